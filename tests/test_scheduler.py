"""Schedulers: specs, broadcast objects, streaming results in the calling thread, bounded submission."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest

from geoflux.errors import GeofluxError
from geoflux.mapping.scheduler import SchedulerError, Shared, open_scheduler


def _scaled(block: np.ndarray, factor: Shared) -> np.ndarray:
    return block * factor.get()


def _run(sched, n: int = 8) -> dict[int, float]:
    handle = sched.broadcast(np.float32(3.0))
    arr = da.ones((n * 4, 4), chunks=4, dtype="float32").map_blocks(_scaled, handle, dtype="float32")
    blocks = list(arr.to_delayed().ravel())
    got: dict[int, float] = {}
    caller = threading.get_ident()

    def take(i: int, value: np.ndarray) -> None:
        assert threading.get_ident() == caller  # a single writer thread, no lock needed
        assert i not in got
        got[i] = float(value.sum())

    sched.stream(blocks, take)
    return got


@pytest.mark.parametrize("spec", ["threads", "processes"])
def test_local_schedulers_stream_every_block_once(spec):
    with open_scheduler(spec, workers=2) as sched:
        assert sched.kind == spec and sched.workers == 2
        assert _run(sched) == {i: 48.0 for i in range(8)}


def test_local_cluster_prints_dashboard_and_bounds_in_flight():
    lines = []
    with open_scheduler("local", workers=2, echo=lines.append, processes=False) as sched:
        assert sched.kind == "distributed" and sched.client is not None
        assert "dask dashboard: http" in lines[0]
        in_flight, peak = [0], [0]
        submit = sched.client.submit

        def counting_submit(*args, **kwargs):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            return submit(*args, **kwargs)

        sched.client.submit = counting_submit
        handle = sched.broadcast(np.float32(3.0))
        arr = da.ones((40, 4), chunks=4, dtype="float32").map_blocks(_scaled, handle, dtype="float32")
        got = {}

        def take(i: int, v: np.ndarray) -> None:
            in_flight[0] -= 1
            got[i] = float(v.sum())

        sched.stream(list(arr.to_delayed().ravel()), take, max_in_flight=3)
        assert got == {i: 48.0 for i in range(10)}
        assert peak[0] == 3  # never more than 3 blocks submitted and not yet consumed


def test_existing_cluster_by_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with open_scheduler(cluster.scheduler_address) as sched:
            assert sched.kind == "distributed" and sched.workers == 2
            assert _run(sched, 4) == {i: 48.0 for i in range(4)}


def test_bad_specs_and_handles():
    with pytest.raises(SchedulerError, match="unknown 'gpu'") as err:
        with open_scheduler("gpu"):
            pass
    assert isinstance(err.value, GeofluxError) and "\n" not in str(err.value)
    with pytest.raises(SchedulerError, match="not installed"):
        Shared("nothing-here").get()
    with open_scheduler("threads") as sched:
        h = sched.broadcast([1, 2])
        assert h.get() == [1, 2]
    with pytest.raises(SchedulerError):
        h.get()  # closing the scheduler drops what it broadcast
