"""Synthetic cubes and models for the mapping tests (importable by subprocesses and worker processes)."""

from __future__ import annotations

import time

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from sklearn.ensemble import RandomForestRegressor

from geoflux.config import VariableSpec
from geoflux.features import feature_names, pixel_features
from geoflux.model import TrainedModel

VARIABLES = [
    VariableSpec(name="ta", collection="c-ta", asset="data", units="degC"),
    VariableSpec(name="sw", collection="c-sw", asset="data", units="W m-2"),
    VariableSpec(name="elev", collection="c-elev", asset="data", units="m", static=True),
    VariableSpec(
        name="lc", collection="c-lc", asset="data", kind="categorical", classes=[1, 2, 3], static=True
    ),
]


def grid(ny: int = 96, nx: int = 80, res: float = 250.0) -> GeoBox:
    """A UTM 32N grid far from the origin, ``ny`` x ``nx`` pixels of ``res`` m."""
    x0, y1 = 440_000.0, 5_580_000.0
    return GeoBox.from_bbox((x0, y1 - ny * res, x0 + nx * res, y1), "EPSG:32632", resolution=res)


def cube(geobox: GeoBox, nt: int = 3, chunk: int = 32, seed: int = 0) -> xr.Dataset:
    """A dask-backed driver cube on ``geobox`` with missing pixels (NaN) in a time-varying and a static
    driver; x/y coordinates are pixel centres."""
    rng = np.random.default_rng(seed)
    ny, nx = geobox.shape
    ta = rng.normal(10, 6, (nt, ny, nx)).astype("float32")
    sw = rng.uniform(50, 300, (nt, ny, nx)).astype("float32")
    elev = rng.uniform(100, 900, (ny, nx)).astype("float32")
    lc = rng.integers(1, 4, (ny, nx)).astype("float32")
    ta[0, 3:9, 4:11] = np.nan  # a cloud in one step
    lc[-5:, :7] = np.nan  # no land cover in a corner
    a = geobox.affine
    xs = a.c + a.a * (np.arange(nx) + 0.5)
    ys = a.f + a.e * (np.arange(ny) + 0.5)
    times = np.datetime64("2021-01-01", "ns") + np.arange(nt) * np.timedelta64(8, "D")
    ds = xr.Dataset(
        {
            "ta": (("time", "y", "x"), ta),
            "sw": (("time", "y", "x"), sw),
            "elev": (("y", "x"), elev),
            "lc": (("y", "x"), lc),
        },
        coords={"time": times, "y": ys, "x": xs},
    )
    return ds.chunk({"time": 1, "y": chunk, "x": chunk})


def training(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {
        "ta": rng.normal(10, 6, n),
        "sw": rng.uniform(50, 300, n),
        "elev": rng.uniform(100, 900, n),
        "lc": rng.integers(1, 4, n).astype(float),
    }
    x = pixel_features(values, VARIABLES)
    y = (
        -0.02 * values["sw"]
        + 0.3 * values["ta"]
        - 0.001 * values["elev"]
        + values["lc"]
        + rng.normal(0, 0.3, n)
    )
    return x, y


def forest_model(n_trees: int = 12, seed: int = 0) -> TrainedModel:
    """A small random forest (all cores while fitting, like the pipeline's) as a TrainedModel."""
    x, y = training()
    est = RandomForestRegressor(n_estimators=n_trees, min_samples_leaf=3, n_jobs=-1, random_state=seed)
    est.fit(x, y)
    names = feature_names(VARIABLES)
    return TrainedModel(est, names, dict.fromkeys(names, ""))


class BandsModel(TrainedModel):
    """A model with the uncertainty/AOA band layout: NEE, NEE_q05, NEE_q95, DI, AOA.

    The extra bands are simple functions of NEE and the features so tests can check every value.
    """

    def predict_bands(self, x: np.ndarray) -> np.ndarray:
        nee = self.predict(x)
        di = np.abs(x[:, 0] - 10.0) / 6.0
        return np.column_stack([nee, nee - 1.0, nee + 1.0, di, (di <= 1.0)]).astype(np.float32)


def bands_model() -> BandsModel:
    m = forest_model()
    return BandsModel(
        m.estimator, m.features, m.feature_units, bands=("NEE", "NEE_q05", "NEE_q95", "DI", "AOA")
    )


class SlowModel(TrainedModel):
    """Sleeps per chunk so that a test can kill a run mid-way."""

    delay: float = 0.15

    def predict_bands(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return super().predict_bands(x)


def slow_model() -> SlowModel:
    m = forest_model()
    return SlowModel(m.estimator, m.features, m.feature_units)
