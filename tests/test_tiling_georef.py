"""Georeferencing: tile boxes -> raster pixels -> CRS polygons, exact on real data and rotated affines."""

from __future__ import annotations

from types import SimpleNamespace

import geopandas as gpd
import numpy as np
import pytest
import rasterio.transform
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from tests.fixtures import make_rasters as mr
from tiling import open_raster
from tiling.georef import areas_m2, crs_to_px, px_to_crs, tile_box_to_raster_px, tile_footprint_crs, to_geojson_lonlat
from tiling.windows import Tile


def _box(x1, y1, x2, y2, angle=0.0):
    return SimpleNamespace(x1_px=x1, y1_px=y1, x2_px=x2, y2_px=y2, angle_deg=angle)


def test_spacenet_yolo_boxes_land_on_the_footprints(real_data):
    """The 43 YOLO boxes of the chip, taken as model boxes on one 900 px tile, match the map footprints."""
    folder = real_data / "spacenet_atlanta"
    raster = open_raster(folder / "sample_geotiff.tif")
    footprints = gpd.read_file(folder / "geotiff_labels.geojson")
    assert footprints.crs == raster.crs and len(footprints) == 43
    yolo = np.loadtxt(folder / "sample_geotiff.tif.txt", ndmin=2)  # class cx cy w h, normalised
    chip = Tile(0, 0, 0, raster.width, raster.height)
    boxes = [_box((cx - w / 2) * 900, (cy - h / 2) * 900, (cx + w / 2) * 900, (cy + h / 2) * 900)
             for _, cx, cy, w, h in yolo]
    ours = np.array([px_to_crs(tile_box_to_raster_px(b, chip), raster.transform).bounds for b in boxes])
    theirs = footprints.geometry.bounds.to_numpy()
    err_m = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=-1)  # (43 ours, 43 theirs)
    best = err_m.argmin(axis=1)
    assert len(set(best)) == 43  # one-to-one
    assert err_m.min(axis=1).max() <= raster.gsd_m  # within one pixel (0.5 m)


def test_same_box_on_a_shifted_tile_lands_at_the_same_place(real_data):
    raster = open_raster(real_data / "spacenet_atlanta" / "sample_geotiff.tif")
    whole = px_to_crs(tile_box_to_raster_px(_box(600, 500, 640, 530), Tile(0, 0, 0, 900, 900)), raster.transform)
    shifted = px_to_crs(tile_box_to_raster_px(_box(200, 100, 240, 130), Tile(1, 400, 400, 504, 504)), raster.transform)
    assert whole.equals_exact(shifted, 1e-6)


@pytest.mark.parametrize("angle,shear", [(30.0, 0.0), (-65.0, 12.0)])
def test_rotated_sheared_affine_places_all_four_corners(tmp_path, angle, shear):
    raster = open_raster(mr.make_rotated(tmp_path / "rot.tif", angle_deg=angle, shear_deg=shear))
    tile = Tile(0, 4, 2, 64, 64)
    poly = px_to_crs(tile_box_to_raster_px(_box(3, 5, 13, 25), tile), raster.transform)
    rows, cols = [7, 7, 27, 27], [7, 17, 17, 7]  # the box's pixel corners in raster px
    xs, ys = rasterio.transform.xy(raster.transform, rows, cols, offset="ul")
    expected = set(zip(np.round(xs, 6), np.round(ys, 6)))
    got = {(round(x, 6), round(y, 6)) for x, y in poly.exterior.coords[:-1]}
    assert got == expected
    # a north-up bounding box from two corners would be wrong here
    two_corner = box(min(xs), min(ys), max(xs), max(ys))
    assert poly.area < 0.95 * two_corner.area


@settings(max_examples=60, deadline=None)
@given(a=st.floats(0.1, 100), e=st.floats(-100, -0.1), b=st.floats(-20, 20), d=st.floats(-20, 20),
       c=st.floats(-1e6, 1e6), f=st.floats(-1e7, 1e7),
       x=st.floats(0, 5000), y=st.floats(0, 5000), w=st.floats(1, 500), h=st.floats(1, 500))
def test_px_crs_px_round_trip(a, e, b, d, c, f, x, y, w, h):
    transform = Affine(a, b, c, d, e, f)
    if abs(transform.determinant) < 1e-3:
        return
    poly_px = box(x, y, x + w, y + h)
    back = crs_to_px(px_to_crs(poly_px, transform), transform)
    assert np.allclose(np.array(back.exterior.coords), np.array(poly_px.exterior.coords), atol=1e-4)


def test_areas_in_square_metres_and_geojson_in_lonlat(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 200, 200))  # 10 m pixels, UTM 33N
    tile = Tile(0, 0, 0, 504, 504)
    geom = px_to_crs(tile_box_to_raster_px(_box(10, 10, 20, 30), tile), raster.transform)
    gdf = gpd.GeoDataFrame({"label": ["car"]}, geometry=[geom], crs=raster.crs)
    assert areas_m2(gdf)[0] == pytest.approx(100 * 200, rel=2e-3)
    fc = to_geojson_lonlat(gdf)
    assert "crs" not in fc and fc["type"] == "FeatureCollection"
    lon, lat = np.array(fc["features"][0]["geometry"]["coordinates"][0]).T
    assert ((lon > 14) & (lon < 16)).all() and ((lat > 36) & (lat < 37)).all()  # near 15 E, 36 N: lon first


def test_tile_footprint_follows_the_affine(tmp_path):
    raster = open_raster(mr.make_sized(tmp_path / "r.tif", 100, 100))
    fp = tile_footprint_crs(Tile(0, 10, 20, 50, 50), raster.transform)
    assert fp.bounds == (500_100.0, 4_000_000.0 - 700.0, 500_600.0, 4_000_000.0 - 200.0)
