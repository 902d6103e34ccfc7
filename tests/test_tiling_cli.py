"""CLI errors are clear (exit 2, one line, no traceback) before any model is loaded."""

from __future__ import annotations

import importlib.util

import pytest

from tests.fixtures import make_rasters as mr
from tiling.cli import main


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    raster = mr.make_sized(tmp_path / "r.tif", 64, 64)
    code = main(["analyze", str(raster), "--task", "count", "--query", "car", "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err
    assert code == 2 and "nomodel" in err and "--model" in err and "Traceback" not in err


def test_raster_without_crs_points_to_pixel_mode(tmp_path, capsys):
    raster = mr.make_no_crs(tmp_path / "plain.tif")
    code = main(["analyze", str(raster), "--task", "caption", "--model", str(tmp_path)])
    assert code == 2 and "--pixel-mode" in capsys.readouterr().err


def test_bad_band_and_aoi_arguments(tmp_path, capsys):
    raster = mr.make_sized(tmp_path / "r.tif", 64, 64)
    assert main(["analyze", str(raster), "--bands", "5,2,1", "--model", str(tmp_path)]) == 2
    assert "band index 5" in capsys.readouterr().err
    assert main(["analyze", str(raster), "--aoi", "1,2,3", "--model", str(tmp_path)]) == 2
    assert "minx,miny,maxx,maxy" in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [("missing/boxes.geojson", "does not exist; create it first"),
                                          ("boxes.shp", "unknown extension '.shp'")])
def test_a_bad_out_path_is_refused_before_the_analysis(tmp_path, capsys, out, message):
    # the model folder is missing too: the --out error comes first, before any tile or model is touched
    raster = mr.make_sized(tmp_path / "r.tif", 64, 64)
    code = main(["analyze", str(raster), "--task", "count", "--query", "car", "--model", str(tmp_path / "nomodel"),
                 "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "nomodel" not in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("leafmap") is not None, reason="leafmap is installed")
def test_notebook_helper_without_leafmap_says_how_to_install():
    from tiling.notebook import show_on_map

    with pytest.raises(ImportError, match=r"pip install '\.\[notebook\]'"):
        show_on_map()


def test_notebook_helper_with_leafmap(tmp_path):
    pytest.importorskip("leafmap")
    from tiling import open_raster
    from tiling.notebook import show_on_map

    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 64, 64))
    m = show_on_map(raster=raster)
    assert any(getattr(layer, "name", "") == "raster" for layer in m.layers)
