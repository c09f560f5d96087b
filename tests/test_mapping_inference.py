"""Compiled inference (treelite/tl2cgen, lleaves) agrees with the library's predict; fallback without it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from test_mapping_helpers import VARIABLES, cube, grid, training

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
