"""Raster in, georeferenced answers out: tiles of a GeoTIFF through SkyMoE, back on the map."""

from tiling.aoi import AOI, aoi_to_pixels
from tiling.errors import (
    AOIError,
    BandError,
    DataTypeError,
    ExportError,
    MissingCRSError,
    ModelNotFoundError,
    ParameterError,
    RasterOpenError,
    TilingError,
)
from tiling.georef import to_geojson_lonlat
from tiling.raster import BAND_PRESETS, Raster, open_raster
from tiling.windows import Tile, TileGrid, Units, make_grid

__all__ = [
    "AOI",
    "AOIError",
    "BAND_PRESETS",
    "BandError",
    "DataTypeError",
    "ExportError",
    "MissingCRSError",
    "ModelNotFoundError",
    "ParameterError",
    "Raster",
    "RasterOpenError",
    "Tile",
    "TileGrid",
    "TilingError",
    "Units",
    "aoi_to_pixels",
    "make_grid",
    "open_raster",
    "to_geojson_lonlat",
]
