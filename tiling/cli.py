"""Command line: ``python -m tiling analyze RASTER --task count --query "small vehicle" ...``.

Exit status: 0 on success, 2 on bad input (a clear message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skymoe.errors import CheckpointError

from tiling.errors import ModelNotFoundError, ParameterError, TilingError

__all__ = ["DEFAULT_MODEL", "build_parser", "main"]

logger = logging.getLogger(__name__)

#: The demo checkpoint shipped with the repository.
DEFAULT_MODEL = Path("assets/skymoe-demo")
TASK_CHOICES = ("caption", "classify", "vqa", "ground", "count")


def build_parser() -> argparse.ArgumentParser:
    """The ``tiling`` argument parser (one sub-command: ``analyze``)."""
    parser = argparse.ArgumentParser(prog="python -m tiling", description="Run SkyMoE over a GeoTIFF, tile by tile.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("analyze", help="analyse a raster and print/export georeferenced answers")
    run.add_argument("raster", type=Path, help="GeoTIFF / VRT / any GDAL raster")
    run.add_argument("--task", choices=TASK_CHOICES, default="count")
    run.add_argument("--query", action="append",
                     help="class to count, expression to ground, or question (vqa); repeat it to run several in one "
                          "pass (each tile read and encoded once), e.g. --query car --query truck")
    run.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    run.add_argument("--quant", choices=("4bit", "8bit", "none"), default="4bit")
    run.add_argument("--device", default="auto")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 helps on a busy machine)")
    run.add_argument("--aoi", help="minx,miny,maxx,maxy[@CRS] (default lon/lat; @pixel for pixels) or a vector file")
    run.add_argument("--bands", help="preset (rgb, sentinel2, landsat8, naip, gray) or indexes like 4,3,2")
    run.add_argument("--stretch", default="2,98", help="low,high percentiles (default 2,98)")
    run.add_argument("--tile", type=int, default=504)
    run.add_argument("--overlap", type=int, default=64)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--out", type=Path, help="write results: .geojson, .gpkg, .csv or .html; with several --query, "
                                              "one file per query: NAME_<query>.EXT")
    run.add_argument("--pixel-mode", action="store_true", help="accept a raster without CRS; output in pixels")
    run.add_argument("-v", "--verbose", action="store_true")
    return parser


def _bands(text: str | None) -> Any:
    """``--bands`` as a preset name or a list of ints."""
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",")]
    if all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return text.strip()


def _stretch(text: str) -> tuple[float, float]:
    """``--stretch low,high``."""
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError as exc:
        raise ParameterError(f"--stretch {text!r}: give two percentiles like 2,98") from exc
    return low, high


def _aoi(text: str | None) -> Any:
    """``--aoi`` as an AOI, or a GeoDataFrame read from a vector file."""
    if not text:
        return None
    from tiling.aoi import parse_aoi_text

    parsed = parse_aoi_text(text)
    if isinstance(parsed, str):
        import geopandas as gpd

        return gpd.read_file(parsed)
    return parsed


def _load(args: argparse.Namespace) -> Any:
    """Load the model, or explain why it cannot be."""
    if not args.model.is_dir():
        raise ModelNotFoundError(
            f"model folder {args.model} not found; pass --model DIR (a SkyMoE or converted LLaVA folder "
            f"with config.json and *.safetensors); the demo model lives in {DEFAULT_MODEL} once it has been built"
        )
    import skymoe

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return skymoe.load_model(args.model, quant=args.quant, device=args.device)


def _run(args: argparse.Namespace) -> int:
    """The ``analyze`` command."""
    from tqdm import tqdm

    from tiling.analysis import iter_analyze, iter_analyze_queries
    from tiling.raster import open_raster

    if args.out is not None:  # refuse a bad --out before the analysis, not after it
        from tiling.export import check_export_path

        check_export_path(args.out)
    raster = open_raster(args.raster, bands=_bands(args.bands), stretch=_stretch(args.stretch),
                         pixel_mode=args.pixel_mode)
    aoi = _aoi(args.aoi)
    loaded = _load(args)
    queries = args.query or [None]
    options = dict(model=loaded, aoi=aoi, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens)
    if len(queries) == 1:
        updates = ({queries[0]: u} for u in iter_analyze(raster, args.task, queries[0], **options))
    else:
        updates = iter_analyze_queries(raster, args.task, queries, **options)
    last = None
    with tqdm(desc="tiles", unit="tile") as bar:
        for last in updates:
            first = next(iter(last.values()))
            bar.total = first.tiles_total
            bar.update(first.tiles_done - bar.n)
    if last is None:
        print("No tile to analyse: every tile is nodata or outside the AOI.")
        return 0
    for query, update in last.items():
        _print_summary(raster, update.result_so_far)
        if args.out is not None:
            out = args.out if len(last) == 1 else args.out.with_name(f"{args.out.stem}_{_slug(query)}{args.out.suffix}")
            _write(update.result_so_far, raster, out)
            print(f"wrote {out}")
    return 0


def _slug(query: str) -> str:
    """A file-name-safe form of a query (``"small vehicle"`` -> ``"small_vehicle"``)."""
    return "".join(c if c.isalnum() else "_" for c in query.lower()).strip("_")[:60] or "query"


def _write(result: Any, raster: Any, out: Path) -> None:
    """Export by extension (``.html`` gives a folium map)."""
    from tiling.export import export, export_html_map

    if out.suffix.lower() == ".html":
        export_html_map(result, raster, out)
    else:
        export(result, out)


def _print_summary(raster: Any, result: Any) -> None:
    """Human-readable summary on stdout."""
    crs = "none (pixel mode)" if raster.crs is None else raster.crs.to_string()
    print(f"raster   {raster.path} ({raster.width}x{raster.height} px, {raster.count} bands {raster.dtype}, CRS {crs})")
    print(f"tiles    {result.tiles_done} run, {result.tiles_skipped_nodata} skipped as nodata")
    print(f"task     {result.task}" + (f" ({result.query})" if result.query else ""))
    if result.counts:
        print("counts   " + ", ".join(f"{k}: {v}" for k, v in sorted(result.counts.items())))
    print(f"boxes    {len(result.detections)} after merging")
    print(f"answer   {result.scene_answer}")
    print("timings  " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (TilingError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
