"""Open a raster once: band choice, one global percentile stretch per band, metadata.

A :class:`Raster` is an immutable description (no open file handle, no pixels):
the reader, grid and preview open the file again where they need it, so a
``Raster`` can cross threads and processes.

Band choice (first match wins):

1. ``bands`` given as a sequence of 1-based band indexes (1 or 3 of them);
2. ``bands`` given as a preset name (see :data:`BAND_PRESETS`);
3. ``colorinterp`` of the file names red, green and blue bands;
4. by band count: 1 -> grey replicated to RGB, 13 -> Sentinel-2 (4, 3, 2),
   4 -> NAIP/RGBN (1, 2, 3; band 4 is near-infrared, not alpha), otherwise the
   first three non-alpha bands; 2 bands -> the first band as grey.

The stretch maps the ``stretch`` percentiles (low, high) of each chosen band,
computed over valid pixels of a decimated read (``out_shape``, average
resampling, which uses overviews), linearly to 0..255.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.warp import transform as warp_transform

from tiling.errors import BandError, DataTypeError, MissingCRSError, ParameterError, RasterOpenError

__all__ = [
    "BAND_PRESETS",
    "STATS_MAX_SIZE_PX",
    "Raster",
    "open_raster",
    "stretch_to_uint8",
    "decimated_shape",
]

logger = logging.getLogger(__name__)

#: Named band presets: 1-based band indexes read as (red, green, blue).
BAND_PRESETS: dict[str, tuple[int, int, int]] = {
    "rgb": (1, 2, 3),
    "sentinel2": (4, 3, 2),
    "landsat8": (4, 3, 2),
    "naip": (1, 2, 3),
    "rgbn": (1, 2, 3),
    "gray": (1, 1, 1),
}

#: Longest side (px) of the decimated read used for statistics and masks.
STATS_MAX_SIZE_PX = 1024

_SUPPORTED_KINDS = "uint8, uint16, int16, uint32, int32, float32, float64"


@dataclass(frozen=True, slots=True)
class Raster:
    """An opened raster's metadata and display settings (no pixels, no file handle).

    Attributes:
        path: The file (GeoTIFF, VRT or anything GDAL reads).
        band_indexes: Three 1-based band indexes read as (red, green, blue);
            grey rasters repeat one band.
        band_preset: How the bands were chosen (a preset name, "colorinterp",
            "custom" or "auto-...").
        lows: Per entry of ``band_indexes``, the raw value mapped to 0.
        highs: Per entry of ``band_indexes``, the raw value mapped to 255.
        crs: The raster CRS, ``None`` in pixel mode.
        transform: Affine from pixel corners (col, row) to ``crs`` coordinates;
            the identity in pixel mode (coordinates are then pixels, y down).
        width: Columns (px).
        height: Rows (px).
        gsd_m: Ground sampling distance (metres per pixel, mean of x and y),
            ``None`` in pixel mode.
        dtype: Numpy dtype name of the data.
        count: Number of bands in the file.
        has_mask: Whether the file declares nodata, a mask or an alpha band.
        pixel_mode: True when results are in pixel coordinates (no CRS).
        nodata: The file's nodata value of band 1, if any.
    """

    path: Path
    band_indexes: tuple[int, int, int]
    band_preset: str
    lows: tuple[float, float, float]
    highs: tuple[float, float, float]
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    gsd_m: float | None
    dtype: str
    count: int
    has_mask: bool
    pixel_mode: bool = False
    nodata: float | None = None

    @property
    def read_indexes(self) -> tuple[int, ...]:
        """Distinct 1-based bands to read, in first-use order."""
        return tuple(dict.fromkeys(self.band_indexes))


def open_raster(
    path: str | Path,
    bands: Sequence[int] | str | None = None,
    stretch: tuple[float, float] | None = (2, 98),
    pixel_mode: bool = False,
) -> Raster:
    """Open ``path``, choose three display bands and compute the global stretch.

    Args:
        path: Raster file (any GDAL format, incl. VRT).
        bands: ``None`` (automatic), a preset name from :data:`BAND_PRESETS`,
            or 1 or 3 band indexes (1-based).
        stretch: Low and high percentiles (0..100) per band; ``None`` keeps
            uint8 data as is and maps other types' min..max to 0..255.
        pixel_mode: Accept a raster without CRS/geotransform; results are
            then in pixel coordinates.

    Returns:
        The raster description.

    Raises:
        RasterOpenError: Missing file, not a raster, truncated or unreadable data.
        MissingCRSError: No CRS or geotransform and ``pixel_mode`` is False.
        DataTypeError: Complex or otherwise unsupported data type.
        BandError: Band index out of range or unknown preset.
        ParameterError: Percentiles out of 0..100 or not increasing.
    """
    path = Path(path)
    _check_stretch(stretch)
    if not path.exists():
        raise RasterOpenError(f"raster file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # reported by _georeferencing instead
            with rasterio.open(path) as ds:
                return _describe(ds, path, bands, stretch, pixel_mode)
    except RasterioIOError as exc:
        raise RasterOpenError(
            f"cannot read {path} as a raster ({exc}); give a GeoTIFF, VRT or other GDAL-readable "
            "image, and check that the file is complete (not truncated)"
        ) from exc


def _describe(ds, path: Path, bands, stretch, pixel_mode: bool) -> Raster:
    """Build the :class:`Raster` of an open dataset (see :func:`open_raster`)."""
    dtype = np.dtype(ds.dtypes[0])
    if dtype.kind == "c":
        raise DataTypeError(
            f"{path} holds complex data ({dtype.name}); convert it to amplitude first "
            f"(e.g. gdal_calc.py --calc='abs(A)'); supported: {_SUPPORTED_KINDS}"
        )
    if dtype.kind not in "uif":
        raise DataTypeError(f"{path} has unsupported data type {dtype.name}; supported: {_SUPPORTED_KINDS}")
    crs, transform, gsd_m = _georeferencing(ds, path, pixel_mode)
    band_indexes, preset = choose_bands(ds.count, ds.colorinterp, bands, path)
    lows, highs = _band_stats(ds, band_indexes, stretch, dtype, path)
    has_mask = any(MaskFlags.all_valid not in flags for flags in ds.mask_flag_enums)
    logger.info("opened %s: %dx%d, %d bands %s, bands %s (%s)", path, ds.width, ds.height, ds.count,
                dtype.name, band_indexes, preset)
    return Raster(
        path=path, band_indexes=band_indexes, band_preset=preset, lows=lows, highs=highs, crs=crs,
        transform=transform, width=ds.width, height=ds.height, gsd_m=gsd_m, dtype=dtype.name,
        count=ds.count, has_mask=has_mask, pixel_mode=crs is None, nodata=ds.nodata,
    )


def _georeferencing(ds, path: Path, pixel_mode: bool) -> tuple[CRS | None, Affine, float | None]:
    """CRS, pixel-corner affine and GSD (m/px) of ``ds``, or pixel-mode values."""
    has_transform = ds.transform != Affine.identity()
    if ds.crs is not None and has_transform:
        return ds.crs, ds.transform, _gsd_m(ds.crs, ds.transform, ds.width, ds.height)
    missing = "CRS" if ds.crs is None else "geotransform"
    if not pixel_mode:
        raise MissingCRSError(
            f"{path} has no {missing}, so answers cannot be placed on the map; assign one "
            "(e.g. gdal_edit.py -a_srs EPSG:XXXX -a_ullr ...) or ask for pixel coordinates with "
            "pixel_mode=True (CLI: --pixel-mode). EPSG:4326 is never assumed."
        )
    logger.warning("%s has no %s: pixel mode, coordinates are (col, row) pixels", path, missing)
    return None, Affine.identity(), None


def _gsd_m(crs: CRS, transform: Affine, width: int, height: int) -> float:
    """Mean geodesic size (m) of one pixel's x and y sides at the raster centre."""
    col, row = width / 2.0, height / 2.0
    pts_crs = [transform @ (col, row), transform @ (col + 1, row), transform @ (col, row + 1)]
    lons, lats = warp_transform(crs, "EPSG:4326", [p[0] for p in pts_crs], [p[1] for p in pts_crs])
    geod = Geod(ellps="WGS84")
    dx = geod.inv(lons[0], lats[0], lons[1], lats[1])[2]
    dy = geod.inv(lons[0], lats[0], lons[2], lats[2])[2]
    return float((dx + dy) / 2.0)


