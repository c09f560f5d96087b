"""The mapping scheduler's block preparation: public dask APIs vs the private path it replaced.

Usage::

    python bench/bench_scheduler.py [--size 2048] [--chunk 256] [--steps 4] [--schedulers threads local]
        [--modes private public compute] [--model hgb] [--trees 50] [--prep 2048:256:4 4096:256:8]
        [--workdir DIR] [--json out.json]

:meth:`geoflux.mapping.scheduler.Scheduler.stream` computes each output chunk (a block) from its own
subgraph, as one task. How the blocks' subgraphs are prepared is the only thing that differs between:

* ``public`` (geoflux today, :func:`geoflux.mapping.scheduler.block_graphs`): one time step's blocks'
  graphs merged and optimized once through the collection protocol (``__dask_optimize__``, a cull to the
  step's keys), then ``dask.optimization.cull`` per block;
* ``private`` (geoflux before): ``dask.base.collections_to_expr(...).optimize()`` and
  ``dask._task_spec.convert_legacy_graph`` once per step, then its own walk over ``Task.dependencies``;
* ``optimize``: ``dask.optimize(*blocks)`` once per step, then ``dask.optimization.cull`` per block
  (dask 2026.8 culls the whole graph once per block inside ``dask.optimize``);
* ``compute`` (what ``dask.compute(block)`` per block does): ``dask.optimize(block)`` per block, which
  culls the whole cube's graph each time.

Two measurements:

1. **prep** (no pixels computed): per block and per map, the preparation cost of each mode on the graph
   ``write_maps`` builds for SIZE:CHUNK:STEPS cubes (a few sizes, to show how it grows).
2. **runs**: ``write_maps`` of a SIZE² cube with STEPS daily steps (12 float32 drivers, tiled DEFLATE
   GeoTIFFs from bench_mapping's helpers) with each scheduler and mode, each in its own subprocess: wall
   time, CPU time, peak RSS of the process tree (psutil, every 50 ms), and the SHA-256 of the outputs'
   pixels, georeferencing and tags but their write time (must be equal across schedulers and modes).
   Load average is printed at start and end: numbers are only comparable on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mapping import (  # noqa: E402  (bench helpers, next to this file)
    N_BANDS,
    geobox_for,
    make_stack,
    stac_items,
    train_model,
    variables,
)


# ------------------------------------------------------------------------------------------ the modes
def _graphs_private(blocks):
    """The private path geoflux used before (dask 2024-2026 internals), kept here to compare."""
    from dask._task_spec import convert_legacy_graph
    from dask.base import collections_to_expr

    dsk = convert_legacy_graph(dict(collections_to_expr(list(blocks), True).optimize().__dask_graph__()))
    for b in blocks:
        out: dict = {}
        stack = [b.key]
        while stack:
            k = stack.pop()
            if k in out:
                continue
            out[k] = node = dsk[k]
            stack.extend(d for d in node.dependencies if d not in out)
        yield b.key, out


def _graphs_optimize(blocks):
    """``dask.optimize`` on all blocks at once, then ``dask.optimization.cull`` per block."""
    import dask
    from dask.optimization import cull

    optimized = dask.optimize(*blocks, traverse=False)
    dsk = dict(optimized[0].__dask_graph__())
    for b in optimized:
        yield b.key, cull(dsk, b.key)[0]


def _graphs_compute(blocks):
    """What ``dask.compute(block)`` prepares per call: the block's graph optimized and culled on its own."""
    import dask

    for b in blocks:
        (opt,) = dask.optimize(b, traverse=False)
        yield b.key, dict(opt.__dask_graph__())


def _graphs(mode: str):
    from geoflux.mapping import scheduler

    modes = {"public": scheduler.block_graphs, "private": _graphs_private, "optimize": _graphs_optimize}
    return {**modes, "compute": _graphs_compute}[mode]


