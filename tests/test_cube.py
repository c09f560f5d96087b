"""Cube stage: QA masks, derived variables, compositing, gap filling, laziness and clear errors, on items
made here (Sentinel-2-like items cloned from a recorded Earth Search item) and on the tiny demo world."""

from __future__ import annotations

import datetime as dt

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
import xarray as xr
from dask_counting import CountTasks
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from stac_server import free_port, read_cassette

from geoflux.catalog.definitions import find_definition, variable_specs
from geoflux.config import config_from_dict, load_config
from geoflux.cube import (
    composite,
    cube_from_config,
    fill_gaps,
    fill_runs,
    load_cube,
    load_variable,
    ndvi,
    nirv,
    qa_mask,
    target_grid,
    vpd_from_dewpoint,
)
from geoflux.errors import CatalogError, CubeError

# --------------------------------------------------------------------------------------------- kernels


def _reference_fill(x: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward loop over runs, for comparison."""
    out, flag = x.astype(np.float32).copy(), np.zeros(x.shape, np.uint8)
    n, i = len(x), 0
    while i < n:
        if np.isnan(x[i]):
            j = i
            while j < n and np.isnan(x[j]):
                j += 1
            if i > 0 and j < n and j - i <= max_gap:
                for k in range(i, j):
                    out[k] = x[i - 1] + (x[j] - x[i - 1]) * (k - i + 1) / (j - i + 1)
                    flag[k] = 1
            i = j
        else:
            i += 1
    return out, flag


@settings(max_examples=150, deadline=None)
@given(
    arrays(
        np.float32, st.integers(1, 30), elements=st.one_of(st.just(np.nan), st.floats(-100, 100, width=32))
    ),
    st.integers(0, 5),
)
def test_fill_runs_matches_reference(x, max_gap):
    got, flag = fill_runs(x, max_gap)
    ref, ref_flag = _reference_fill(x, max_gap)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(flag, ref_flag)
    assert np.array_equal(got[~np.isnan(x)], x[~np.isnan(x)])  # measured values never change


def test_fill_gaps_is_lazy_and_same_on_numpy_and_dask():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 20, 24)).astype("float32")
    a[rng.random(a.shape) < 0.3] = np.nan
    t = pd.date_range("2021-01-01", periods=12, freq="8D")
    arr = xr.DataArray(a, dims=("time", "y", "x"), coords={"time": t}, name="v").chunk(
        {"time": 1, "y": 10, "x": 12}
    )
    counter = CountTasks()
    with counter:
        filled, flag = fill_gaps(arr, 2)
    assert counter.n == 0 and filled.chunks[0] == (1,) * 12 and flag.name == "v_filled"
    ref, ref_flag = fill_runs(np.moveaxis(a, 0, -1), 2)
    np.testing.assert_allclose(filled.values, np.moveaxis(ref, -1, 0))
    np.testing.assert_array_equal(flag.values, np.moveaxis(ref_flag, -1, 0))


def test_qa_mask_and_derived_variables():
    qa = xr.DataArray(np.array([0, 1, 2, 3, 0x8000, 0x8001, np.nan], dtype="float32"))
    np.testing.assert_array_equal(qa_mask(qa, 0x8003, [0, 1]).values, [1, 1, 0, 0, 0, 0, 0])
    scl = xr.DataArray(np.array([4, 5, 8, 9, 0], dtype="float32"))
    np.testing.assert_array_equal(qa_mask(scl, None, [4, 5, 6, 7]).values, [1, 1, 0, 0, 0])
    red, nir = xr.DataArray(np.float32([0.05, 0.1, 0.0])), xr.DataArray(np.float32([0.45, 0.1, 0.0]))
    np.testing.assert_allclose(ndvi(red, nir).values[:2], [0.8, 0.0], atol=1e-6)
    assert np.isnan(ndvi(red, nir).values[2])  # 0/0 is missing, not an error
    np.testing.assert_allclose(nirv(red, nir).values[:2], [0.8 * 0.45, 0.0], atol=1e-6)
    # saturation vapour pressure tables (Goff-Gratch): es(20 degC) = 23.39 hPa, es(10 degC) = 12.28 hPa;
    # the Magnus formula is within 0.5 % of them in this range
    vpd = vpd_from_dewpoint(
        xr.DataArray(np.float32([20.0, 10.0, 5.0])), xr.DataArray(np.float32([10.0, 10.0, 5.2]))
    )
    np.testing.assert_allclose(vpd.values, [23.39 - 12.28, 0.0, 0.0], atol=0.05)


def test_composite_aggregations_are_lazy():
    t = pd.DatetimeIndex(["2021-01-01", "2021-01-03", "2021-01-05", "2021-01-10"])
    vals = np.array([1.0, 4.0, np.nan, 7.0], "float32")[:, None, None] * np.ones((1, 4, 4), "float32")
    arr = xr.DataArray(da.from_array(vals, chunks=(1, 2, 2)), dims=("time", "y", "x"), coords={"time": t})
    periods = pd.date_range("2021-01-01", periods=3, freq="8D")
    expect = {"mean": 2.5, "median": 2.5, "max": 4.0, "min": 1.0, "sum": 5.0}
    for agg, first in expect.items():
        counter = CountTasks()
        with counter:
            out = composite(arr, periods, "8D", agg)
        assert counter.n == 0 and out.chunks[0] == (1, 1, 1)
        v = out.values
        np.testing.assert_allclose(v[0], first)
        np.testing.assert_allclose(v[1], 7.0)  # one scene: relabelled as is
        assert np.isnan(v[2]).all()  # no scene in the third period
    with pytest.raises(CubeError, match="aggregation 'mode'"):
        composite(arr, periods, "8D", "mode")


# ------------------------------------------------------------------------- Sentinel-2-like items, locally

GRID = {
    "crs": "EPSG:32632",
    "resolution": 20.0,
    "bbox": [500000.0, 5000000.0, 502560.0, 5002560.0],
    "chunk": 64,
}
SCENES = [  # (time, red DN, nir DN, cloudy left half)
    (dt.datetime(2023, 6, 2, 10, 30), 1200, 4000, False),
    (dt.datetime(2023, 6, 5, 10, 30), 1600, 4600, False),
    (dt.datetime(2023, 6, 10, 10, 30), 1400, 5000, True),
    (dt.datetime(2023, 6, 18, 10, 30), 1800, 5400, False),
]


def _write(path, data, gb, nodata=None):
    profile = {
        "driver": "GTiff", "width": gb.shape[1], "height": gb.shape[0], "count": 1, "dtype": data.dtype.name,
        "crs": "EPSG:32632", "transform": gb.affine, "tiled": True, "blockxsize": 64, "blockysize": 64,
        "nodata": nodata,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


@pytest.fixture(scope="module")
def s2_world(realdata, tmp_path_factory):
    """A static catalog of 4 Sentinel-2 L2A items cloned from the recorded Earth Search item (its asset
    keys, raster:bands scale/offset/nodata, proj fields), with red/nir/scl rewritten to local COGs."""
    rec = read_cassette(realdata / "stac/recorded-searches/test_multiple_collections.yaml")[0]["json"][
        "features"
    ][0]
    template = pystac.Item.from_dict(rec)
    root = tmp_path_factory.mktemp("s2")
    from geoflux.config import GridSpec

    gb = target_grid(GridSpec(**GRID))
    footprint = gb.extent.to_crs("EPSG:4326")
    cat = pystac.Catalog("s2-local", "Sentinel-2-like items for tests")
    coll = pystac.Collection(
        "sentinel-2-l2a",
        "local copy",
        pystac.Extent(
            pystac.SpatialExtent([list(footprint.boundingbox)]),
            pystac.TemporalExtent([[SCENES[0][0], SCENES[-1][0]]]),
        ),
    )
    for k, (t, r, n, cloudy) in enumerate(SCENES):
        item = template.clone()
        item.id = f"S2_local_{k}"
        item.datetime = t
        item.properties["datetime"] = t.isoformat() + "Z"
        item.properties.pop("proj:epsg", None)  # pystac migrates the recorded proj:epsg to proj:code
        item.properties["proj:code"] = "EPSG:32632"
        item.geometry = footprint.json
        item.bbox = list(footprint.boundingbox)
        item.set_self_href(None)
        item.links = []
        # only the assets made local stay: the others keep the recorded tile's UTM 13N grid, which odc-stac
        # would (rightly) take as this item's footprint too
        for key in [k for k in item.assets if k not in ("red", "nir", "scl")]:
            del item.assets[key]
        scl = np.full(gb.shape, 4, "uint8")
        if cloudy:
            scl[:, : gb.shape[1] // 2] = 9  # cloud high probability
        red = np.full(gb.shape, r, "uint16")
        red[0, 0] = 0  # one nodata pixel
        for key, data in (("red", red), ("nir", np.full(gb.shape, n, "uint16")), ("scl", scl)):
            path = root / f"{item.id}_{key}.tif"
            _write(path, data, gb, nodata=0)
            a = item.assets[key]
            a.href = str(path)
            a.extra_fields["proj:shape"] = list(gb.shape)
            a.extra_fields["proj:transform"] = list(gb.affine)[:6]
        coll.add_item(item)
    cat.add_child(coll)
    cat.normalize_hrefs(str(root))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def _cfg(catalog, variables, tmp_path, start="2023-06-01", periods=4):
    end = (pd.Timestamp(start) + pd.Timedelta(days=8 * (periods - 1))).strftime("%Y-%m-%d")
    return config_from_dict(
        {
            "catalog": str(catalog),
            "variables": [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in variables],
            "towers": {"files": "none/*.csv", "sites": "none.csv"},
            "grid": GRID,
            "time": {"start": start, "end": end, "step": "8D"},
        },
        base_dir=tmp_path,
    )


def test_s2_definition_qa_derived_composite_gapfill(s2_world, tmp_path):
    """The shipped Earth Search definition, pointed at local items: SCL mask, scale/offset, derived NDVI,
    median composite, gap filling with a flag; lazy until computed, O(chunks) graph."""
    specs = variable_specs(
        find_definition("earth-search-sentinel-2-l2a"), ["red", "ndvi"], catalog=str(s2_world)
    )
    cfg = _cfg(s2_world, specs, tmp_path)
    counter = CountTasks()
    with counter:
        cube = cube_from_config(cfg)
    assert counter.n == 0, "building the cube computed something"
    assert set(cube.data_vars) == {"red", "ndvi", "ndvi_filled"}
    nd = cube["ndvi"]
    n_chunks = nd.data.npartitions
    # O(chunks) (16 here), not O(pixels) (65536): reads per scene and band, decode, mask, median, fill
    assert len(nd.data.__dask_graph__()) <= 50 * n_chunks
    with dask.config.set(scheduler="threads"):
        red, nd, flag = cube["red"].values, nd.values, cube["ndvi_filled"].values

    def refl(dn):
        return dn * 1e-4 - 0.1

    def nd_of(k):
        r, n = refl(SCENES[k][1]), refl(SCENES[k][2])
        return (n - r) / (n + r)

    # period 0: two clear scenes, median of two = their mean; the nodata red pixel stays missing
    np.testing.assert_allclose(red[0, 1:, 1:], (refl(1200) + refl(1600)) / 2, rtol=1e-5)
    assert np.isnan(red[0, 0, 0])
    np.testing.assert_allclose(nd[0, 5, 5], (nd_of(0) + nd_of(1)) / 2, rtol=1e-5)
    # period 1: cloudy on the left (SCL 9 masked) -> gap-filled from periods 0 and 2, flagged
    half = red.shape[2] // 2
    np.testing.assert_allclose(nd[1, 5, half + 3], nd_of(2), rtol=1e-5)
    np.testing.assert_allclose(nd[1, 5, 3], ((nd_of(0) + nd_of(1)) / 2 + nd_of(3)) / 2, rtol=1e-5)
    assert flag[1, 5, 3] == 1 and flag[1, 5, half + 3] == 0
    assert np.isnan(red[1, :, :half]).all()  # red has no gap filling configured: stays masked
    # period 3: no scene and no later value -> not extrapolated
    assert np.isnan(nd[3]).all() and not flag[3].any()


def test_modis_item_without_wkt_or_cog_gives_clear_errors(realdata, tmp_path):
    from geoflux.config import GridSpec, VariableSpec

    item = pystac.Item(
        "no-crs", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], dt.datetime(2021, 1, 1), {}
    )
    item.add_asset(
        "data", pystac.Asset(str(realdata / "rasters/float.tif"), media_type=pystac.MediaType.GEOTIFF)
    )
    var = VariableSpec(name="v", collection="c", asset="data")
    gb = target_grid(GridSpec(crs="EPSG:4326", resolution=0.1, bbox=(0, 0, 1, 1)))
    with pytest.raises(CubeError, match=r"cat: item no-crs: asset 'data' has no CRS"):
        load_variable([item], var, gb, 16, source="cat")
    item.properties["proj:epsg"] = 4326
    item.assets["data"].href = str(tmp_path / "gone.tif")
    with pytest.raises(CubeError, match=r"item no-crs: asset 'data': COG not found at .*gone\.tif"):
        load_variable([item], var, gb, 16)
    item.assets["data"].media_type = "application/vnd+zarr"
    with pytest.raises(CubeError, match=r"item no-crs: asset 'data' is Zarr"):
        load_variable([item], var, gb, 16)


def test_catalog_errors_through_cube_from_config(s2_world, tiny_world_pristine, tmp_path):
    from geoflux.catalog import default_retry

    (red,) = variable_specs(find_definition("earth-search-sentinel-2-l2a"), ["red"], catalog=str(s2_world))
    # a collection without the configured asset
    bad = red.model_copy(update={"asset": "red-jp2x"})
    with pytest.raises(
        CatalogError,
        match=r"catalog\.json: collection 'sentinel-2-l2a': item S2_local_0 has no "
        r"asset 'red-jp2x'",
    ):
        cube_from_config(_cfg(s2_world, [bad], tmp_path))
    # an empty search (time range without scenes)
    with pytest.raises(CatalogError, match=r"collection 'sentinel-2-l2a': no items intersect"):
        cube_from_config(_cfg(s2_world, [red], tmp_path, start="2020-01-01"))
    # an unreachable catalog
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CatalogError, match=rf"{url}: cannot reach STAC API"):
        cube_from_config(
            _cfg(url, [red.model_copy(update={"catalog": None})], tmp_path), retry=default_retry(1, 0.0)
        )


def test_gap_filling_on_demo_world(tiny_world_pristine):
    """Drop two consecutive NDVI scenes of the demo world: those periods are interpolated and flagged."""
    from geoflux.catalog import search_items

    cfg = load_config(tiny_world_pristine / "config.yaml")
    var = next(v for v in cfg.variables if v.name == "ndvi").model_copy(update={"max_gap": 2})
    items = search_items(str(cfg.path(cfg.catalog)), var.collection)
    periods = cfg.periods()
    dropped = {f"ndvi-{periods[k]:%Y%m%d}" for k in (5, 6)}
    kept = [i for i in items if i.id not in dropped]
    gb = target_grid(cfg.grid)
    cube = load_cube({"ndvi": kept}, [var], gb, periods, cfg.time.step, cfg.grid.chunk)
    full = load_cube({"ndvi": items}, [var.model_copy(update={"max_gap": 0})], gb, periods, cfg.time.step, 32)
    got, flag, truth = cube["ndvi"].values, cube["ndvi_filled"].values, full["ndvi"].values
    ok = np.isfinite(truth[4]) & np.isfinite(truth[7])
    for k, w in ((5, 1 / 3), (6, 2 / 3)):
        np.testing.assert_allclose(got[k][ok], truth[4][ok] + w * (truth[7][ok] - truth[4][ok]), rtol=1e-5)
        assert flag[k][ok].all()
    assert not flag[[0, 1, 2, 3, 4, 7]].any()
    np.testing.assert_array_equal(got[7], truth[7])
