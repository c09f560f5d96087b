"""Where dask tasks run: threads (default), processes, a local dask.distributed cluster, or a remote one.

One interface for all of them, built for the mapping stage's needs:

- :meth:`Scheduler.broadcast` puts a large object (the model) on every worker once — in this process for
  threads, through the pool initializer for processes, through a worker plugin on distributed — so task
  graphs carry only a small :class:`Shared` handle, never the object (no "Sending large graph" warnings,
  no model pickled per task).
- :meth:`Scheduler.stream` computes many small delayed results (one per output chunk) and hands each to a
  callback *in the calling thread* as soon as it is done, so a single writer can write it and drop it.
  Blocks are submitted in a sliding window, each block's own subgraph as one task (to a thread or process
  pool, or ``client.submit`` + ``as_completed`` on distributed, so a block's reads and prediction run on
  one worker without transfers), so memory is bounded by the chunks in flight, never by the output size.

Scheduler specs (``geoflux map --scheduler``): ``threads``, ``processes``, ``local`` (a
``distributed.LocalCluster`` on this machine; its dashboard address is printed) or ``tcp://host:port``
(an existing cluster; workers need geoflux installed).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cloudpickle
import dask
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.optimization import cull
from distributed.diagnostics.plugin import WorkerPlugin

from geoflux.errors import GeofluxError
from geoflux.memory import trim_heap

SCHEDULERS = ("threads", "processes", "local")

# Objects broadcast to this process (token -> object). Filled in-process for threads, by the pool
# initializer in worker processes and by a worker plugin on distributed workers.
_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


class SchedulerError(GeofluxError):
    """A scheduler spec is invalid or a cluster cannot be reached."""


@dataclass(frozen=True)
class Shared:
    """A small picklable handle to an object broadcast with :meth:`Scheduler.broadcast`.

    Task graphs hold this handle (a few bytes) instead of the object; :meth:`get` returns the copy that
    lives in the current process.
    """

    token: str

    def get(self) -> Any:
        try:
            return _SHARED[self.token]
        except KeyError:
            raise SchedulerError(
                f"shared object {self.token} is not installed in this process (broadcast it first)"
            ) from None


def _install(payloads: dict[str, bytes]) -> None:
    with _SHARED_LOCK:
        for token, blob in payloads.items():
            if token not in _SHARED:
                _SHARED[token] = pickle.loads(blob)  # our own bytes, pickled by broadcast() below


def _process_initializer(payloads: dict[str, bytes]) -> None:
    from dask.multiprocessing import initialize_worker_process

    initialize_worker_process(user_initializer=partial(_install, payloads))


class _SharedPlugin(WorkerPlugin):
    """distributed WorkerPlugin installing broadcast objects on every (current and future) worker."""

    def __init__(self, payloads: dict[str, bytes]):
        super().__init__()
        self.payloads = payloads

    def setup(self, worker: Any) -> None:
        _install(self.payloads)

    def teardown(self, worker: Any) -> None:
        with _SHARED_LOCK:
            for token in self.payloads:
                _SHARED.pop(token, None)


def block_graphs(blocks: Sequence[Delayed]) -> Iterator[tuple[Any, dict]]:
    """Each block's key and its own graph (its task and all of its inputs), lazily, in ``blocks`` order.

    The blocks' graphs are merged and optimized together once, through the collection protocol
    (``__dask_optimize__``: for delayed values, a cull to the blocks' keys); each block then gets its own
    part of that graph with ``dask.optimization.cull``, whose cost is the block's own tasks. Each block is
    computed from its part as a single task, so on a cluster its reads and prediction run on one worker,
    without transfers.

    Not ``dask.compute(block)`` per block, nor ``dask.optimize(*blocks)``: in dask 2026.8 both cull the
    whole graph once per block, a cost that grows as blocks x graph size (87-100 ms per 256-px block of a
    4096² cube with 8 steps, 3 min per map, against about 1 ms here; bench/bench_scheduler.py).
    """
    blocks = list(blocks)
    graphs = {id(g): g for g in (b.__dask_graph__() for b in blocks)}  # to_delayed's blocks share one
    graph = HighLevelGraph.merge(*graphs.values())
    dsk = dict(blocks[0].__dask_optimize__(graph, [b.key for b in blocks]))
    for block in blocks:
        yield block.key, cull(dsk, block.key)[0]


# distributed's default environment for worker processes sets MALLOC_TRIM_THRESHOLD_=65536, which turns off
# glibc's adaptive mmap threshold: every MB-sized temporary (HistGradientBoosting allocates one per tree per
# chunk) is then mmapped, page-faulted and unmapped again, ~20 % more CPU per chunk. Measured at 4096² (300
# iterations, 2 workers): 0.84 of the threaded throughput with the default, 0.99-1.12 without it. Workers
# trim their heap after each chunk instead (see geoflux.memory). Turning off the workers' profiler and
# sampling their monitors less often changed nothing measurable, so they keep distributed's defaults.
LOCAL_CLUSTER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": {
        "OMP_NUM_THREADS": 1,
        "MKL_NUM_THREADS": 1,
        "OPENBLAS_NUM_THREADS": 1,
    },
}


def _compute_one(dsk: dict, key: Any, trim: bool = False) -> Any:
    """Compute one block from its own graph, synchronously, in a pool thread or worker process.

    ``trim``: give the block's freed buffers back to the system afterwards (worker processes; see
    :mod:`geoflux.memory`).
    """
    value = dask.get(dsk, key)  # dask's synchronous scheduler, in this thread
    if trim:
        trim_heap()
    return value


def _compute_pickled(blob: bytes, key: Any) -> Any:
    """:func:`_compute_one` for a graph sent as bytes (cloudpickle, made by :meth:`Scheduler.stream`)."""
    return _compute_one(cloudpickle.loads(blob), key, trim=True)


@dataclass
class Scheduler:
    """An open scheduler; use :func:`open_scheduler` to make one.

    Attributes
    ----------
    kind : ``threads``, ``processes`` or ``distributed``.
    workers : number of parallel task slots (threads or processes; total threads on distributed).
    client : the ``distributed.Client`` (distributed only).
    dashboard : dashboard URL (distributed only, when the cluster has one).
    """

    kind: str
    workers: int
    client: Any = None
    dashboard: str | None = None
    _payloads: dict[str, bytes] = field(default_factory=dict)
    _origins: dict[int, tuple[Any, Shared]] = field(default_factory=dict)
    _pool: Executor | None = None
    _threads: Executor | None = None
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def broadcast(self, obj: Any, origin: Any = None) -> Shared:
        """Place ``obj`` once on every worker and return a handle to it for task graphs.

        Parameters
        ----------
        obj : any picklable object (for threads it is shared as is, not copied).
        origin : if given, a later broadcast with the same ``origin`` object returns the first handle (no
            new copy, no restart of a process pool), e.g. when one scheduler maps many tiles with one model
            (``obj`` being a prepared copy of ``origin``). The scheduler keeps ``origin`` referenced.
        """
        if origin is not None and id(origin) in self._origins:
            return self._origins[id(origin)][1]
        token = f"geoflux-shared-{os.getpid()}-{id(self)}-{next(self._counter)}"
        if self.kind == "threads":
            # Same process: share the object itself, no copy.
            with _SHARED_LOCK:
                _SHARED[token] = obj
            self._payloads[token] = b""
        else:
            blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            self._payloads[token] = blob
            if self.kind == "processes":
                # Workers get every payload through their initializer: restart the pool with the new set.
                self._close_pool()
            else:
                self.client.register_plugin(_SharedPlugin({token: blob}), name=token)
        handle = Shared(token)
        if origin is not None:
            self._origins[id(origin)] = (origin, handle)  # holding origin keeps its id unique
        return handle

    def _thread_pool(self) -> Executor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="geoflux-worker")
        return self._threads

    def _process_pool(self) -> Executor:
        if self._pool is None:
            # spawn, not fork: forking a process that runs GDAL/OpenMP threads can deadlock.
            ctx = multiprocessing.get_context("spawn")
            os.environ.setdefault("PYTHONHASHSEED", "6640")  # consistent dask tokens in the children
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_process_initializer,
                initargs=(dict(self._payloads),),
            )
        return self._pool

    def _close_pool(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def stream(
        self,
        blocks: Sequence[Delayed],
        on_result: Callable[[int, Any], None],
        max_in_flight: int | None = None,
    ) -> None:
        """Compute ``blocks`` and call ``on_result(index, value)`` for each one in this thread.

        Blocks are submitted in a sliding window: at most ``max_in_flight`` are computing or waiting to
        be consumed, and a new one is submitted as each result is handed over. So memory holds the inputs
        and outputs of a few blocks, whatever their number (a single dask computation of all blocks would
        let the local schedulers read every input chunk ahead of the slow predictions).

        Parameters
        ----------
        blocks : delayed values to compute (typically one per output chunk).
        on_result : consumer, called exactly once per block in the calling thread, in completion order.
        max_in_flight : cap on blocks in flight (default 2 per worker, at least 4).
        """
        if not blocks:
            return
        cap = max_in_flight or max(4, 2 * self.workers)
        if self.kind == "distributed":
            from distributed import as_completed

            def submit_one(sub: dict, key: Any) -> Any:
                # as opaque bytes: distributed would read the Task objects of a graph argument as
                # dependencies on keys that do not exist on the cluster
                blob = cloudpickle.dumps(sub)
                return self.client.submit(_compute_pickled, blob, key, pure=False)

            pending_ac = as_completed()
        else:
            pool = self._thread_pool() if self.kind == "threads" else self._process_pool()

            def submit_one(sub: dict, key: Any) -> Any:
                return pool.submit(_compute_one, sub, key, self.kind == "processes")

        todo = enumerate(block_graphs(blocks))
        pending: dict[Any, int] = {}

        def submit() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                i, (key, sub) = nxt
                fut = submit_one(sub, key)
                pending[fut] = i
                if self.kind == "distributed":
                    pending_ac.add(fut)

        try:
            for _ in range(cap):
                submit()
            if self.kind == "distributed":
                for fut in pending_ac:
                    i = pending.pop(fut)
                    value = fut.result()
                    fut.release()
                    on_result(i, value)
                    del value
                    trim_heap()  # the block's buffers, freed, would otherwise stay in malloc's heap
                    submit()
                return
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    on_result(i, fut.result())
                    # the block's inputs, freed in the pool thread, would otherwise stay in malloc's heap
                    trim_heap()
                    submit()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        """Shut down the process pool and drop broadcast objects (also from a cluster's workers)."""
        self._close_pool()
        if self.kind == "distributed" and self.client is not None and self._payloads:
            for token in self._payloads:
                with contextlib.suppress(Exception):  # the cluster may be gone already
                    self.client.unregister_worker_plugin(token)
        with _SHARED_LOCK:
            for token in self._payloads:
                _SHARED.pop(token, None)
        self._payloads.clear()
        self._origins.clear()


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def open_scheduler(
    spec: str | Scheduler | None = "threads",
    workers: int | None = None,
    echo: Callable[[str], None] | None = None,
    processes: bool = True,
) -> Iterator[Scheduler]:
    """Open a scheduler for the block, close (and shut down what it started) afterwards.

    Parameters
    ----------
    spec : ``threads`` (default), ``processes``, ``local`` or ``tcp://host:port``; an open
        :class:`Scheduler` is passed through (and not closed).
    workers : threads or processes to use (default: the CPUs available to this process). For ``local``,
        the number of worker processes, each with one thread.
    echo : where to print the dashboard address of a distributed cluster (e.g. ``click.echo``).
    processes : ``local`` only: worker processes (True) or threads in this process (False, for tests).

    Raises
    ------
    SchedulerError
        if the spec is unknown or the cluster cannot be reached.
    """
    if isinstance(spec, Scheduler):
        yield spec
        return
    spec = spec or "threads"
    n = workers or _default_workers()
    if spec in ("threads", "processes"):
        sched = Scheduler(spec, n)
        try:
            yield sched
        finally:
            sched.close()
        return
    if spec != "local" and "://" not in spec:  # tcp://, tls://, inproc:// ... addresses of a scheduler
        raise SchedulerError(
            f"scheduler: unknown {spec!r} (expected threads, processes, local or tcp://host:port)"
        )
    import logging

    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if spec == "local":
            # One thread per worker process: predictions hold the GIL only briefly, but GDAL reads and
            # sklearn's Cython loops scale best across processes; dashboard on a free port. Workers
            # inherit the config at spawn: see LOCAL_CLUSTER_CONFIG.
            with dask.config.set(LOCAL_CLUSTER_CONFIG):
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=n if processes else 1,
                        threads_per_worker=1 if processes else n,
                        processes=processes,
                        dashboard_address=":0",
                        silence_logs=logging.ERROR,
                    )
                )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(spec, timeout="10s"))
            except OSError as exc:
                raise SchedulerError(f"scheduler: cannot connect to {spec} ({exc})") from None
        threads = sum(client.nthreads().values()) or 1
        dashboard = getattr(client, "dashboard_link", None)
        if echo is not None:
            echo(f"dask dashboard: {dashboard}  ({len(client.nthreads())} workers, {threads} threads)")
        sched = Scheduler("distributed", threads, client=client, dashboard=dashboard)
        try:
            yield sched
        finally:
            sched.close()
