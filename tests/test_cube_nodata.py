"""Missing stays missing, rasters are checked (issue #15 items 1-2): nodata from every source and areas a
raster does not cover are NaN before scaling, derived drivers are NaN where an input is, broken rasters,
implausible values and mostly-missing scenes are named by variable, item and asset.

Rasters are made here (MODIS-like int16 with its fill value, in the sinusoidal projection) or read from the
shared real data (rasterio's test rasters), never copied into the repository.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import dask
import numpy as np
import pystac
import pytest
import rasterio
from odc.geo.geobox import GeoBox

from geoflux.catalog.definitions import find_definition, variable_specs
from geoflux.config import VariableSpec, load_config
from geoflux.cube import load_variable
from geoflux.errors import CubeError

SINU = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
MODIS_RES = 463.312716528
# a 40 x 40 MODIS-like raster; the grid below is coarser (resampled, not pasted) and reaches 32 % past it
RASTER = GeoBox.from_bbox((800000.0, 5200000.0 - 40 * MODIS_RES, 800000.0 + 40 * MODIS_RES, 5200000.0),
                          SINU, resolution=MODIS_RES)  # fmt: skip
GRID = GeoBox.from_bbox((805000.0, 5185000.0, 825000.0, 5195000.0), SINU, resolution=500.0)


def _tif(path: Path, data: np.ndarray, gb: GeoBox, nodata: float | None) -> Path:
    bands = data if data.ndim == 3 else data[None]
    profile = {
        "driver": "GTiff", "width": gb.shape[1], "height": gb.shape[0], "count": bands.shape[0],
        "dtype": bands.dtype.name, "crs": gb.crs.to_wkt(), "transform": gb.affine, "nodata": nodata,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
    return path


def _item(item_id: str, assets: dict[str, tuple[Path, list[dict] | None]], gb: GeoBox) -> pystac.Item:
    """A MODIS-like item: datetime null with start/end, CRS as proj:wkt2 unless it has an EPSG code."""
    fp = gb.extent.to_crs("EPSG:4326")
    props = {"start_datetime": "2021-06-10T00:00:00Z", "end_datetime": "2021-06-25T23:59:59Z"}
    item = pystac.Item(item_id, fp.json, list(fp.boundingbox), None, props)
    epsg = gb.crs.epsg
    item.properties.update({"proj:code": f"EPSG:{epsg}"} if epsg else {"proj:wkt2": gb.crs.to_wkt()})
    for key, (path, bands) in assets.items():
        a = pystac.Asset(str(path), media_type=pystac.MediaType.GEOTIFF, roles=["data"])
        a.extra_fields.update({"proj:shape": list(gb.shape), "proj:transform": list(gb.affine)[:6]})
        if bands is not None:
            a.extra_fields["raster:bands"] = bands
        item.add_asset(key, a)
    return item


def _values(arr) -> np.ndarray:
    with dask.config.set(scheduler="threads"):
        return arr.values


def _grid_centres_x(gb: GeoBox) -> np.ndarray:
    return gb.affine.c + (np.arange(gb.shape[1]) + 0.5) * gb.affine.a


# --------------------------------------------------------------------- MODIS-like int16 with its fill value


def _ndvi_spec(nodata: float | None) -> VariableSpec:
    (spec,) = variable_specs(find_definition("pc-modis-13A1-061"), ["ndvi"])
    # the region reaches past the raster on purpose; QA all good; valid_range off so that a decoded fill
    # value (-0.3) would show instead of being masked by luck
    return spec.model_copy(update={"nodata": nodata, "missing_max": 0.9, "valid_range": None})


@pytest.mark.parametrize(
    ("config_nodata", "file_tag", "stac_nodata"),
    [
        (-3000, -3000, -3000),  # declared everywhere
        (-3000, None, None),  # only the config knows: GDAL must still skip the fill when resampling
        (None, None, -3000),  # only the item's raster:bands knows
        (None, -3000, None),  # only the file knows
    ],
)
def test_modis_fill_and_outside_footprint_are_nan(tmp_path, config_nodata, file_tag, stac_nodata):
    raw = np.full(RASTER.shape, 5000, "int16")  # NDVI 0.5
    raw[:, 10:20] = -3000  # a stripe of fill
    qa = np.zeros(RASTER.shape, "uint16")
    rb = [{"nodata": stac_nodata, "data_type": "int16"}] if stac_nodata is not None else None
    item = _item(
        "MOD13A1.A2021161.h18v04",
        {
            "500m_16_days_NDVI": (_tif(tmp_path / "ndvi.tif", raw, RASTER, file_tag), rb),
            "500m_16_days_VI_Quality": (_tif(tmp_path / "qa.tif", qa, RASTER, None), None),
        },
        RASTER,
    )
    arr = load_variable([item], _ndvi_spec(config_nodata), GRID, 16)
    v = _values(arr)[0]
    finite = v[np.isfinite(v)]
    # constant data 0.5: any other finite value is fill leaking in (decoded -0.3, or blended with it)
    np.testing.assert_allclose(finite, 0.5, atol=1e-6)
    x = _grid_centres_x(GRID)
    x_fill = RASTER.affine.c + np.array([10, 20]) * MODIS_RES
    x_end = RASTER.affine.c + 40 * MODIS_RES
    in_fill = (x > x_fill[0] + 500) & (x < x_fill[1] - 500)
    outside = x > x_end + 500
    data = (x < x_fill[0] - 500) | ((x > x_fill[1] + 500) & (x < x_end - 500))
    assert in_fill.any() and outside.any() and data.sum() > 10
    assert np.isnan(v[:, in_fill]).all()
    assert np.isnan(v[:, outside]).all()
    assert np.isfinite(v[1:, data]).all()


def test_file_nodata_other_than_declared_is_named(tmp_path):
    """A file tagged 0 whose fill is -3000: GDAL can skip only one of them while resampling."""
    path = _tif(tmp_path / "ndvi.tif", np.full(RASTER.shape, 5000, "int16"), RASTER, 0)
    qa = _tif(tmp_path / "qa.tif", np.zeros(RASTER.shape, "uint16"), RASTER, None)
    item = _item("A", {"500m_16_days_NDVI": (path, None), "500m_16_days_VI_Quality": (qa, None)}, RASTER)
    with pytest.raises(
        CubeError, match=r"variable 'ndvi': item A: asset '500m_16_days_NDVI': .*ndvi\.tif: the file's "
        r"nodata is 0 but -3000 is declared \(expected the same value"
    ):  # fmt: skip
        load_variable([item], _ndvi_spec(-3000), GRID, 16)


def test_nirv_is_nan_where_red_is_nodata(tmp_path):
    """The shipped NIRv (NDVI x NIR from red/NIR reflectance, fill -1000) on the raster's own grid."""
    rng = np.random.default_rng(3)
    red = rng.integers(200, 1500, RASTER.shape).astype("int16")
    nir = rng.integers(2000, 5000, RASTER.shape).astype("int16")
    hole = rng.random(RASTER.shape) < 0.1
    red[hole] = -1000
    rb = [{"nodata": -1000, "data_type": "int16", "scale": 0.0001}]
    item = _item(
        "MOD13A1.A2021161.h18v04",
        {
            "500m_16_days_red_reflectance": (_tif(tmp_path / "red.tif", red, RASTER, -1000), rb),
            "500m_16_days_NIR_reflectance": (_tif(tmp_path / "nir.tif", nir, RASTER, -1000), rb),
            "500m_16_days_VI_Quality": (_tif(tmp_path / "qa.tif", np.zeros_like(red), RASTER, None), None),
        },
        RASTER,
    )
    (spec,) = variable_specs(find_definition("pc-modis-13A1-061"), ["nirv"])
    v = _values(load_variable([item], spec, RASTER, 16))[0]
    np.testing.assert_array_equal(np.isnan(v), hole)
    r, n = red * 1e-4, nir * 1e-4
    want = (n - r) / (n + r) * n
    np.testing.assert_allclose(v[~hole], want[~hole], rtol=1e-5)


