"""Benchmark: peak memory and wall time of the demo world's generation (:func:`geoflux.demo.write_world`).

Each run is a fresh child process writing the world into a temporary folder; its peak RSS is the kernel's
high-water mark (``ru_maxrss`` from ``wait4``, what ``/usr/bin/time -v`` reports as "Maximum resident set
size"), its wall time includes the imports. The load average is printed before and after: on a shared
machine compare figures measured back to back.

Run ``python bench/bench_world_memory.py [--size default] [--repeat 3]``; figures go to stdout, the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(size: str) -> tuple[float, float]:
    """Generate the world once in a child process; return (wall seconds, peak RSS MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = f"from geoflux.demo import write_world; write_world({tmp!r}, {size!r})"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code])
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"write_world({size!r}) failed")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", help="a geoflux.demo.WORLD_SIZES name")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs = []
    for i in range(args.repeat):
        wall, rss = run_once(args.size)
        runs.append({"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1)})
        print(f"run {i + 1}: wall {wall:.2f} s, peak RSS {rss:.0f} MB", flush=True)
    load_after = os.getloadavg()[0]
    summary = {
        "size": args.size,
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "load_1min": [load_before, load_after],
    }
    print(
        f"median wall {summary['median_wall_s']:.2f} s, peak RSS up to {summary['max_peak_rss_mb']:.0f} MB "
        f"(load {load_before:.1f} -> {load_after:.1f})"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
