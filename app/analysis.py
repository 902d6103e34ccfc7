"""The Analyse tab's run: tiles through the shared model, partial results streamed to the map.

Closing the generator (the Stop button cancels the event) closes ``tiling.iter_analyze``,
which stops cleanly after the batch in flight; the partial result stays in the session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd
import skymoe
import tiling
from tiling.errors import AOIError

from app.errors import user_facing
from app.handlers import counts_table, detections_table, grid_layer, parse_aoi, selected_text
from app.map_component import map_value
from app.session import Session
from app.state import ModelHolder

__all__ = ["TASK_CHOICES", "QUERY_NEEDS", "SCOPES", "run_analysis", "stopped_status", "answers_table", "query_hint"]

logger = logging.getLogger(__name__)

TASK_CHOICES = ["count", "ground", "caption", "classify", "vqa"]
#: Tasks that need a query: (what it is, an example).
QUERY_NEEDS = {
    "count": ("the class to count", "small vehicle"),
    "ground": ("the expression to find", "the large ship near the pier"),
    "vqa": ("the question", "Is there a runway?"),
}
SCOPES = ["Whole scene", "Area of interest"]
ANSWER_COLUMNS = ["tile_id", "answer", "confidence"]

Outputs = tuple[Session, str, pd.DataFrame, pd.DataFrame, pd.DataFrame, str, str]


def query_hint(task: str) -> gr.Textbox:
    """The Query box for ``task``: an example placeholder, or disabled where no query is needed."""
    if task in QUERY_NEEDS:
        return gr.Textbox(placeholder=QUERY_NEEDS[task][1], interactive=True)
    return gr.Textbox(value="", placeholder=f"{task} needs no query", interactive=False)


def answers_table(result: Any) -> pd.DataFrame:
    """Per-tile text answers (caption / classify / VQA, and the raw text of other tasks)."""
    if result is None:
        return pd.DataFrame(columns=ANSWER_COLUMNS)
    rows = [(a.tile_id, a.text, round(float(a.confidence), 3)) for a in result.tile_answers]
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS)


def _check_request(session: Session, task: str, query: str | None, scope: str, aoi_text: str) -> Any:
    """Validate the run's inputs before any tile is read; returns the AOI (or None)."""
    if session.raster is None:
        raise ValueError("No raster loaded: upload a GeoTIFF (or open one by path) first.")
    if task not in TASK_CHOICES:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASK_CHOICES}.")
    if task in QUERY_NEEDS and not query:
        what, example = QUERY_NEEDS[task]
        raise ValueError(f"The {task} task needs {what} (e.g. '{example}'): type it in the Query box.")
    skymoe.build_prompt(task, query)
    if scope != "Area of interest":
        return None
    aoi = parse_aoi(aoi_text)
    if aoi is None:
        raise AOIError("Scope is 'Area of interest' but no area is set: draw a rectangle with the ▭ button "
                       "on the map (or type west,south,east,north), or choose 'Whole scene'.")
    return aoi


def _with_result(session: Session, result: Any, message: str) -> Session:
    """``session`` holding ``result`` (partial or final), shown on the map."""
    results = None
    if not session.raster.pixel_mode:
        results = tiling.to_geojson_lonlat(result.detections)
        for row, feature in enumerate(results["features"]):
            feature["properties"]["_row"] = row
    answers = {str(a.tile_id): {"text": a.text, "confidence": float(a.confidence)} for a in result.tile_answers}
    shown = session.map.replace(results=results, counts=dict(result.counts), answers=answers, message=message)
    return session.replace(result=result, map=shown)


def _summary(result: Any, done: int, total: int, finished: bool) -> str:
    """Status markdown of a run."""
    head = "Done" if finished else "Running"
    lines = [f"**{head}**: {done}/{total} tiles ({result.tiles_skipped_nodata} skipped as nodata)."]
    if result.counts:
        lines.append("Counts: " + ", ".join(f"{k} **{v}**" for k, v in result.counts.items()))
    if finished and result.scene_answer:
        lines.append(f"Scene answer: {result.scene_answer}")
    if finished and result.timings:
        lines.append("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return "\n\n".join(lines)


def _outputs(session: Session, status: str) -> Outputs:
    result = session.result
    return (session, map_value(session.map), detections_table(result), counts_table(result),
            answers_table(result), status, selected_text(session))


@user_facing("running the analysis")
def run_analysis(session: Session, task: str, query: str, tile: int, overlap: int, batch_size: int,
                 scope: str, aoi_text: str, *, holder: ModelHolder,
                 progress: gr.Progress = gr.Progress()) -> Iterator[Outputs]:
    """Run ``task`` over the scene or the AOI, yielding partial results after each batch.

    Yields:
        (session, map value, detections table, counts table, tile answers table, status markdown,
        selected tile text).
    """
    query = (query or "").strip() or None
    aoi = _check_request(session, task, query, scope, aoi_text)
    session = grid_layer(session, int(tile), int(overlap), aoi)
    loaded = holder.get()
    total = len(session.grid.tiles)
    progress((0, total), desc="tiles", unit="tiles")
    session = session.replace(result=None, map=session.map.replace(results=None, counts={}, answers={},
                                                                    message=f"{task}: 0/{total} tiles"))
    yield _outputs(session, f"**Running**: 0/{total} tiles.")
    updates = tiling.iter_analyze(session.raster, task, query, model=loaded, aoi=aoi, tile=int(tile),
                                  overlap=int(overlap), batch_size=int(batch_size))
    try:
        update = None
        for update in updates:
            progress((update.tiles_done, update.tiles_total), desc="tiles", unit="tiles")
            message = f"{task}: {update.tiles_done}/{update.tiles_total} tiles"
            session = _with_result(session, update.result_so_far, message)
            yield _outputs(session, _summary(update.result_so_far, update.tiles_done, update.tiles_total, False))
        if update is None:
            raise AOIError("No tile to analyse: every tile of this area is nodata.")
        result = update.result_so_far
        session = _with_result(session, result, f"{task}: done, {len(result.detections)} detections")
        logger.info("%s on %s: %d tiles, counts %s", task, session.name, update.tiles_total, result.counts)
        yield _outputs(session, _summary(result, update.tiles_done, update.tiles_total, True))
    finally:
        updates.close()


def stopped_status(session: Session) -> str:
    """Status after Stop: what the kept partial result covers."""
    result = session.result
    if result is None:
        return "**Stopped** before any batch finished; nothing to keep."
    counts = ", ".join(f"{k} **{v}**" for k, v in result.counts.items()) or "no detections"
    return (f"**Stopped**: the partial result is kept ({counts}; {len(result.tile_answers)} tiles answered). "
            "It can be exported in the Results tab.")
