"""Preview PNG warped to Web Mercator with transparent nodata; tile outlines in lon/lat."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import make_rasters as mr
from tiling import MissingCRSError, grid_geojson, make_grid, open_raster, render_preview


def test_landsat_preview_is_transparent_on_nodata_and_placed_in_lonlat(real_data):
    raster = open_raster(real_data / "landsat7_rgb" / "RGB.byte.tif")
    preview = render_preview(raster, max_size=400)
    image = np.array(Image.open(io.BytesIO(preview.png_bytes)))
    assert image.shape[2] == 4 and max(image.shape[:2]) <= 400
    alpha = image[..., 3]
    assert alpha[0, 0] == 0 and alpha[-1, -1] == 0  # rotated footprint: corners are nodata
    h, w = alpha.shape
    assert alpha[h // 2, w // 2] == 255 and 0.2 < (alpha == 0).mean() < 0.6
    west, south, east, north = preview.bounds_lonlat
    assert -80 < west < east < -76 and 23 < south < north < 26  # the Bahamas


def test_grid_outlines_in_lonlat(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 1000, 600))
    grid = make_grid(raster, tile=504, overlap=64)
    collection = grid_geojson(raster, grid)
    assert [f["properties"]["tile_id"] for f in collection["features"]] == [t.tile_id for t in grid.tiles]
    lon, lat = np.array(collection["features"][0]["geometry"]["coordinates"][0]).T
    assert np.all((lon > 14) & (lon < 16)) and np.all((lat > 35) & (lat < 37))


def test_pixel_mode_has_no_map_preview(tmp_path):
    raster = open_raster(mr.make_no_crs(tmp_path / "p.tif"), pixel_mode=True)
    with pytest.raises(MissingCRSError, match="pixel mode"):
        render_preview(raster)
