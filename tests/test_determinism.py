"""Training is reproducible to the last bit: same inputs and seed, same model and predictions."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from geoflux.footprint_fit import FootprintRows, fit_pixels, stable_predict


def _data(n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, np.sin(x[:, 0]) + x[:, 1] * x[:, 2] + rng.normal(0, 0.3, n)


def test_stable_predict_is_bit_identical_and_equals_the_forest():
    x, y = _data()
    rf = RandomForestRegressor(30, n_jobs=-1, random_state=0).fit(x, y)
    runs = [stable_predict(rf, x) for _ in range(4)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    # the same function as the forest's own (threaded) predict, up to the order of the float sums
    np.testing.assert_allclose(runs[0], rf.predict(x), rtol=0, atol=1e-9)
    assert rf.n_jobs == -1  # the fitted forest is left as it was


def test_iterative_footprint_training_is_reproducible():
    x, _ = _data(4000, seed=1)
    rng = np.random.default_rng(2)
    n_rows = 400
    owner = np.sort(rng.integers(0, n_rows, len(x)))
    owner[:n_rows] = np.arange(n_rows)  # every row owns at least one pixel
    owner = np.sort(owner)
    w = rng.random(len(x))
    w /= np.bincount(owner, weights=w)[owner]
    fr = FootprintRows(x=x, weight=w, owner=owner, n_rows=n_rows)
    y = fr.tower_sum(np.sin(x[:, 0]) + x[:, 1])
    sites = np.array([f"S{i % 8}" for i in range(n_rows)])

    def make() -> RandomForestRegressor:
        return RandomForestRegressor(20, n_jobs=-1, random_state=0)

    preds = []
    for _ in range(2):
        est, _, target = fit_pixels(make, fr, y, np.arange(n_rows), sites, method="iterative", seed=3)
        preds.append((target, stable_predict(est, x)))
    assert np.array_equal(preds[0][0], preds[1][0]), "per-pixel targets differ between identical runs"
    assert np.array_equal(preds[0][1], preds[1][1]), "fitted models differ between identical runs"