def test_lst_fill_is_missing_not_minus_273(tmp_path):
    """uint16 LST, fill 0, scale 0.02 K, converted to degC; no valid_range to hide a decoded fill."""
    raw = np.full(RASTER.shape, 14600, "uint16")  # 292 K = 18.85 degC
    raw[5:9, 5:9] = 0
    path = _tif(tmp_path / "lst.tif", raw, RASTER, None)  # the fill is declared only in the config
    item = _item("MOD11A2.A2021161.h18v04", {"LST_Day_1km": (path, None)}, RASTER)
    spec = VariableSpec(
        name="lst", collection="modis-11A2-061", asset="LST_Day_1km", scale=0.02, offset=-273.15,
        nodata=0, units="degC", physical_range=(-95.0, 95.0),
    )  # fmt: skip
    v = _values(load_variable([item], spec, RASTER, 16))[0]
    np.testing.assert_array_equal(np.isnan(v), raw == 0)
    np.testing.assert_allclose(v[raw != 0], 14600 * 0.02 - 273.15, rtol=1e-6)
    # the same raster with the fill declared nowhere: -273.15 degC is outside the physical range, and
    # the error (raised in the chunk's task) names variable, step, item and asset
    undeclared = spec.model_copy(update={"nodata": None})
    with pytest.raises(
        CubeError,
        match=r"variable 'lst': step 2021-06-10 00:00: item MOD11A2\.A2021161\.h18v04: asset "
        r"'LST_Day_1km': 16 pixel\(s\) outside physical_range \[-95, 95\] degC \(min -273\.1",
    ):
        _values(load_variable([item], undeclared, RASTER, 16))
    with pytest.warns(UserWarning, match=r"variable 'lst'.*outside physical_range"):
        v = _values(
            load_variable([item], undeclared.model_copy(update={"on_implausible": "warn"}), RASTER, 16)
        )
    np.testing.assert_array_equal(np.isnan(v[0]), raw == 0)  # warned, and the implausible values are missing


