"""Exceptions raised by :mod:`tiling`; every message names the bad value and what to do.

All derive from :class:`TilingError`, so callers (CLI, app) can catch one type.
"""

from __future__ import annotations

__all__ = [
    "TilingError",
    "RasterOpenError",
    "MissingCRSError",
    "DataTypeError",
    "BandError",
    "AOIError",
    "ParameterError",
    "ExportError",
    "ModelNotFoundError",
]


class TilingError(Exception):
    """Base class of every error raised on bad input to :mod:`tiling`."""


class RasterOpenError(TilingError):
    """The file is missing, not a raster, or truncated/corrupt."""


class MissingCRSError(TilingError):
    """The raster has no CRS or no geotransform and pixel mode was not requested."""


class DataTypeError(TilingError):
    """The raster's data type cannot be shown as an image (e.g. complex numbers)."""


class BandError(TilingError):
    """A band index or band preset does not fit the raster."""


class AOIError(TilingError):
    """The area of interest is empty, invalid or outside the raster."""


class ParameterError(TilingError, ValueError):
    """A numeric or choice parameter (tile size, overlap, stretch, task...) is out of range."""


class ExportError(TilingError):
    """A result could not be written (unknown format, missing folder, write failure)."""


class ModelNotFoundError(TilingError):
    """The model folder given to the CLI does not exist."""
