"""Synthetic mosaics: GeoTIFF georeferencing, nodata mask, overviews, and the objects GeoJSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import MaskFlags
from shapely.geometry import box, shape

from train.synthetic.mosaic import build_mosaic, write_mosaic

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    mosaic = build_mosaic(seed=3, size_px=1024, cell_px=512, gsd_m=0.5, crs="EPSG:32633",
                          origin_crs=(400_000.0, 5_000_000.0))
    path = tmp_path_factory.mktemp("mosaic") / "m.tif"
    geojson = write_mosaic(path, mosaic)
    return mosaic, path, geojson


def test_geotiff_georeferencing_and_structure(written):
    mosaic, path, _ = written
    with rasterio.open(path) as ds:
        assert (ds.width, ds.height, ds.count) == (1024, 1024, 3)
        assert ds.crs.to_epsg() == 32633
        assert ds.res == (0.5, 0.5)
        assert ds.transform.c == 400_000.0 and ds.transform.f == 5_000_000.0
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1) == [2, 4, 8, 16]
        assert ds.mask_flag_enums[0] == [MaskFlags.per_dataset]
        mask = ds.dataset_mask()
        data = ds.read()
    assert np.array_equal(mask > 0, mosaic.valid)
    assert 0.02 < 1 - mosaic.valid.mean() < 0.3  # a nodata collar exists, most of the raster is valid
    assert data[:, ~mosaic.valid].mean() < 3  # written as 0; JPEG blurs the collar edge, the mask rules
    err = np.abs(data.transpose(1, 2, 0).astype(int) - mosaic.image)[mosaic.valid].mean()
    assert err < 4  # JPEG compression only


def test_mosaic_holds_several_scene_types_and_road_cars(written):
    mosaic, _, _ = written
    assert len(set(mosaic.cell_scenes.ravel())) >= 2
    assert "road" in mosaic.object_scenes
    assert len(mosaic.annotation.objects) == len(mosaic.object_scenes) > 10


def test_objects_geojson_matches_truth_in_raster_crs(written):
    mosaic, path, geojson = written
    fc = json.loads(Path(geojson).read_text())
    assert fc["crs"]["properties"]["name"].endswith("EPSG::32633")
    assert len(fc["features"]) == len(mosaic.annotation.objects)
    with rasterio.open(path) as ds:
        bounds = box(*ds.bounds)
        valid = ds.dataset_mask() > 0
        inv = ~ds.transform
    for feat, obj in zip(fc["features"], mosaic.annotation.objects):
        geom = shape(feat["geometry"])
        assert bounds.contains(geom)
        assert feat["properties"]["label"] == obj.label
        col, row = inv @ (geom.centroid.x, geom.centroid.y)
        assert valid[int(row), int(col)]  # no truth object lies in the nodata collar
        assert abs(geom.area - obj.attributes["length_m"] * obj.attributes["width_m"]) < 0.05 * geom.area + 0.5


def test_bad_mosaic_arguments():
    with pytest.raises(ValueError, match="multiple of cell_px"):
        build_mosaic(size_px=1000, cell_px=512)
    with pytest.raises(ValueError, match="projected"):
        build_mosaic(size_px=512, cell_px=512, crs="EPSG:4326")


def test_committed_sample_scene():
    tif, objects = ASSETS / "sample_scene.tif", ASSETS / "sample_scene_objects.geojson"
    if not tif.exists():
        pytest.skip("assets/sample_scene.tif not generated")
    assert tif.stat().st_size < 12e6
    with rasterio.open(tif) as ds:
        assert (ds.width, ds.height, ds.count) == (4096, 4096, 3)
        assert ds.crs.to_epsg() == 32618 and ds.res == (0.4, 0.4)
        assert ds.overviews(1) and ds.profile["tiled"]
        bounds = box(*ds.bounds)
    fc = json.loads(objects.read_text())
    labels = Counter(f["properties"]["label"] for f in fc["features"])
    assert len(labels) >= 6 and sum(labels.values()) > 300
    assert all(bounds.contains(shape(f["geometry"])) for f in fc["features"])
