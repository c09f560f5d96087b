"""Analysis: multi-scale scores, grouped importance, IAV attribution, scenarios, AOA against the truth."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression
from threadpoolctl import threadpool_limits

from geoflux.config import ModelSpec, VariableSpec, load_config

# What controls NEE in the generator (geoflux/demo.py true_fluxes): GPP and RECO are functions of sw, ta,
# vpd, sm, ndvi and the land-cover class only. Elevation acts only through ta (lapse rate) and lst is a
# by-product of ta, sw, ndvi and moisture: neither has a direct effect.
TRUE_DRIVERS = {"sw", "ta", "vpd", "sm", "ndvi", "landcover"}


def _pairs(n_sites=4, years=1, seed=0):
    rng = np.random.default_rng(seed)
    t = pd.date_range("2020-01-01", periods=46 * years, freq="8D")
    rows = []
    for s in range(n_sites):
        season = -3 * np.sin(2 * np.pi * t.dayofyear / 365)
        obs = season + s + rng.normal(0, 0.5, len(t))
        rows.append(pd.DataFrame({"site": f"S{s}", "time": t, "obs": obs}))
    return pd.concat(rows, ignore_index=True)


def test_multiscale_perfect_and_offset_predictions():
    from geoflux.analysis import multiscale_scores, multiscale_table

    p = _pairs()
    ms = multiscale_scores(p.assign(pred=p["obs"]))
    assert all(s["nse"] == pytest.approx(1.0) for s in ms["scales"].values())
    assert set(ms["skipped"]) == {"daily", "weekly", "iav"}
    # a constant error per site: wrong at the native scale and across sites, right for anomalies
    offset = p["site"].str[1:].astype(int) * 0.5
    ms = multiscale_scores(p.assign(pred=p["obs"] + offset))
    assert ms["scales"]["native"]["nse"] < 0.99
    assert ms["scales"]["anomaly"]["nse"] == pytest.approx(1.0)
    assert ms["scales"]["across_site"]["bias"] == pytest.approx(offset.groupby(p["site"]).first().mean())
    assert ms["scales"]["native"]["rmse_site_p90"] >= ms["scales"]["native"]["rmse_site_median"]
    text = multiscale_table(ms)
    assert "anomaly" in text and "8 days" in text


def test_multiscale_iav_and_subdaily_coverage():
    from geoflux.analysis import multiscale_frames, multiscale_scores

    p = _pairs(years=3)
    rng = np.random.default_rng(1)
    ms = multiscale_scores(p.assign(pred=p["obs"] + rng.normal(0, 0.1, len(p))))
    n_years = p["time"].dt.year.nunique()
    assert "iav" in ms["scales"] and ms["scales"]["iav"]["n"] == 4 * n_years
    t = pd.date_range("2021-06-01", periods=48 * 2, freq="30min")
    hh = pd.DataFrame({"site": "A", "time": t, "obs": 1.0, "pred": 1.0})
    hh = hh.drop(index=range(48, 48 + 40))  # day 2 keeps 8 of 48 half-hours
    frames = multiscale_frames(hh, min_fraction=0.5)
    assert len(frames["daily"]) == 1 and frames["daily"]["time"].iloc[0] == pd.Timestamp("2021-06-01")


def test_grouped_importance_permutes_a_categorical_driver_jointly():
    from geoflux.analysis import driver_groups, grouped_permutation_importance

    rng = np.random.default_rng(0)
    n = 600
    cls = rng.integers(1, 4, n)
    df = pd.DataFrame(
        {"site": np.arange(n) % 6, "time": 0, "a": rng.uniform(0, 1, n), "b": rng.uniform(0, 1, n)}
    )
    for c in (1, 2, 3):
        df[f"lc_{c}"] = (cls == c).astype(float)
    df["NEE"] = 2 * df["a"] + np.select([cls == 1, cls == 2], [3.0, -3.0], 0.0) + rng.normal(0, 0.1, n)
    features = ["a", "b", "lc_1", "lc_2", "lc_3"]
    variables = [VariableSpec(name="lc", collection="c", asset="d", kind="categorical", classes=[1, 2, 3])]
    groups = driver_groups(features, variables)
    assert groups == {"a": ["a"], "b": ["b"], "lc": ["lc_1", "lc_2", "lc_3"]}
    imp = grouped_permutation_importance(
        df, features, ModelSpec(kind="random_forest", params={"n_estimators": 30}), groups, n_repeats=3
    )
    assert list(imp["driver"]) == ["lc", "a", "b"]
    assert imp.set_index("driver").loc["b", "importance"] < 0.05 * imp["importance"].max()


def _linear_model(features, coefs):
    from geoflux.model import TrainedModel

    x = np.eye(len(features))
    est = LinearRegression().fit(np.vstack([np.zeros(len(features)), x]), np.r_[0.0, coefs])
    return TrainedModel(est, list(features), {})


def test_iav_attribution_is_exact_for_an_additive_model():
    from geoflux.analysis import iav_attribution

    variables = [VariableSpec(name=n, collection="c", asset="d") for n in ("ta", "sw")]
    rng = np.random.default_rng(2)
    # MODIS-like 8-day steps restarting on 1 January of each of three years
    t = pd.DatetimeIndex(
        [d for y in (2019, 2020, 2021) for d in pd.date_range(f"{y}-01-01", periods=46, freq="8D")]
    )
    n_pix = 5
    sample = pd.DataFrame(
        {
            "pixel": np.tile(np.arange(n_pix), len(t)),
            "time": np.repeat(t, n_pix),
            "ta": rng.normal(10, 3, n_pix * len(t)),
            "sw": rng.normal(150, 40, n_pix * len(t)),
            "valid": True,
        }
    )
    model = _linear_model(["ta", "sw"], [0.3, -0.02])
    table, info = iav_attribution(model, sample, variables)
    years = pd.to_datetime(sample["time"]).dt.year
    assert info["period"] == "year" and len(table) == years.nunique()
    np.testing.assert_allclose(table["interaction"], 0.0, atol=1e-6)  # float32 features
    ta_anom = sample.groupby(years)["ta"].mean() - sample.groupby(years)["ta"].mean().mean()
    np.testing.assert_allclose(table["contrib_ta"], 0.3 * ta_anom.to_numpy(), atol=1e-6)


def test_scenarios_perturb_as_documented():
    from geoflux.analysis import SCENARIOS, scenario_projection

    variables = [VariableSpec(name=n, collection="c", asset="d") for n in ("ta", "vpd")]
    sample = pd.DataFrame({"pixel": [0, 1], "time": 0, "ta": [10.0, 20.0], "vpd": [5.0, 10.0], "valid": True})
    warm = next(s for s in SCENARIOS if s.name == "warming_2K")
    out, skipped = warm.apply(sample)
    assert skipped == ["lst"]
    np.testing.assert_allclose(out["ta"], [12.0, 22.0])
    # VPD at constant relative humidity: esat(t + 2) / esat(t) ≈ 1.14 at 10 degC, 1.13 at 20 degC
    np.testing.assert_allclose(out["vpd"] / sample["vpd"], [1.1427, 1.1321], rtol=2e-3)
    x = warm.apply_features(sample[["ta", "vpd"]].to_numpy(np.float32), ["ta", "vpd"])
    np.testing.assert_allclose(x, out[["ta", "vpd"]].to_numpy(), rtol=1e-6)  # chunks perturb alike
    model = _linear_model(["ta", "vpd"], [0.5, 0.0])
    res = scenario_projection(model, sample, variables, [warm]).set_index("region")
    assert res.loc["all", "delta_nee"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------------------
# the tiny demo world
# -------------------------------------------------------------------------------------------------------

FEW_TREES = {"n_estimators": 30, "min_samples_leaf": 2}


@pytest.fixture(scope="module")
def demo_trained(tiny_world_pristine, tmp_path_factory):
    """Tiny world → towers → extraction → train (few trees, 5 site folds), saved like the pipeline."""
    from geoflux import pipeline
    from geoflux.features import feature_names, feature_units
    from geoflux.model import save_model, train

    dst = tmp_path_factory.mktemp("demo_model") / "run"
    shutil.copytree(tiny_world_pristine, dst)
    cfg = load_config(dst / "config.yaml")
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"kind": "random_forest", "params": FEW_TREES, "cv_folds": 5}
            )
        }
    )
    pipeline.stage_towers(cfg)
    table = pipeline.stage_extract(cfg)
    model, cv_pred, cv = train(
        table,
        feature_names(cfg.variables),
        feature_units(cfg.variables),
        cfg.model,
        sites=pipeline.load_sites(cfg),
    )
    save_model(model, cfg.out_dir / pipeline.MODEL)
    cv_pred.to_parquet(cfg.out_dir / pipeline.CV_PREDICTIONS, index=False)
    return cfg, model, cv


def test_demo_band_coverage_on_held_out_sites(demo_trained):
    _, model, cv = demo_trained
    u = cv["uncertainty"]
    assert 0.8 <= u["coverage"] <= 0.95, u
    assert cv["aoa"]["fraction_inside"] > 0.8
    assert cv["nse"] > 0.9  # site-grouped skill on the generated world
    assert model.bands == tuple(cv["bands"])


@pytest.fixture(scope="module")
def demo_analysis(demo_trained, tmp_path_factory):
    from geoflux.analysis import analyze

    cfg, _, _ = demo_trained
    out = tmp_path_factory.mktemp("analysis")
    return out, analyze(cfg, out, n_pixels=400, importance_folds=5, n_repeats=3)


def test_demo_importance_ranks_true_drivers_on_top(demo_analysis):
    _, res = demo_analysis
    ranked = [r["driver"] for r in res["importance"]]
    assert set(ranked[:3]) <= TRUE_DRIVERS, ranked
    assert "elevation" not in ranked[:3] and "lst" not in ranked[:3], ranked


def test_demo_analyze_writes_tables_and_plots(demo_analysis):
    out, res = demo_analysis
    for name in ("analysis.json", "multiscale.txt", "importance.csv", "importance.png", "iav.csv", "iav.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("pd_*.png"))) >= 3 and len(list(out.glob("pd2_*.png"))) >= 1
    assert res["iav"]["period"] == "month"  # the tiny world spans one year
    sc = pd.read_csv(out / "scenarios.csv")
    assert {"warming_2K", "drying_20pct"} <= set(sc["scenario"]) and sc["left_aoa"].between(0, 1).all()
    assert res["multiscale"]["scales"]["native"]["n_sites"] == 25


def _sign_table(n_sites: int = 6, n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Towers where NEE falls with ``a`` at fixed ``b`` although the two rise together across samples:
    y = 2 b - a with a = b + noise: an unconstrained model learns NEE falling with ``a``."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        b = rng.uniform(0, 10, n)
        a = b + rng.normal(0, 1.5, n)
        rows.append(pd.DataFrame({"site": f"S{s}", "time": np.arange(n), "b": b, "a": a, "NEE": 2 * b - a}))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("kind", ["hist_gradient_boosting", "random_forest", "lightgbm"])
def test_monotonic_constraint_holds_on_the_named_feature(kind):
    from geoflux.model import make_estimator

    if kind == "lightgbm":
        pytest.importorskip("lightgbm")
    table = _sign_table()
    features = ["b", "a"]  # the constraint is by name: "a" is the second column
    x, y = table[features].to_numpy(), table["NEE"].to_numpy()
    params = {"n_estimators": 30} if kind != "hist_gradient_boosting" else {"max_iter": 30}
    grid = np.column_stack([np.full(50, 5.0), np.linspace(0, 10, 50)])  # b fixed, a swept
    # one OpenMP thread: on 360 rows threads only spin (as model.py's OPENMP_MIN_ROWS says)
    with threadpool_limits(1, user_api="openmp"):
        for sign in (1, -1):
            spec = ModelSpec(kind=kind, params=params, monotonic={"a": sign})
            pred = make_estimator(spec, features).fit(x, y).predict(grid)
            assert np.all(sign * np.diff(pred) >= -1e-9), (kind, sign)
        free = make_estimator(ModelSpec(kind=kind, params=params), features).fit(x, y).predict(grid)
    assert free[-1] - free[0] < -1.0  # the unconstrained model does see the fall: the test can fail


def test_monotonic_constraint_is_checked():
    from pydantic import ValidationError

    from geoflux.errors import ModelError
    from geoflux.model import make_estimator

    with pytest.raises(ValidationError):
        ModelSpec(monotonic={"a": 2})
    spec = ModelSpec(monotonic={"zz": 1})
    with pytest.raises(ModelError, match=r"model.monotonic: unknown feature\(s\) \['zz'\]"):
        make_estimator(spec, ["a", "b"])
    with pytest.raises(ModelError, match="without its feature names"):
        make_estimator(spec)
    # no constraint (or only zeros): no feature names needed, estimator as before
    assert make_estimator(ModelSpec(monotonic={"a": 0})).get_params()["monotonic_cst"] is None


def test_train_threads_the_monotonic_constraint_through_cv_and_the_card(tmp_path):
    from geoflux.model import load_model, save_model, train

    table = _sign_table()
    spec = ModelSpec(params={"max_iter": 30}, monotonic={"a": 1}, cv_folds=3, uncertainty="none", aoa=False)
    model, _, cv = train(table, ["b", "a"], {"a": "", "b": ""}, spec)
    grid = np.column_stack([np.full(50, 5.0), np.linspace(0, 10, 50)])
    assert np.all(np.diff(model.predict(grid)) >= -1e-9)
    assert model.provenance["monotonic"] == {"a": 1}
    # the held-out models were constrained too: their error is that of a model that cannot follow -a
    _, _, cv_free = train(table, ["b", "a"], {"a": "", "b": ""}, spec.model_copy(update={"monotonic": {}}))
    assert cv["rmse"] > cv_free["rmse"]
    save_model(model, tmp_path / "m.skops")
    assert load_model(tmp_path / "m.skops").provenance["monotonic"] == {"a": 1}
