"""Progress reporting on stderr for dask computations (threads/processes schedulers)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from dask.callbacks import Callback
from tqdm.auto import tqdm


class _TqdmCallback(Callback):
    """Counts finished tasks of a local-scheduler computation into a tqdm bar."""

    def __init__(self, desc: str):
        super().__init__()
        self._desc = desc
        self._bar: tqdm | None = None

    def _start_state(self, dsk, state) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = tqdm(total=total, desc=self._desc, file=sys.stderr, unit="task", leave=False)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk, state, errored) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def progress_bar(desc: str) -> Iterator[None]:
    """Show a task progress bar on stderr for dask computations inside the block."""
    with _TqdmCallback(desc):
        yield
