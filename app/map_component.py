"""The Leaflet map inside ``gr.HTML`` and the state it renders.

Python owns a :class:`MapState`; the component's value is that state as JSON and
``app/static/map.js`` (run through ``js_on_load``) redraws only the parts whose key changed.
All coordinates here are lon/lat degrees (EPSG:4326), bounds as ``(west, south, east, north)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

__all__ = ["MapState", "STATIC_DIR", "LEAFLET_ROUTE", "STATIC_ROUTE", "make_map", "map_value"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
LEAFLET_ROUTE = "/skymoe/leaflet"
STATIC_ROUTE = "/skymoe/static"
MAP_EVENTS = ("aoi", "tile_select")  # custom events map.js triggers; see its header
_NONCE = itertools.count(1)

_TEMPLATE = '<div class="skymoe-map-wrap"><div class="skymoe-map"></div><div class="skymoe-map-status"></div></div>'


@dataclasses.dataclass(frozen=True)
class MapState:
    """Everything the map shows, as plain JSON-able values.

    Attributes:
        overlay: ``{"url", "bounds": [w, s, e, n] lon/lat, "name"}`` of the raster preview, or None.
        grid: tile outlines (GeoJSON FeatureCollection, lon/lat) with ``tile_id`` properties.
        grid_key: changes whenever ``grid`` does (the JS redraws on change only).
        results: detections (FeatureCollection, lon/lat) with ``label, score, tile_id, area_m2, _row``.
        results_key: changes whenever ``results`` does.
        counts: detections per label, for the legend.
        answers: per-tile text answers ``{tile_id: {"text", "confidence"}}`` shown on grid tiles.
        aoi: area of interest ``[w, s, e, n]`` lon/lat, or None.
        selected: ``tile_id`` of the tile Chat / Routing last worked on (outlined), or None.
        focus: ``{"row": int, "nonce": int}``: zoom to the result feature of that table row.
        message: one line shown under the map.
    """

    overlay: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    grid_key: str = ""
    results: dict[str, Any] | None = None
    results_key: str = ""
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    answers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    aoi: list[float] | None = None
    selected: int | None = None
    focus: dict[str, int] | None = None
    message: str = ""

    def replace(self, **changes: Any) -> MapState:
        """A copy with ``changes`` applied; a new ``grid``/``results`` gets a fresh key."""
        if "grid" in changes and "grid_key" not in changes:
            changes["grid_key"] = f"g{next(_NONCE)}"
        if "results" in changes and "results_key" not in changes:
            changes["results_key"] = f"r{next(_NONCE)}"
        return dataclasses.replace(self, **changes)

    def focus_row(self, row: int) -> MapState:
        """A copy that makes the map zoom to the result feature of table row ``row``."""
        return self.replace(focus={"row": int(row), "nonce": next(_NONCE)})


def map_value(state: MapState) -> str:
    """The ``gr.HTML`` value for ``state`` (JSON text read by map.js)."""
    return json.dumps(dataclasses.asdict(state), separators=(",", ":"))


def _head() -> str:
    """``<head>`` tags: Leaflet and our CSS, all served by the app itself (no CDN)."""
    return (
        f'<link rel="stylesheet" href="{LEAFLET_ROUTE}/leaflet.css">'
        f'<link rel="stylesheet" href="{STATIC_ROUTE}/map.css">'
        f'<script src="{LEAFLET_ROUTE}/leaflet.js"></script>'
    )


def make_map(state: MapState | None = None) -> gr.HTML:
    """The map component; its custom events are ``.aoi(...)`` and ``.tile_select(...)``."""
    js = (STATIC_DIR / "map.js").read_text(encoding="utf-8")
    missing = [name for name in MAP_EVENTS if f'"{name}"' not in js]
    if missing:
        raise RuntimeError(f"app/static/map.js no longer triggers the events {missing}")
    return gr.HTML(
        value=map_value(state or MapState()),
        html_template=_TEMPLATE,
        js_on_load=js,
        head=_head(),
        elem_id="skymoe-map",
        apply_default_css=False,
        padding=False,
    )
