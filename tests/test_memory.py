"""geoflux.memory: freed chunk buffers go back to the system."""

from __future__ import annotations

import os

import numpy as np
import pytest

from geoflux.memory import _libc, trim_heap

pytestmark = pytest.mark.skipif(
    _libc() is None or not hasattr(_libc(), "malloc_trim") or not os.path.exists("/proc/self/statm"),
    reason="glibc malloc_trim and /proc are needed",
)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_trim_returns_freed_chunk_buffers():
    # a large free raises glibc's mmap threshold, so the next 2 MB arrays come from the heap, as chunk
    # buffers do after the first few chunks of a mapping run
    big = np.ones(16 * 2**20 // 8)  # below the 32 MiB cap of the dynamic threshold
    del big
    bufs = [np.ones(2 * 2**20 // 8) for _ in range(100)]  # 200 MB, touched
    keep = bufs[-1]  # pins the top of the heap: freed memory below it is not released on free()
    del bufs
    before = _rss_mb()
    trim_heap()
    after = _rss_mb()
    assert keep.sum() > 0
    assert before - after > 100, (before, after)
