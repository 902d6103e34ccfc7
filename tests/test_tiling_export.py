"""Export: GeoJSON lon/lat, GPKG native CRS, CSV, HTML; errors leave nothing half-written."""

from __future__ import annotations

import csv
import json

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from tests.fixtures import make_rasters as mr
from tiling import ExportError, SceneResult, TileAnswer, export, export_html_map, open_raster
from tiling.georef import areas_m2, px_to_crs


def _result(raster, boxes_px=((10, 10, 30, 20), (100, 50, 140, 90)), crs="raster"):
    crs = raster.crs if crs == "raster" else crs
    geoms = [px_to_crs(box(*b), raster.transform) for b in boxes_px]
    frame = gpd.GeoDataFrame({"label": ["car"] * len(geoms), "score": np.linspace(0.9, 0.5, len(geoms)),
                              "task": "count", "query": "car", "tile_id": np.arange(len(geoms))},
                             geometry=geoms, crs=crs)
    frame.insert(5, "area_m2", areas_m2(frame))
    answers = [TileAnswer(0, (0.0, 0.0, 1.0, 1.0), "{<1><2><5><4>}", 0.9, "", None, 1)]
    return SceneResult(frame, {"car": len(geoms)}, answers, f"{len(geoms)} car", {"total": 1.0}, crs, 1, 0,
                       "count", "car", 1)


@pytest.fixture()
def raster(tmp_path):
    return open_raster(mr.make_sized(tmp_path / "r.tif", 200, 150))


def test_geojson_is_lonlat_and_gpkg_native_and_both_read_back_the_same(tmp_path, raster):
    result = _result(raster)
    gj = export(result, tmp_path / "out.geojson")
    gp = export(result, tmp_path / "out.gpkg")
    doc = json.loads(gj.read_text())
    assert "crs" not in doc  # RFC 7946: WGS84 lon/lat implied
    coords = np.array([c for f in doc["features"] for c in f["geometry"]["coordinates"][0]])
    assert (np.abs(coords[:, 0]) <= 180).all() and (np.abs(coords[:, 1]) <= 90).all()
    assert np.allclose(coords[:, 0], 15.0, atol=0.1) and np.allclose(coords[:, 1], 36.1, atol=0.2)  # lon ~15 E first
    from_gj = gpd.read_file(gj)
    from_gp = gpd.read_file(gp, layer="detections")
    assert from_gj.crs.to_epsg() == 4326 and from_gp.crs.to_epsg() == 32633
    cols = ["label", "score", "task", "query", "tile_id"]
    assert from_gj[cols].to_dict("records") == from_gp[cols].to_dict("records") == result.detections[cols].to_dict("records")
    back = from_gp.to_crs(4326).geometry
    assert all(a.equals_exact(b, 1e-9) or a.normalize().equals_exact(b.normalize(), 1e-9)
               for a, b in zip(back, from_gj.geometry))
    assert np.allclose(from_gp.geometry.area, result.detections.geometry.area)


def test_csv_rows_with_lonlat_then_counts(tmp_path, raster):
    path = export(_result(raster), tmp_path / "d.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 and rows[0]["label"] == "car"
    assert 14 < float(rows[0]["lon"]) < 16 and 35 < float(rows[0]["lat"]) < 37
    counts = export(_result(raster, boxes_px=()), tmp_path / "c.csv")
    assert list(csv.reader(counts.open())) == [["label", "count"], ["car", "0"]]


def test_empty_result_still_makes_a_valid_gpkg(tmp_path, raster):
    path = export(_result(raster, boxes_px=()), tmp_path / "empty.gpkg")
    back = gpd.read_file(path)
    assert len(back) == 0 and back.crs.to_epsg() == 32633


def test_missing_folder_and_unknown_extension(tmp_path, raster):
    with pytest.raises(ExportError, match="does not exist"):
        export(_result(raster), tmp_path / "nope" / "out.geojson")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ExportError, match=r"\.shp"):
        export(_result(raster), tmp_path / "out.shp")
    assert list(tmp_path.iterdir()) == [tmp_path / "r.tif"]


def test_failed_export_leaves_the_old_file_and_no_temp(tmp_path, raster):
    target = tmp_path / "out.geojson"
    target.write_text("previous run")
    pixel = _result(raster, crs=None)
    with pytest.raises(ExportError, match="pixel-mode"):
        export(pixel, target)
    assert target.read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson", "r.tif"]


def test_pixel_mode_gpkg_and_csv_in_pixels(tmp_path):
    raster = open_raster(mr.make_no_crs(tmp_path / "p.tif"), pixel_mode=True)
    result = _result(raster, crs=None)
    rows = list(csv.DictReader(export(result, tmp_path / "p.csv").open()))
    assert float(rows[0]["x_px"]) == pytest.approx(20) and float(rows[0]["y_px"]) == pytest.approx(15)
    assert gpd.read_file(export(result, tmp_path / "p.gpkg")).crs is None


def test_html_map(tmp_path, raster):
    path = export_html_map(_result(raster), raster, tmp_path / "map.html")
    text = path.read_text()
    assert "leaflet" in text.lower() and "data:image/png;base64" in text and "2 car" in text