# ----------------------------------------------------------------------------------------------- data
def cube_items(paths: list[Path], n: int, steps: int) -> dict:
    """bench_mapping's items, one per daily step (same files: the drivers repeat in time)."""
    out = {}
    for name, (item,) in stac_items(paths, n).items():
        out[name] = []
        for t in range(steps):
            it = item.clone()
            it.id = f"{item.id}-{t}"
            it.datetime = dt.datetime(2021, 6, 1 + t, tzinfo=dt.timezone.utc)
            out[name].append(it)
    return out


def build(stack: Path, n: int, chunk: int, steps: int):
    """The cube and the blocks write_maps streams (optimized once, as write_maps does)."""
    import pandas as pd

    from geoflux.cube import load_cube
    from geoflux.mapping.predict import predict_bands
    from geoflux.mapping.scheduler import Shared

    paths = [stack / f"band{b:02d}.tif" for b in range(N_BANDS)]
    periods = pd.date_range("2021-06-01", periods=steps, freq="1D")
    cube = load_cube(cube_items(paths, n, steps), variables(), geobox_for(n), periods, "1D", chunk)
    pred = predict_bands(cube, Shared("bench"), variables(), ["NEE"])
    return cube, pred.data.to_delayed(optimize_graph=True)


def prep(stack: Path, n: int, chunk: int, steps: int, modes: list[str]) -> dict:
    """Preparation cost per mode for one step's blocks (the cost is the same for every step)."""
    _, blocks = build(stack, n, chunk, steps)
    step = list(blocks[0, 0].ravel())
    tasks = len(step[0].__dask_graph__())
    row = {"graph_tasks": tasks, "blocks_per_step": len(step), "blocks": len(step) * steps}
    for mode in modes:
        t0 = time.perf_counter()
        sizes = [len(sub) for _, sub in _graphs(mode)(step)]
        s = time.perf_counter() - t0
        row[mode] = {
            "ms_per_block": round(1e3 * s / len(step), 2),
            "s_per_map": round(s * steps, 2),
            "tasks_per_block": sizes[0],
        }
    return row


# --------------------------------------------------------------------------------------- child process
def child(args) -> dict:
    import pickle

    from geoflux.mapping import band_spec, write_maps
    from geoflux.mapping import scheduler as sched_mod
    from geoflux.mapping.scheduler import open_scheduler

    sched_mod.block_graphs = _graphs(args.mode)  # stream() looks it up at call time
    model = pickle.loads(Path(args.model_file).read_bytes())  # written by this script in its work dir
    n = args.size
    out = Path(args.out)
    t0 = time.perf_counter()
    with open_scheduler(args.scheduler, workers=args.workers) as sched:
        t1 = time.perf_counter()
        cube, _ = build(Path(args.stack), n, args.chunk, args.steps)
        specs = {
            t: [band_spec("NEE", out / f"nee-{t}.tif", "gC m-2 d-1", {"software": "geoflux bench"})]
            for t in range(args.steps)
        }
        write_maps(cube, model, variables(), geobox_for(n), specs, sched, overwrite=True)
        t2 = time.perf_counter()
    import rasterio

    digest = hashlib.sha256()
    for t in range(args.steps):
        # pixels, georeferencing and tags but ``created`` (the write time), as tests/test_mapping.py
        with rasterio.open(out / f"nee-{t}.tif") as src:
            tags = {k: v for k, v in src.tags().items() if k != "created"}
            meta = repr((src.profile, tags, src.tags(1), src.descriptions, src.overviews(1)))
            digest.update(src.read().tobytes() + meta.encode())
    return {"seconds": round(t2 - t0, 2), "startup_seconds": round(t1 - t0, 2), "sha256": digest.hexdigest()}


