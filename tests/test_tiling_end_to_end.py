"""analyze / iter_analyze / CLI with a real tiny SkyMoE checkpoint (random weights: plumbing, not answers)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import rasterio

import skymoe
from tests.fixtures import make_rasters as mr
from tiling import analyze, analyze_queries, iter_analyze, iter_analyze_queries, make_grid, open_raster
from tiling.errors import ParameterError
from tiling.cli import main
from tiling.merge import box_valid_share

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = skymoe.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
    return folder, skymoe.load_model(folder, quant="none", device="cpu")


@pytest.fixture()
def spy_generate(monkeypatch):
    """Records the images the model receives, then runs the real ``skymoe.generate``."""
    seen: list[np.ndarray] = []
    real = skymoe.generate

    def recording(model, processor, images, prompts, **kwargs):
        seen.extend(np.asarray(im) for im in images)
        return real(model, processor, images, prompts, **kwargs)

    monkeypatch.setattr(skymoe, "generate", recording)
    return seen


def test_landsat_nodata_frame_never_reaches_the_model(real_data, tiny, spy_generate):
    raster = open_raster(real_data / "landsat7_rgb" / "RGB.byte.tif")
    result = analyze(raster, "ground", "the white cloud", model=tiny[1], tile=160, overlap=0, batch_size=12,
                     max_new_tokens=MAX_NEW_TOKENS)
    grid = make_grid(raster, tile=160, overlap=0)
    assert result.tiles_skipped_nodata > 0  # the frame's corner tiles
    assert len(spy_generate) == len(result.tile_answers) == len(grid.tiles) - (result.tiles_skipped_nodata - grid.skipped_nodata)
    assert all(image.shape == (160, 160, 3) and image.any() for image in spy_generate)  # no all-nodata tile
    with rasterio.open(raster.path) as ds:
        valid = ds.dataset_mask() > 0
    inv = ~raster.transform
    for geom in result.detections.geometry:  # every kept box lies mostly over data
        cols, rows = zip(*(inv @ xy for xy in geom.exterior.coords))
        assert box_valid_share((min(cols), min(rows), max(cols), max(rows)), valid) >= 0.5
    assert result.detections.crs == raster.crs
    assert set(result.timings) >= {"read", "model", "merge", "total"}


def test_iter_analyze_streams_and_cancels_cleanly(tmp_path, tiny):
    path = mr.make_rgb(tmp_path / "r.tif", 600, 400)
    updates = iter_analyze(path, "count", "small vehicle", model=tiny[1], tile=128, overlap=0, batch_size=4,
                           max_new_tokens=MAX_NEW_TOKENS)
    first = next(updates)
    assert (first.tiles_done, first.tiles_total) == (4, 20)
    assert first.result_so_far.tiles_done == 4 and len(first.result_so_far.tile_answers) == 4
    updates.close()
    assert not any(t.name == "tiling-read-ahead" and t.is_alive() for t in threading.enumerate())


def test_cli_end_to_end_writes_geojson(tmp_path, tiny, capsys):
    path = mr.make_rgb(tmp_path / "r.tif", 300, 200)
    out = tmp_path / "out.geojson"
    code = main(["analyze", str(path), "--task", "count", "--query", "small vehicle", "--model", str(tiny[0]),
                 "--quant", "none", "--device", "cpu", "--tile", "128", "--overlap", "0",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "small vehicle" in printed and "6 run" in printed

    code = main(["analyze", str(path), "--task", "count", "--query", "small vehicle", "--query", "ship",
                 "--model", str(tiny[0]), "--quant", "none", "--device", "cpu", "--tile", "128", "--overlap", "0",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(tmp_path / "many.csv")])
    printed = capsys.readouterr().out
    assert code == 0 and (tmp_path / "many_small_vehicle.csv").exists() and (tmp_path / "many_ship.csv").exists()
    assert "task     count (small vehicle)" in printed and "task     count (ship)" in printed


def test_several_queries_in_one_pass_equal_one_run_per_query_and_encode_each_tile_once(tmp_path, tiny):
    path = mr.make_rgb(tmp_path / "r.tif", 700, 300)
    kwargs = dict(model=tiny[1], tile=128, overlap=16, batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    queries = ["small vehicle", "ship", "storage tank"]
    vision_calls = []
    hook = tiny[1].model.model.vision_tower.register_forward_hook(lambda m, i, o: vision_calls.append(i[0].shape[0]))
    try:
        together = analyze_queries(path, "count", queries, **kwargs)
    finally:
        hook.remove()
    tiles = len(make_grid(open_raster(path), tile=128, overlap=16).tiles)
    assert sum(vision_calls) == tiles  # every tile's image encoded once for the three queries
    assert list(together) == queries
    for query in queries:
        alone = analyze(path, "count", query, **kwargs)
        both = together[query]
        assert [a.text for a in both.tile_answers] == [a.text for a in alone.tile_answers]
        assert both.counts == alone.counts and both.scene_answer == alone.scene_answer
        assert both.query == query and both.tiles_done == alone.tiles_done == tiles
        assert both.detections.drop(columns="geometry").equals(alone.detections.drop(columns="geometry"))
    streamed = list(iter_analyze_queries(path, "ground", ["the red car", "the ship"], **kwargs))
    assert all(list(update) == ["the red car", "the ship"] for update in streamed)
    assert streamed[-1]["the ship"].tiles_done == tiles


@pytest.mark.parametrize(("task", "queries", "message"), [
    ("count", [], "no query"),
    ("count", ["car", " car"], "repeated"),
    ("count", "car", "list of strings"),
    ("caption", ["x"], "takes no query"),
    ("count", ["car", ""], "cannot build"),
])
def test_bad_query_lists_fail_before_reading(tmp_path, tiny, task, queries, message):
    with pytest.raises(ParameterError, match=message):
        analyze_queries(tmp_path / "absent.tif", task, queries, model=tiny[1])