# ------------------------------------------------------------------------------------ real rasters


def _file_grid(path: Path) -> GeoBox:
    with rasterio.open(path) as ds:
        return GeoBox(
            ds.shape, ds.transform, ds.crs.to_wkt() if ds.crs.to_epsg() is None else ds.crs.to_epsg()
        )


def test_real_all_nodata_raster_is_named(realdata):
    path = realdata / "rasters/all-nodata.tif"
    gb = _file_grid(path)
    with rasterio.open(path) as ds:
        assert not ds.read_masks(1).any()  # the premise: every pixel is nodata
        bands = [{"nodata": 0, "data_type": "uint16"}] * ds.count
    item = _item("scene-1", {"ndvi": (path, bands)}, gb)
    spec = VariableSpec(name="ndvi", collection="c", asset="ndvi", scale=1e-4, units="1")
    with pytest.raises(
        CubeError,
        match=r"^cat: variable 'ndvi': step 2021-06-10 00:00: item scene-1: asset 'ndvi': 100% of the "
        r"region is missing \(nodata or outside the raster\) \(expected at most missing_max 50%\)$",
    ):
        load_variable([item], spec, gb, 256, source="cat")
    with pytest.warns(UserWarning, match="100% of the region is missing"):
        arr = load_variable([item], spec.model_copy(update={"on_implausible": "warn"}), gb, 256)
    assert np.isnan(_values(arr)).all()


def test_real_raster_nan_exactly_where_its_mask_says(realdata):
    """shade.tif (EPSG:3857, uint8, nodata 255, 88 % nodata): NaN exactly where rasterio's mask is 0."""
    path = realdata / "rasters/shade.tif"
    gb = _file_grid(path)
    item = _item("shade", {"data": (path, None)}, gb)
    spec = VariableSpec(name="shade", collection="c", asset="data", scale=0.01, missing_max=0.95)
    v = _values(load_variable([item], spec, gb, 256))[0]
    with rasterio.open(path) as ds:
        mask, raw = ds.read_masks(1), ds.read(1)
    np.testing.assert_array_equal(np.isnan(v), mask == 0)
    np.testing.assert_allclose(v[mask > 0], raw[mask > 0] * 0.01, rtol=1e-6)
    # with the default missing_max the coverage check names the scene, with the share measured
    with pytest.raises(CubeError, match=r"item shade: asset 'data': 8\d% of the region is missing"):
        load_variable([item], spec.model_copy(update={"missing_max": 0.5}), gb, 256)


def test_broken_rasters_named_up_front(realdata, tmp_path):
    gb = _file_grid(realdata / "rasters/shade.tif")
    spec = VariableSpec(name="ndvi", collection="c", asset="ndvi", scale=1e-4, nodata=-3000, units="1")
    # a 3-band RGB where one band is expected
    rgb = _item("rgb", {"ndvi": (realdata / "rasters/RGB.byte.tif", None)}, gb)
    with pytest.raises(
        CubeError, match=r"^cat: variable 'ndvi': item rgb: asset 'ndvi': .*RGB\.byte\.tif: has 3 bands "
        r"\(expected 1: one driver per asset\)$"
    ):  # fmt: skip
        load_variable([rgb], spec, gb, 256, source="cat")
    # a file that is not a raster at all
    junk = tmp_path / "ndvi_20210610.tif"
    junk.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(
        CubeError, match=r"item junk: asset 'ndvi': .*ndvi_20210610\.tif: not a readable raster"
    ):
        load_variable([_item("junk", {"ndvi": (junk, None)}, gb)], spec, gb, 256)
    # a uint8 file cannot hold the declared fill -3000 (an NDVI product is int16)
    shade = _item("shade", {"ndvi": (realdata / "rasters/shade.tif", None)}, gb)
    with pytest.raises(
        CubeError, match=r"item shade: asset 'ndvi': .*data type uint8 cannot hold nodata -3000"
    ):
        load_variable([shade], spec, gb, 256)
    # the item says int16, the file is uint8
    shade.assets["ndvi"].extra_fields["raster:bands"] = [{"data_type": "int16"}]
    with pytest.raises(CubeError, match=r"item shade: asset 'ndvi': .*data type uint8 \(expected int16"):
        load_variable([shade], spec.model_copy(update={"nodata": None}), gb, 256)


