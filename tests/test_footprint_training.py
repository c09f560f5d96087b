"""Footprint-consistent learning: pixel draws, map-path CV, and a change-of-support world it must survive.

The synthetic landscape here is independent of geoflux's generator: per-pixel NEE is a non-linear function
of a class and a continuous driver, towers see weighted mixtures of pixels of different classes, and the
tower value is the weighted sum of the *per-pixel* truth. A model that learns from footprint-averaged
drivers learns f(Σ w x) and must do worse on single pixels than one that learns Σ w f(x).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from geoflux.config import FootprintSpec, ModelSpec
from geoflux.errors import FootprintError
from geoflux.footprint_fit import FootprintRows, footprint_rows
from geoflux.model import train

FEATURES = ["t", "lc_1", "lc_2"]


def _truth(t: np.ndarray, cls: np.ndarray) -> np.ndarray:
    # class 1 takes up carbon with a temperature optimum, class 2 respires exponentially: strongly non-linear
    return np.where(cls == 1, -4.0 * np.exp(-(((t - 18.0) / 6.0) ** 2)), 0.4 * np.exp(0.09 * t))


def _world(n_sites: int = 16, n_steps: int = 20, n_pix: int = 6, seed: int = 3):
    """Training table (averaged rows) and pixel table of towers over mixed two-class footprints."""
    rng = np.random.default_rng(seed)
    rows, pix = [], []
    for s in range(n_sites):
        share2 = rng.uniform(0.0, 0.6)  # many footprints mix the classes
        cls = np.where(rng.random(n_pix) < share2, 2, 1)
        cls[0] = 1 if s % 2 else 2  # the tower's own pixel alternates
        w = rng.dirichlet(np.full(n_pix, 1.5))
        base = rng.uniform(5, 25)
        for k in range(n_steps):
            t = base + 8 * np.sin(k / 3.0) + rng.normal(0, 1.5, n_pix)
            y = float(np.sum(w * _truth(t, cls)))
            onehot = np.stack([(cls == 1), (cls == 2)], axis=1).astype(float)
            time = pd.Timestamp("2021-01-01") + pd.Timedelta(days=8 * k)
            rows.append(
                {
                    "site": f"S{s:02d}",
                    "time": time,
                    "t": float(np.sum(w * t)),
                    "lc_1": float(np.sum(w * onehot[:, 0])),
                    "lc_2": float(np.sum(w * onehot[:, 1])),
                    "NEE": y,
                }
            )
            for i in range(n_pix):
                pix.append(
                    {
                        "site": f"S{s:02d}",
                        "time": time,
                        "row": s,
                        "col": i,
                        "fp_weight": w[i],
                        "t": t[i],
                        "lc_1": onehot[i, 0],
                        "lc_2": onehot[i, 1],
                    }
                )
    return pd.DataFrame(rows), pd.DataFrame(pix)


def _pixel_skill(model) -> float:
    """NSE of the model on fresh single pixels of both classes against the per-pixel truth."""
    rng = np.random.default_rng(99)
    t = rng.uniform(0, 30, 4000)
    cls = rng.integers(1, 3, 4000)
    x = np.column_stack([t, cls == 1, cls == 2]).astype(np.float32)
    truth = _truth(t, cls)
    pred = model.predict(x)
    return 1 - np.sum((pred - truth) ** 2) / np.sum((truth - truth.mean()) ** 2)


def test_draws_follow_footprint_weights():
    fr = FootprintRows(
        x=np.zeros((5, 1), np.float32),
        weight=np.array([0.7, 0.2, 0.1, 0.5, 0.5]),
        owner=np.array([0, 0, 0, 1, 1]),
        n_rows=2,
    )
    d = fr.draw(np.array([0, 1]), 20000, np.random.default_rng(0))
    counts = np.bincount(d, minlength=5) / 20000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1, 0.5, 0.5], atol=0.015)
    # only the asked rows' pixels are drawn
    assert set(fr.draw(np.array([1]), 50, np.random.default_rng(1))) <= {3, 4}
    # the footprint-weighted sum, by hand
    np.testing.assert_allclose(fr.tower_sum(np.array([1.0, 2, 3, 4, 6])), [0.7 + 0.4 + 0.3, 5.0])


def test_footprint_rows_match_table_and_renormalize():
    table, pixels = _world(n_sites=3, n_steps=2)
    table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)  # any row order
    fr = footprint_rows(table, pixels, FEATURES)
    np.testing.assert_allclose(np.bincount(fr.owner, weights=fr.weight), 1.0)
    # a row's pixels hold that row's own site and time: the weighted sum of pixel t is the row's averaged t
    np.testing.assert_allclose(fr.tower_sum(fr.x[:, 0].astype(float)), table["t"], rtol=1e-5)


@pytest.fixture(scope="module")
def fitted():
    table, pixels = _world()
    out = {}
    for method in ("averaged", "pixel", "iterative"):
        spec = ModelSpec(
            kind="random_forest",
            params={"n_estimators": 60, "min_samples_leaf": 2},
            uncertainty="quantile",
            training=method,
            seed=1,
        )
        tab = table.copy()
        if method == "averaged":  # what the pipeline does for averaged training: dominant class only
            hard = (tab["lc_1"] >= tab["lc_2"]).astype(float)
            tab["lc_1"], tab["lc_2"] = hard, 1 - hard
        out[method] = train(tab, FEATURES, dict.fromkeys(FEATURES, "1"), spec, pixels=pixels)
    return out


def test_footprint_consistent_training_beats_averaged_rows_on_single_pixels(fitted):
    skill = {m: _pixel_skill(v[0]) for m, v in fitted.items()}
    # learning Σ w f(x) instead of f(Σ w x): the per-pixel function is recovered far better
    assert skill["iterative"] > skill["averaged"] + 0.1, skill
    # the plain pixel expansion gives every pixel its tower's mixed NEE: smeared, not a cure by itself
    assert skill["iterative"] > skill["pixel"] + 0.1, skill
    assert skill["iterative"] > 0.9, skill


def test_cv_goes_through_the_map_path(fitted):
    _, _, cv = fitted["averaged"]
    assert cv["prediction_path"].startswith("map")
    assert np.isfinite(cv["averaged_rows"]["nse"])  # what a CV on averaged rows would have said
    # held-out towers predicted through their pixels: the footprint-consistent model does better there
    assert fitted["iterative"][2]["nse"] > cv["nse"] + 0.05
    for method in ("pixel", "iterative"):
        _, pred, res = fitted[method]
        assert res["training"] == method
        assert np.isfinite(pred["pred"]).all()
        assert {"lo", "hi", "DI", "AOA"} <= set(pred.columns)
        # the AOA's training points are single pixels with exact 0/1 classes, as the map sees them
        pts = fitted[method][0].aoa.points
        assert pts.shape[0] > len(pred)


def test_fallback_is_reported_per_tower_and_can_stop():
    from geoflux.extract import check_footprint_methods
    from geoflux.footprint import FootprintWeights

    sites = pd.DataFrame(
        {"LAT": [50.0, 50.1], "LON": [8.0, 8.1], "HEIGHT_MEAS": [np.nan, 30.0], "HEIGHT_CANOPY": [1, 50.0]},
        index=pd.Index(["NOH", "LOW"], name="SITE_ID"),
    )
    recs = pd.DataFrame({"site": ["NOH", "LOW"], "USTAR": [0.3, 0.3], "WS": [2.0, 2.0], "WD": [200, 200.0]})
    recs.attrs["resolution"] = "HH"
    w = np.ones((1, 1))
    fps = {s: FootprintWeights(0, 0, w, 1.0, "disk") for s in sites.index}
    table = check_footprint_methods(fps, sites, recs, FootprintSpec())
    reasons = dict(zip(table["site"], table["reason"], strict=True))
    assert "HEIGHT_MEAS" in reasons["NOH"]
    assert "displacement" in reasons["LOW"]
    with pytest.raises(FootprintError, match=r"NOH.*LOW|LOW.*NOH"):
        check_footprint_methods(fps, sites, recs, FootprintSpec(fallback="error"))
    # a disk configured on purpose is no fallback
    assert (check_footprint_methods(fps, sites, recs, FootprintSpec(method="disk"))["reason"] == "").all()


def test_training_pixels_are_what_the_map_sees(tiny_run):
    """A footprint pixel's training features, pushed through the model, give the mapped NEE at that pixel."""
    import rasterio

    from geoflux import pipeline
    from geoflux.config import load_config
    from geoflux.features import feature_names
    from geoflux.model import load_model

    out, _ = tiny_run
    cfg = load_config(out / "config.yaml")
    pixels = pd.read_parquet(out / pipeline.PIXELS)
    model = load_model(out / pipeline.MODEL)
    features = feature_names(cfg.variables)
    # class features are exact 0/1 on both ends: no footprint-fraction tails a single pixel cannot have
    lc = [f for f in features if f.startswith("landcover_")]
    assert set(np.unique(pixels[lc].to_numpy())) == {0.0, 1.0}
    sample = pixels.sample(25, random_state=0)
    for r in sample.itertuples():
        with rasterio.open(out / "maps" / f"nee_{pd.Timestamp(r.time):%Y%m%d}.tif") as ds:
            mapped = ds.read(1)[r.row, r.col]
        x = np.array([[getattr(r, f) for f in features]], dtype=np.float32)
        np.testing.assert_allclose(mapped, model.predict(x)[0], rtol=1e-5, atol=1e-5)


