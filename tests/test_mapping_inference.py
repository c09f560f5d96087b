"""Compiled inference (treelite/tl2cgen) agrees with the library; auto picks the faster agreeing path."""

from __future__ import annotations

import copy
import json
import os
import pickle
import tempfile

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from test_mapping_helpers import VARIABLES, cube, grid, training
from threadpoolctl import threadpool_limits

from geoflux import inference
from geoflux.errors import ModelError
from geoflux.features import feature_names
from geoflux.mapping import band_spec, write_maps
from geoflux.model import TrainedModel

# measured on this data: 0 for the forest and boosting, ~1e-15 for LightGBM (tree sums in float64 in the
# same order); the bound leaves room for other compilers/CPUs and is far below map precision
MAX_ABS_DIFF = 1e-9  # gC m-2 d-1


def _model(est) -> TrainedModel:
    x, y = training()
    est.fit(x, y)
    names = feature_names(VARIABLES)
    return TrainedModel(est, names, dict.fromkeys(names, ""))


def _features(n: int = 20_000) -> np.ndarray:
    x, _ = training(n, seed=7)
    return x.astype(np.float32)


ESTIMATORS = {
    "random_forest": lambda: RandomForestRegressor(n_estimators=8, max_depth=8, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingRegressor(
        max_iter=20, max_leaf_nodes=15, random_state=0
    ),
}


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_tl2cgen_agrees_with_library(kind, tmp_path):
    pytest.importorskip("tl2cgen")
    model = _model(ESTIMATORS[kind]())
    compiled, how = inference.prepare(model, "compiled", tmp_path)
    assert how.startswith("compiled") and compiled.estimator is not model.estimator
    x = _features()
    diff = np.abs(compiled.predict(x) - model.predict(x)).max()
    assert diff <= MAX_ABS_DIFF, diff
    # cached: a second prepare does not compile again
    libs = sorted(tmp_path.glob("*.so"))
    inference.prepare(model, "compiled", tmp_path)
    assert sorted(tmp_path.glob("*.so")) == libs and len(libs) == 1


def test_lightgbm_compiles_and_agrees(tmp_path):
    pytest.importorskip("tl2cgen")
    lgb = pytest.importorskip("lightgbm")
    model = _model(lgb.LGBMRegressor(n_estimators=40, num_leaves=15, verbose=-1, random_state=0))
    compiled, how = inference.prepare(model, "compiled", tmp_path)
    assert how == "compiled LGBMRegressor"
    x = _features()
    diff = np.abs(compiled.predict(x) - model.predict(x)).max()
    assert diff <= MAX_ABS_DIFF, diff


def test_compiled_model_maps_in_worker_processes(tmp_path):
    pytest.importorskip("tl2cgen")
    model = _model(HistGradientBoostingRegressor(max_iter=10, max_leaf_nodes=7, random_state=0))
    compiled, _ = inference.prepare(model, "compiled", tmp_path / "cache")
    gb = grid(64, 48)
    ds = cube(gb, nt=1)
    maps = {}
    for name, m, sched in (("lib", model, "threads"), ("compiled", compiled, "processes")):
        spec = band_spec("NEE", tmp_path / f"{name}.tif", "gC m-2 d-1", {})
        write_maps(ds, m, VARIABLES, gb, {0: [spec]}, sched, workers=2)
        import rasterio

        with rasterio.open(spec.path) as src:
            maps[name] = src.read(1)
    np.testing.assert_allclose(maps["compiled"], maps["lib"], rtol=0, atol=1e-5)


def test_loading_a_compiled_library_leaves_nothing_in_the_temp_dir(monkeypatch, tmp_path):
    """Each process used to leave a geoflux-compiled-<uid>-<pid> folder behind (189 of them here)."""
    pytest.importorskip("tl2cgen")
    model = _model(HistGradientBoostingRegressor(max_iter=10, max_leaf_nodes=7, random_state=0))
    compiled, _ = inference.prepare(model, "compiled", tmp_path / "cache")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(inference, "_LOADED", {})  # as in a fresh worker process
    fresh = pickle.loads(pickle.dumps(compiled.estimator))
    x = _features()
    np.testing.assert_allclose(fresh.predict(x), model.predict(x), rtol=0, atol=MAX_ABS_DIFF)
    assert inference._LOADED  # it was really loaded from a file written here
    assert list(temp.iterdir()) == []


def test_fallback_without_compilers(monkeypatch, tmp_path):
    model = _model(HistGradientBoostingRegressor(max_iter=5, random_state=0))
    monkeypatch.setattr(inference, "available", lambda: False)
    same, how = inference.prepare(model, "auto", tmp_path)
    assert same is model and "not installed" in how
    with pytest.raises(ModelError, match="needs treelite and tl2cgen"):
        inference.prepare(model, "compiled", tmp_path)
    with pytest.raises(ModelError, match="unknown mode"):
        inference.prepare(model, "fast", tmp_path)
    assert inference.prepare(model, "library")[0] is model


# --- auto: measure, then choose per estimator ------------------------------------------------------------


@pytest.fixture(scope="module")
def band_model() -> TrainedModel:
    """A point forest plus two quantile boosting models, as the default model has (tiny)."""
    x, y = training()
    names = feature_names(VARIABLES)
    # one OpenMP thread: boosting's spin-waiting threads crawl when other processes hold the cores
    with threadpool_limits(1, user_api="openmp"):
        rf = RandomForestRegressor(n_estimators=8, max_depth=8, random_state=0).fit(x, y)
        domain = {f: [float(lo), float(hi)] for f, lo, hi in zip(names, x.min(0), x.max(0), strict=True)}
        m = TrainedModel(rf, names, {}, domain=domain)
        m.bands = ("NEE", "NEE_q05", "NEE_q95")
        m.quantile_models = tuple(
            HistGradientBoostingRegressor(loss="quantile", quantile=q, max_iter=10, random_state=0).fit(x, y)
            for q in (0.05, 0.95)
        )
    return m


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compiled-library cache for the auto tests: each model is compiled once."""
    return tmp_path_factory.mktemp("compiled")


def _compiled_timing(compiled_s: dict[str, float], library_s: float = 0.1):
    """A stand-in for inference.time_predict: seconds by path (compiled: by estimator name)."""

    def fake(predict, x, repeats=5):
        owner = getattr(predict, "__self__", None)
        if isinstance(owner, inference.CompiledEstimator):
            return compiled_s[owner.name]
        return library_s

    return fake


def test_auto_keeps_library_when_compiled_loses(monkeypatch, band_model, cache):
    pytest.importorskip("tl2cgen")
    model = band_model
    slow = {"RandomForestRegressor": 0.34, "HistGradientBoostingRegressor": 0.2}  # 3.4x, 2x slower
    monkeypatch.setattr(inference, "time_predict", _compiled_timing(slow))
    chosen, how = inference.prepare(model, "auto", cache)
    assert chosen is model
    assert how.startswith("auto: NEE library") and "NEE_q95 library" in how and "not 1.1x faster" in how
    record = json.loads((cache / "auto.json").read_text())["bands"]
    assert sorted(record) == ["NEE", "NEE_q05", "NEE_q95"]
    for r in record.values():  # each was really compiled and checked, then refused on speed
        assert r["choice"] == "library" and r["max_abs_diff"] <= inference.AGREEMENT_ATOL
        assert r["compiled_kpix_s"] < r["library_kpix_s"]


def test_auto_uses_compiled_only_where_it_wins(monkeypatch, band_model, cache):
    pytest.importorskip("tl2cgen")
    model = band_model
    mixed = {"RandomForestRegressor": 0.5, "HistGradientBoostingRegressor": 0.02}
    monkeypatch.setattr(inference, "time_predict", _compiled_timing(mixed))
    chosen, how = inference.prepare(model, "auto", cache)
    assert "NEE library" in how and "NEE_q05 compiled" in how and "NEE_q95 compiled" in how
    assert chosen.estimator is model.estimator
    assert all(isinstance(q, inference.CompiledEstimator) for q in chosen.quantile_models)
    x = _features(5_000)
    diff = np.abs(chosen.predict_bands(x).astype(np.float64) - model.predict_bands(x)).max()
    assert diff <= MAX_ABS_DIFF, diff


def test_auto_refuses_a_compiled_path_that_disagrees(monkeypatch, band_model, cache):
    pytest.importorskip("tl2cgen")
    model = band_model
    monkeypatch.setattr(
        inference,
        "time_predict",
        _compiled_timing(dict.fromkeys(("RandomForestRegressor", "HistGradientBoostingRegressor"), 0.001)),
    )
    real = inference.CompiledEstimator.predict
    monkeypatch.setattr(inference.CompiledEstimator, "predict", lambda self, x: real(self, x) + 0.01)
    chosen, how = inference.prepare(model, "auto", cache)
    assert chosen is model and how.count("compiled differs by 0.01") == 3


def test_auto_does_not_compile_over_budget(band_model, tmp_path, monkeypatch):
    pytest.importorskip("tl2cgen")
    monkeypatch.setattr(inference, "_BUILT", {})  # as if this process had compiled nothing yet
    model = band_model
    est = inference.estimate_compile_seconds(model.estimator)
    assert est == pytest.approx(
        sum(t.tree_.node_count for t in model.estimator.estimators_)
        * inference.COMPILE_CPU_S_PER_NODE
        / (os.cpu_count() or 1)
    )
    chosen, how = inference.prepare(model, "auto", tmp_path, budget_s=0.0)
    assert chosen is model and how.count("over budget 0 s") == 3
    assert not list(tmp_path.glob("*.so"))


def test_auto_choice_is_consistent_with_its_measurements(band_model, cache):
    """Real timings (no assumption which path wins): whatever auto picks, its own record must justify it."""
    pytest.importorskip("tl2cgen")
    model = band_model
    chosen, _ = inference.prepare(model, "auto", cache)
    record = json.loads((cache / "auto.json").read_text())["bands"]
    picked = [chosen.estimator, *chosen.quantile_models]
    for r, est in zip(record.values(), picked, strict=True):
        compiled = isinstance(est, inference.CompiledEstimator)
        assert compiled == (r["choice"] == "compiled")
        if compiled:
            assert r["compiled_kpix_s"] >= r["library_kpix_s"] * inference.MIN_SPEEDUP * 0.999
            assert r["max_abs_diff"] <= inference.AGREEMENT_ATOL


def test_sample_pixels_are_the_training_pixels(band_model):
    from geoflux.model import AOA

    model = copy.copy(band_model)
    x, _ = training()
    center, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    weights = np.linspace(0.5, 2.0, x.shape[1])
    model.aoa = AOA(center, scale, weights, (x - center) / scale * weights, dbar=1.0, threshold=1.0)
    s = inference.sample_pixels(model, n=200)
    assert s.shape == (200, x.shape[1]) and s.dtype == np.float32
    # every sampled row is one of the training rows (standardization undone), to float32 rounding
    nearest = np.abs(s[:, None, :] - x[None, :, :].astype(np.float32)).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-3


def test_auto_compiles_a_one_model_residual_band(monkeypatch, cache):
    """The ``residual`` band has one scale model: auto times it as one band and keeps the model's shape."""
    pytest.importorskip("tl2cgen")
    x, y = training()
    names = feature_names(VARIABLES)
    with threadpool_limits(1, user_api="openmp"):
        point = HistGradientBoostingRegressor(max_iter=15, max_depth=4, random_state=0).fit(x, y)
        scale = HistGradientBoostingRegressor(loss="quantile", quantile=0.9, max_iter=10, random_state=0)
        scale.fit(x, np.abs(y - point.predict(x)))
    model = TrainedModel(point, names, {})
    model.bands, model.quantile_models, model.conformal_margin = ("NEE", "NEE_q05", "NEE_q95"), (scale,), 0.1
    fast = dict.fromkeys(("HistGradientBoostingRegressor",), 0.01)
    monkeypatch.setattr(inference, "time_predict", _compiled_timing(fast))
    chosen, how = inference.prepare(model, "auto", cache)
    assert "NEE compiled" in how and "NEE_band compiled" in how
    assert len(chosen.quantile_models) == 1
    assert isinstance(chosen.quantile_models[0], inference.CompiledEstimator)
    xs = _features(5_000)
    diff = np.abs(chosen.predict_bands(xs).astype(np.float64) - model.predict_bands(xs)).max()
    assert diff <= 1e-5, diff  # float32 output bands
    # the band is NEE -/+ (scale + margin), from the library's own scale model
    half = np.maximum(scale.predict(xs), 0) + 0.1
    b = model.predict_bands(xs).astype(np.float64)
    np.testing.assert_allclose(b[:, 2] - b[:, 0], half, atol=1e-5)


# --- the fast paths keep the library's answers ------------------------------------------------------------


def _thresholds(est) -> list[tuple[int, float]]:
    """(feature, threshold) of every split of a scikit-learn forest or HistGradientBoosting model."""
    if hasattr(est, "estimators_"):
        return [
            (int(f), float(t))
            for tree in est.estimators_
            for f, t in zip(tree.tree_.feature, tree.tree_.threshold, strict=True)
            if f >= 0
        ]
    return [
        (int(nd["feature_idx"]), float(nd["num_threshold"]))
        for it in est._predictors
        for p in it
        for nd in p.nodes
        if not nd["is_leaf"]
    ]


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_quantized_compiled_trees_agree_at_the_split_values(kind, tmp_path):
    """tl2cgen's ``quantize`` maps inputs to threshold indices: rows exactly at (float32-rounded) split
    values, where ``x <= threshold`` is decided by the last bit, must still follow the library's branch."""
    pytest.importorskip("tl2cgen")
    assert inference.TL2CGEN_PARAMS.get("quantize") == 1
    model = _model(ESTIMATORS[kind]())
    compiled, _ = inference.prepare(model, "compiled", tmp_path)
    x = _features(4_000)
    rng = np.random.default_rng(3)
    splits = _thresholds(model.estimator)
    for row, k in zip(x, rng.integers(0, len(splits), len(x)), strict=True):
        f, t = splits[k]
        row[f] = np.float32(t)  # on the split value, to float32 rounding (maps are float32)
        row[(f + 1) % len(row)] = np.nextafter(np.float32(t), np.float32(np.inf))
    diff = np.abs(compiled.predict(x) - model.predict(x)).max()
    assert diff <= MAX_ABS_DIFF, diff


def test_compiled_cache_is_keyed_by_the_code_generation_options(monkeypatch, tmp_path):
    """A library built with other tl2cgen options (e.g. before ``quantize``) is never reused."""
    pytest.importorskip("tl2cgen")
    est = _model(HistGradientBoostingRegressor(max_iter=5, random_state=0)).estimator
    _, with_params = inference._converted(est, tmp_path)
    monkeypatch.setattr(inference, "TL2CGEN_PARAMS", {})
    _, without = inference._converted(est, tmp_path)
    assert with_params != without


def test_di_is_the_exact_nearest_training_distance():
    """DI from the KD-tree equals a brute-force nearest-neighbour distance over all training points."""
    from scipy.spatial.distance import cdist

    from geoflux.model import AOA

    rng = np.random.default_rng(5)
    # clustered training points (like pixels of a few towers) and queries inside and far outside them
    centers = rng.normal(0, 3, (12, 11))
    pts = centers[rng.integers(0, 12, 3_000)] + rng.normal(0, 0.2, (3_000, 11))
    q = np.vstack(
        [centers[rng.integers(0, 12, 1_500)] + rng.normal(0, 0.3, (1_500, 11)), rng.normal(0, 6, (500, 11))]
    )
    center, scale, weights = pts.mean(0), pts.std(0), rng.uniform(0.01, 1.0, 11)
    aoa = AOA(center, scale, weights, (pts - center) / scale * weights, dbar=0.7, threshold=0.5)
    z = (q - center) / scale * weights
    exact = cdist(z, aoa.points).min(axis=1) / 0.7
    np.testing.assert_allclose(aoa.di(q), exact, rtol=1e-12, atol=0)


def test_predict_bands_columns_are_the_models_own_predictions():
    """predict_bands fills float32 columns from each part: NEE, the band, DI and AOA = DI <= threshold."""
    from geoflux.model import AOA

    x, y = training()
    names = feature_names(VARIABLES)
    with threadpool_limits(1, user_api="openmp"):
        point = HistGradientBoostingRegressor(max_iter=15, random_state=0).fit(x, y)
        scale = HistGradientBoostingRegressor(loss="quantile", quantile=0.9, max_iter=10, random_state=0)
        scale.fit(x, np.abs(y - point.predict(x)))
    model = TrainedModel(point, names, {}, bands=("NEE", "NEE_q05", "NEE_q95", "DI", "AOA"))
    model.quantile_models, model.conformal_margin = (scale,), 0.2
    center, sd = x.mean(0), x.std(0) + 1e-6
    w = np.ones(x.shape[1])
    model.aoa = AOA(center, sd, w, (x - center) / sd * w, dbar=1.0, threshold=0.3)
    xs = _features(3_000)
    b = model.predict_bands(xs)
    assert b.dtype == np.float32 and b.shape == (3_000, 5)
    nee = point.predict(xs)
    s = np.maximum(scale.predict(xs), 0)  # NEE -/+ (scale + margin), in the order the band adds them
    np.testing.assert_array_equal(b[:, 0], nee.astype(np.float32))
    np.testing.assert_array_equal(b[:, 1], ((nee - s) - 0.2).astype(np.float32))
    np.testing.assert_array_equal(b[:, 2], ((nee + s) + 0.2).astype(np.float32))
    di = model.aoa.di(xs)
    np.testing.assert_array_equal(b[:, 3], di.astype(np.float32))
    np.testing.assert_array_equal(b[:, 4], (di <= 0.3).astype(np.float32))


def test_auto_maps_with_the_library_when_compilation_fails(monkeypatch, band_model, tmp_path):
    """No C compiler (or any build error): auto still maps, with the library, and says why."""
    pytest.importorskip("tl2cgen")

    def broken(est, cache_dir=None, nthread=None):
        raise RuntimeError("gcc: command not found\nmore detail")

    monkeypatch.setattr(inference, "compile_estimator", broken)
    chosen, how = inference.prepare(band_model, "auto", tmp_path)
    assert chosen is band_model
    assert how.count("compilation failed: gcc: command not found") == 3, how


def test_a_model_compiled_once_is_reused_by_another_run_folder(band_model, tmp_path):
    """The same model (same hash) compiled for one run folder is copied, not rebuilt, for another."""
    pytest.importorskip("tl2cgen")
    est = band_model.quantile_models[0]
    first = inference.compile_estimator(est, tmp_path / "run1")
    lib = next((tmp_path / "run1").glob("*.so"))
    assert lib.name in inference._BUILT
    calls = []
    import tl2cgen

    def no_build(*args, **kwargs):
        calls.append(args)
        raise AssertionError("rebuilt")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl2cgen, "export_lib", no_build)
        second = inference.compile_estimator(est, tmp_path / "run2")
    assert not calls and (tmp_path / "run2" / lib.name).read_bytes() == lib.read_bytes()
    x = _features(500)[:, : est.n_features_in_]
    np.testing.assert_array_equal(first.predict(x), second.predict(x))


