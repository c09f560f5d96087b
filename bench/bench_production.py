"""What users actually map: the default demo model's production band set, per band and per inference path.

Usage::

    python bench/bench_production.py [--workdir DIR] [--size default] [--pixels 65536] [--compile]

Generates the demo world (``geoflux.demo.write_world``, default size: 256 x 256 pixels, 46 steps, 30
towers) and runs the pipeline's ``towers``, ``extract`` and ``train`` stages with the demo's model config
(``ModelSpec`` defaults: footprint-consistent ``iterative`` training, histogram boosting with a
residual-quantile band, AOA), once per work dir (reused when the model exists). Then, on the
real drivers of ``--pixels`` map pixels (whole periods of the world's cube, mid-season first), it measures
what one map task does (one thread, as :func:`geoflux.mapping.single_threaded` and one OpenMP thread):

* per band: ``NEE`` (point model), ``band`` (its quantile model(s)), ``DI`` (+AOA, KD-tree query) and
  ``all bands`` (:meth:`TrainedModel.predict_bands`) — seconds, kpix/s, peak RSS above the start;
* ``all bands`` through each inference path (``library``; ``compiled`` with ``--compile``, its compile time
  reported, cached in the work dir; ``auto`` = :func:`geoflux.inference.prepare` ``auto`` and what it chose);
* the traversal estimate: mean nodes visited per pixel per tree and per model (sklearn ``decision_path``
  for forests, a walk of the fitted nodes for HistGradientBoosting) on a 2,000-pixel sample.

The machine load (``/proc/loadavg``) is printed before and after: other processes share the cores, so
figures are for this machine at that load, not a wall-clock claim. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoflux import inference, pipeline
from geoflux.config import load_config
from geoflux.demo import write_world
from geoflux.model import load_model


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()


def prepare_run(workdir: Path, size: str) -> Any:
    """The demo world and its trained model in ``workdir`` (reused when present); returns the config."""
    cfg_path = workdir / "config.yaml"
    if not cfg_path.exists():
        t0 = time.perf_counter()
        write_world(workdir, size)
        print(f"world written in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = load_config(cfg_path)
    if not (cfg.out_dir / pipeline.MODEL).exists():
        for stage in (pipeline.stage_towers, pipeline.stage_extract, pipeline.stage_train):
            t0 = time.perf_counter()
            stage(cfg)
            print(f"{stage.__name__}: {time.perf_counter() - t0:.0f} s", flush=True)
    return cfg


def map_pixels(cfg: Any, n: int) -> np.ndarray:
    """(n, n_features) float32 features of real map pixels: whole periods, mid-season first."""
    from geoflux.cube import cube_from_config
    from geoflux.features import pixel_features

    cube = cube_from_config(cfg)
    nt = cube.sizes["time"]
    order = sorted(range(nt), key=lambda i: abs(i - nt // 2))
    rows: list[np.ndarray] = []
    got = 0
    for i in order:
        step = cube.isel(time=i) if "time" in cube.dims else cube
        values = {v.name: step[v.name].values for v in cfg.variables}
        f = pixel_features(values, cfg.variables).reshape(-1, len(load_features(cfg)))
        f = f[~np.isnan(f).any(axis=1)]
        rows.append(f)
        got += len(f)
        if got >= n:
            break
    return np.ascontiguousarray(np.concatenate(rows)[:n], dtype=np.float32)


def load_features(cfg: Any) -> list[str]:
    from geoflux.features import feature_names

    return feature_names(cfg.variables)


class PeakRSS:
    """Peak resident memory (MB) above the level at entry, polled every 10 ms (psutil)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.mb = (self.peak - self.base) / 2**20


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of ``fn()`` (the least disturbed by other processes) and peak RSS MB."""
    from threadpoolctl import threadpool_limits

    best = np.inf
    with PeakRSS() as mem, threadpool_limits(1, user_api="openmp"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best, mem.mb


def nodes_visited(est: Any, x: np.ndarray) -> tuple[int, float]:
    """(number of trees, mean nodes visited per pixel summed over the trees) for a tree ensemble."""
    if hasattr(est, "decision_path") and hasattr(est, "estimators_"):
        indicator, _ = est.decision_path(x)
        return len(est.estimators_), float(np.asarray(indicator.sum(axis=1)).mean())
    if hasattr(est, "_predictors"):  # HistGradientBoosting: no decision_path, walk the fitted nodes
        total = np.zeros(len(x))
        trees = [p for it in est._predictors for p in it]
        for p in trees:
            nodes = p.nodes
            at = np.zeros(len(x), dtype=np.int64)
            total += 1
            while True:
                inner = ~nodes["is_leaf"][at].astype(bool)
                if not inner.any():
                    break
                idx = np.flatnonzero(inner)
                nd = nodes[at[idx]]
                v = x[idx, nd["feature_idx"]]
                left = np.where(np.isnan(v), nd["missing_go_to_left"] == 1, v <= nd["num_threshold"])
                at[idx] = np.where(left, nd["left"], nd["right"])
                total[idx] += 1
        return len(trees), float(total.mean())
    return 0, float("nan")


def tree_nodes(est: Any) -> int:
    if hasattr(est, "estimators_"):
        return int(sum(t.tree_.node_count for t in est.estimators_))
    if hasattr(est, "_predictors"):
        return int(sum(len(p.nodes) for it in est._predictors for p in it))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geoflux-bench-production")
    ap.add_argument("--size", default="default")
    ap.add_argument("--pixels", type=int, default=65_536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also compile with treelite/tl2cgen (cached)")
    args = ap.parse_args()
    load0 = loadavg()
    print(f"load average before: {load0}; {os.cpu_count()} CPUs", flush=True)
    cfg = prepare_run(args.workdir, args.size)
    model = load_model(cfg.out_dir / pipeline.MODEL)
    from geoflux.mapping import single_threaded

    one = single_threaded(model)  # what a map task runs: one thread per task
    x = map_pixels(cfg, args.pixels)
    n = len(x)
    print(f"{n} map pixels, {x.shape[1]} features; model bands {list(model.bands)}", flush=True)

    ests = {"NEE": one.estimator}
    # the band: two quantile models (uncertainty: quantile) or one residual-quantile model (residual)
    for k, q in enumerate(one.quantile_models or ()):
        ests[f"band_{k}"] = q
    sample = x[np.random.default_rng(0).choice(n, min(2000, n), replace=False)]
    structure = {}
    for name, est in ests.items():
        trees, visited = nodes_visited(est, sample)
        structure[name] = {
            "kind": type(est).__name__,
            "trees": trees,
            "nodes": tree_nodes(est),
            "visited_per_pixel": visited,
            "visited_per_tree": visited / trees if trees else float("nan"),
        }

    rows: dict[str, dict[str, float]] = {}

    def measure(label: str, fn: Callable[[], Any]) -> None:
        s, mb = timed(fn, args.repeats)
        rows[label] = {"seconds": s, "kpix_s": n / s / 1e3, "peak_rss_mb": mb}
        print(f"  {label:<28} {s:8.3f} s {n / s / 1e3:9.1f} kpix/s  +{mb:7.1f} MB", flush=True)

    measure("NEE (library)", lambda: one.predict(x))
    if one.quantile_models is not None:
        measure("band (library)", lambda: [q.predict(x) for q in one.quantile_models])
    if one.aoa is not None:
        one.aoa.di(x[:10])  # build the KD-tree outside the timing: once per model and process
        measure("DI+AOA", lambda: one.aoa.di(x) <= one.aoa.threshold)
    measure("all bands (library)", lambda: one.predict_bands(x))

    compile_s = None
    if args.compile and inference.available():
        t0 = time.perf_counter()
        comp, how = inference.prepare(model, "compiled", args.workdir / "compiled")
        compile_s = time.perf_counter() - t0
        print(f"  compiled ({how}) in {compile_s:.1f} s (0 when cached)", flush=True)
        comp1 = single_threaded(comp)
        measure("NEE (compiled)", lambda: comp1.predict(x))
        if comp1.quantile_models is not None:
            measure("band (compiled)", lambda: [q.predict(x) for q in comp1.quantile_models])
        measure("all bands (compiled)", lambda: comp1.predict_bands(x))
    t0 = time.perf_counter()
    auto, how = inference.prepare(model, "auto", args.workdir / "compiled")
    auto_s = time.perf_counter() - t0
    print(f"  auto chose: {how} ({auto_s:.1f} s to decide)", flush=True)
    auto1 = single_threaded(auto)
    measure("all bands (auto)", lambda: auto1.predict_bands(x))

    load1 = loadavg()
    print(f"\nload average after: {load1}")
    print("\n| model | kind | trees | nodes | nodes visited / pixel | per tree |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, s in structure.items():
        print(
            f"| {name} | {s['kind']} | {s['trees']} | {s['nodes']:,} | {s['visited_per_pixel']:.0f} "
            f"| {s['visited_per_tree']:.1f} |"
        )
    print(f"\n| band set ({n:,} pixels, 1 thread) | s | kpix/s | Mpix/s | peak RSS (+MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(
            f"| {label} | {r['seconds']:.3f} | {r['kpix_s']:.0f} | {r['kpix_s'] / 1e3:.3f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    print(
        json.dumps(
            {
                "pixels": n,
                "structure": structure,
                "rows": rows,
                "compile_s": compile_s,
                "auto": how,
                "auto_decide_s": auto_s,
                "load_before": load0,
                "load_after": load1,
            }
        )
    )


if __name__ == "__main__":
    main()
