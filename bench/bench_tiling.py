"""Tiling benchmark: read throughput, batched vs one-at-a-time model throughput, peak memory.

Prints:
  (a) tiles/s for read + stretch (+ the model processor's preprocessing) alone;
  (b) tiles/s through a tiny SkyMoE: batch_size=1 looped the way GeoChat's
      scripts do (read a tile, preprocess, generate, next) vs the batched,
      read-ahead path of ``tiling.analyze``, and their ratio;
  (c) peak resident memory (VmHWM) while iterating every tile of a
      20000 x 20000 4-band uint16 raster (tiled, DEFLATE) made in a temp dir;
      measured in a fresh child process that only reads tiles.

Usage: python bench/bench_tiling.py [--size 20000] [--model-raster 2500] [--batch-size 8] [--torch-threads 1]
                                   [--repeats 3] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BLOCK_PX = 512


def make_big_raster(path: Path, size_px: int, bands: int = 4) -> Path:
    """A ``size_px`` square uint16 GeoTIFF (tiled 512, DEFLATE level 1), written block by block."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    yy, xx = np.mgrid[0:BLOCK_PX, 0:BLOCK_PX]
    texture = [(1000 + 400 * k + (xx // 8 * 5 + yy // 8 * 3 + 7 * k) % 256).astype(np.uint16) for k in range(bands)]
    profile = dict(driver="GTiff", width=size_px, height=size_px, count=bands, dtype="uint16", tiled=True,
                   blockxsize=BLOCK_PX, blockysize=BLOCK_PX, compress="DEFLATE", zlevel=1, predictor=2,
                   num_threads="ALL_CPUS", BIGTIFF="IF_SAFER", crs="EPSG:32633",
                   transform=Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0))
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size_px, BLOCK_PX):
            for col in range(0, size_px, BLOCK_PX):
                h, w = min(BLOCK_PX, size_px - row), min(BLOCK_PX, size_px - col)
                shift = np.uint16((row // BLOCK_PX * 7 + col // BLOCK_PX * 3) % 200)
                ds.write(np.stack([t[:h, :w] + shift for t in texture]), window=Window(col, row, w, h))
    return path


def _vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(path: str, batch_size: int) -> None:
    """Child process: iterate every tile of ``path``; print JSON with RSS figures and tiles/s."""
    from tiling import iter_tile_batches, make_grid, open_raster

    raster = open_raster(path)
    grid = make_grid(raster, tile=504, overlap=64)
    baseline_kib = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    start = time.perf_counter()
    tiles = 0
    checksum = 0
    for batch in iter_tile_batches(raster, grid.tiles, batch_size=batch_size):
        tiles += len(batch.tiles)
        checksum += int(batch.images[:, ::64, ::64].sum())
    seconds = time.perf_counter() - start
    print(json.dumps({"tiles": tiles, "seconds": seconds, "baseline_rss_mib": baseline_kib / 1024,
                      "peak_rss_mib": _vm_kib("VmHWM") / 1024, "checksum": checksum,
                      "raster": [raster.width, raster.height, raster.count, raster.dtype]}))


def bench_memory(size_px: int, batch_size: int, workdir: Path) -> dict:
    """(c) and (a, read + stretch): make the big raster, iterate it in a fresh process."""
    start = time.perf_counter()
    path = make_big_raster(workdir / "big.tif", size_px)
    made_s = time.perf_counter() - start
    out = subprocess.run([sys.executable, __file__, "--child-memory", str(path), "--batch-size", str(batch_size)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["make_s"] = made_s
    figures["file_mib"] = path.stat().st_size / 2**20
    path.unlink()
    return figures


def _tiny_model(workdir: Path):
    """A tiny SkyMoE checkpoint written and loaded (quant none), or None when skymoe lacks it."""
    import skymoe
    from skymoe import presets

    if not hasattr(presets, "make_tiny_checkpoint") or not hasattr(skymoe, "load_model"):
        return None
    folder = presets.make_tiny_checkpoint(workdir / "tiny")
    return skymoe.load_model(folder, quant="none", device="cpu")


def bench_preprocess(raster_path: Path, loaded) -> float:
    """(a) with preprocessing: read + stretch + processor(images) tiles/s."""
    from tiling import iter_tile_batches, make_grid, open_raster

    raster = open_raster(raster_path)
    tiles = make_grid(raster, tile=504, overlap=64).tiles
    start = time.perf_counter()
    for batch in iter_tile_batches(raster, tiles, batch_size=8):
        loaded.processor.image_processor(images=list(batch.images), return_tensors="pt")
    return len(tiles) / (time.perf_counter() - start)


def _timed(fn) -> tuple[float, float]:
    """Run ``fn``; returns (wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_model(raster_path: Path, loaded, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """(b) GeoChat-style loop (one tile at a time) vs the batched read-ahead path of analyze, same tiles.

    The two are run alternately ``repeats`` times and the best (least disturbed) time of each is
    kept, because the machine is shared; CPU time is reported beside wall time.
    """
    import rasterio
    import skymoe

    from tiling import analyze, make_grid, open_raster, read_tile

    raster = open_raster(raster_path)
    tiles = make_grid(raster, tile=504, overlap=64).tiles
    prompt = skymoe.build_prompt("count", "small vehicle")

    def loop() -> None:
        with rasterio.open(raster.path) as ds:
            for tile in tiles:  # GeoChat's scripts: one image, one prompt, one generate call
                image, _ = read_tile(ds, raster, tile)
                skymoe.generate(loaded.model, loaded.processor, [image], [prompt], max_new_tokens=max_new_tokens,
                                batch_size=1)

    results = []

    def batched() -> None:
        results.append(analyze(raster, "count", "small vehicle", model=loaded, batch_size=batch_size,
                               max_new_tokens=max_new_tokens))

    loop_runs, batched_runs = [], []
    for _ in range(repeats):
        loop_runs.append(_timed(loop))
        batched_runs.append(_timed(batched))
    assert results[-1].tiles_done == len(tiles)
    best_loop = min(loop_runs)
    best_batched = min(batched_runs)
    return {"tiles": len(tiles), "loop_runs": loop_runs, "batched_runs": batched_runs,
            "loop_tps": len(tiles) / best_loop[0], "batched_tps": len(tiles) / best_batched[0],
            "loop_cpu_tps": len(tiles) / best_loop[1], "batched_cpu_tps": len(tiles) / best_batched[1],
            "timings": results[-1].timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the memory-test raster (px)")
    parser.add_argument("--model-raster", type=int, default=2500, help="side (px) of the raster for (b): 36 tiles")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of (b); the best of each is kept")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for (b); 1 by default: on a shared 2-core machine two "
                             "spinning OpenMP threads make both paths several times slower and the figures noisy")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        memory_child(args.child_memory, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.skip_memory:
            mem = bench_memory(args.size, args.batch_size, workdir)
            print(f"(c) {mem['raster']} raster ({mem['file_mib']:.0f} MiB on disk, made in {mem['make_s']:.1f} s): "
                  f"{mem['tiles']} tiles iterated, peak RSS {mem['peak_rss_mib']:.0f} MiB "
                  f"(baseline after imports {mem['baseline_rss_mib']:.0f} MiB)")
            print(f"(a) read + stretch: {mem['tiles'] / mem['seconds']:.1f} tiles/s "
                  f"({mem['tiles']} tiles of 504 px, 3 of 4 uint16 bands, {mem['seconds']:.1f} s)")
        import torch

        torch.set_num_threads(args.torch_threads)
        small = make_big_raster(workdir / "small.tif", args.model_raster)
        loaded = _tiny_model(workdir)
        if loaded is None:
            print("(b) skipped: skymoe.presets.make_tiny_checkpoint / skymoe.load_model not available")
            return
        print(f"(a) read + stretch + processor: {bench_preprocess(small, loaded):.1f} tiles/s")
        fig = bench_model(small, loaded, args.batch_size, args.max_new_tokens, args.repeats)
        print(f"(b) tiny model, {fig['tiles']} tiles, max_new_tokens={args.max_new_tokens}, "
              f"torch threads {args.torch_threads}, best of {args.repeats}: "
              f"batch_size=1 loop {fig['loop_tps']:.2f} tiles/s vs batched (batch_size={args.batch_size}, read-ahead) "
              f"{fig['batched_tps']:.2f} tiles/s: ratio {fig['batched_tps'] / fig['loop_tps']:.2f}x wall, "
              f"{fig['batched_cpu_tps'] / fig['loop_cpu_tps']:.2f}x CPU time")
        print("    runs (wall s, CPU s): loop " + ", ".join(f"({w:.1f}, {c:.1f})" for w, c in fig["loop_runs"])
              + "; batched " + ", ".join(f"({w:.1f}, {c:.1f})" for w, c in fig["batched_runs"]))
        print("    batched timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in fig["timings"].items()))


if __name__ == "__main__":
    main()
