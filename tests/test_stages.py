"""Unit tests per stage on small data made here: catalog, cube, extract, model, mapping, validate."""

from __future__ import annotations

import json

import dask
import numpy as np
import pandas as pd
import pytest
import rasterio
from dask_counting import CountTasks

from geoflux.config import ModelSpec, load_config
from geoflux.errors import CatalogError, GridError, ModelError


@pytest.fixture(scope="module")
def cfg(tiny_world_pristine):
    return load_config(tiny_world_pristine / "config.yaml")


def test_static_catalog_search_filters_time_and_names_missing(cfg):
    from geoflux.catalog import search_items

    cat = str(cfg.path(cfg.catalog))
    items = search_items(cat, "demo-ndvi", None, "2021-03-20", "2021-04-10")
    # 8-day items overlapping 20 Mar .. 10 Apr: starts 14 Mar, 22 Mar, 30 Mar, 7 Apr
    assert [i.id for i in items] == ["ndvi-20210314", "ndvi-20210322", "ndvi-20210330", "ndvi-20210407"]
    assert all(i.assets["data"].href.startswith("/") for i in items)
    with pytest.raises(CatalogError, match="no collection 'demo-nope'"):
        search_items(cat, "demo-nope")
    with pytest.raises(CatalogError, match="no items"):
        search_items(cat, "demo-ndvi", (0.0, 0.0, 1.0, 1.0))


def test_item_interval_uses_start_end_when_datetime_null(realdata):
    import pystac

    from geoflux.catalog.search import _item_interval

    path = realdata / "stac" / "modis-061" / "modis-13A1-061" / "MOD13A1.A2022017.h12v11.061.json"
    item = pystac.Item.from_file(str(path))
    assert item.datetime is None
    t0, t1 = _item_interval(item)
    assert t0 == pd.Timestamp("2022-01-17") and t1 > t0


def test_cube_is_lazy_and_decodes_scale_offset(cfg):
    from geoflux.cube import cube_from_config

    counter = CountTasks()
    with counter:
        cube = cube_from_config(cfg)
    assert counter.n == 0, "building the cube computed something"
    ta = cube["ta"]
    assert ta.chunks is not None and ta.dtype == np.float32
    n_chunks = ta.data.npartitions
    # O(chunks) tasks, not O(pixels): read, nodata mask, scale, offset, range check (blockwise, fused)
    assert len(ta.data.__dask_graph__()) <= 8 * n_chunks
    # decoded values equal raw COG values * scale + offset (read independently with rasterio)
    raw_path = cfg.path("world/cogs/lst/lst_20210322.tif")
    with rasterio.open(raw_path) as ds:
        raw = ds.read(1).astype("float64")
    lst = cube["lst"].sel(time="2021-03-22").values
    np.testing.assert_allclose(lst, raw * 0.02 - 273.15, atol=1e-3)
    lc = cube["landcover"].values
    assert set(np.unique(lc)) <= {1.0, 2.0, 3.0, 4.0}  # nearest: class codes never blended


def test_extract_footprint_weighted_means(cfg):
    import xarray as xr

    from geoflux.cube import target_grid
    from geoflux.extract import extract_drivers, tower_footprints
    from geoflux.footprint import FootprintWeights

    gb = target_grid(cfg.grid)
    ny, nx = gb.shape
    ta = xr.DataArray(
        np.arange(2 * ny * nx, dtype="float32").reshape(2, ny, nx),
        dims=("time", "y", "x"),
        coords={"time": pd.date_range("2021-01-01", periods=2, freq="8D")},
    ).chunk(16)
    lc = xr.DataArray(np.ones((ny, nx), "float32"), dims=("y", "x")).chunk(16)
    lc[10, 11] = 2
    cube = xr.Dataset({"ta": ta, "landcover": lc})
    w = np.array([[0.25, 0.25], [0.5, 0.0]])
    fw = {"S1": FootprintWeights(10, 10, w, 1.0, "test")}
    variables = [v for v in cfg.variables if v.name in ("ta", "landcover")]
    out, pixels = extract_drivers(cube, fw, variables)
    a = ta.values
    expect_ta = 0.25 * a[:, 10, 10] + 0.25 * a[:, 10, 11] + 0.5 * a[:, 11, 10]
    np.testing.assert_allclose(out["ta"], expect_ta, rtol=1e-6)
    np.testing.assert_allclose(out["landcover_2"], 0.25)  # class fraction, not an averaged code
    np.testing.assert_allclose(out["landcover_1"], 0.75)
    # the pixel table: every weighted pixel of the footprint (the zero-weight one left out) with the
    # pixel's own values, exactly what the map sees there: 0/1 class features
    assert len(pixels) == 2 * 3
    one = pixels.loc[pixels["time"] == pixels["time"].min()].set_index(["row", "col"])
    assert sorted(one.index) == [(10, 10), (10, 11), (11, 10)]
    np.testing.assert_allclose(one.loc[(11, 10), "fp_weight"], 0.5)
    np.testing.assert_allclose(one.loc[(10, 11), "ta"], a[0, 10, 11])
    assert set(pixels["landcover_2"]) == {0.0, 1.0}
    assert one.loc[(10, 11), "landcover_2"] == 1.0
    np.testing.assert_allclose(pixels.groupby("time")["fp_weight"].sum(), 1.0)
    sites = pd.DataFrame({"LAT": [0.0], "LON": [0.0]}, index=pd.Index(["FAR"], name="SITE_ID"))
    with pytest.raises(GridError, match=r"FAR.*outside the grid"):
        tower_footprints(sites, gb, cfg.footprint)


