"""Mapping stage: predict NEE chunk by chunk over the driver cube.

One dask task per output chunk: each task assembles the features of its chunk (float32), skips pixels
with a missing driver, and calls the model. The model enters the graph once, as a single delayed object
that every chunk task depends on, never copied into each task.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from geoflux.config import VariableSpec
from geoflux.errors import ModelError
from geoflux.features import feature_names, pixel_features
from geoflux.model import TrainedModel


def _predict_block(*blocks: np.ndarray, model: TrainedModel, variables: Sequence[VariableSpec]) -> np.ndarray:
    values = {v.name: b for v, b in zip(variables, blocks, strict=True)}
    feats = pixel_features(values, variables)
    shape = feats.shape[:-1]
    flat = feats.reshape(-1, feats.shape[-1])
    valid = ~np.isnan(flat).any(axis=1)
    out = np.full(flat.shape[0], np.nan, dtype=np.float32)
    if valid.any():
        out[valid] = model.predict(flat[valid])
    return out.reshape(shape)


def predict_map(cube: xr.Dataset, model: TrainedModel, variables: Sequence[VariableSpec]) -> xr.DataArray:
    """Lazy NEE map (time, y, x), float32 gC m-2 d-1, NaN where a driver is missing.

    Raises
    ------
    ModelError
        if the model's features differ from those the variables define.
    """
    names = feature_names(variables)
    if names != list(model.features):
        raise ModelError(f"model features {model.features} differ from the configured drivers' {names}")
    ref = next(cube[v.name] for v in variables if "time" in cube[v.name].dims)
    nt, ny, nx = ref.shape
    chunks = ref.data.chunks
    arrays = []
    for v in variables:
        a = cube[v.name].data
        if a.ndim == 2:  # static driver: broadcast along time lazily (no copies until a chunk runs)
            a = da.broadcast_to(a[None], (nt, ny, nx), chunks=chunks)
        arrays.append(a.rechunk(chunks))
    # Predict single-threaded inside each task: dask already runs one task per core.
    m = copy.copy(model)
    m.estimator = copy.copy(model.estimator)
    if "n_jobs" in m.estimator.get_params():
        m.estimator.set_params(n_jobs=1)
    model_node = dask.delayed(m, pure=True, traverse=False)
    pairs = [x for a in arrays for x in (a, "tyx")]
    out = da.blockwise(
        _predict_block,
        "tyx",
        *pairs,
        dtype=np.float32,
        model=model_node,
        variables=list(variables),
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    return xr.DataArray(
        out,
        coords={"time": ref["time"], "y": ref["y"], "x": ref["x"]},
        dims=("time", "y", "x"),
        name="NEE",
        attrs={"units": model.target_units, "long_name": "net ecosystem exchange"},
    )
