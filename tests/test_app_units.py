"""Fast in-process checks of the app's pieces (no server): settings, map state, model holder."""

from __future__ import annotations

import json

import pytest

from app.handlers import _bands_arg, _resolve_source, parse_aoi
from app.main import parse_args
from app.map_component import MapState, make_map, map_value
from app.server import PreviewStore
from app.settings import AppSettings
from app.state import ModelHolder, ModelUnavailableError
from tiling.errors import AOIError


def test_safe_defaults():
    settings = parse_args([])
    assert settings.host == "127.0.0.1" and settings.auth is None
    assert settings.quant == "4bit"
    assert 0 < settings.max_upload_bytes < 2 * 1024**3  # a 2 GB upload is refused
    assert parse_args(["--auth", "ann:secret"]).auth == ("ann", "secret")
    with pytest.raises(SystemExit):
        parse_args(["--auth", "no-colon"])


def test_map_state_keys_change_only_with_their_part():
    state = MapState().replace(grid={"type": "FeatureCollection", "features": []})
    moved = state.replace(aoi=[1.0, 2.0, 3.0, 4.0])
    assert moved.grid_key == state.grid_key and moved.results_key == state.results_key
    assert state.replace(results={"features": []}).results_key != state.results_key
    focused = moved.focus_row(3)
    assert json.loads(map_value(focused))["focus"]["row"] == 3
    assert focused.focus_row(3).focus["nonce"] != focused.focus["nonce"]  # a second click still zooms


def test_map_component_exposes_the_custom_events():
    component = make_map()
    assert callable(component.aoi) and callable(component.tile_select)
    assert "/skymoe/leaflet/leaflet.js" in component.head


def test_preview_store_is_bounded():
    store = PreviewStore(capacity=2)
    urls = [store.put(bytes([i]) * 10) for i in range(3)]
    keys = [u.rsplit("/", 1)[1].removesuffix(".png") for u in urls]
    assert store.get(keys[0]) is None and store.get(keys[2]) == bytes([2]) * 10


def test_band_and_aoi_inputs_are_checked():
    assert _bands_arg("auto", "") is None
    assert _bands_arg("sentinel2", "") == "sentinel2"
    assert _bands_arg("custom", "4, 3, 2") == (4, 3, 2)
    with pytest.raises(ValueError, match="1 band .* or 3 bands"):
        _bands_arg("custom", "4,3")
    with pytest.raises(ValueError, match="not 1-based band numbers"):
        _bands_arg("custom", "red,green,blue")
    assert parse_aoi("") is None
    assert parse_aoi("10,20,11,21").geometry.bounds == (10.0, 20.0, 11.0, 21.0)
    with pytest.raises(AOIError):
        parse_aoi("10,20,eleven")


def test_server_paths_stay_inside_allowed_folders(tmp_path):
    settings = AppSettings(allowed_dirs=(tmp_path,))
    inside = tmp_path / "a.tif"
    inside.write_bytes(b"x")
    assert _resolve_source(None, str(inside), settings) == inside.resolve()
    with pytest.raises(ValueError, match="outside the folders"):
        _resolve_source(None, str(tmp_path / ".." / "elsewhere.tif"), settings)
    with pytest.raises(ValueError, match="No raster given"):
        _resolve_source(None, "  ", settings)


def test_missing_demo_model_says_how_to_make_it(tmp_path, monkeypatch):
    import app.state

    missing_demo = tmp_path / "skymoe-demo"  # as on a clone where assets/skymoe-demo is absent
    monkeypatch.setattr(app.state, "DEFAULT_MODEL_DIR", missing_demo)
    holder = ModelHolder()
    with pytest.raises(ModelUnavailableError, match="python -m train.demo --out assets/skymoe-demo"):
        holder.load(missing_demo)
    assert "train.demo" in holder.status.error
    with pytest.raises(ModelUnavailableError, match="No model is loaded"):
        holder.get()


def test_no_raster_loaded_is_a_clear_error(tmp_path):
    import gradio as gr

    from app.analysis import run_analysis
    from app.handlers import open_default_raster
    from app.session import Session

    session, note = open_default_raster(AppSettings(raster=tmp_path / "missing.tif"), PreviewStore())
    assert session.raster is None and "missing.tif is missing: upload a GeoTIFF" in note
    with pytest.raises(gr.Error, match="No raster loaded: upload a GeoTIFF"):
        next(run_analysis(Session(), "count", "car", 504, 64, 8, "Whole scene", "", holder=ModelHolder()))


def test_raster_without_crs_points_to_pixel_mode(tmp_path):
    from app.handlers import open_session
    from tests.fixtures.make_rasters import make_no_crs
    from tiling.errors import MissingCRSError

    path = make_no_crs(tmp_path / "nocrs.tif")
    with pytest.raises(MissingCRSError, match="Tick 'Pixel coordinates \\(no CRS\\)'"):
        open_session(path, path.name, None, (2, 98), False, (504, 64), PreviewStore())
    session, info = open_session(path, path.name, None, (2, 98), True, (504, 64), PreviewStore())
    assert session.map.overlay is None and "pixel coordinates" in session.map.message
    assert "CRS none (pixel mode)" in info and len(session.grid.tiles) == 1


def test_unexpected_errors_become_a_short_message_not_a_trace():
    import gradio as gr

    from app.errors import user_facing

    @user_facing("doing something")
    def broken():
        raise KeyError("tile_px")

    @user_facing("streaming")
    def broken_stream():
        yield 1
        raise FileNotFoundError("/data/x.tif is gone")

    with pytest.raises(gr.Error) as err:
        broken()
    assert "Something went wrong while doing something (KeyError" in err.value.message
    assert "log" in err.value.message and "Traceback" not in err.value.message
    stream = broken_stream()
    assert next(stream) == 1
    with pytest.raises(gr.Error, match="x.tif is gone"):
        next(stream)
