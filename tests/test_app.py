"""End-to-end tests of the map app: the real ``python app.py`` on a free port, driven by gradio_client.

The model is a real tiny SkyMoE fine-tuned for seconds to answer one box (tests/app_harness.py),
so count and ground produce features whose place on the map can be checked.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import rasterio
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.app_harness import footprint_lonlat, make_scene, shared_app
from tests.browser import wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def app():
    return shared_app()


def _client(app) -> Client:
    return Client(app.url, verbose=False)


def _load(client: Client, path: Path | None = None, server_path: str = "") -> tuple[dict, str]:
    upload = handle_file(str(path)) if path is not None else None
    map_json, info, _selected = client.predict(upload, server_path, "auto", "", 2, 98, False, 504, 64,
                                               api_name="/load_raster")
    return json.loads(map_json), info


def _analyze(client: Client, task: str, query: str, scope: str = "Whole scene", aoi: str = ""):
    map_json, detections, counts, answers, status, _selected = client.predict(
        task, query, 504, 64, 8, scope, aoi, api_name="/analyze")
    return json.loads(map_json), detections, counts, status


def _coords(geometry: dict) -> list[tuple[float, float]]:
    rings = geometry["coordinates"] if geometry["type"] == "Polygon" else [
        ring for polygon in geometry["coordinates"] for ring in polygon]
    return [tuple(pt) for ring in rings for pt in ring]


def _assert_inside(features: list[dict], bounds: tuple[float, float, float, float]) -> None:
    west, south, east, north = bounds
    eps = 1e-9
    for feature in features:
        for lon, lat in _coords(feature["geometry"]):
            assert west - eps <= lon <= east + eps and south - eps <= lat <= north + eps, (lon, lat, bounds)


def test_upload_count_ground_and_export(app):
    client = _client(app)
    state, info = _load(client, app.scene)
    assert "1000 x 700 px" in info and "EPSG:32633" in info
    footprint = footprint_lonlat(app.scene)
    assert state["overlay"]["url"].startswith("/skymoe/preview/")
    assert state["overlay"]["bounds"] == pytest.approx(list(footprint), abs=1e-3)
    assert len(state["grid"]["features"]) == 6

    state, detections, counts, status = _analyze(client, "count", "small vehicle")
    features = state["results"]["features"]
    assert features, f"count produced no features: {status}"
    _assert_inside(features, footprint)
    assert {f["properties"]["label"] for f in features} == {"small vehicle"}
    assert sum(row[1] for row in counts["data"]) == len(features) == len(detections["data"])
    assert "Done" in status

    state, detections, _, _ = _analyze(client, "ground", "the red car")
    grounded = state["results"]["features"]
    assert grounded and all(f["properties"]["task"] == "ground" for f in grounded)
    _assert_inside(grounded, footprint)

    gpkg = Path(client.predict("GeoPackage (native CRS)", api_name="/export"))
    read = gpd.read_file(gpkg)
    assert len(read) == len(grounded)
    with rasterio.open(app.scene) as ds:
        assert read.crs == ds.crs
    csv = Path(client.predict("CSV (counts)", api_name="/export"))
    table = pd.read_csv(csv)
    assert len(table) >= 1


def test_invalid_upload_gets_a_clear_error(app):
    bad = app.root / "not_a_raster.tif"
    bad.write_bytes(b"this is text, not a GeoTIFF\n" * 50)
    with pytest.raises(AppError, match="cannot read .* as a raster"):
        _load(_client(app), bad)


def test_upload_over_the_size_limit_is_refused(app):
    big = app.root / "big.tif"
    big.write_bytes(b"\0" * (3 * 1024 * 1024 + 4096))  # just over the app's 3 MB test limit
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        _load(_client(app), big)  # the client reads the limit from the app's config
    request = urllib.request.Request(app.url + "/gradio_api/upload", method="POST",
                                     data=_multipart(big), headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # and the server enforces it
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413


def _multipart(path: Path) -> bytes:
    head = (f'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: image/tiff\r\n\r\n").encode()
    return head + path.read_bytes() + b"\r\n--XyZ--\r\n"


def test_bad_input_gives_clear_messages_and_the_app_keeps_running(app):
    client = _client(app)
    exports_before = set((app.root / "tmp").glob("skymoe-export-*"))
    with pytest.raises(AppError, match="Nothing to export yet"):
        client.predict("GeoPackage (native CRS)", api_name="/export")
    assert set((app.root / "tmp").glob("skymoe-export-*")) == exports_before, "a refused export left files"
    _load(client, app.scene)
    with pytest.raises(AppError, match="needs the expression to find"):
        _analyze(client, "ground", "   ")
    with pytest.raises(AppError, match="outside"):
        _analyze(client, "count", "car", scope="Area of interest", aoi="100,10,100.1,10.1")
    with pytest.raises(AppError, match="no area is set"):
        _analyze(client, "count", "car", scope="Area of interest", aoi="")
    with pytest.raises(AppError, match="outside the folders"):
        _load(client, server_path="/etc/passwd")
    not_model = app.data_dir / "not-a-model"
    not_model.mkdir(exist_ok=True)
    (not_model / "notes.txt").write_text("hello")
    with pytest.raises(AppError, match="not a loadable SkyMoE checkpoint"):
        client.predict(str(not_model), "none", "cpu", api_name="/load_model")
    with pytest.raises(AppError, match="Model folder not found"):
        client.predict(str(app.root / "missing"), "none", "cpu", api_name="/load_model")
    state, _, _, _ = _analyze(client, "count", "small vehicle")  # still works, same model
    assert state["results"]["features"]


def test_server_path_inside_allowed_folder_opens(app):
    copy = app.data_dir / "scene_copy.tif"
    copy.write_bytes(app.scene.read_bytes())
    state, info = _load(_client(app), server_path=str(copy))
    assert "scene_copy.tif" in info and state["overlay"] is not None


def test_leaflet_is_served_by_the_app(app):
    with urllib.request.urlopen(app.url + "/skymoe/leaflet/leaflet.js", timeout=30) as response:
        assert b"Leaflet" in response.read(2000)
    with urllib.request.urlopen(app.url + "/skymoe/static/map.css", timeout=30) as response:
        assert b".skymoe-map" in response.read()


def test_chat_and_routing_on_a_selected_tile(app):
    client = _client(app)
    _load(client, app.scene)
    with pytest.raises(AppError, match="Type a question"):
        client.predict("  ", [], "1", api_name="/chat")
    with pytest.raises(AppError, match="Tile 99 is not in the current grid"):
        client.predict("Is there a car?", [], "99", api_name="/chat")
    history, cleared, map_json = client.predict("Is there a car?", [], "1", api_name="/chat")
    assert cleared == "" and history[-1]["role"] == "assistant"
    content = history[-1]["content"]
    text = content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)
    assert text.startswith("Tile 1: {<20><30><60><50>|0}")
    state = json.loads(map_json)
    assert state["selected"] == 1 and "Is there a car?" in state["answers"]["1"]["text"]
    history, _, _ = client.predict("And a ship?", history, "1", api_name="/chat")  # same tile: one conversation
    assert len(history) == 4 and "new conversation" not in str(history[-1]["content"])
    history, _, _ = client.predict("Any roads?", history, "2", api_name="/chat")  # another tile: a new one
    assert "Tile 2 (new conversation)" in str(history[-1]["content"])
    heatmaps, loads, note, map_json = client.predict("1", "count", api_name="/routing")
    assert Path(heatmaps).is_file() and Path(loads).is_file()
    assert note.startswith("Tile 1 ") and "8 experts" in note


def test_stop_cancels_a_run_and_keeps_the_partial_result(app):
    big = make_scene(app.data_dir / "big_scene.tif", width=2000, height=1600)  # 20 tiles
    client = _client(app)
    _load(client, server_path=str(big))
    job = client.submit("count", "small vehicle", 504, 64, 1, "Whole scene", "", api_name="/analyze")
    wait_for(lambda: len(job.outputs()) >= 3, 120, what="two batches streamed")
    job.cancel()  # what the Stop button's front end does: POST /cancel for the running event
    status = client.predict(api_name="/stop")
    assert status.startswith("**Stopped**: the partial result is kept"), status
    streamed = json.loads(job.outputs()[-1][0])["results"]["features"]
    first = json.loads(Path(client.predict("GeoJSON (EPSG:4326)", api_name="/export")).read_text())["features"]
    assert 0 < len(first) < 20 and len(first) >= len(streamed)
    time.sleep(3)  # a run that went on would keep adding detections to the session
    later = json.loads(Path(client.predict("GeoJSON (EPSG:4326)", api_name="/export")).read_text())["features"]
    assert len(later) == len(first)
    state, _, _, status = _analyze(client, "count", "small vehicle", scope="Area of interest",
                                   aoi=",".join(f"{v:.6f}" for v in _inner_box(footprint_lonlat(big))))
    assert "Done" in status and state["results"]["features"]  # the app still runs


def _inner_box(bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    west, south, east, north = bounds
    return (west + 0.2 * (east - west), south + 0.2 * (north - south),
            west + 0.8 * (east - west), south + 0.8 * (north - south))


def test_model_tab_loads_4bit_or_says_why_not(app):
    client = _client(app)
    report = client.predict(str(app.model_dir), "4bit", "cpu", api_name="/load_model")
    assert report.startswith("**Loaded**") and "M parameters" in report
    assert "quantization **4bit**" in report or "⚠️" in report, report  # 4-bit, or the fallback notice
    report = client.predict(str(app.model_dir), "none", "cpu", api_name="/load_model")
    assert report.startswith("**Loaded**") and "quantization **none**" in report
