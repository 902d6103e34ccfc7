"""Run a task over a whole raster: tiles -> SkyMoE -> georeferenced, merged answers.

Flow per batch: the read-ahead thread hands stretched tiles (tiles without a
single valid pixel are never sent to the model); the model answers them in
one batched ``skymoe.generate`` call; each answer is parsed in tile pixels,
boxes mostly over nodata (< 50 % valid pixels) or outside the AOI are
dropped, and the rest become raster-pixel detections. After every batch the
scene result is rebuilt: class-aware NMS across tiles (:mod:`tiling.merge`),
polygons in the raster CRS, counts, scene answer (:mod:`tiling.compose`).

Counting (``task="count"``) prompts the count task on every tile. Tiles whose
answer holds boxes contribute boxes (merged by NMS, counted once); tiles that
answer only an integer contribute that integer weighted by the share of the
tile they own (:func:`tiling.merge.ownership_weighted_count`), so overlaps are
not counted twice. ``counts[query] = merged boxes + round(weighted integers)``.
For ``classify`` and ``vqa`` ``counts`` holds the number of tiles per answer.

Several queries of one task (counting several classes, grounding several expressions, several
questions) run in one pass with :func:`analyze_queries`: each batch of tiles is read once and its
image prefix encoded once (:class:`skymoe.TilePrefix`), then every query is asked of it, so a
further query costs only its own text and answer, not the 324-1296 image tokens again. The
results equal one :func:`analyze` per query (same greedy answers).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
from rasterio.crs import CRS
from shapely.geometry import Point

import skymoe
from tiling.compose import compose_scene_answer, normalise_answer
from tiling.errors import ParameterError
from tiling.georef import areas_m2, px_to_crs, tile_box_to_raster_px, tile_footprint_crs
from tiling.merge import Detection, box_valid_share, nms, ownership_weighted_count
from tiling.raster import Raster, open_raster
from tiling.reading import TileBatch, iter_tile_batches
from tiling.windows import Tile, TileGrid, Units, make_grid

__all__ = [
    "DETECTION_COLUMNS",
    "MIN_VALID_SHARE",
    "TileAnswer",
    "SceneResult",
    "AnalysisUpdate",
    "iter_analyze",
    "analyze",
    "iter_analyze_queries",
    "analyze_queries",
]

logger = logging.getLogger(__name__)

#: Columns of ``SceneResult.detections`` (plus ``geometry``).
DETECTION_COLUMNS = ["label", "score", "task", "query", "tile_id", "area_m2"]

#: Boxes with a smaller share of valid pixels are dropped as lying over nodata.
MIN_VALID_SHARE = 0.5

ProgressFn = Callable[[int, int], Any]


@dataclass(frozen=True)
class TileAnswer:
    """One tile's answer.

    Attributes:
        tile_id: The tile.
        bounds_crs: ``(left, bottom, right, top)`` of the tile's footprint in
            the raster CRS (pixels in pixel mode).
        text: The raw model answer.
        confidence: exp(mean token log-probability), in (0, 1].
        answer: The parsed, readable answer (caption, class, count, ...).
        count: The integer the tile answered (count task), if any.
        n_boxes: Boxes kept from this tile before cross-tile merging.
    """

    tile_id: int
    bounds_crs: tuple[float, float, float, float]
    text: str
    confidence: float
    answer: str = ""
    count: int | None = None
    n_boxes: int = 0


@dataclass
class SceneResult:
    """Everything one run produced.

    Attributes:
        detections: One row per merged box: ``label, score, task, query,
            tile_id, area_m2, geometry`` (polygon in ``crs``).
        counts: Per label (see the module docstring for each task).
        tile_answers: Per-tile answers in tile order.
        scene_answer: One sentence for the scene (rules in :mod:`tiling.compose`).
        timings: Seconds: ``open``, ``grid``, ``read`` (reader thread),
            ``wait`` (model waiting for tiles), ``model``, ``merge``, ``total``.
        crs: The raster CRS (``None`` in pixel mode).
        tiles_total: Tiles of the grid (after skipping nodata tiles).
        tiles_skipped_nodata: Tiles skipped as (mostly) nodata.
        task: Task key.
        query: The query.
        tiles_done: Tiles answered so far.
    """

    detections: gpd.GeoDataFrame
    counts: dict[str, int]
    tile_answers: list[TileAnswer]
    scene_answer: str
    timings: dict[str, float]
    crs: CRS | None
    tiles_total: int
    tiles_skipped_nodata: int
    task: str = ""
    query: str | None = None
    tiles_done: int = 0


@dataclass(frozen=True)
class AnalysisUpdate:
    """Progress after one batch.

    Attributes:
        tiles_done: Tiles processed so far (answered or found all-nodata).
        tiles_total: Tiles of the grid.
        new_detections: This batch's boxes that survive merging so far
            (a later, better box may still replace one: ``result_so_far`` is
            authoritative).
        result_so_far: The scene result over every tile processed so far.
    """

    tiles_done: int
    tiles_total: int
    new_detections: gpd.GeoDataFrame
    result_so_far: SceneResult


@dataclass
class _Run:
    """Mutable state of one run (private to :func:`iter_analyze`)."""

    raster: Raster
    grid: TileGrid
    task: str
    query: str | None
    detections: list[Detection] = field(default_factory=list)
    answers: list[TileAnswer] = field(default_factory=list)
    integer_counts: list[tuple[Tile, int]] = field(default_factory=list)
    skipped_empty: int = 0
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("open", "grid", "read", "wait", "model", "merge", "total"), 0.0))

    @property
    def label(self) -> str:
        """Label of boxes: the normalised query (or the task name without one)."""
        return normalise_answer(self.query) if self.query else self.task


def iter_analyze(
    raster_or_path: Raster | str | Path,
    task: str,
    query: str | None = None,
    model: Any = None,
    aoi: Any = None,
    tile: int = 504,
    overlap: int = 64,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    bands: Any = None,
    stretch: tuple[float, float] | None = (2, 98),
    pixel_mode: bool = False,
    max_new_tokens: int = 64,
    max_nodata: float = 0.9,
    iou_threshold: float = 0.5,
    units: Units | str = Units.PIXELS,
) -> Iterator[AnalysisUpdate]:
    """Run ``task`` over every tile, yielding the result so far after each batch.

    Closing the generator stops the reader thread after the batch in flight.

    Args:
        raster_or_path: An opened :class:`Raster`, or a path (then ``bands``,
            ``stretch`` and ``pixel_mode`` are used to open it).
        task: One of ``skymoe.TASKS`` (caption, classify, vqa, ground, count).
        query: Class to count, expression to ground, or question (vqa).
        model: ``skymoe.LoadedModel`` ``(model, processor)``.
        aoi: Area of interest (any form of :func:`tiling.aoi.aoi_to_pixels`).
        tile: Tile size (px).
        overlap: Overlap between tiles (px).
        batch_size: Tiles per model call.
        progress: Called as ``progress(tiles_done, tiles_total)`` after each batch.
        bands: Band choice when opening a path (see :func:`tiling.open_raster`).
        stretch: Percentile stretch when opening a path.
        pixel_mode: Accept a raster without CRS (results in pixels).
        max_new_tokens: Generation budget per tile.
        max_nodata: Skip tiles with a larger nodata share.
        iou_threshold: NMS IoU threshold.
        units: Unit of ``tile`` and ``overlap`` (``"px"`` or ``"m"``).

    Yields:
        One :class:`AnalysisUpdate` per batch (none when no tile is left to run).

    Raises:
        ParameterError: Unknown task, missing query or model, bad batch size.
        TilingError: Raster, AOI or grid errors (see :func:`open_raster`, :func:`make_grid`).
    """
    runs, prompts = _prepare(raster_or_path, task, [query], model, aoi, tile, overlap, batch_size, bands, stretch,
                             pixel_mode, max_nodata, units)
    for updates in _iterate(runs, model, prompts, batch_size, max_new_tokens, iou_threshold, progress):
        yield updates[0]


def analyze(
    raster_or_path: Raster | str | Path,
    task: str,
    query: str | None = None,
    model: Any = None,
    aoi: Any = None,
    tile: int = 504,
    overlap: int = 64,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    bands: Any = None,
    stretch: tuple[float, float] | None = (2, 98),
    pixel_mode: bool = False,
    max_new_tokens: int = 64,
    max_nodata: float = 0.9,
    iou_threshold: float = 0.5,
    units: Units | str = Units.PIXELS,
) -> SceneResult:
    """Run ``task`` over the raster and return the final :class:`SceneResult`.

    Arguments and errors as :func:`iter_analyze`; with no tile to run (all
    nodata), the result is empty.
    """
    runs, prompts = _prepare(raster_or_path, task, [query], model, aoi, tile, overlap, batch_size, bands, stretch,
                             pixel_mode, max_nodata, units)
    return _final_results(runs, model, prompts, batch_size, max_new_tokens, iou_threshold, progress)[0]


def iter_analyze_queries(
    raster_or_path: Raster | str | Path,
    task: str,
    queries: Sequence[str],
    model: Any = None,
    aoi: Any = None,
    tile: int = 504,
    overlap: int = 64,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    bands: Any = None,
    stretch: tuple[float, float] | None = (2, 98),
    pixel_mode: bool = False,
    max_new_tokens: int = 64,
    max_nodata: float = 0.9,
    iou_threshold: float = 0.5,
    units: Units | str = Units.PIXELS,
) -> Iterator[dict[str, AnalysisUpdate]]:
    """Run several queries of ``task`` in one pass, yielding each query's progress after each batch.

    Every batch of tiles is read once and its image prefix encoded once; each query is then
    asked of it (module docstring). Arguments as :func:`iter_analyze`, with ``queries`` the
    classes to count, expressions to ground or questions (distinct, non-empty).

    Yields:
        ``{query: AnalysisUpdate}`` per batch, in the order of ``queries``.

    Raises:
        ParameterError: As :func:`iter_analyze`; also no query, a repeated query, or a task
            that takes no query (caption, classify: one :func:`analyze` answers them).
    """
    queries = _check_queries(task, queries)
    runs, prompts = _prepare(raster_or_path, task, queries, model, aoi, tile, overlap, batch_size, bands, stretch,
                             pixel_mode, max_nodata, units)
    for updates in _iterate(runs, model, prompts, batch_size, max_new_tokens, iou_threshold, progress):
        yield dict(zip(queries, updates))


def analyze_queries(
    raster_or_path: Raster | str | Path,
    task: str,
    queries: Sequence[str],
    model: Any = None,
    aoi: Any = None,
    tile: int = 504,
    overlap: int = 64,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    bands: Any = None,
    stretch: tuple[float, float] | None = (2, 98),
    pixel_mode: bool = False,
    max_new_tokens: int = 64,
    max_nodata: float = 0.9,
    iou_threshold: float = 0.5,
    units: Units | str = Units.PIXELS,
) -> dict[str, SceneResult]:
    """Several queries of ``task`` in one pass; returns ``{query: SceneResult}``.

    Each result equals :func:`analyze` with that query. Arguments and errors as
    :func:`iter_analyze_queries`.
    """
    queries = _check_queries(task, queries)
    runs, prompts = _prepare(raster_or_path, task, queries, model, aoi, tile, overlap, batch_size, bands, stretch,
                             pixel_mode, max_nodata, units)
    return dict(zip(queries, _final_results(runs, model, prompts, batch_size, max_new_tokens, iou_threshold, progress)))


def _final_results(runs: list[_Run], model: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
                   iou_threshold: float, progress: ProgressFn | None) -> list[SceneResult]:
    """Run the whole pass; one final result per run (empty results when no tile was left to run)."""
    last = None
    for last in _iterate(runs, model, prompts, batch_size, max_new_tokens, iou_threshold, progress):
        pass
    if last is None:
        return [_result(run, 0, iou_threshold)[0] for run in runs]
    return [update.result_so_far for update in last]


def _check_queries(task: str, queries: Sequence[str]) -> list[str]:
    """The queries of a multi-query run, validated (see :func:`iter_analyze_queries`)."""
    if isinstance(queries, str):
        raise ParameterError(f"queries must be a list of strings, got the string {queries!r}: wrap it in a list")
    queries = [q.strip() if isinstance(q, str) else q for q in queries]
    if not queries:
        raise ParameterError("no query given: pass at least one class, expression or question")
    if task in ("caption", "classify"):
        raise ParameterError(f"the {task} task takes no query; use analyze(raster, {task!r}, model=...)")
    repeated = sorted({q for q in queries if queries.count(q) > 1})
    if repeated:
        raise ParameterError(f"repeated queries {repeated}: give each class, expression or question once")
    return queries


def _prepare(raster_or_path, task, queries, model, aoi, tile, overlap, batch_size, bands, stretch, pixel_mode,
             max_nodata, units) -> tuple[list[_Run], list[str]]:
    """Validate, open the raster and cut the grid once; returns one run state and prompt per query."""
    start = time.perf_counter()
    prompts = [_check_request(task, query, model, batch_size) for query in queries]
    raster = raster_or_path if isinstance(raster_or_path, Raster) else open_raster(
        raster_or_path, bands=bands, stretch=stretch, pixel_mode=pixel_mode)
    opened = time.perf_counter()
    grid = make_grid(raster, tile=tile, overlap=overlap, aoi=aoi, max_nodata=max_nodata, units=units)
    runs = [_Run(raster, grid, task, query, started=start) for query in queries]
    for run in runs:
        run.timings["open"] = opened - start
        run.timings["grid"] = time.perf_counter() - opened
    return runs, prompts


def _iterate(runs: list[_Run], model: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
             iou_threshold: float, progress: ProgressFn | None) -> Iterator[list[AnalysisUpdate]]:
    """The batch loop shared by every query (stops the reader when closed); one update per run.

    The reader, the wait for tiles and the model time are shared: each run's ``timings`` holds
    the pass's figures, its ``merge`` only its own merging.
    """
    done, total = 0, len(runs[0].grid.tiles)
    batches = iter_tile_batches(runs[0].raster, runs[0].grid.tiles, batch_size=batch_size)
    shared = dict.fromkeys(("read", "wait", "model"), 0.0)
    try:
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            shared["wait"] += time.perf_counter() - waited
            if batch is None:
                return
            shared["read"] += batch.read_s
            before = [len(run.detections) for run in runs]
            shared["model"] += _run_batch(runs, batch, model, prompts, max_new_tokens, batch_size)
            done += len(batch.tiles)
            updates = []
            for run, first_new in zip(runs, before):
                run.timings.update(shared, total=time.perf_counter() - run.started)
                result, kept = _result(run, done, iou_threshold)
                updates.append(AnalysisUpdate(done, total, kept[kept["_index"] >= first_new].drop(columns="_index"),
                                              result))
            if progress is not None:
                progress(done, total)
            yield updates
    finally:
        batches.close()


def _check_request(task: str, query: str | None, model: Any, batch_size: int) -> str:
    """Validate the request before any pixel is read; returns the prompt."""
    if task not in skymoe.TASKS:
        raise ParameterError(f"unknown task {task!r}; choose one of {sorted(skymoe.TASKS)}")
    if model is None:
        raise ParameterError("no model given: pass model=skymoe.load_model(DIR) (a LoadedModel)")
    if int(batch_size) < 1:
        raise ParameterError(f"batch_size must be at least 1, got {batch_size}")
    try:
        return skymoe.build_prompt(task, query)
    except ValueError as exc:
        raise ParameterError(f"cannot build the {task} prompt: {exc}") from exc


def _run_batch(runs: list[_Run], batch: TileBatch, model: Any, prompts: list[str], max_new_tokens: int,
               batch_size: int) -> float:
    """Send the batch's non-empty tiles to the model, record every run's answers; returns model seconds.

    One query: one batched :func:`skymoe.generate`. Several: the tiles' image prefix is encoded
    once (:class:`skymoe.TilePrefix`) and each query asked of it.
    """
    has_data = batch.valid.any(axis=(1, 2))  # (batch,)
    for run in runs:
        run.skipped_empty += int((~has_data).sum())
    picked = np.flatnonzero(has_data)
    if picked.size == 0:
        return 0.0
    started = time.perf_counter()
    images = [batch.images[i] for i in picked]  # (tile, tile, 3) uint8 each
    if len(runs) == 1:
        answers = [skymoe.generate(model.model, model.processor, images, [prompts[0]] * len(images),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)]
    else:
        prefix = skymoe.TilePrefix(model.model, model.processor, images)
        answers = [prefix.ask(prompt, max_new_tokens=max_new_tokens) for prompt in prompts]
    seconds = time.perf_counter() - started
    for run, generations in zip(runs, answers):
        for i, gen in zip(picked, generations):
            _record(run, batch.tiles[i], batch.valid[i], gen.text, float(gen.confidence))
    return seconds


def _record(run: _Run, tile: Tile, valid: np.ndarray, text: str, confidence: float) -> None:
    """Parse one tile's answer into detections, an integer count and a TileAnswer."""
    parsed = skymoe.parse_answer(run.task, text, (tile.width_px, tile.height_px))
    kept = 0
    for box in parsed.boxes if run.task in ("ground", "count") else []:
        envelope = (box.x1_px, box.y1_px, box.x2_px, box.y2_px)
        if box_valid_share(envelope, valid) < MIN_VALID_SHARE:
            continue
        poly_px = tile_box_to_raster_px(box, tile)
        if run.grid.aoi_px is not None and not run.grid.aoi_px.contains(Point(poly_px.centroid)):
            continue
        run.detections.append(Detection(run.label, confidence, tile.tile_id, poly_px))
        kept += 1
    if run.task == "count" and not parsed.boxes and parsed.count is not None:
        run.integer_counts.append((tile, parsed.count))
    answer = parsed.label if run.task == "classify" and parsed.label else parsed.answer
    bounds = tile_footprint_crs(tile, run.raster.transform).bounds
    run.answers.append(TileAnswer(tile.tile_id, bounds, text, confidence, answer or "", parsed.count, kept))


