"""The tile grid: full-size windows that cover every pixel of a raster (or an AOI).

Along one axis of ``length`` px, for a region ``[start, stop)`` and tile size
``t`` with ``overlap`` (stride ``s = t - overlap``)::

    n = stop - start
    n <= t:  one offset, centred: clamp((start + stop - t) // 2, 0, max(length - t, 0))
    n >  t:  start + i * s  for i in 0 .. ceil((n - t) / s) - 1,  then  stop - t

The last tile is shifted back inside the raster, so every tile is exactly
``t`` px and no edge strip is dropped. A raster shorter than ``t`` gets one
tile at offset 0 that extends past the raster; the reader pads it with
nodata. Windows are half-open, in pixel corners: a tile covers columns
``col_off_px .. col_off_px + width_px - 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window
from shapely.geometry import box

from tiling.aoi import aoi_to_pixels
from tiling.errors import ParameterError, RasterOpenError
from tiling.raster import Raster, decimated_shape

__all__ = [
    "Units",
    "Tile",
    "TileGrid",
    "MASK_MAX_SIZE_PX",
    "axis_offsets",
    "grid_windows",
    "make_grid",
    "read_valid_mask",
]

logger = logging.getLogger(__name__)

#: Longest side (px) of the decimated dataset mask used to skip nodata tiles.
MASK_MAX_SIZE_PX = 2048


class Units(str, Enum):
    """Unit of ``tile`` and ``overlap`` in :func:`make_grid`."""

    PIXELS = "px"
    METRES = "m"


@dataclass(frozen=True, slots=True)
class Tile:
    """One window of the grid, in raster pixels (half-open, pixel corners).

    Attributes:
        tile_id: Index in the grid's tile list (row-major order).
        col_off_px: First column.
        row_off_px: First row.
        width_px: Columns (always the grid's tile size; may extend past a
            raster smaller than a tile).
        height_px: Rows (as ``width_px``).
    """

    tile_id: int
    col_off_px: int
    row_off_px: int
    width_px: int
    height_px: int

    @property
    def bounds_px(self) -> tuple[int, int, int, int]:
        """``(col_min, row_min, col_max, row_max)``, max exclusive."""
        return (self.col_off_px, self.row_off_px, self.col_off_px + self.width_px, self.row_off_px + self.height_px)

    @property
    def window(self) -> Window:
        """The tile as a rasterio window."""
        return Window(self.col_off_px, self.row_off_px, self.width_px, self.height_px)


@dataclass(frozen=True)
class TileGrid:
    """The tiles to run, and what was left out.

    Attributes:
        tiles: Tiles to run, ``tile_id`` = position in this list.
        skipped_nodata: Tiles left out because more than ``max_nodata`` of
            their in-raster area is nodata.
        tile_px: Tile size (px).
        overlap_px: Overlap between neighbours (px).
        col_offsets_px: Distinct column offsets of the full grid (before skipping).
        row_offsets_px: Distinct row offsets of the full grid (before skipping).
        aoi_px: The AOI in pixel coordinates, or ``None`` for the whole raster.
        skipped_aoi: Tiles of the AOI's bounding box that miss the AOI itself.
    """

    tiles: list[Tile]
    skipped_nodata: int
    tile_px: int = 504
    overlap_px: int = 0
    col_offsets_px: tuple[int, ...] = field(default_factory=tuple)
    row_offsets_px: tuple[int, ...] = field(default_factory=tuple)
    aoi_px: Any = None
    skipped_aoi: int = 0


def axis_offsets(start: int, stop: int, length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis (formula in the module docstring).

    Args:
        start: First pixel of the region to cover.
        stop: One past the last pixel of the region (``start < stop <= length``).
        length: Raster size along the axis (px).
        tile: Tile size (px).
        overlap: Overlap between neighbours (px), ``0 <= overlap < tile``.

    Returns:
        Increasing offsets.
    """
    span = stop - start
    if span <= tile:  # one tile, centred on the region (context on both sides), kept inside the raster
        return [max(0, min((start + stop - tile) // 2, length - tile))]
    stride = tile - overlap
    steps = math.ceil((span - tile) / stride)
    return [start + i * stride for i in range(steps)] + [stop - tile]


def grid_windows(
    width: int, height: int, tile: int, overlap: int, region_px: tuple[int, int, int, int] | None = None
) -> tuple[list[int], list[int]]:
    """Column and row offsets of a grid covering ``region_px`` (default: all).

    Args:
        width: Raster columns.
        height: Raster rows.
        tile: Tile size (px).
        overlap: Overlap (px).
        region_px: ``(col_min, row_min, col_max, row_max)``, max exclusive.

    Returns:
        ``(col_offsets, row_offsets)``; the tiles are their product.

    Raises:
        ParameterError: ``tile < 1`` or overlap outside ``0 .. tile - 1``.
    """
    if tile < 1:
        raise ParameterError(f"tile size must be at least 1 px, got {tile}")
    if not 0 <= overlap < tile:
        raise ParameterError(f"overlap must be in 0..{tile - 1} px for a {tile} px tile, got {overlap}")
    c0, r0, c1, r1 = region_px if region_px is not None else (0, 0, width, height)
    return axis_offsets(c0, c1, width, tile, overlap), axis_offsets(r0, r1, height, tile, overlap)


def make_grid(
    raster: Raster,
    tile: float = 504,
    overlap: float = 64,
    aoi: Any = None,
    max_nodata: float = 0.9,
    units: Units | str = Units.PIXELS,
) -> TileGrid:
    """Cut ``raster`` (or its ``aoi``) into full-size tiles, skipping mostly-nodata ones.

    Args:
        raster: From :func:`tiling.open_raster`.
        tile: Tile size in ``units``.
        overlap: Overlap between neighbours in ``units``.
        aoi: Area of interest (any form :func:`tiling.aoi.aoi_to_pixels` takes).
        max_nodata: Skip tiles whose in-raster area is more than this share
            nodata (from the decimated dataset mask); 0..1.
        units: ``"px"`` or ``"m"`` (metres through the raster's GSD).

    Returns:
        The grid.

    Raises:
        ParameterError: Bad tile/overlap/max_nodata/units.
        AOIError: Empty AOI or AOI outside the raster.
    """
    tile_px, overlap_px = _to_pixels(raster, tile, overlap, Units(units))
    if not 0.0 <= max_nodata <= 1.0:
        raise ParameterError(f"max_nodata must be a share in 0..1, got {max_nodata}")
    aoi_px = aoi_to_pixels(aoi, raster) if aoi is not None else None
    region = None
    if aoi_px is not None:
        minx, miny, maxx, maxy = aoi_px.bounds
        region = (math.floor(minx), math.floor(miny), math.ceil(maxx), math.ceil(maxy))
    cols, rows = grid_windows(raster.width, raster.height, tile_px, overlap_px, region)
    valid = read_valid_mask(raster) if raster.has_mask else None
    tiles: list[Tile] = []
    skipped_nodata = skipped_aoi = 0
    for row in rows:
        for col in cols:
            if aoi_px is not None and not aoi_px.intersects(box(col, row, col + tile_px, row + tile_px)):
                skipped_aoi += 1
                continue
            if valid is not None and 1.0 - _valid_share(valid, raster, col, row, tile_px) > max_nodata:
                skipped_nodata += 1
                continue
            tiles.append(Tile(len(tiles), col, row, tile_px, tile_px))
    logger.info("grid: %d tiles of %d px (overlap %d), %d skipped as nodata, %d outside the AOI",
                len(tiles), tile_px, overlap_px, skipped_nodata, skipped_aoi)
    return TileGrid(tiles, skipped_nodata, tile_px, overlap_px, tuple(cols), tuple(rows), aoi_px, skipped_aoi)


def _to_pixels(raster: Raster, tile: float, overlap: float, units: Units) -> tuple[int, int]:
    """Tile and overlap in whole pixels."""
    if units is Units.METRES:
        if raster.gsd_m is None:
            raise ParameterError("tile/overlap in metres need a georeferenced raster; use units='px' in pixel mode")
        return round(tile / raster.gsd_m), round(overlap / raster.gsd_m)
    if int(tile) != tile or int(overlap) != overlap:
        raise ParameterError(f"tile and overlap in pixels must be whole numbers, got {tile}, {overlap}")
    return int(tile), int(overlap)


def read_valid_mask(raster: Raster, max_size_px: int = MASK_MAX_SIZE_PX) -> np.ndarray:
    """Decimated dataset mask (True = valid), ``(rows_dec, cols_dec)`` bool.

    Raises:
        RasterOpenError: The mask cannot be read (truncated file).
    """
    shape = decimated_shape(raster.width, raster.height, max_size_px)
    try:
        with rasterio.open(raster.path) as ds:
            mask = ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest)
    except RasterioError as exc:
        raise RasterOpenError(f"cannot read the nodata mask of {raster.path} ({exc}); is the file complete?") from exc
    return mask > 0


def _valid_share(valid: np.ndarray, raster: Raster, col: int, row: int, tile_px: int) -> float:
    """Share of valid pixels of a tile's in-raster part, on the decimated mask."""
    rows_dec, cols_dec = valid.shape
    r0 = math.floor(row * rows_dec / raster.height)
    c0 = math.floor(col * cols_dec / raster.width)
    r1 = max(r0 + 1, math.ceil(min(row + tile_px, raster.height) * rows_dec / raster.height))
    c1 = max(c0 + 1, math.ceil(min(col + tile_px, raster.width) * cols_dec / raster.width))
    return float(valid[r0:r1, c0:c1].mean())
