"""Schedulers: specs, broadcast objects, streaming results in the calling thread, bounded submission."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from geoflux.errors import GeofluxError
from geoflux.mapping import scheduler
from geoflux.mapping.scheduler import SchedulerError, Shared, block_graphs, open_scheduler


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


def test_each_block_graph_is_the_blocks_own_part():
    arr = (da.arange(64, chunks=8, dtype="float64").reshape(8, 8).rechunk(4) + 1) * 2
    blocks = list(arr.to_delayed(optimize_graph=True).ravel())
    parts = list(block_graphs(blocks))
    assert [k for k, _ in parts] == [b.key for b in blocks]
    for block, (key, sub) in zip(blocks, parts, strict=True):
        (own,) = dask.optimize(block)  # dask culling this block's graph on its own
        assert set(sub) == set(dict(own.__dask_graph__()))
        np.testing.assert_array_equal(dask.get(sub, key), block.compute())


def test_scheduler_uses_public_dask_names_only():
    # dask and distributed modules whose name starts with "_" are private and change without notice
    tree = ast.parse(Path(scheduler.__file__).read_text())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in modules if m.split(".")[0] in ("dask", "distributed")]
    assert ours and not [m for m in ours if any(part.startswith("_") for part in m.split("."))]
    assert "collections_to_expr" not in Path(scheduler.__file__).read_text()
