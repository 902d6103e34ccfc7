"""Areas of interest: any CRS, lon/lat or pixels, turned into a pixel-frame polygon.

Accepted forms (``aoi`` argument of :func:`tiling.make_grid` / :func:`tiling.analyze`):

- :class:`AOI` -- a shapely geometry with an explicit CRS (``"pixel"`` for
  pixel coordinates (col, row), y down);
- a GeoDataFrame / GeoSeries -- their own CRS (union of all geometries);
- a GeoJSON dict (geometry, Feature or FeatureCollection) -- EPSG:4326 lon/lat
  as RFC 7946 says;
- a shapely geometry or a ``(minx, miny, maxx, maxy)`` tuple -- the raster's
  CRS (pixels in pixel mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapely
import shapely.affinity
import shapely.ops
from pyproj import Transformer
from rasterio.crs import CRS
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from tiling.errors import AOIError
from tiling.raster import Raster

__all__ = ["AOI", "PIXEL", "aoi_to_pixels", "parse_aoi_text"]

logger = logging.getLogger(__name__)

#: CRS marker of geometries given in pixel coordinates (col, row).
PIXEL = "pixel"


@dataclass(frozen=True, slots=True)
class AOI:
    """An area of interest with its coordinate frame.

    Attributes:
        geometry: Polygon(s) of the area.
        crs: Anything ``rasterio.crs.CRS.from_user_input`` takes, or ``"pixel"``.
    """

    geometry: BaseGeometry
    crs: Any = "EPSG:4326"


def _as_aoi(aoi: Any, raster: Raster) -> AOI:
    """Normalise the accepted AOI forms to an :class:`AOI`."""
    if isinstance(aoi, AOI):
        return aoi
    native = PIXEL if raster.crs is None else raster.crs
    if hasattr(aoi, "union_all") and hasattr(aoi, "crs"):  # GeoDataFrame / GeoSeries
        if aoi.crs is None:
            raise AOIError("the AOI GeoDataFrame has no CRS; set one with .set_crs(...)")
        return AOI(aoi.union_all(), aoi.crs)
    if isinstance(aoi, dict):
        if aoi.get("type") == "FeatureCollection":
            geoms = [shape(f["geometry"]) for f in aoi.get("features", []) if f.get("geometry")]
            return AOI(shapely.union_all(geoms) if geoms else shapely.Polygon(), "EPSG:4326")
        geom = aoi.get("geometry") if aoi.get("type") == "Feature" else aoi
        try:
            return AOI(shape(geom), "EPSG:4326")
        except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
            raise AOIError(f"the AOI dict is not valid GeoJSON ({exc}): {str(aoi)[:200]}") from exc
    if isinstance(aoi, BaseGeometry):
        return AOI(aoi, native)
    if isinstance(aoi, (tuple, list)) and len(aoi) == 4:
        minx, miny, maxx, maxy = (float(v) for v in aoi)
        return AOI(box(minx, miny, maxx, maxy), native)
    raise AOIError(f"unsupported AOI {aoi!r}: give an AOI(geometry, crs), GeoJSON dict, GeoDataFrame, "
                   "shapely geometry or (minx, miny, maxx, maxy) bounds")


def aoi_to_pixels(aoi: Any, raster: Raster) -> shapely.Polygon | shapely.MultiPolygon:
    """The AOI as a polygon in the raster's pixel frame, clipped to the raster.

    Args:
        aoi: Any accepted AOI form (module docstring).
        raster: The raster the AOI refers to.

    Returns:
        The area in pixel coordinates (col, row), corners of pixels, inside
        ``[0, width] x [0, height]``.

    Raises:
        AOIError: Empty or invalid AOI, pixel AOI on a georeferenced-only path
            mismatch, or no overlap with the raster.
    """
    area = _as_aoi(aoi, raster)
    geom = area.geometry
    if geom.is_empty or geom.area == 0:
        raise AOIError(f"the AOI is empty (no area): {geom.wkt[:200]}")
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(area.crs, str) and area.crs.lower() == PIXEL:
        geom_px = geom
    else:
        if raster.crs is None:
            raise AOIError(f"the raster {raster.path} is in pixel mode (no CRS), so an AOI in {area.crs} "
                           "cannot be placed; give the AOI in pixels: AOI(geometry, crs='pixel')")
        geom_crs = _reproject(geom, CRS.from_user_input(area.crs), raster.crs)
        inv = ~raster.transform
        geom_px = shapely.affinity.affine_transform(geom_crs, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
    extent_px = box(0, 0, raster.width, raster.height)
    clipped = geom_px.intersection(extent_px)
    if clipped.is_empty or clipped.area == 0:
        raise AOIError(
            f"the AOI (pixel bounds {tuple(round(v, 1) for v in geom_px.bounds)}, from {area.crs}) lies outside "
            f"the raster {raster.path} (pixel bounds (0, 0, {raster.width}, {raster.height})); check its CRS "
            "and coordinate order (GeoJSON is lon, lat)"
        )
    return clipped


def _reproject(geom: BaseGeometry, src: CRS, dst: CRS) -> BaseGeometry:
    """Reproject a shapely geometry (densified first so curved edges stay curved)."""
    if src == dst:
        return geom
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    dense = shapely.segmentize(geom, max_segment_length=max(_extent(geom) / 32.0, 1e-9))
    return shapely.ops.transform(transformer.transform, dense)


def _extent(geom: BaseGeometry) -> float:
    """Largest side of the geometry's bounds."""
    minx, miny, maxx, maxy = geom.bounds
    return max(maxx - minx, maxy - miny)


def parse_aoi_text(text: str) -> AOI | str:
    """Parse the CLI's ``--aoi``: ``minx,miny,maxx,maxy[@CRS]`` or a vector file path.

    ``@CRS`` is e.g. ``@EPSG:4326`` or ``@pixel``; without it the bounds are
    lon/lat (EPSG:4326). A path is returned unchanged (read by the caller).

    Raises:
        AOIError: Neither four numbers nor an existing file.
    """
    if Path(text).exists():
        return text
    coords, _, crs = text.partition("@")
    parts = coords.split(",")
    try:
        minx, miny, maxx, maxy = (float(p) for p in parts)
    except ValueError as exc:
        raise AOIError(f"--aoi {text!r} is neither an existing vector file nor 'minx,miny,maxx,maxy[@CRS]' "
                       "(e.g. -84.40,33.74,-84.39,33.75@EPSG:4326 or 0,0,1000,800@pixel)") from exc
    return AOI(box(minx, miny, maxx, maxy), crs or "EPSG:4326")
