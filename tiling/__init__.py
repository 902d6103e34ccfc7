"""Raster in, georeferenced answers out: tiles of a GeoTIFF through SkyMoE, back on the map.

leafmap (``tiling.notebook``) is optional and not imported here.
"""

from tiling.analysis import (
    AnalysisUpdate,
    SceneResult,
    TileAnswer,
    analyze,
    analyze_queries,
    iter_analyze,
    iter_analyze_queries,
)
from tiling.aoi import AOI, aoi_to_pixels, parse_aoi_text
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
from tiling.export import EXPORT_FORMATS, export, export_html_map
from tiling.georef import to_geojson_lonlat
from tiling.merge import Detection, nms
from tiling.preview import Preview, grid_geojson, render_preview
from tiling.raster import BAND_PRESETS, Raster, open_raster
from tiling.reading import TileBatch, iter_tile_batches, read_tile
from tiling.windows import Tile, TileGrid, Units, make_grid

__all__ = [
    "AOI",
    "AOIError",
    "AnalysisUpdate",
    "BAND_PRESETS",
    "BandError",
    "DataTypeError",
    "Detection",
    "EXPORT_FORMATS",
    "ExportError",
    "MissingCRSError",
    "ModelNotFoundError",
    "ParameterError",
    "Preview",
    "Raster",
    "RasterOpenError",
    "SceneResult",
    "Tile",
    "TileAnswer",
    "TileBatch",
    "TileGrid",
    "TilingError",
    "Units",
    "analyze",
    "analyze_queries",
    "aoi_to_pixels",
    "export",
    "export_html_map",
    "grid_geojson",
    "iter_analyze",
    "iter_analyze_queries",
    "iter_tile_batches",
    "make_grid",
    "nms",
    "open_raster",
    "parse_aoi_text",
    "read_tile",
    "render_preview",
    "to_geojson_lonlat",
]