def _toy_table(n_sites=6, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        x = rng.uniform(0, 1, size=(n, 2))
        rows.append(
            pd.DataFrame(
                {
                    "site": f"S{s}",
                    "time": pd.date_range("2021", periods=n),
                    "a": x[:, 0],
                    "b": x[:, 1],
                    "NEE": 3 * x[:, 0] - x[:, 1] + 0.5 * s,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_cv_is_grouped_by_site(monkeypatch):
    from geoflux import model

    seen = []
    real = model.make_estimator

    class Spy:
        def __init__(self, est):
            self.est = est

        def fit(self, x, y):
            seen.append(len(y))
            self.est.fit(x, y)
            return self

        def predict(self, x):
            return self.est.predict(x)

    monkeypatch.setattr(model, "make_estimator", lambda spec, features=None: Spy(real(spec, features)))
    table = _toy_table()
    pred, res = model.cross_validate(
        table, ["a", "b"], ModelSpec(kind="random_forest", params={"n_estimators": 20})
    )
    assert seen == [5 * 40] * 6  # each fold trains on exactly the other five sites
    assert res["n_sites"] == 6 and np.isfinite(pred["pred"]).all()


def test_model_roundtrip_and_tamper_refused(tmp_path):
    from geoflux.model import fit, load_model, save_model

    table = _toy_table()
    m = fit(
        table, ["a", "b"], {"a": "u", "b": "u"}, ModelSpec(kind="random_forest", params={"n_estimators": 10})
    )
    path = save_model(m, tmp_path / "m.skops")
    again = load_model(path)
    x = table[["a", "b"]].to_numpy(np.float32)
    np.testing.assert_allclose(again.predict(x), m.predict(x), rtol=1e-12)  # tree sums in any order
    assert again.features == ["a", "b"] and again.provenance["sites"] == [f"S{i}" for i in range(6)]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="hash does not match"):
        load_model(path)
    foreign = tmp_path / "f.skops"
    foreign.write_bytes(b"not a model")
    card = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "f.json").write_text(
        json.dumps({**card, "sha256": __import__("hashlib").sha256(b"not a model").hexdigest()})
    )
    with pytest.raises(ModelError, match="not a skops model"):
        load_model(foreign)


def test_mapping_one_task_per_chunk_model_once(cfg):
    import xarray as xr

    from geoflux.features import feature_names
    from geoflux.mapping import predict_bands
    from geoflux.model import fit

    variables = [v for v in cfg.variables if v.name in ("ta", "landcover")]
    ny, nx, nt = 40, 36, 3
    rng = np.random.default_rng(1)
    ta = rng.normal(10, 5, (nt, ny, nx)).astype("float32")
    ta[1, 5, 7] = np.nan
    lc = rng.integers(1, 5, (ny, nx)).astype("float32")
    cube = xr.Dataset({"ta": (("time", "y", "x"), ta), "landcover": (("y", "x"), lc)}).chunk(
        {"time": 1, "y": 16, "x": 16}
    )
    names = feature_names(variables)
    feats = np.column_stack(
        [ta.ravel(), *[(np.broadcast_to(lc, ta.shape).ravel() == c) for c in (1, 2, 3, 4)]]
    )
    ok = ~np.isnan(feats).any(axis=1)
    table = pd.DataFrame(feats[ok][:500], columns=names).assign(
        site=np.arange(500) % 5, NEE=lambda d: d["ta"]
    )
    m = fit(table, names, {}, ModelSpec(kind="random_forest", params={"n_estimators": 5}))
    pred = predict_bands(cube, m, variables)  # the lazy path write_maps streams from
    graph = dict(pred.data.__dask_graph__())
    n_out = pred.data.npartitions
    import cloudpickle

    model_size = len(cloudpickle.dumps(m))
    carriers = [k for k, v in graph.items() if len(cloudpickle.dumps(v)) >= model_size]
    assert len(carriers) == 1, "the model sits in the graph exactly once"
    predict_tasks = [k for k in graph if isinstance(k, tuple) and "predict_bands_block" in str(k[0])]
    assert len(predict_tasks) == n_out  # exactly one prediction task per output chunk
    assert carriers[0] not in predict_tasks
    with dask.config.set(scheduler="threads"):
        out = pred.sel(band="NEE").values
    direct = np.full(ta.size, np.nan, np.float32)
    direct[ok] = m.predict(feats[ok].astype(np.float32))
    np.testing.assert_allclose(out.ravel(), direct, rtol=1e-6)
    assert np.isnan(out[1, 5, 7])


def test_truth_scores_match_numpy(tmp_path):
    from odc.geo.geobox import GeoBox

    from geoflux.cog import RasterSpec, write_cog
    from geoflux.validate import truth_scores

    gb = GeoBox.from_bbox((0, 0, 3000, 2000), "EPSG:32631", resolution=10)
    rng = np.random.default_rng(2)
    maps, truths, allp, allo = [], [], [], []
    for k in range(2):
        o = rng.normal(0, 2, gb.shape).astype("float32")
        p = (o + rng.normal(0.3, 0.5, gb.shape)).astype("float32")
        p[:3, :3] = np.nan
        maps.append(write_cog(np.nan_to_num(p, nan=-9999), gb, RasterSpec(tmp_path / f"p{k}.tif")))
        truths.append(write_cog(o, gb, RasterSpec(tmp_path / f"o{k}.tif")))
        ok = ~np.isnan(p)
        allp.append(p[ok])
        allo.append(o[ok])
    p, o = np.concatenate(allp).astype(float), np.concatenate(allo).astype(float)
    s = truth_scores(maps, truths)
    assert s["n"] == p.size
    assert s["nse"] == pytest.approx(1 - ((p - o) ** 2).sum() / ((o - o.mean()) ** 2).sum(), rel=1e-6)
    assert s["bias"] == pytest.approx((p - o).mean(), rel=1e-6)


def test_tower_truth_matches_footprint_weighted_truth(cfg, tiny_world_pristine):
    """The generator's towers report the footprint-weighted truth, up to their noise."""
    from geoflux import towers as tw
    from geoflux.cube import target_grid
    from geoflux.extract import tower_footprints
    from geoflux.validate import footprint_map_values

    sites = tw.read_sites(cfg.path(cfg.towers.sites))
    records = tw.read_towers(str(cfg.path(cfg.towers.files)), sites)
    obs = tw.aggregate(tw.qc_filter(records), cfg.periods())
    truths = {p: cfg.path(f"world/truth/nee_{p:%Y%m%d}.tif") for p in cfg.periods()}
    fps = tower_footprints(sites, target_grid(cfg.grid), cfg.footprint, records=records)
    # demo files carry u*, wind, Obukhov length and sigma_v: measured-input FFP for every tower
    assert {fw.method for fw in fps.values()} == {"ffp"}
    assert min(fw.coverage for fw in fps.values()) > 0.9
    vals = footprint_map_values(truths, fps)
    pairs = vals.merge(obs, on=["site", "time"])
    diff = pairs["NEE"] - pairs["map"]
    # half-hourly Laplace noise sigma ~0.5-1 umol m-2 s-1 averaged over ~300 records per 8 days,
    # plus gap-filled records: the period mean should sit within ~0.1 gC m-2 d-1 of the truth
    assert abs(diff.mean()) < 0.05
    assert diff.abs().quantile(0.95) < 0.3
    assert len(pairs) > 0.9 * len(sites) * len(cfg.periods())
