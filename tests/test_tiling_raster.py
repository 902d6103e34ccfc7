"""open_raster: band presets, global stretch, nodata, metadata and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from tests.fixtures import make_rasters as mr
from tiling import (
    BandError,
    DataTypeError,
    MissingCRSError,
    ParameterError,
    RasterOpenError,
    make_grid,
    open_raster,
)
from tiling.reading import iter_tile_batches, read_tile
from tiling.windows import Tile


def _one_tile(raster, size=None):
    tile = Tile(0, 0, 0, size or max(raster.width, raster.height), size or max(raster.width, raster.height))
    with rasterio.open(raster.path) as ds:
        return read_tile(ds, raster, tile)


def test_uint16_rgbn_gives_full_range_rgb_without_nir(tmp_path):
    raster = open_raster(mr.make_uint16_rgbn(tmp_path / "n.tif"))
    assert raster.band_indexes == (1, 2, 3) and raster.band_preset == "auto-rgbn"
    assert raster.dtype == "uint16" and raster.count == 4
    image, valid = _one_tile(raster)
    assert image.dtype == np.uint8 and image.shape == (300, 300, 3)
    part = image[: raster.height, : raster.width]
    for ch in range(3):  # each channel spans the 8-bit range (2-98 % stretch), mid-grey on average
        assert part[..., ch].min() == 0 and part[..., ch].max() == 255
        assert 100 < part[..., ch].mean() < 155
    assert not valid[raster.height :].any()  # padding below the raster is not valid data


@pytest.mark.parametrize("preset,expected", [("sentinel2", (4, 3, 2)), ("landsat8", (4, 3, 2)),
                                             ("rgb", (1, 2, 3)), ("naip", (1, 2, 3)), ("gray", (1, 1, 1))])
def test_13_band_presets_pick_their_bands_and_stretch_each(tmp_path, preset, expected):
    raster = open_raster(mr.make_sentinel2(tmp_path / "s2.tif"), bands=preset)
    assert raster.band_indexes == expected
    # band k has values 1000k +- 500: the stretch limits show which band feeds each channel
    for band, lo, hi in zip(expected, raster.lows, raster.highs):
        assert 1000 * band - 500 <= lo < 1000 * band < hi <= 1000 * band + 500
    image, _ = _one_tile(raster)
    part = image[: raster.height, : raster.width]
    assert part.std() > 50  # a real 8-bit image, not a flat or saturated one
    assert abs(float(part.mean()) - 127.5) < 20


def test_13_band_default_is_sentinel2_and_band_indexes_work(tmp_path):
    path = mr.make_sentinel2(tmp_path / "s2.tif")
    assert open_raster(path).band_indexes == (4, 3, 2)
    assert open_raster(path, bands=[8, 4, 3]).band_indexes == (8, 4, 3)
    assert open_raster(path, bands=[11]).band_indexes == (11, 11, 11)


def test_stretch_is_global_not_per_tile(tmp_path):
    raster = open_raster(mr.make_rgb(tmp_path / "g.tif", 400, 100))  # ramp dark (left) -> bright (right)
    grid = make_grid(raster, tile=100, overlap=0)
    batch = next(iter_tile_batches(raster, grid.tiles, batch_size=len(grid.tiles)))
    means = batch.images[..., 0].mean(axis=(1, 2))
    assert list(means) == sorted(means)  # brightness keeps increasing across tiles
    assert means[0] < 60 and means[-1] > 190  # a per-tile min-max stretch would give ~127 for both


def test_float_nan_is_nodata(tmp_path):
    raster = open_raster(mr.make_float_nan(tmp_path / "f.tif"))
    image, valid = _one_tile(raster)
    assert not valid[:50, :60].any() and valid[50:100, 60:120].all()
    assert (image[:50, :60] == 0).all()


def test_vrt_opens_like_its_source(tmp_path):
    src = mr.make_rgb(tmp_path / "src.tif", 300, 200)
    vrt = open_raster(mr.make_vrt(tmp_path / "v.vrt", src))
    tif = open_raster(src)
    assert (vrt.lows, vrt.highs, vrt.transform, vrt.crs) == (tif.lows, tif.highs, tif.transform, tif.crs)
    assert np.array_equal(_one_tile(vrt)[0], _one_tile(tif)[0])


def test_real_spacenet_uint16_pan_metadata(real_data):
    raster = open_raster(real_data / "spacenet_atlanta" / "sample_geotiff.tif")
    assert raster.crs.to_epsg() == 32616 and raster.band_indexes == (1, 1, 1)
    assert raster.gsd_m == pytest.approx(0.5, rel=0.01) and raster.has_mask


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("hello, not an image")
    with pytest.raises(RasterOpenError, match="notes.tif"):
        open_raster(path)
    with pytest.raises(RasterOpenError, match="not found"):
        open_raster(tmp_path / "missing.tif")


def test_truncated_tiff(tmp_path):
    with pytest.raises(RasterOpenError, match="truncated"):
        open_raster(mr.make_truncated(tmp_path / "t.tif"))


def test_no_crs_needs_pixel_mode(tmp_path):
    path = mr.make_no_crs(tmp_path / "plain.tif")
    with pytest.raises(MissingCRSError, match="pixel_mode=True"):
        open_raster(path)
    raster = open_raster(path, pixel_mode=True)
    assert raster.crs is None and raster.pixel_mode and raster.gsd_m is None


def test_complex_data(tmp_path):
    with pytest.raises(DataTypeError, match="complex64"):
        open_raster(mr.make_complex(tmp_path / "c.tif"))


def test_band_index_out_of_range_names_the_index_and_count(tmp_path):
    path = mr.make_uint16_rgbn(tmp_path / "n.tif")
    with pytest.raises(BandError, match=r"band index 7 .* has 4 band"):
        open_raster(path, bands=[7, 2, 1])
    with pytest.raises(BandError, match="0"):
        open_raster(path, bands=[0, 1, 2])
    with pytest.raises(BandError, match="unknown band preset 'modis'"):
        open_raster(path, bands="modis")


def test_bad_stretch(tmp_path):
    with pytest.raises(ParameterError, match="0 <= low < high <= 100"):
        open_raster(mr.make_sized(tmp_path / "r.tif", 10, 10), stretch=(98, 2))


@pytest.mark.parametrize("dtype,lo,hi", [("int16", -500, 1500), ("float64", -0.2, 0.8), ("uint32", 10, 90_000)])
def test_other_data_types_stretch_to_8_bit(tmp_path, dtype, lo, hi):
    ramp = np.linspace(lo, hi, 200)[None, None, :].repeat(50, axis=1).astype(dtype)  # (1, 50, 200)
    raster = open_raster(mr.write_geotiff(tmp_path / f"{dtype}.tif", ramp))
    image, valid = _one_tile(raster)
    row = image[10, :200, 0].astype(int)
    assert valid[:50, :200].all() and row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all()  # monotone: a ramp stays a ramp
