"""Notebook helper: raster preview and result layers on a ``leafmap.Map`` in one call.

leafmap is an optional extra (``pip install .[notebook]``); it is imported only
when :func:`show_on_map` is called, never by the rest of :mod:`tiling`.
Results are plain GeoDataFrames, so ``leafmap.Map().add_gdf(result.detections)``
works as well.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from tiling.analysis import SceneResult
from tiling.georef import to_geojson_lonlat
from tiling.raster import Raster

__all__ = ["show_on_map"]

logger = logging.getLogger(__name__)


def _import_leafmap() -> Any:
    """Import leafmap or explain how to install it."""
    try:
        import leafmap
    except ImportError as exc:
        raise ImportError("show_on_map needs leafmap, an optional extra: pip install '.[notebook]' "
                          "(or pip install leafmap)") from exc
    return leafmap


def show_on_map(result: SceneResult | None = None, raster: Raster | None = None, m: Any = None,
                max_size: int = 1024) -> Any:
    """Put the raster preview and the detections on a leafmap map.

    Args:
        result: Detections to show (layer "detections"), optional.
        raster: Raster to show as an image overlay (layer "raster"), optional.
        m: An existing ``leafmap.Map``; a new one is made when ``None``.
        max_size: Longest side of the preview (px).

    Returns:
        The map.

    Raises:
        ImportError: leafmap is not installed (message says how to install it).
    """
    leafmap = _import_leafmap()
    from tiling.preview import render_preview

    m = m if m is not None else leafmap.Map()
    if raster is not None:
        preview = render_preview(raster, max_size=max_size)
        west, south, east, north = preview.bounds_lonlat
        url = "data:image/png;base64," + base64.b64encode(preview.png_bytes).decode("ascii")
        m.image_overlay(url=url, bounds=((south, west), (north, east)), name="raster")
        m.fit_bounds([[south, west], [north, east]])
    if result is not None and len(result.detections):
        m.add_geojson(to_geojson_lonlat(result.detections), layer_name="detections")
    return m
