"""Shared by the benchmark scripts: run one child process, measuring its CPU time and peak memory."""

from __future__ import annotations

import os
import subprocess
import time


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, int, float, int]:
    """Run ``cmd`` with its stdout captured; return (stdout, exit code, CPU seconds, peak RSS bytes).

    CPU seconds are this child's and its reaped workers' (``wait4`` on the child alone: unaffected by other
    processes); peak RSS is the maximum over time (polled every 50 ms) of the summed RSS of its process tree.
    """
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read() if proc.stdout else ""
    return stdout, proc.returncode, usage.ru_utime + usage.ru_stime, peak