def choose_bands(
    count: int,
    colorinterp: Sequence[ColorInterp],
    bands: Sequence[int] | str | None,
    path: Path | str = "<raster>",
) -> tuple[tuple[int, int, int], str]:
    """Pick three 1-based display bands (see the module docstring for the rules).

    Args:
        count: Bands in the file.
        colorinterp: The file's colour interpretation per band.
        bands: ``None``, a preset name, or 1 or 3 band indexes.
        path: For error messages.

    Returns:
        ``((r, g, b), preset_name)``.

    Raises:
        BandError: Unknown preset, wrong number of indexes or an index out of 1..count.
    """
    if isinstance(bands, str):
        key = bands.lower().replace("-", "").replace("_", "")
        if key not in BAND_PRESETS:
            raise BandError(f"unknown band preset {bands!r}; choose one of {sorted(BAND_PRESETS)} "
                            "or give band indexes like 4,3,2")
        chosen, name = BAND_PRESETS[key], key
    elif bands is not None:
        chosen = tuple(int(b) for b in bands)
        if len(chosen) == 1:
            chosen = chosen * 3
        if len(chosen) != 3:
            raise BandError(f"give 1 or 3 band indexes (got {len(chosen)}: {list(chosen)}) for {path}")
        name = "custom"
    else:
        chosen, name = _auto_bands(count, colorinterp)
    bad = [b for b in chosen if not 1 <= b <= count]
    if bad:
        raise BandError(f"band index {bad[0]} is out of range for {path}, which has {count} band(s) "
                        f"(valid: 1..{count}; indexes are 1-based)")
    return (chosen[0], chosen[1], chosen[2]), name


