"""Tile grid: full coverage, full-size tiles, AOI and nodata skipping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from tests.fixtures import make_rasters as mr
from tiling import AOI, AOIError, ParameterError, make_grid, open_raster
from tiling.windows import axis_offsets, grid_windows


def _coverage(width: int, height: int, tile: int, overlap: int) -> np.ndarray:
    """How often each pixel is covered; also checks every tile is full size and inside when it can be."""
    cols, rows = grid_windows(width, height, tile, overlap)
    hits = np.zeros((height, width), np.int32)
    for r in rows:
        for c in cols:
            assert c >= 0 and r >= 0
            if width >= tile:
                assert c + tile <= width
            if height >= tile:
                assert r + tile <= height
            hits[r : r + tile, c : c + tile] += 1
    return hits


@pytest.mark.parametrize("width,height", [(1, 1), (503, 503), (504, 504), (505, 1000), (5000, 37)])
@pytest.mark.parametrize("overlap", [0, 1, 64, 252, 503])
def test_issue_sizes_are_fully_covered(width, height, overlap):
    hits = _coverage(width, height, 504, overlap)
    assert hits.min() >= 1


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), tile=st.integers(1, 600), data=st.data())
def test_any_size_and_overlap_covers_every_pixel(width, height, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    cols, rows = grid_windows(width, height, tile, overlap)
    for offsets, length in ((cols, width), (rows, height)):
        covered = np.zeros(length, bool)
        for off in offsets:
            covered[off : off + tile] = True
        assert covered.all()
        assert offsets == sorted(set(offsets))
        if length >= tile:
            assert offsets[-1] + tile == length  # last tile shifted back inside, never dropped


def test_make_grid_small_raster_is_padded_not_rejected(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "tiny.tif", 1, 1))
    grid = make_grid(raster)
    assert [(t.col_off_px, t.row_off_px, t.width_px, t.height_px) for t in grid.tiles] == [(0, 0, 504, 504)]


def test_make_grid_tiles_are_full_size_on_a_real_file(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 505, 1000))
    grid = make_grid(raster, tile=504, overlap=64)
    assert {(t.width_px, t.height_px) for t in grid.tiles} == {(504, 504)}
    assert [t.tile_id for t in grid.tiles] == list(range(len(grid.tiles)))
    assert len(grid.tiles) == 2 * 3


def test_bad_overlap_is_a_clear_error(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 50, 50))
    with pytest.raises(ParameterError, match="overlap must be in 0..503"):
        make_grid(raster, tile=504, overlap=504)


def test_mostly_nodata_tiles_are_skipped_and_counted(tmp_path):
    # 600x400 with a 100 px nodata frame: the valid core 400x200 is exactly 4x2 tiles of 100 px
    raster = open_raster(mr.make_rgb(tmp_path / "f.tif", 600, 400, frame_px=100))
    grid = make_grid(raster, tile=100, overlap=0, max_nodata=0.9)
    assert grid.skipped_nodata == 6 * 4 - 4 * 2
    assert {(t.col_off_px, t.row_off_px) for t in grid.tiles} == {(c, r) for c in (100, 200, 300, 400) for r in (100, 200)}
    # with overlap, a tile half in the frame is kept (50 % nodata <= 90 %)
    assert make_grid(raster, tile=100, overlap=50, max_nodata=0.9).skipped_nodata > 0


def test_aoi_in_lonlat_and_pixels_limits_the_grid(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 2000, 1500))
    px = make_grid(raster, tile=504, overlap=0, aoi=AOI(box(1000, 500, 1100, 600), "pixel"))
    assert len(px.tiles) == 1
    tile = px.tiles[0]
    assert tile.col_off_px <= 1000 and tile.col_off_px + 504 >= 1100
    # the same area given in the raster CRS (UTM 33N, 10 m pixels)
    t = raster.transform
    x0, y0 = t @ (1000, 500)
    x1, y1 = t @ (1100, 600)
    crs = make_grid(raster, tile=504, overlap=0, aoi=AOI(box(x0, y1, x1, y0), raster.crs))
    assert [(t.col_off_px, t.row_off_px) for t in crs.tiles] == [(tile.col_off_px, tile.row_off_px)]


def test_aoi_outside_and_empty_raise(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 100, 100))
    with pytest.raises(AOIError, match="outside the raster"):
        make_grid(raster, aoi=AOI(box(-10, 50, -9, 51), "EPSG:4326"))
    with pytest.raises(AOIError, match="empty"):
        make_grid(raster, aoi=AOI(box(0, 0, 0, 0), "pixel"))


def test_aoi_as_geojson_lonlat(tmp_path):
    from pyproj import Transformer

    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 2000, 1500))
    to_lonlat = Transformer.from_crs(raster.crs, "EPSG:4326", always_xy=True)
    (x0, y0), (x1, y1) = raster.transform @ (1010, 510), raster.transform @ (1090, 590)
    (lon0, lat0), (lon1, lat1) = to_lonlat.transform(x0, y0), to_lonlat.transform(x1, y1)
    feature = {"type": "Feature", "properties": {},
               "geometry": box(min(lon0, lon1), min(lat0, lat1), max(lon0, lon1), max(lat0, lat1)).__geo_interface__}
    grid = make_grid(raster, tile=504, overlap=0, aoi=feature)
    assert len(grid.tiles) == 1
    c0, r0, c1, r1 = grid.aoi_px.bounds
    assert abs(c0 - 1010) < 1 and abs(r1 - 590) < 1


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 5000), tile=st.integers(1, 600), data=st.data())
def test_region_smaller_than_a_tile_gets_one_centred_tile_covering_it(length, tile, data):
    start = data.draw(st.integers(0, length - 1))
    stop = data.draw(st.integers(start + 1, min(length, start + tile)))
    (off,) = axis_offsets(start, stop, length, tile, 0)
    assert off <= start and off + tile >= stop  # covers the region
    if length >= tile:
        assert 0 <= off and off + tile <= length  # full tile inside the raster
        room_left, room_right = start - off, off + tile - stop
        assert abs(room_left - room_right) <= 1 or off in (0, length - tile)  # centred unless at an edge