# ------------------------------------------------------------------------------ the demo world's drivers


def _demo_item(world: Path, name: str, k: int):
    from geoflux.catalog import search_items

    cfg = load_config(world / "config.yaml")
    var = next(v for v in cfg.variables if v.name == name)
    items = sorted(search_items(str(cfg.path(cfg.catalog)), var.collection), key=lambda i: i.datetime)
    return cfg, var, items[k]


def test_demo_driver_with_10_percent_nodata(tiny_world):
    cfg, var, item = _demo_item(tiny_world, "ndvi", 2)
    src = Path(item.assets["data"].get_absolute_href())
    dst = tiny_world / "ndvi_holes.tif"
    shutil.copy(src, dst)
    with rasterio.open(dst, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        assert ds.nodata == -3000
        raw = ds.read(1)
        holes = np.random.default_rng(7).random(raw.shape) < 0.1
        raw[holes] = -3000
        ds.write(raw, 1)
    item.assets["data"].href = str(dst)
    from geoflux.cube import target_grid

    gb = target_grid(cfg.grid)
    v = _values(load_variable([item], var, gb, cfg.grid.chunk))[0]
    with rasterio.open(dst) as ds:
        mask, raw = ds.read_masks(1), ds.read(1)
        assert ds.transform == gb.affine and ds.shape == gb.shape  # the demo grid is the COGs' grid
    assert 0.08 < (mask == 0).mean() < 0.12
    np.testing.assert_array_equal(np.isnan(v), mask == 0)
    np.testing.assert_allclose(v[mask > 0], raw[mask > 0] * 1e-4, rtol=1e-6)


def test_demo_driver_decoded_wrong_is_reported(tiny_world):
    """Air temperature stored as int16 hundredths of degC, configured without its scale: 100x too warm."""
    cfg, var, item = _demo_item(tiny_world, "ta", 1)
    from geoflux.cube import target_grid

    gb = target_grid(cfg.grid)
    wrong = var.model_copy(update={"scale": 1.0, "physical_range": (-90.0, 60.0)})
    with pytest.raises(CubeError, match=rf"variable 'ta': step .*: item {item.id}: asset 'data': \d+ pixel"):
        _values(load_variable([item], wrong, gb, cfg.grid.chunk))
    right = var.model_copy(update={"physical_range": (-90.0, 60.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert np.isfinite(_values(load_variable([item], right, gb, cfg.grid.chunk))).all()


# ------------------------------------------------------------------------------ prediction on missing


def test_every_map_band_is_nodata_where_any_driver_is_missing():
    from test_mapping_helpers import VARIABLES, bands_model, cube, grid

    from geoflux.mapping import predict_bands

    ds = cube(grid(48, 40), nt=2)
    model = bands_model()
    out = _values(predict_bands(ds, model, VARIABLES))
    missing = np.zeros(out.shape[1:], bool)
    for v in VARIABLES:
        a = ds[v.name].values
        missing |= np.isnan(a if a.ndim == 3 else np.broadcast_to(a, out.shape[1:]))
    assert missing.any() and not missing.all()
    for k, band in enumerate(model.bands):  # NEE, quantiles, DI, AOA
        np.testing.assert_array_equal(np.isnan(out[k]), missing, err_msg=band)


def test_coverage_measured_once_per_scene_and_checked_every_time(tmp_path, monkeypatch):
    """A run builds its cube in several stages: the coarse coverage read is done once per process and
    file version, while the check (here an error) is made on every build."""
    import geoflux.cube as cube

    data = np.full(GRID.shape, 100, np.int16)
    cols = GRID.shape[1]
    data[:, : cols * 6 // 10] = -3000  # 60 % of the region missing
    path = _tif(tmp_path / "ndvi.tif", data, GRID, -3000)
    item = _item("scene", {"ndvi": (path, None)}, GRID)
    spec = VariableSpec(name="ndvi", collection="c", asset="ndvi", scale=1e-4, nodata=-3000, units="1")
    calls = []
    measure = cube._measure_coverage
    monkeypatch.setattr(cube, "_measure_coverage", lambda *a, **k: calls.append(1) or measure(*a, **k))
    for _ in range(2):
        with pytest.raises(CubeError, match=r"item scene: asset 'ndvi': 60% of the region is missing"):
            load_variable([item], spec, GRID, 256)
    assert len(calls) == 1
    # the file rewritten with fewer holes is measured again (and now passes)
    data[:, : cols // 10] = -3000
    data[:, cols // 10 :] = 100
    _tif(path, data, GRID, -3000)
    arr = load_variable([item], spec, GRID, 256)
    assert len(calls) == 2
    assert np.isnan(_values(arr)).mean() == pytest.approx(0.1)