def test_partitioned_model_compiles_head_by_head(tmp_path):
    """A partitioned model's RECO and GPP heads are compiled one by one and put back together: its
    compiled NEE is RECO - GPP exactly as the library's."""
    pytest.importorskip("tl2cgen")
    from geoflux.model import PartitionedRegressor

    x, y = training()
    rng = np.random.default_rng(1)
    reco = np.abs(y) + rng.uniform(0, 1, len(y))  # any two targets whose difference is y
    est = PartitionedRegressor(
        HistGradientBoostingRegressor(max_iter=15, max_leaf_nodes=7, random_state=0),
        HistGradientBoostingRegressor(max_iter=15, max_leaf_nodes=7, random_state=0),
    ).fit(x, np.c_[reco, reco - y])
    names = feature_names(VARIABLES)
    model = TrainedModel(est, names, dict.fromkeys(names, ""))
    compiled, how = inference.prepare(model, "compiled", tmp_path)
    assert isinstance(compiled.estimator, PartitionedRegressor) and how.count("HistGradientBoosting") == 2
    assert isinstance(compiled.estimator.reco, inference.CompiledEstimator)
    xs = _features()
    assert np.abs(compiled.predict(xs) - model.predict(xs)).max() <= MAX_ABS_DIFF
    assert len(list(tmp_path.glob("*.so"))) == 2
    auto, how = inference.prepare(model, "auto", tmp_path)
    assert "NEE_reco" in how and "NEE_gpp" in how and isinstance(auto.estimator, PartitionedRegressor)
    assert np.abs(auto.predict(xs) - model.predict(xs)).max() <= MAX_ABS_DIFF