def _auto_bands(count: int, colorinterp: Sequence[ColorInterp]) -> tuple[tuple[int, ...], str]:
    """Automatic band choice from colour interpretation, then band count."""
    ci = list(colorinterp)
    if all(c in ci for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return tuple(ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)), "colorinterp"
    if count == 13:
        return BAND_PRESETS["sentinel2"], "auto-sentinel2"
    if count == 4:
        return BAND_PRESETS["naip"], "auto-rgbn"
    usable = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha] or [1]
    if len(usable) >= 3:
        return tuple(usable[:3]), "auto-first-three"
    return (usable[0],) * 3, "auto-gray"


def decimated_shape(width: int, height: int, max_size_px: int = STATS_MAX_SIZE_PX) -> tuple[int, int]:
    """``(rows, cols)`` of a read whose longest side is at most ``max_size_px``."""
    factor = max(1.0, max(width, height) / max_size_px)
    return max(1, math.ceil(height / factor)), max(1, math.ceil(width / factor))


def _band_stats(ds, band_indexes, stretch, dtype: np.dtype, path: Path):
    """Per-band (lows, highs) from a decimated masked read (average resampling)."""
    if stretch is None and dtype == np.uint8:
        return (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    unique = list(dict.fromkeys(band_indexes))
    shape = decimated_shape(ds.width, ds.height)
    try:
        data = ds.read(unique, out_shape=(len(unique), *shape), resampling=Resampling.average, masked=True)
    except RasterioError as exc:
        raise RasterOpenError(f"cannot read pixels of {path} ({exc}); the file may be truncated or corrupt") from exc
    pct = (0.0, 100.0) if stretch is None else stretch
    stats: dict[int, tuple[float, float]] = {}
    for i, band in enumerate(unique):
        values = np.ma.masked_invalid(data[i].astype(np.float64)).compressed()
        if values.size == 0:
            logger.warning("band %d of %s has no valid pixels; stretch 0..1", band, path)
            stats[band] = (0.0, 1.0)
            continue
        lo, hi = np.percentile(values, pct)
        stats[band] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    lows = tuple(stats[b][0] for b in band_indexes)
    highs = tuple(stats[b][1] for b in band_indexes)
    return lows, highs


def stretch_to_uint8(data: np.ndarray, lows: Sequence[float], highs: Sequence[float]) -> np.ndarray:
    """Map raw band values linearly to 0..255 (clipped) with fixed per-band limits.

    Args:
        data: ``(3, rows, cols)`` raw values, any real dtype; NaN becomes 0.
        lows: Raw value mapped to 0, per band.
        highs: Raw value mapped to 255, per band.

    Returns:
        ``(rows, cols, 3)`` uint8 image (channels last, as the model takes it).
    """
    if data.dtype in (np.uint8, np.uint16):  # lookup table: one gather per pixel instead of float maths
        values = np.arange(np.iinfo(data.dtype).max + 1, dtype=np.float32)
        out = np.empty(data.shape[1:] + (3,), np.uint8)  # (rows, cols, 3)
        for band in range(3):
            lut = _linear_to_uint8(values, lows[band], highs[band])
            out[..., band] = lut[data[band]]
        return out
    out = _linear_to_uint8(data.astype(np.float32), np.asarray(lows, np.float32)[:, None, None],
                           np.asarray(highs, np.float32)[:, None, None])
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _linear_to_uint8(values: np.ndarray, low, high) -> np.ndarray:
    """``(values - low) * 255 / (high - low)`` clipped to 0..255 as uint8 (NaN -> 0)."""
    out = (values - low) * (255.0 / (high - low))
    np.clip(out, 0.0, 255.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out.astype(np.uint8)


def _check_stretch(stretch: tuple[float, float] | None) -> None:
    """Validate the percentile pair."""
    if stretch is None:
        return
    try:
        lo, hi = (float(v) for v in stretch)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"stretch must be two percentiles like (2, 98), got {stretch!r}") from exc
    if not 0.0 <= lo < hi <= 100.0:
        raise ParameterError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {stretch!r}")