def run_child(mode: str, scheduler: str, args, model_path: Path, stack: Path) -> dict:
    import psutil

    out = Path(tempfile.mkdtemp(dir=args.workdir, prefix=f"{mode}-{scheduler}-"))
    cmd = [
        sys.executable, __file__, "--child", "--mode", mode, "--scheduler", scheduler, "--size",
        str(args.size), "--chunk", str(args.chunk), "--steps", str(args.steps), "--workers",
        str(args.workers), "--stack", str(stack), "--model-file", str(model_path), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's CPU, with its reaped workers'
        if pid:
            break
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{mode}/{scheduler} failed")
    res = json.loads(stdout.strip().splitlines()[-1])
    for f in out.glob("*"):
        f.unlink()
    out.rmdir()
    cpu = usage.ru_utime + usage.ru_stime
    return {**res, "cpu_seconds": round(cpu, 1), "peak_rss_mb": round(peak / 2**20)}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--schedulers", nargs="*", default=["threads", "local"], help="none: prep only")
    ap.add_argument("--modes", nargs="+", default=["private", "public", "optimize", "compute"])
    ap.add_argument("--model", choices=["rf", "hgb", "lightgbm"], default="hgb")
    ap.add_argument("--trees", type=int, default=50)
    ap.add_argument("--prep", nargs="*", default=["2048:256:4", "4096:256:8"], help="SIZE:CHUNK:STEPS")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scheduler and mode (interleaved)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, default=None, help="keeps stacks and the model between runs")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--scheduler", help=argparse.SUPPRESS)
    ap.add_argument("--stack", help=argparse.SUPPRESS)
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="geoflux-bench-sched-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(
        f"# load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {len(os.sched_getaffinity(0))} CPUs"
    )
    results: dict = {"loadavg_start": load0, "prep": {}, "runs": {}}
    print(
        "\n| graph (size:chunk:steps) | tasks | blocks | "
        + " | ".join(f"{m} ms/block (s/map)" for m in args.modes)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(args.modes))
    for spec in args.prep:
        n, chunk, steps = (int(v) for v in spec.split(":"))
        row = prep(make_stack_dir(args.workdir, n), n, chunk, steps, args.modes)
        results["prep"][spec] = row
        cells = " | ".join(f"{row[m]['ms_per_block']:.2f} ({row[m]['s_per_map']:.1f})" for m in args.modes)
        print(f"| {spec} | {row['graph_tasks']} | {row['blocks']} | {cells} |", flush=True)

    if args.schedulers:
        run_all(args, results)
    results["loadavg_end"] = os.getloadavg()
    le = results["loadavg_end"]
    print(f"# load average at end {le[0]:.2f} {le[1]:.2f} {le[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


def run_all(args, results: dict) -> None:
    stack = make_stack_dir(args.workdir, args.size)
    model_path = args.workdir / f"model-{args.model}-{args.trees}.pkl"
    train_model(model_path, args.model, args.trees)
    print(f"\nwrite_maps {args.size}² chunk {args.chunk}, {args.steps} steps, {args.model} {args.trees}, "
          f"{args.workers} workers")  # fmt: skip
    print("| scheduler / mode | s (start-up) | CPU s | peak RSS MB | output sha256 |")
    print("|---|---|---|---|---|")
    for rep in range(args.repeat):
        for s in args.schedulers:
            for m in args.modes:
                r = run_child(m, s, args, model_path, stack)
                results["runs"].setdefault(f"{s}/{m}", []).append(r)
                cells = [f"{r['seconds']:.1f} ({r['startup_seconds']:.1f})", f"{r['cpu_seconds']:.1f}",
                         str(r["peak_rss_mb"]), r["sha256"][:12]]  # fmt: skip
                print(f"| {s}/{m} #{rep} | " + " | ".join(cells) + " |", flush=True)
    digests = {r["sha256"] for rs in results["runs"].values() for r in rs}
    results["identical_outputs"] = len(digests) == 1
    print(f"\nidentical outputs across schedulers and modes: {results['identical_outputs']}")


def make_stack_dir(workdir: Path, n: int) -> Path:
    stack = workdir / f"stack-{n}"
    make_stack(stack, n)
    return stack


if __name__ == "__main__":
    main()
