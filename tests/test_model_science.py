"""Model stage science: validation schemes, uncertainty band, area of applicability, safe model files.

Toy tables are made here; the demo-world checks (coverage, AOA, importance against the generator) are in
tests/test_analysis.py, which trains once on the tiny world.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from geoflux.config import ModelSpec
from geoflux.errors import ModelError

FEW_TREES = {"n_estimators": 30, "min_samples_leaf": 2}


def _sites_table(n_sites=12, n=30, seed=0, noise=0.3):
    """Sites on a line west→east, warmer to the east; NEE = 2a − b + site-independent noise ∝ (1 + a)."""
    rng = np.random.default_rng(seed)
    rows, sites = [], []
    for s in range(n_sites):
        a = rng.uniform(0, 1, n)
        b = rng.uniform(0, 1, n)
        ta = 5 + s + rng.normal(0, 0.5, n)
        rows.append(
            pd.DataFrame(
                {
                    "site": f"S{s:02d}",
                    "time": pd.date_range("2021-01-01", periods=n, freq="D"),
                    "a": a,
                    "b": b,
                    "ta": ta,
                    "NEE": 2 * a - b + rng.normal(0, noise * (1 + a)),
                }
            )
        )
        sites.append({"SITE_ID": f"S{s:02d}", "LAT": 50.0, "LON": 10.0 + 0.2 * s})
    return pd.concat(rows, ignore_index=True), pd.DataFrame(sites).set_index("SITE_ID")


@pytest.mark.parametrize("scheme", ["site", "spatial_block", "climate"])
def test_grouped_schemes_never_split_a_site(scheme):
    from geoflux.model import cv_splits

    table, sites = _sites_table()
    spec = ModelSpec(cv=scheme, cv_block_km=30.0, cv_folds=0 if scheme != "climate" else 4)
    folds, name = cv_splits(table, spec, sites)
    assert len(folds) >= 2
    seen = np.zeros(len(table), int)
    for train, test in folds:
        assert not set(table.loc[train, "site"]) & set(table.loc[test, "site"]), name
        seen[test] += 1
    assert (seen == 1).all()  # every row held out exactly once
    if scheme == "spatial_block":
        # sites 0.2 deg of longitude apart (~14 km) in 30 km blocks: at most 3 neighbouring sites per block
        for _, test in folds:
            ids = sorted(int(s[1:]) for s in set(table.loc[test, "site"]))
            assert len(ids) <= 3 and ids == list(range(ids[0], ids[0] + len(ids)))
        assert len(folds) <= 8
    if scheme == "climate":
        warmest = table.groupby("site")["ta"].mean().sort_values().index[-3:]
        held_out = [set(table.loc[test, "site"]) for _, test in folds]
        assert set(warmest) in held_out  # the warmest bin is one extrapolation fold


def test_temporal_holdout_alternates_blocks_and_validates_one_site():
    from geoflux.model import cross_validate, cv_splits

    table, _ = _sites_table(n_sites=1, n=64, noise=0.05)
    spec = ModelSpec(cv="temporal", cv_block_days=8, kind="random_forest", params=FEW_TREES, aoa=False)
    folds, _ = cv_splits(table, spec)
    day = (table["time"] - table["time"].min()).dt.days.to_numpy()
    for train, test in folds:
        assert len(set(day[test] // 8 % 2)) == 1 and not set(day[test] // 8) & set(day[train] // 8)
    pred, res = cross_validate(table, ["a", "b"], spec)
    assert np.isfinite(pred["pred"]).all() and res["nse"] > 0.5
    with pytest.raises(ModelError, match="fewer than 2 sites"):
        cross_validate(table, ["a", "b"], ModelSpec(kind="random_forest", params=FEW_TREES))


def test_band_covers_nominal_share_of_held_out_sites():
    from geoflux.model import cross_validate

    table, _ = _sites_table(n_sites=15, n=60, seed=3)
    spec = ModelSpec(
        kind="random_forest", params=FEW_TREES, uncertainty="quantile", cv_folds=5, interval=0.9, aoa=False
    )
    pred, res = cross_validate(table, ["a", "b"], spec)
    u = res["uncertainty"]
    assert 0.8 <= u["coverage"] <= 0.95
    inside = (pred["obs"] >= pred["lo"]) & (pred["obs"] <= pred["hi"])
    assert u["coverage"] == pytest.approx(inside.mean())
    # heteroscedastic noise (sd ∝ 1 + a): the band is wider where a is large
    width = pred["hi"] - pred["lo"]
    assert width[table["a"] > 0.8].mean() > 1.3 * width[table["a"] < 0.2].mean()


def test_aoa_flags_extrapolation_and_roundtrips(tmp_path):
    from geoflux.model import load_model, save_model, train

    table, _ = _sites_table(n_sites=8, n=40, seed=1)
    spec = ModelSpec(kind="random_forest", params=FEW_TREES, cv_folds=4)
    m, _, cv = train(table, ["a", "b"], {"a": "1", "b": "1"}, spec)
    assert m.bands == ("NEE", "NEE_q05", "NEE_q95", "DI", "AOA")
    assert cv["aoa"]["fraction_inside"] > 0.9
    # a drives NEE twice as strongly as b: its importance weight is larger
    assert m.aoa.weights[0] > m.aoa.weights[1]
    x = np.array([[0.5, 0.5], [1.2, 0.5], [3.0, 0.5], [10.0, 0.5]], np.float32)
    bands = m.predict_bands(x)
    assert bands.shape == (4, 5) and bands.dtype == np.float32
    di = bands[:, 3]
    assert np.all(np.diff(di) > 0)  # farther from the training data, more dissimilar
    assert bands[0, 4] == 1 and bands[-1, 4] == 0
    assert np.all(bands[:, 1] <= bands[:, 0]) and np.all(bands[:, 0] <= bands[:, 2])
    path = save_model(m, tmp_path / "m.skops")
    again = load_model(path)
    assert again.bands == m.bands
    np.testing.assert_allclose(again.predict_bands(x), bands, rtol=1e-6)
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["bands"] == list(m.bands) and card["aoa_threshold"] == pytest.approx(m.aoa.threshold)


def test_di_scaled_margin_holds_coverage_where_errors_grow_with_dissimilarity():
    """Held-out errors whose spread grows with DI (drawn here, not from any model): a flat margin covers
    the similar third too often and the dissimilar third too rarely; the DI-scaled margin holds the
    nominal share in each third, on fresh draws it was not calibrated on."""
    from geoflux.model import _conformal_quantile, _di_scaled_margin

    rng = np.random.default_rng(4)

    def draws(n):
        z = rng.uniform(0, 3, n)  # DI / AOA threshold
        return z, np.abs(rng.normal(0, 0.2 * (1 + 2 * z)))

    z, e = draws(6000)
    scale = np.full_like(e, 0.1)  # an uninformative band model: half-width 0.1 everywhere
    w = np.ones_like(e)
    margin, slope = _di_scaled_margin(e - scale, e, w, z, 0.9)
    flat = _conformal_quantile(e - scale, 0.9, w)
    assert 1.0 < slope < 4.0  # the drawn spread grows by a factor 1 + 2z
    z2, e2 = draws(30000)
    scaled_cover = e2 <= 0.1 + margin * (1 + slope * z2)
    flat_cover = e2 <= 0.1 + flat
    for lo, hi in ((0, 1), (1, 2), (2, 3)):
        m = (z2 >= lo) & (z2 < hi)
        assert 0.86 < scaled_cover[m].mean() < 0.94, (lo, scaled_cover[m].mean())
    assert flat_cover[z2 < 1].mean() > 0.97 and flat_cover[z2 >= 2].mean() < 0.85
    # errors that do not grow with DI keep the flat margin
    e3 = np.abs(rng.normal(0, 0.3, 6000))
    assert _di_scaled_margin(e3 - 0.1, e3, w, z, 0.9)[1] < 0.1


def test_band_widens_with_di_and_roundtrips(tmp_path):
    from geoflux.model import load_model, save_model, train

    table, _ = _sites_table(n_sites=8, n=40, seed=1)
    spec = ModelSpec(kind="random_forest", params=FEW_TREES, cv_folds=4, uncertainty="residual")
    m, _, cv = train(table, ["a", "b"], {"a": "1", "b": "1"}, spec)
    assert cv["uncertainty"]["margin_di_slope"] == m.margin_di_slope >= 0
    m.margin_di_slope = 2.0  # whatever the CV found, the band must follow the stated rule
    x = np.array([[0.5, 0.5], [1.5, 0.5], [4.0, 0.5]], np.float32)
    b = m.predict_bands(x).astype(np.float64)
    expected = m.conformal_margin * (1 + 2.0 * b[:, 3] / m.aoa.threshold)
    flat = m.margin_di_slope
    m.margin_di_slope = 0.0
    b0 = m.predict_bands(x).astype(np.float64)
    m.margin_di_slope = flat
    np.testing.assert_allclose(b[:, 2] - b0[:, 2], expected - m.conformal_margin, rtol=1e-4, atol=1e-5)
    again = load_model(save_model(m, tmp_path / "m.skops"))
    assert again.margin_di_slope == 2.0
    np.testing.assert_allclose(again.predict_bands(x), b, rtol=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["margin_di_slope"] == 2.0


def test_foreign_type_in_skops_file_refused(tmp_path):
    from fractions import Fraction

    from geoflux.model import fit, load_model, save_model

    table, _ = _sites_table(n_sites=3, n=20)
    m = fit(
        table,
        ["a", "b"],
        {},
        ModelSpec(kind="random_forest", params={"n_estimators": 5}, uncertainty="none", aoa=False),
    )
    path = save_model(m, tmp_path / "m.skops")
    card = json.loads((tmp_path / "m.json").read_text())
    blob = sio.dumps({"estimator": m.estimator, "extra": Fraction(1, 3)})
    path.write_bytes(blob)
    (tmp_path / "m.json").write_text(json.dumps({**card, "sha256": hashlib.sha256(blob).hexdigest()}))
    with pytest.raises(ModelError, match="untrusted type"):
        load_model(path)


def test_lightgbm_optional_extra(tmp_path):
    pytest.importorskip("lightgbm")
    from geoflux.model import fit, load_model, save_model

    table, _ = _sites_table(n_sites=4, n=40)
    spec = ModelSpec(kind="lightgbm", params={"n_estimators": 20}, uncertainty="none", aoa=False)
    m = fit(table, ["a", "b"], {}, spec)
    again = load_model(save_model(m, tmp_path / "m.skops"))
    x = table[["a", "b"]].to_numpy(np.float32)
    np.testing.assert_allclose(again.predict(x), m.predict(x))


def test_missing_optional_regressor_is_named(monkeypatch):
    import importlib.util

    from geoflux.model import make_estimator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "xgboost" else real(n, *a))
    with pytest.raises(ModelError, match="xgboost is not installed"):
        make_estimator(ModelSpec(kind="xgboost"))


DEFAULT_ESTIMATOR, DEFAULT_DEPTH = "HistGradientBoostingRegressor", 6  # README "Choosing the model"
SMALL_BOOST = {"max_iter": 40, "max_depth": 4, "learning_rate": 0.1}


def test_residual_band_is_one_model_symmetric_and_covers(tmp_path):
    from geoflux.model import cross_validate, load_model, save_model, train

    table, _ = _sites_table(n_sites=15, n=60, seed=3)
    spec = ModelSpec(
        kind="hist_gradient_boosting", params=SMALL_BOOST, uncertainty="residual", cv_folds=5, aoa=False
    )
    pred, res = cross_validate(table, ["a", "b"], spec)
    u = res["uncertainty"]
    assert 0.8 <= u["coverage"] <= 0.95 and "residual" in u["method"]
    # heteroscedastic noise (sd ∝ 1 + a): the one scale model widens the band where a is large
    width = pred["hi"] - pred["lo"]
    assert width[table["a"] > 0.8].mean() > 1.3 * width[table["a"] < 0.2].mean()
    m, _, _ = train(table, ["a", "b"], {"a": "1", "b": "1"}, spec)
    assert len(m.quantile_models) == 1 and m.bands == ("NEE", "NEE_q05", "NEE_q95")
    x = table[["a", "b"]].to_numpy(np.float32)[:200]
    bands = m.predict_bands(x).astype(np.float64)
    # independent of raw_bounds: NEE -/+ (the scale model's non-negative prediction + the margin)
    half = np.maximum(m.quantile_models[0].predict(x), 0) + m.conformal_margin
    np.testing.assert_allclose(bands[:, 2] - bands[:, 0], half, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bands[:, 0] - bands[:, 1], half, rtol=1e-5, atol=1e-5)
    again = load_model(save_model(m, tmp_path / "m.skops"))
    assert len(again.quantile_models) == 1
    np.testing.assert_allclose(again.predict_bands(x), bands.astype(np.float32), rtol=1e-6)


def test_default_model_recovers_the_signal_on_held_out_sites_and_its_band_covers():
    """ModelSpec() as shipped (kind, params, band): skill against the noise-free signal, not the noisy obs."""
    from geoflux.metrics import scores
    from geoflux.model import cross_validate, make_estimator

    spec = ModelSpec(cv_folds=5, aoa=False)
    est = make_estimator(spec)
    assert type(est).__name__ == DEFAULT_ESTIMATOR and est.get_params()["max_depth"] == DEFAULT_DEPTH
    table, _ = _sites_table(n_sites=15, n=60, seed=3)
    pred, res = cross_validate(table, ["a", "b"], spec)
    signal = 2 * table["a"] - table["b"]  # what the generator computes before its noise
    assert scores(signal, pred["pred"])["nse"] > 0.85
    assert 0.8 <= res["uncertainty"]["coverage"] <= 0.97


def test_cv_coverage_is_that_of_the_band_the_maps_carry():
    """Sites that each cover their own stretch of a curved response: held-out sites at the ends
    extrapolate (high DI, large errors), so the margin grows with DI. The CV's coverage must then be the
    coverage of that band (margin x (1 + slope x DI / threshold)), not of a flat one."""
    from geoflux.model import train

    rng = np.random.default_rng(4)
    rows = []
    for s in range(12):
        a = s / 12 + rng.uniform(0, 0.25, 40)
        b = rng.uniform(0, 1, 40)
        nee = np.sin(4 * a) + 0.3 * b + rng.normal(0, 0.1, 40)
        rows.append(pd.DataFrame({"site": f"S{s:02d}", "time": np.arange(40), "a": a, "b": b, "NEE": nee}))
    table = pd.concat(rows, ignore_index=True)
    spec = ModelSpec(kind="random_forest", params=FEW_TREES, cv_folds=6, uncertainty="residual")
    m, pred, cv = train(table, ["a", "b"], {"a": "1", "b": "1"}, spec)
    u = cv["uncertainty"]
    assert m.margin_di_slope > 0 and m.cv_band is None  # train()'s arrays are not kept on the model
    inside = (pred["obs"] >= pred["lo"]) & (pred["obs"] <= pred["hi"])
    assert u["coverage"] == pytest.approx(inside.mean())
    assert set(u["flat_margin"]) >= {"coverage", "mean_width"} and "grows with DI" in u["method"]
    width = (pred["hi"] - pred["lo"]).to_numpy()
    raw = (pred["hi_raw"] - pred["lo_raw"]).to_numpy()
    # beyond the raw bounds, the band widens with the row's DI as the map's does
    assert np.corrcoef(width - raw, pred["DI"])[0, 1] > 0.9
