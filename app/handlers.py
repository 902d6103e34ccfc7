"""Event handlers for opening rasters, the area of interest, results, export and the model.

Handlers take and return plain values plus the per-user :class:`~app.session.Session`; the
layout (app/layout.py) wires them. They call ``tiling``/``skymoe`` and hold no model or geo math.
Coordinates from the map are lon/lat degrees, bounds ``(west, south, east, north)``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import tiling
from tiling.aoi import AOI, parse_aoi_text
from tiling.errors import AOIError, MissingCRSError, TilingError

from app.errors import user_facing
from app.map_component import MapState, map_value
from app.server import PreviewStore
from app.session import Session
from app.settings import AppSettings
from app.state import ModelHolder

__all__ = [
    "BAND_CHOICES", "EXPORT_FORMATS", "load_raster", "open_session", "open_default_raster", "on_aoi", "on_tile_select",
    "parse_aoi", "selected_text", "grid_layer", "select_result_row", "export_result", "load_model", "model_report",
    "detections_table", "counts_table",
]

logger = logging.getLogger(__name__)

BAND_CHOICES = ["auto", *tiling.BAND_PRESETS, "custom"]
EXPORT_FORMATS = {
    "GeoJSON (EPSG:4326)": ".geojson",
    "GeoPackage (native CRS)": ".gpkg",
    "CSV (counts)": ".csv",
    "HTML map": ".html",
}
DETECTION_COLUMNS = ["row", "label", "score", "tile_id", "area_m2"]


def _bands_arg(choice: str, custom: str) -> tuple[int, ...] | str | None:
    """The ``bands`` argument of ``tiling.open_raster`` for the UI's band controls."""
    if choice in ("", "auto", None):
        return None
    if choice != "custom":
        return choice
    try:
        bands = tuple(int(part) for part in custom.replace(" ", "").split(",") if part)
    except ValueError as err:
        raise ValueError(f"Custom bands {custom!r} are not 1-based band numbers like '4,3,2'.") from err
    if len(bands) not in (1, 3):
        raise ValueError(f"Custom bands {custom!r}: give 1 band (grey) or 3 bands (red,green,blue).")
    return bands


