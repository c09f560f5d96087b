"""A dask callback that counts executed tasks: tests use it to prove that nothing computes early."""

from __future__ import annotations

from dask.callbacks import Callback


class CountTasks(Callback):
    """Counts tasks run by local dask schedulers while active (``with CountTasks() as c: ...; c.n``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def _pretask(self, key, dsk, state):
        self.n += 1
