"""Chat and Routing: questions and router inspection on one selected tile of the grid.

The selected tile is the one clicked on the map (its ``tile_id`` indexes the session's grid);
without a selection the first tile of the grid is used, and the reply says so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import rasterio
import skymoe
from PIL import Image
from tiling.reading import read_tile

from app.errors import user_facing
from app.map_component import map_value
from app.plots import expert_heatmap_figure, expert_load_figure
from app.session import ChatContext, Session
from app.state import ModelHolder

__all__ = ["ROUTING_QUERIES", "selected_tile", "chat", "routing"]

logger = logging.getLogger(__name__)

#: Query used per task when routing is profiled on a tile.
ROUTING_QUERIES = {"count": "small vehicle", "ground": "the largest building", "vqa": "What is in the image?",
                   "caption": None, "classify": None}
CHAT_MAX_NEW_TOKENS = 64


def selected_tile(session: Session, tile_text: str) -> tuple[Any, np.ndarray]:
    """The selected tile of the session's grid and its stretched pixels ``(tile_px, tile_px, 3)`` uint8."""
    if session.raster is None or session.grid is None:
        raise ValueError("No raster loaded: upload a GeoTIFF (or open one by path) first.")
    if not session.grid.tiles:
        raise ValueError("The current grid has no tiles (all nodata?): load the raster again.")
    text = (tile_text or "").strip()
    try:
        tile_id = int(text) if text else 0
    except ValueError as err:
        raise ValueError(f"Tile {text!r} is not a tile number: click a tile of the grid on the map.") from err
    if not 0 <= tile_id < len(session.grid.tiles):
        raise ValueError(f"Tile {tile_id} is not in the current grid (0..{len(session.grid.tiles) - 1}): "
                         "click a tile of the grid on the map.")
    tile = session.grid.tiles[tile_id]
    with rasterio.open(session.raster.path) as ds:
        image, _valid = read_tile(ds, session.raster, tile)
    return tile, image


def _chat_context(session: Session, tile: Any, image: np.ndarray, loaded: Any) -> ChatContext:
    """The session's conversation if it is about this tile with this model, else a fresh one."""
    ctx = session.chat
    if (ctx is not None and ctx.tile_id == tile.tile_id and ctx.grid_key == session.map.grid_key
            and ctx.prefix.model is loaded.model):
        return ctx
    return ChatContext(tile.tile_id, session.map.grid_key, skymoe.TilePrefix(loaded.model, loaded.processor, [image]))


@user_facing("answering the question")
def chat(session: Session, message: str, history: list[dict[str, Any]], tile_text: str,
         *, holder: ModelHolder) -> tuple[list[dict[str, Any]], str, Session, str]:
    """Answer ``message`` about the selected tile, continuing the conversation about that tile.

    The tile's image prefix is encoded once (``TilePrefix``) and earlier turns on the same tile
    are fed back to the model; another tile, grid or model starts a new conversation.

    Returns:
        (chat history in messages format, cleared input box, session, map value).
    """
    question = (message or "").strip()
    if not question:
        raise ValueError("Type a question about the selected tile first.")
    tile, image = selected_tile(session, tile_text)
    loaded = holder.get()
    ctx = _chat_context(session, tile, image, loaded)
    prompt = skymoe.build_prompt("vqa", question)
    generation = ctx.prefix.ask(prompt, history=ctx.turns, max_new_tokens=CHAT_MAX_NEW_TOKENS)[0]
    answer = generation.text.strip() or "(no answer)"
    ctx = dataclasses.replace(ctx, turns=(*ctx.turns, (prompt, generation.text)))
    where = "" if (tile_text or "").strip() else " (no tile selected: the first tile)"
    fresh = " (new conversation)" if len(ctx.turns) == 1 and history else ""
    history = list(history or []) + [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"Tile {tile.tile_id}{where}{fresh}: {answer} "
                                         f"(confidence {generation.confidence:.2f})"},
    ]
    answers = dict(session.map.answers)
    answers[str(tile.tile_id)] = {"text": f"Q: {question} A: {answer}", "confidence": float(generation.confidence)}
    session = session.replace(chat=ctx, map=session.map.replace(answers=answers, selected=tile.tile_id))
    return history, "", session, map_value(session.map)


def _trace_task(loaded: Any, image: np.ndarray, task: str) -> Any:
    """Run ``task`` on one tile inside ``capture_routing``; returns the trace."""
    prompt = skymoe.build_prompt(task, ROUTING_QUERIES[task])
    with skymoe.capture_routing(loaded.model) as trace:
        skymoe.generate(loaded.model, loaded.processor, [image], [prompt], max_new_tokens=8)
    return trace


@user_facing("inspecting the routing")
def routing(session: Session, tile_text: str, heatmap_task: str,
            *, holder: ModelHolder) -> tuple[Image.Image, Image.Image, str, Session, str]:
    """Per-expert heatmaps of ``heatmap_task`` and expert load per task on the selected tile.

    Returns:
        (heatmap figure, load figure, markdown note, session, map value with the tile outlined).
    """
    if heatmap_task not in ROUTING_QUERIES:
        raise ValueError(f"Unknown task {heatmap_task!r}; choose one of {list(ROUTING_QUERIES)}.")
    tile, image = selected_tile(session, tile_text)
    loaded = holder.get()
    loads, heatmaps, layer_ids = {}, None, []
    for task in ROUTING_QUERIES:
        trace = _trace_task(loaded, image, task)
        if not trace.layers:
            raise ValueError("This model has no MoE layers, so there is no routing to show.")
        loads[task] = trace.expert_load()
        if task == heatmap_task:
            heatmaps, layer_ids = trace.expert_heatmaps(sample=0), sorted(trace.layers)
    note = (f"Tile {tile.tile_id} (cols {tile.col_off_px}.., rows {tile.row_off_px}.., outlined white on the map), "
            f"task **{heatmap_task}**: {len(layer_ids)} MoE layers (rows) x {heatmaps.shape[1]} experts (columns). "
            "Brighter = more of that region's image patches went to the expert (top-k). Below: expert load "
            "per task on this tile.")
    if loaded.model.config.object_tokens:
        note += (" This model reads only the patches where it detects objects (object tokens); the other "
                 "patches stay dark.")
    session = session.replace(map=session.map.replace(selected=tile.tile_id))
    return (expert_heatmap_figure(image, heatmaps, layer_ids), expert_load_figure(loads), note,
            session, map_value(session.map))
