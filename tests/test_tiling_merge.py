"""Cross-tile merging: NMS keeps one box per object, nodata boxes dropped, ownership counts."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from tests.fixtures import make_rasters as mr
from tiling import make_grid, open_raster
from tiling.merge import Detection, box_valid_share, nms, owned_share, ownership_weighted_count
from tiling.reading import read_tile


def test_duplicate_in_two_overlapping_tiles_is_counted_once_best_score_wins():
    # one car at raster px (470..490, 100..120) seen by tile 0 (cols 0..504) and tile 1 (cols 440..944)
    a = Detection("car", 0.62, 0, box(470, 100, 490, 120))
    b = Detection("car", 0.91, 1, box(471, 101, 491, 121))
    other = Detection("car", 0.55, 1, box(700, 300, 720, 320))
    kept = nms([a, b, other])
    assert len(kept) == 2
    assert b in kept and a not in kept


def test_box_clipped_by_a_tile_edge_is_a_duplicate_of_the_whole_one():
    whole = Detection("ship", 0.8, 1, box(480, 50, 540, 70))  # seen whole by the right tile
    clipped = Detection("ship", 0.9, 0, box(480, 50, 504, 70))  # cut at the left tile's edge, IoU 0.4
    kept = nms([whole, clipped])
    assert len(kept) == 1 and kept[0].score == 0.9


def test_nms_is_class_aware_and_keeps_neighbours_in_one_tile():
    car = Detection("car", 0.9, 0, box(0, 0, 10, 10))
    truck = Detection("truck", 0.8, 1, box(0, 0, 10, 10))
    # two adjacent cars in one tile, slightly overlapping: both are real objects
    car2 = Detection("car", 0.7, 0, box(8, 0, 18, 10))
    kept = nms([car, truck, car2])
    assert {d.label for d in kept} == {"car", "truck"} and len(kept) == 3


def test_boxes_over_nodata_have_low_valid_share(real_data):
    raster = open_raster(real_data / "landsat7_rgb" / "RGB.byte.tif")
    grid = make_grid(raster, tile=504, overlap=64)
    tile = grid.tiles[0]  # top-left tile: nodata corner at its top-left, data further in
    with rasterio.open(raster.path) as ds:
        _, valid = read_tile(ds, raster, tile)
    assert box_valid_share((0, 0, 40, 40), valid) == 0.0
    assert box_valid_share((300, 300, 340, 340), valid) == 1.0
    assert box_valid_share((600, 600, 700, 700), valid) == 0.0  # outside the tile


@pytest.mark.parametrize("overlap", [0, 64, 200])
def test_ownership_shares_partition_the_raster(tmp_path, overlap):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 1300, 700))
    grid = make_grid(raster, tile=504, overlap=overlap)
    owned_px = sum(owned_share(t, grid, raster.width, raster.height) * 504 * 504 for t in grid.tiles)
    assert owned_px == pytest.approx(1300 * 700)
    # a uniform density of 1 object per tile-area counts the raster's area once, whatever the overlap
    total = ownership_weighted_count([(t, 10) for t in grid.tiles], grid, raster.width, raster.height)
    assert total == pytest.approx(10 * 1300 * 700 / 504**2)


def test_small_raster_tile_owns_all_of_itself(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 30, 20))
    grid = make_grid(raster)
    assert owned_share(grid.tiles[0], grid, raster.width, raster.height) == 1.0


def test_valid_share_on_a_synthetic_mask():
    valid = np.zeros((10, 10), bool)
    valid[:, 5:] = True
    assert box_valid_share((0, 0, 10, 10), valid) == 0.5
