"""Process memory policy for chunk-by-chunk work.

glibc's ``malloc`` serves a large request with ``mmap`` (given back to the system on ``free``) only above
its *mmap threshold*, and it raises that threshold after each large ``free``, up to 32 MiB. Chunk-sized
arrays (1-30 MB: a chunk of 12 float32 drivers at 512² is 12 MB) then come from the heap arenas, which
fragment and keep freed pages, so peak RSS creeps up with the number of chunks processed. Measured on
the mapping benchmark (12 drivers, chunk 512, threads): peak RSS 548-556 MB at 4096² against 460 MB at
1024². Trimming the heap after each written chunk keeps it at 468-481 MB for the same run time; pinning
the mmap threshold instead (``mallopt``) kept it flat too but cost 10-15 % of the run time in page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Give the free heap memory of every malloc arena back to the system (glibc ``malloc_trim(0)``).

    Takes about a millisecond; called once per finished chunk.

    Returns
    -------
    True if memory was released; False if there was none to release or the C library is not glibc.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    return bool(trim(0))
