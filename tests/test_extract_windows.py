"""Extraction reads tower windows chunk by chunk: the same values as slicing each window, with one task per
touched chunk (issue #21, fixed costs)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

from geoflux.config import VariableSpec
from geoflux.extract import _read_windows, _union_window

VARS = [
    VariableSpec(name="ta", collection="c", asset="data", units="degC"),
    VariableSpec(name="elevation", collection="c", asset="data", units="m", static=True),
]
# across chunk borders (chunks of 8 x 8), inside one chunk, at the grid's edges, and the whole grid
WINDOWS = {
    "a": (slice(5, 19), slice(3, 12)),
    "b": (slice(9, 12), slice(9, 15)),
    "c": (slice(0, 4), slice(14, 20)),
    "d": (slice(0, 20), slice(0, 20)),
}


def _cube(lazy: bool) -> xr.Dataset:
    rng = np.random.default_rng(3)
    ta = rng.normal(size=(5, 20, 20)).astype(np.float32)
    ta[2, 6:9, 4:7] = np.nan
    elev = rng.uniform(0, 900, (20, 20)).astype(np.float32)
    if lazy:
        ta, elev = da.from_array(ta, chunks=(2, 8, 8)), da.from_array(elev, chunks=(8, 8))
    return xr.Dataset({"ta": (("time", "y", "x"), ta), "elevation": (("y", "x"), elev)})


def test_windows_equal_slices_with_one_task_per_chunk(monkeypatch):
    cube = _cube(lazy=True)
    with dask.config.set(scheduler="sync"):
        got = _read_windows(cube, WINDOWS, VARS)
    ref = {s: {v.name: cube[v.name].isel(y=w[0], x=w[1]).values for v in VARS} for s, w in WINDOWS.items()}
    for s in WINDOWS:
        for v in VARS:
            assert got[s][v.name].dtype == np.float32
            np.testing.assert_array_equal(got[s][v.name], ref[s][v.name])  # NaN where the cube has NaN
    # one cut per touched chunk: window "d" touches all 3 x 3 spatial chunks, ta has 3 time chunks
    calls = []
    import geoflux.extract as ex

    cut = ex._cut
    monkeypatch.setattr(ex, "_cut", lambda block, cuts: calls.append(len(cuts)) or cut(block, cuts))
    with dask.config.set(scheduler="sync"):
        _read_windows(cube, WINDOWS, VARS)
    assert len(calls) == 3 * 9 + 9


def test_in_memory_cube_and_union_window():
    got = _read_windows(_cube(lazy=False), {"a": WINDOWS["a"]}, VARS)
    np.testing.assert_array_equal(got["a"]["ta"], _cube(lazy=False)["ta"].values[:, 5:19, 3:12])
    assert _union_window((slice(4, 9), slice(2, 5)), (slice(1, 7), slice(3, 8))) == (slice(1, 9), slice(2, 8))
    # an empty footprint window does not stretch the read
    assert _union_window((slice(30, 30), slice(0, 0)), (slice(1, 7), slice(3, 8))) == (
        slice(1, 7),
        slice(3, 8),
    )
