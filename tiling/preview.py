"""Map previews: the stretched raster warped to Web Mercator, and tile outlines in lon/lat.

The preview is a decimated read (``out_shape``, average resampling, which uses
overviews) stretched with the raster's global limits, warped to EPSG:3857 so
that a Leaflet ``L.imageOverlay`` placed on ``bounds_lonlat`` lines up with the
basemap in its true (possibly rotated) footprint; nodata and the area outside
the footprint are transparent.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import array_bounds
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from shapely.geometry import box

from tiling.errors import MissingCRSError
from tiling.georef import px_to_crs, tile_footprint_crs, to_geojson_lonlat
from tiling.raster import Raster, decimated_shape, stretch_to_uint8
from tiling.windows import TileGrid

__all__ = ["Preview", "WEB_MERCATOR", "render_preview", "grid_geojson", "footprint_crs"]

logger = logging.getLogger(__name__)

WEB_MERCATOR = "EPSG:3857"


@dataclass(frozen=True)
class Preview:
    """A PNG overlay for a web map.

    Attributes:
        png_bytes: RGBA PNG, EPSG:3857 pixel grid, alpha 0 on nodata/outside.
        bounds_lonlat: ``(west, south, east, north)`` in degrees of the PNG's edges.
        width_px: PNG width.
        height_px: PNG height.
    """

    png_bytes: bytes
    bounds_lonlat: tuple[float, float, float, float]
    width_px: int
    height_px: int


def footprint_crs(raster: Raster):
    """The raster's four outer pixel corners as a polygon in its CRS."""
    return px_to_crs(box(0, 0, raster.width, raster.height), raster.transform)


def _require_crs(raster: Raster, what: str) -> None:
    if raster.crs is None:
        raise MissingCRSError(f"{raster.path} is in pixel mode (no CRS): a {what} on a map needs a CRS; "
                              "assign one to the file to place it on a map")


def _decimated_rgba(raster: Raster, max_size: int) -> tuple[np.ndarray, Affine]:
    """``(4, rows, cols)`` uint8 stretched RGBA of a decimated read, and its affine."""
    rows, cols = decimated_shape(raster.width, raster.height, max_size)
    with rasterio.open(raster.path) as ds:
        data = ds.read(list(raster.read_indexes), out_shape=(len(raster.read_indexes), rows, cols),
                       resampling=Resampling.average)
        valid = ds.dataset_mask(out_shape=(rows, cols)) > 0 if raster.has_mask else np.ones((rows, cols), bool)
    data = data[[raster.read_indexes.index(b) for b in raster.band_indexes]]  # (3, rows, cols)
    if data.dtype.kind == "f":
        valid &= ~np.isnan(data).any(axis=0)
    rgb = np.moveaxis(stretch_to_uint8(data, raster.lows, raster.highs), -1, 0)  # (3, rows, cols)
    rgba = np.concatenate([rgb, (valid * 255).astype(np.uint8)[None]])
    transform = raster.transform @ Affine.scale(raster.width / cols, raster.height / rows)
    return rgba, transform


def render_preview(raster: Raster, max_size: int = 2048) -> Preview:
    """Stretched RGBA PNG of the raster warped to EPSG:3857, at most ``max_size`` px a side.

    Raises:
        MissingCRSError: The raster is in pixel mode.
    """
    _require_crs(raster, "preview")
    rgba, src_transform = _decimated_rgba(raster, max_size)
    _, rows, cols = rgba.shape
    left, bottom, right, top = footprint_crs(raster).bounds
    dst_transform, dst_w, dst_h = calculate_default_transform(raster.crs, WEB_MERCATOR, cols, rows,
                                                              left, bottom, right, top)
    scale = max(dst_w, dst_h) / max_size
    if scale > 1:
        dst_w, dst_h = max(1, round(dst_w / scale)), max(1, round(dst_h / scale))
        dst_transform = dst_transform @ Affine.scale(scale)
    out = np.zeros((4, dst_h, dst_w), np.uint8)
    for bands, resampling in ((slice(0, 3), Resampling.bilinear), (slice(3, 4), Resampling.nearest)):
        reproject(rgba[bands], out[bands], src_transform=src_transform, src_crs=raster.crs,  # views: filled in place
                  dst_transform=dst_transform, dst_crs=WEB_MERCATOR, resampling=resampling)
    out[:3, out[3] == 0] = 0
    buf = io.BytesIO()
    Image.fromarray(np.moveaxis(out, 0, -1), mode="RGBA").save(buf, format="PNG")
    west, south, east, north = transform_bounds(WEB_MERCATOR, "EPSG:4326", *array_bounds(dst_h, dst_w, dst_transform))
    logger.info("preview of %s: %dx%d px, bounds %s", raster.path, dst_w, dst_h, (west, south, east, north))
    return Preview(buf.getvalue(), (west, south, east, north), dst_w, dst_h)


def grid_geojson(raster: Raster, grid: TileGrid) -> dict:
    """Tile outlines as an RFC 7946 FeatureCollection in lon/lat.

    Each feature's properties: ``tile_id, col_off_px, row_off_px, width_px, height_px``.

    Raises:
        MissingCRSError: The raster is in pixel mode.
    """
    _require_crs(raster, "tile grid")
    tiles = grid.tiles
    frame = gpd.GeoDataFrame(
        {"tile_id": [t.tile_id for t in tiles], "col_off_px": [t.col_off_px for t in tiles],
         "row_off_px": [t.row_off_px for t in tiles], "width_px": [t.width_px for t in tiles],
         "height_px": [t.height_px for t in tiles]},
        geometry=[tile_footprint_crs(t, raster.transform) for t in tiles], crs=raster.crs,
    )
    return to_geojson_lonlat(frame)
