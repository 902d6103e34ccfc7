"""Pixel <-> map geometry: tile boxes -> raster pixels -> polygons in the raster CRS.

Frames:

- tile px: (x, y) from the tile's top-left pixel corner, as the model answers;
- raster px: (col, row) from the raster's top-left pixel corner (pixel
  corners, not centres: pixel (c, r) covers ``[c, c+1) x [r, r+1)``);
- crs: the raster's CRS, through the full affine (rotation and shear kept:
  all four corners are transformed, never just two);
- lonlat: EPSG:4326 in (lon, lat) order, for GeoJSON (RFC 7946).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import shapely.affinity
from affine import Affine
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from tiling.windows import Tile

__all__ = [
    "box_polygon_px",
    "tile_box_to_raster_px",
    "px_to_crs",
    "crs_to_px",
    "tile_footprint_crs",
    "areas_m2",
    "to_geojson_lonlat",
]

logger = logging.getLogger(__name__)


def box_polygon_px(x1: float, y1: float, x2: float, y2: float, angle_deg: float = 0.0) -> Polygon:
    """A box as a polygon in pixel coordinates, rotated about its centre.

    Args:
        x1, y1, x2, y2: Corners (any frame of pixels, y down).
        angle_deg: Rotation in degrees; positive turns clockwise on screen
            (y axis points down), as GeoChat's ``|<theta>`` boxes are drawn.

    Returns:
        The 4-corner polygon (clockwise on screen from the top-left corner).
    """
    poly = shapely.box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), ccw=False)
    if angle_deg:
        poly = shapely.affinity.rotate(poly, angle_deg, origin="centroid")
    return poly


def tile_box_to_raster_px(box: Any, tile: Tile) -> Polygon:
    """A model box (tile px) as a polygon in raster pixels.

    Args:
        box: Anything with ``x1_px, y1_px, x2_px, y2_px`` (tile px) and
            optionally ``angle_deg`` (e.g. ``skymoe.Box``).
        tile: The tile the box was predicted on.
    """
    poly = box_polygon_px(box.x1_px, box.y1_px, box.x2_px, box.y2_px, getattr(box, "angle_deg", 0.0) or 0.0)
    return shapely.affinity.translate(poly, tile.col_off_px, tile.row_off_px)


def px_to_crs(geom_px: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Raster-pixel geometry to the raster CRS through the full affine (every vertex)."""
    return shapely.affinity.affine_transform(geom_px, [transform.a, transform.b, transform.d, transform.e,
                                                       transform.xoff, transform.yoff])


def crs_to_px(geom_crs: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Raster-CRS geometry to raster pixels (inverse affine)."""
    return px_to_crs(geom_crs, ~transform)


def tile_footprint_crs(tile: Tile, transform: Affine) -> Polygon:
    """A tile's four pixel corners as a polygon in the raster CRS."""
    c0, r0, c1, r1 = tile.bounds_px
    return px_to_crs(shapely.box(c0, r0, c1, r1, ccw=False), transform)


def areas_m2(gdf: gpd.GeoDataFrame) -> np.ndarray:
    """Area of each geometry in square metres, through a local UTM zone.

    Returns:
        ``(n,)`` float64; NaN for every row when ``gdf`` has no CRS (pixel mode).
    """
    if gdf.crs is None or len(gdf) == 0:
        return np.full(len(gdf), math.nan)
    utm = gdf.estimate_utm_crs()
    return gdf.geometry.to_crs(utm).area.to_numpy(dtype=np.float64)


def to_geojson_lonlat(gdf: gpd.GeoDataFrame) -> dict:
    """An RFC 7946 FeatureCollection (EPSG:4326, lon/lat order, no ``crs`` member).

    Raises:
        ValueError: ``gdf`` has no CRS (pixel mode cannot give lon/lat).
    """
    if gdf.crs is None:
        raise ValueError("the GeoDataFrame has no CRS (pixel mode): lon/lat GeoJSON is impossible")
    lonlat = gdf.to_crs("EPSG:4326")
    lonlat = lonlat.set_geometry(shapely.orient_polygons(lonlat.geometry.to_numpy(), exterior_cw=False),
                                 crs="EPSG:4326")  # RFC 7946: exterior rings counter-clockwise
    # to_json turns NaN into null; round-trip through it for strict JSON.
    collection = json.loads(lonlat.to_json(drop_id=True, to_wgs84=False))
    collection.pop("crs", None)
    return collection