def _resolve_source(upload: str | None, server_path: str, settings: AppSettings) -> Path:
    """The raster file: the upload if any, else a server path inside the allowed folders."""
    if upload:
        return Path(upload)
    if not server_path or not server_path.strip():
        raise ValueError("No raster given: upload a GeoTIFF or type the path of one on the server.")
    path = Path(server_path.strip()).expanduser().resolve()
    allowed = [Path(d).resolve() for d in settings.allowed_dirs]
    if not any(path.is_relative_to(folder) for folder in allowed):
        raise ValueError(
            f"{path} is outside the folders this app may read ({', '.join(map(str, allowed))}); "
            "upload the file instead, or restart the app with --allow-dir."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No file at {path}.")
    return path


def parse_aoi(text: str) -> AOI | None:
    """The area of interest typed or drawn: ``"west,south,east,north"`` lon/lat (or ``...@CRS``)."""
    if not text or not text.strip():
        return None
    aoi = parse_aoi_text(text.strip())
    if not isinstance(aoi, AOI):
        raise AOIError(f"Area of interest {text!r}: give four numbers west,south,east,north in degrees.")
    return aoi


def _aoi_bounds(aoi: AOI | None) -> list[float] | None:
    """Bounds of a lon/lat AOI for the map, or None when there is none or it is not lon/lat."""
    if aoi is None or str(aoi.crs).upper() not in ("EPSG:4326", "OGC:CRS84"):
        return None
    return [float(v) for v in aoi.geometry.bounds]


def grid_layer(session: Session, tile: int, overlap: int, aoi: AOI | None) -> Session:
    """``session`` with the tile grid (for ``tile``/``overlap``/``aoi``) computed and on the map.

    The tile selection survives only when the grid's tiles are unchanged (tile ids stay valid).
    """
    grid = tiling.make_grid(session.raster, tile=tile, overlap=overlap, aoi=aoi)
    if session.grid is not None and session.grid.tiles == grid.tiles:
        return session.replace(grid=grid, map=session.map.replace(aoi=_aoi_bounds(aoi)))
    outlines = None if session.raster.pixel_mode else tiling.grid_geojson(session.raster, grid)
    shown = session.map.replace(grid=outlines, aoi=_aoi_bounds(aoi), selected=None)
    return session.replace(grid=grid, map=shown)


def selected_text(session: Session) -> str:
    """The "Selected tile" box's text for ``session`` ("" when none is selected)."""
    return "" if session.map.selected is None else str(session.map.selected)


def _raster_info(raster: Any, name: str, grid: Any) -> str:
    """Markdown summary of an opened raster."""
    crs = "none (pixel mode)" if raster.crs is None else raster.crs.to_string()
    gsd = "n/a" if raster.gsd_m is None else f"{raster.gsd_m:.2f} m"
    stretch = ", ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(raster.lows, raster.highs))
    return (
        f"**{name}**: {raster.width} x {raster.height} px, {raster.count} band(s) {raster.dtype}, "
        f"CRS {crs}, GSD {gsd}\n\nDisplay bands {list(raster.band_indexes)} ({raster.band_preset}), "
        f"stretch {stretch}; {len(grid.tiles)} tiles, {grid.skipped_nodata} skipped as nodata."
    )


def _open(path: Path, bands: Any, low: float, high: float, pixel_mode: bool) -> Any:
    try:
        return tiling.open_raster(path, bands=bands, stretch=(float(low), float(high)), pixel_mode=pixel_mode)
    except MissingCRSError as err:
        raise MissingCRSError(
            f"{path.name} has no coordinate reference system or geotransform ({err}). Tick "
            "'Pixel coordinates (no CRS)' and load it again to analyse it in pixel coordinates."
        ) from err


def open_session(path: Path, name: str, bands: Any, stretch: tuple[float, float], pixel_mode: bool,
                 grid: tuple[int, int], previews: PreviewStore) -> tuple[Session, str]:
    """Open ``path`` into a fresh session with its preview and tile grid; returns it and its info."""
    raster = _open(path, bands, stretch[0], stretch[1], pixel_mode)
    overlay, message = None, ""
    if raster.pixel_mode:
        message = f"{name} has no CRS: analysed in pixel coordinates; the map cannot place it."
    else:
        preview = tiling.render_preview(raster)
        overlay = {"url": previews.put(preview.png_bytes), "bounds": list(preview.bounds_lonlat), "name": name}
    session = Session(raster=raster, name=name, map=MapState(overlay=overlay, message=message))
    session = grid_layer(session, grid[0], grid[1], None)
    return session, _raster_info(raster, name, session.grid)


@user_facing("loading the raster")
def load_raster(upload: str | None, server_path: str, band_choice: str, custom_bands: str,
                stretch_low: float, stretch_high: float, pixel_mode: bool, tile: int, overlap: int,
                *, settings: AppSettings, previews: PreviewStore) -> tuple[Session, str, str, str]:
    """Open the uploaded (or server-side) raster: returns (session, map value, info, selected tile)."""
    path = _resolve_source(upload, server_path, settings)
    name = path.name
    session, info = open_session(path, name, _bands_arg(band_choice, custom_bands),
                                 (stretch_low, stretch_high), bool(pixel_mode), (int(tile), int(overlap)), previews)
    logger.info("opened %s", path)
    return session, map_value(session.map), info, selected_text(session)


def open_default_raster(settings: AppSettings, previews: PreviewStore) -> tuple[Session, str]:
    """The session shown at start: the default raster if it opens, else an empty map with a note."""
    raster_path = settings.raster
    if raster_path is None:
        return Session(), "No raster loaded yet: upload a GeoTIFF."
    if not Path(raster_path).is_file():
        note = f"The sample scene {raster_path} is missing: upload a GeoTIFF."
        return Session(map=MapState(message=note)), note
    try:
        return open_session(Path(raster_path), Path(raster_path).name, None, (2, 98), False, (504, 64), previews)
    except (TilingError, ValueError) as err:
        logger.warning("cannot open the default raster %s: %s", raster_path, err)
        note = f"The default raster {raster_path} could not be opened ({err}): upload a GeoTIFF."
        return Session(map=MapState(message=note)), note


def on_aoi(session: Session, evt: gr.EventData) -> tuple[Session, str, str]:
    """A rectangle was drawn (or cleared) on the map: returns (session, AOI text, scope)."""
    data = evt._data or {}
    if data.get("west") is None:
        return session.replace(map=session.map.replace(aoi=None)), "", "Whole scene"
    bounds = [float(data[k]) for k in ("west", "south", "east", "north")]
    text = ",".join(f"{v:.6f}" for v in bounds)
    return session.replace(map=session.map.replace(aoi=bounds)), text, "Area of interest"


def on_tile_select(session: Session, evt: gr.EventData) -> tuple[Session, str]:
    """A grid tile was clicked: remember it for Chat and Routing; returns (session, its id)."""
    session = session.replace(map=session.map.replace(selected=int((evt._data or {})["tile_id"])))
    return session, selected_text(session)


def detections_table(result: Any) -> pd.DataFrame:
    """One row per detection, in the order of the map's features (``row`` = feature index)."""
    if result is None or len(result.detections) == 0:
        return pd.DataFrame(columns=DETECTION_COLUMNS)
    table = pd.DataFrame(result.detections.drop(columns="geometry"))
    table.insert(0, "row", range(len(table)))
    return table[[c for c in DETECTION_COLUMNS if c in table.columns]].round({"score": 3, "area_m2": 1})


def counts_table(result: Any) -> pd.DataFrame:
    """Detections per label."""
    counts = {} if result is None else result.counts
    return pd.DataFrame({"label": list(counts), "count": list(counts.values())})


def select_result_row(session: Session, evt: gr.SelectData) -> tuple[Session, str]:
    """A results-table row was clicked: zoom the map to that detection."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    session = session.replace(map=session.map.focus_row(int(row)))
    return session, map_value(session.map)


@user_facing("exporting the results")
def export_result(session: Session, fmt: str) -> str:
    """Write the last result as ``fmt`` (a key of :data:`EXPORT_FORMATS`); returns the file path.

    Nothing is left behind when writing fails.
    """
    if session.result is None:
        raise ValueError("Nothing to export yet: run an analysis first.")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}.")
    folder = Path(tempfile.mkdtemp(prefix="skymoe-export-"))
    path = folder / f"{Path(session.name).stem or 'scene'}_results{EXPORT_FORMATS[fmt]}"
    try:
        if path.suffix == ".html":
            tiling.export_html_map(session.result, session.raster, path)
        else:
            tiling.export(session.result, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.info("exported %s", path)
    return str(path)


def model_report(holder: ModelHolder) -> str:
    """Markdown for the Model tab: what is loaded, or what is missing and how to get it."""
    status = holder.status
    lines = []
    if status.loaded and status.summary is not None:
        s = status.summary
        lines.append(
            f"**Loaded** `{status.path}` in {status.load_seconds:.1f} s: {s.total_params / 1e6:.1f} M parameters, "
            f"{s.active_params_per_token / 1e6:.1f} M active per token, {s.num_experts} experts in MoE layers "
            f"{list(s.moe_layers)}; quantization **{s.quantization}**, device {s.device}, dtype {s.dtype}."
        )
    elif status.loading:
        lines.append(f"Loading `{status.path}` ...")
    else:
        lines.append("**No model loaded.**")
    if status.error:
        lines.append(f"⚠️ {status.error}")
    lines += [f"⚠️ {notice}" for notice in status.notices]
    return "\n\n".join(lines)


@user_facing("loading the model")
def load_model(path: str, quant: str, device: str, *, holder: ModelHolder) -> str:
    """Load the checkpoint folder ``path`` (Model tab); returns the Model tab's report."""
    if not path or not path.strip():
        raise ValueError("Type the checkpoint folder to load.")
    status = holder.load(path.strip(), quant=quant, device=device)
    for notice in status.notices:
        gr.Warning(notice)
    return model_report(holder)
