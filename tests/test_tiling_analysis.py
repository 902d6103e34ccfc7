"""analyze / iter_analyze: the answers of overlapping tiles merged, counted once, kept off nodata.

The first tests feed fixed model answers (texts a model could write) through the real
parsing, georeferencing and merging code of one analysis run; the end-to-end tests run
a real tiny SkyMoE checkpoint (random weights: its texts are arbitrary, so they check the
plumbing, not the answers).
"""

from __future__ import annotations

import pytest
import rasterio

from tests.fixtures import make_rasters as mr
from tiling import ParameterError, make_grid, open_raster
from tiling.analysis import _record, _result, _Run
from tiling.reading import read_tile


def _run(tmp_path, width, height, task="count", query="small vehicle", overlap=64, frame_px=0):
    raster = open_raster(mr.make_rgb(tmp_path / "r.tif", width, height, frame_px=frame_px))
    grid = make_grid(raster, tile=504, overlap=overlap)
    return _Run(raster, grid, task, query)


def _valid(run, tile):
    with rasterio.open(run.raster.path) as ds:
        return read_tile(ds, run.raster, tile)[1]


def test_object_seen_by_two_tiles_is_counted_once_and_best_score_wins(tmp_path):
    run = _run(tmp_path, 944, 504)  # two tiles: cols 0..504 and 440..944, overlap 440..504
    left, right = run.grid.tiles
    assert (left.col_off_px, right.col_off_px) == (0, 440)
    # the same car at raster x ~469..489, y ~101..121, as each tile sees it (0-100 grid of the tile)
    _record(run, left, _valid(run, left), "{<93><20><97><24>|0}", 0.55)
    _record(run, right, _valid(run, right), "{<6><20><10><24>|0}{<50><50><55><55>|0}", 0.83)
    result, _ = _result(run, 2, 0.5)
    assert result.counts == {"small vehicle": 2}
    assert len(result.detections) == 2
    dup = result.detections[result.detections.geometry.centroid.x < 500_000 + 10 * 600]
    assert list(dup["score"]) == [0.83] and list(dup["tile_id"]) == [1]
    assert set(result.detections.columns) >= {"label", "score", "task", "query", "tile_id", "area_m2", "geometry"}
    assert result.detections.crs == run.raster.crs
    assert (result.detections["area_m2"] > 0).all()


def test_integer_only_counts_use_tile_ownership(tmp_path):
    run = _run(tmp_path, 944, 504, overlap=252)  # three tiles, heavily overlapping
    assert len(run.grid.tiles) == 3
    for tile in run.grid.tiles:
        _record(run, tile, _valid(run, tile), "4", 0.9)
    result, _ = _result(run, 3, 0.5)
    # owned widths 378 + 220 + 346 = 944 px: 4 objects per 504 px -> 7.49, not 3 * 4 = 12
    assert result.counts == {"small vehicle": 7}
    assert "tile counts" in result.scene_answer


def test_boxes_over_nodata_are_dropped(tmp_path):
    run = _run(tmp_path, 504, 504, frame_px=100)  # 100 px nodata frame around the image
    tile = run.grid.tiles[0]
    # one box in the frame (top-left corner), one in the valid centre
    _record(run, tile, _valid(run, tile), "{<2><2><12><12>}{<40><40><50><50>}", 0.7)
    result, _ = _result(run, 1, 0.5)
    assert len(result.detections) == 1 and result.counts == {"small vehicle": 1}
    assert result.tile_answers[0].n_boxes == 1


def test_classify_counts_tiles_per_class_and_votes(tmp_path):
    run = _run(tmp_path, 1400, 504, task="classify", query=None, overlap=0)
    labels = ["forest", "forest", "harbor"]
    for tile, (label, conf) in zip(run.grid.tiles, zip(labels, (0.4, 0.5, 0.6))):
        _record(run, tile, _valid(run, tile), label, conf)
    result, _ = _result(run, 3, 0.5)
    assert result.counts == {"forest": 2, "harbor": 1}
    assert result.scene_answer.startswith("forest (2 of 3 tiles")


def test_vqa_existence_is_yes_when_any_tile_says_yes(tmp_path):
    run = _run(tmp_path, 1400, 504, task="vqa", query="Is there a runway?", overlap=0)
    for tile, text in zip(run.grid.tiles, ["No", "Yes", "no"]):
        _record(run, tile, _valid(run, tile), text, 0.9)
    result, _ = _result(run, 3, 0.5)
    assert result.scene_answer.startswith("yes (tiles 1:")


def test_unknown_task_and_missing_query_fail_before_reading(tmp_path):
    from tiling import analyze

    path = mr.make_sized(tmp_path / "r.tif", 10, 10)
    with pytest.raises(ParameterError, match="unknown task 'detect'"):
        analyze(path, "detect", model=object())
    with pytest.raises(ParameterError, match="no model"):
        analyze(path, "caption")