def test_towers_stage_names_every_disk_fallback(tiny_world, caplog):
    """Heights missing from the site table: one warning line per tower (warn), nothing written (error)."""
    from geoflux import pipeline
    from geoflux.config import load_config

    sites_csv = tiny_world / "world" / "sites.csv"
    sites = pd.read_csv(sites_csv)
    sites.drop(columns=["HEIGHT_MEAS"]).to_csv(sites_csv, index=False)
    cfg = load_config(tiny_world / "config.yaml")
    stop = cfg.model_copy(update={"footprint": cfg.footprint.model_copy(update={"fallback": "error"})})
    before = set(tiny_world.rglob("*"))
    with pytest.raises(FootprintError, match="HEIGHT_MEAS"):
        pipeline.stage_towers(stop)
    assert set(tiny_world.rglob("*")) == before
    with caplog.at_level(logging.WARNING, logger="geoflux"):
        pipeline.stage_towers(cfg)
    lines = [r.getMessage() for r in caplog.records if "disk instead of FFP" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in lines) == sorted(f"footprint {s}" for s in sites["SITE_ID"])
    methods = pd.read_csv(tiny_world / pipeline.FOOTPRINT_METHODS)
    assert set(methods["method"]) == {"disk"} and methods["reason"].str.contains("HEIGHT_MEAS").all()