def _result(run: _Run, done: int, iou_threshold: float) -> tuple[SceneResult, gpd.GeoDataFrame]:
    """Merge everything so far; returns the result and the kept rows with their ``_index``."""
    started = time.perf_counter()
    indexed = {id(d): i for i, d in enumerate(run.detections)}
    kept = nms(run.detections, iou_threshold=iou_threshold)
    frame = _detections_frame(run, kept)
    frame["_index"] = [indexed[id(d)] for d in kept]
    counts, rule = _counts(run, len(kept))
    scene = compose_scene_answer(run.task, run.query, run.answers, counts, len(kept), rule)
    run.timings["merge"] += time.perf_counter() - started
    result = SceneResult(
        detections=frame.drop(columns="_index"), counts=counts, tile_answers=list(run.answers), scene_answer=scene,
        timings=dict(run.timings), crs=run.raster.crs, tiles_total=len(run.grid.tiles),
        tiles_skipped_nodata=run.grid.skipped_nodata + run.skipped_empty, task=run.task, query=run.query,
        tiles_done=done,
    )
    return result, frame


def _detections_frame(run: _Run, kept: list[Detection]) -> gpd.GeoDataFrame:
    """The merged detections as a GeoDataFrame in the raster CRS."""
    geoms = [px_to_crs(d.polygon_px, run.raster.transform) for d in kept]
    frame = gpd.GeoDataFrame(
        {"label": [d.label for d in kept], "score": np.array([d.score for d in kept], dtype=np.float64),
         "task": [run.task] * len(kept), "query": [run.query] * len(kept),
         "tile_id": np.array([d.tile_id for d in kept], dtype=np.int64)},
        geometry=gpd.GeoSeries(geoms, crs=run.raster.crs), crs=run.raster.crs,
    )
    frame.insert(5, "area_m2", areas_m2(frame))
    return frame


def _counts(run: _Run, n_boxes: int) -> tuple[dict[str, int], str]:
    """Scene counts and the rule used (module docstring)."""
    if run.task in ("classify", "vqa"):
        return dict(Counter(normalise_answer(a.answer) for a in run.answers if a.answer.strip())), "tiles per answer"
    if run.task == "ground":
        return ({run.label: n_boxes} if run.answers else {}), "boxes"
    if run.task != "count" or not run.answers:
        return {}, "none"
    weighted = ownership_weighted_count(run.integer_counts, run.grid, run.raster.width, run.raster.height)
    rule = {(True, False): "boxes", (False, True): "tile counts", (True, True): "boxes + tile counts"}.get(
        (n_boxes > 0, bool(run.integer_counts)), "no readable count")
    return {run.label: n_boxes + int(round(weighted))}, rule

