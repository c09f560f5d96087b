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

Times are the best of ``--repeats`` runs in CPU seconds of the process (``time.process_time``; one thread)
and in wall seconds: on shared cores wall time mostly measures the other processes, CPU time the work.

``--kinds`` adds, per supported model kind (``random_forest``, ``hist_gradient_boosting``, and
``lightgbm``/``xgboost`` when installed; ``geoflux.model.make_estimator`` defaults, fitted on the demo's
training table), the library's and ``auto``'s NEE predict on the same map pixels (CPU time, one thread) and
what ``auto`` chose: ``auto`` must never be slower than the library.

``--e2e 1024 4096 [8192]`` adds the production band set END TO END with the same model: per size N, a
stack of N x N float32 GeoTIFFs of the model's drivers (one mid-season step of the demo cube, tiled;
tiled DEFLATE files described by in-memory STAC items) -> ``geoflux.cube.load_cube`` -> ``write_maps``
(threads, all CPUs) -> one COG per band (NEE, NEE_q05, NEE_q95, DI, AOA), per ``--e2e-inference`` mode,
each run in its own subprocess: wall and CPU seconds, Mpix/s (N² / wall), peak RSS of the process tree
(psutil, every 50 ms) and the load at start and end of each run.

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

from _proc import run_measured

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


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` wall and CPU seconds of ``fn()`` (the least disturbed runs) and peak RSS MB."""
    from threadpoolctl import threadpool_limits

    best = cpu = np.inf
    with PeakRSS() as mem, threadpool_limits(1, user_api="openmp"):
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
    return best, cpu, mem.mb


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
    ap.add_argument("--kinds", action="store_true", help="library vs auto per supported model kind")
    ap.add_argument("--e2e", type=int, nargs="*", default=[], help="end-to-end map sizes (pixels per side)")
    ap.add_argument("--e2e-inference", nargs="+", default=["auto"], choices=list(inference.MODES))
    ap.add_argument("--chunk", type=int, default=512, help="map chunk edge (px) of the end-to-end runs")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one end-to-end run (size)
    ap.add_argument("--mode", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(e2e_child(args)))
        return
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
        s, cpu, mb = timed(fn, args.repeats)
        rows[label] = {
            "seconds": s,
            "kpix_s": n / s / 1e3,
            "cpu_us_per_pixel": cpu / n * 1e6,
            "kpix_per_cpu_s": n / cpu / 1e3,
            "peak_rss_mb": mb,
        }
        print(
            f"  {label:<28} {s:8.3f} s {n / s / 1e3:9.1f} kpix/s  CPU {cpu / n * 1e6:6.2f} us/pix"
            f" ({n / cpu / 1e3:6.1f} kpix per CPU-s)  +{mb:7.1f} MB",
            flush=True,
        )

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
    print(
        f"\n| band set ({n:,} pixels, 1 thread) | wall s | kpix/s (wall) | CPU us/pixel | kpix per CPU-s "
        "| peak RSS (+MB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(
            f"| {label} | {r['seconds']:.3f} | {r['kpix_s']:.0f} | {r['cpu_us_per_pixel']:.2f} "
            f"| {r['kpix_per_cpu_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    kinds = [] if not args.kinds else kind_table(cfg, model, x, args)
    e2e = [] if not args.e2e else end_to_end(cfg, model, args)
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
                "kinds": kinds,
                "e2e": e2e,
            }
        )
    )


def kind_table(cfg: Any, model: Any, x: np.ndarray, args: Any) -> list[dict[str, Any]]:
    """Library vs ``auto`` NEE predict per supported model kind, on the map pixels ``x`` (CPU s, 1 thread)."""
    import importlib.util

    import pandas as pd

    from geoflux.config import ModelSpec
    from geoflux.mapping import single_threaded
    from geoflux.model import TrainedModel, make_estimator

    table = pd.read_parquet(cfg.out_dir / "training" / "training.parquet")
    feats = list(model.features)
    kinds = ["random_forest", "hist_gradient_boosting"]
    kinds += [k for k in ("lightgbm", "xgboost") if importlib.util.find_spec(k) is not None]
    out = []
    for kind in kinds:
        est = make_estimator(ModelSpec(kind=kind)).fit(table[feats].to_numpy(np.float32), table["NEE"])
        m = TrainedModel(est, feats, {})
        m.aoa = model.aoa  # auto times on the model's own training pixels, as in a run
        t0 = time.perf_counter()
        auto, how = inference.prepare(m, "auto", args.workdir / "compiled")
        decide = time.perf_counter() - t0
        lib1, auto1 = single_threaded(m), single_threaded(auto)
        ref = lib1.predict(x)
        diff = float(np.abs(np.asarray(auto1.predict(x)) - ref).max())
        _, c_lib, _ = timed(lambda lib1=lib1: lib1.predict(x), args.repeats)
        _, c_auto, _ = timed(lambda auto1=auto1: auto1.predict(x), args.repeats)
        r = {
            "kind": kind,
            "estimator": type(est).__name__,
            "nodes": inference.node_count(est),
            "library_kpix_cpu_s": len(x) / c_lib / 1e3,
            "auto_kpix_cpu_s": len(x) / c_auto / 1e3,
            "auto": how,
            "decide_s": decide,
            "max_abs_diff": diff,
        }
        out.append(r)
        print(
            f"  {kind}: library {r['library_kpix_cpu_s']:.0f}, auto {r['auto_kpix_cpu_s']:.0f} kpix/CPU-s",
            flush=True,
        )
    print(
        f"\n| kind (NEE, {len(x):,} map pixels, kpix per CPU-s) | nodes | library | auto | auto / library "
        "| auto chose | max abs diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in out:
        chose = "compiled" if "NEE compiled" in r["auto"] else "library"
        print(
            f"| {r['kind']} | {r['nodes']:,} | {r['library_kpix_cpu_s']:.0f} | {r['auto_kpix_cpu_s']:.0f} "
            f"| {r['auto_kpix_cpu_s'] / r['library_kpix_cpu_s']:.2f} | {chose} | {r['max_abs_diff']:.1e} |"
        )
    return out


# ------------------------------------------------------------------------------------------ end to end
E2E_BLOCK = 256
E2E_DATE = "2021-06-01"


def e2e_variables(cfg: Any) -> list[Any]:
    """The model's drivers as plain float32 rasters (physical values: no scale, offset or QA)."""
    plain = {"asset": "data", "scale": 1.0, "offset": 0.0, "nodata": -9999.0, "catalog": None}
    plain.update(signing=None, query=None, filter=None, qa_asset=None, qa_mask=None, qa_keep=None)
    return [v.model_copy(update={"collection": f"e2e-{v.name}", **plain}) for v in cfg.variables]


def e2e_geobox(cfg: Any, n: int) -> Any:
    from odc.geo.geobox import GeoBox

    x0, _, _, y1 = cfg.grid.bbox
    res = cfg.grid.resolution
    return GeoBox.from_bbox((x0, y1 - n * res, x0 + n * res, y1), cfg.grid.crs, resolution=res)


def e2e_stack(cfg: Any, n: int, folder: Path) -> dict[str, Path]:
    """One N x N float32 GeoTIFF per driver: a mid-season step of the demo cube, tiled (written once)."""
    import rasterio
    from rasterio.windows import Window

    from geoflux.cube import cube_from_config

    folder.mkdir(parents=True, exist_ok=True)
    paths = {v.name: folder / f"{v.name}.tif" for v in cfg.variables}
    if all(p.exists() for p in paths.values()):
        return paths
    cube = cube_from_config(cfg)
    mid = cube.sizes["time"] // 2
    gb = e2e_geobox(cfg, n)
    for v in cfg.variables:
        a = cube[v.name]
        a = (a.isel(time=mid) if "time" in a.dims else a).values.astype(np.float32)
        a = np.where(np.isnan(a), np.float32(-9999.0), a)
        th, tw = a.shape
        prof = {
            "driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": "float32", "crs": cfg.grid.crs,
            "transform": gb.affine, "tiled": True, "blockxsize": E2E_BLOCK, "blockysize": E2E_BLOCK,
            "compress": "deflate", "nodata": -9999.0,
        }  # fmt: skip
        part = paths[v.name].with_suffix(".part.tif")
        with rasterio.open(part, "w", **prof) as dst:
            for r0 in range(0, n, th):
                for c0 in range(0, n, tw):
                    h, w = min(th, n - r0), min(tw, n - c0)
                    dst.write(a[:h, :w], 1, window=Window(c0, r0, w, h))
        os.replace(part, paths[v.name])
    return paths


def e2e_items(cfg: Any, paths: dict[str, Path], n: int) -> dict[str, list[Any]]:
    """One STAC item per driver (projection extension), as a static catalog would hold them."""
    import datetime as dt

    import pystac
    from pystac.extensions.projection import ProjectionExtension

    gb = e2e_geobox(cfg, n)
    lon0, lat0, lon1, lat1 = gb.extent.to_crs("EPSG:4326").boundingbox
    geom = gb.extent.to_crs("EPSG:4326").json
    out = {}
    for name, p in paths.items():
        item = pystac.Item(
            id=f"{name}-{n}", geometry=geom, bbox=[lon0, lat0, lon1, lat1],
            datetime=dt.datetime.fromisoformat(E2E_DATE).replace(tzinfo=dt.timezone.utc), properties={},
        )  # fmt: skip
        item.add_asset("data", pystac.Asset(href=str(p), media_type=pystac.MediaType.GEOTIFF, roles=["data"]))
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        proj.code = str(gb.crs)
        proj.shape = [n, n]
        proj.transform = list(gb.affine)[:6]
        out[name] = [item]
    return out


def e2e_child(args: Any) -> dict[str, Any]:
    """One end-to-end run in this (child) process: cube read -> all bands -> COGs."""
    import pandas as pd

    from geoflux.cube import load_cube
    from geoflux.mapping import band_spec, write_maps

    cfg = load_config(args.workdir / "config.yaml")
    model = load_model(cfg.out_dir / pipeline.MODEL)
    model, how = inference.prepare(model, args.mode, args.workdir / "compiled")
    n = args.child
    paths = e2e_stack(cfg, n, args.workdir / "e2e" / f"stack-{n}")
    out = args.workdir / "e2e" / f"out-{n}-{args.mode}"
    out.mkdir(parents=True, exist_ok=True)
    gb = e2e_geobox(cfg, n)
    variables = e2e_variables(cfg)
    specs = [band_spec(b, out / f"{b}.tif", model.target_units, {"software": "bench"}) for b in model.bands]
    t0, c0 = time.perf_counter(), time.process_time()
    cube = load_cube(e2e_items(cfg, paths, n), variables, gb, pd.DatetimeIndex([E2E_DATE]), "1D", args.chunk)
    write_maps(cube, model, variables, gb, {0: specs}, "threads", overwrite=True, workers=args.workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for spec in specs:
        spec.path.unlink()
    return {"seconds": wall, "cpu_seconds": cpu, "inference": how, "bands": list(model.bands)}


def end_to_end(cfg: Any, model: Any, args: Any) -> list[dict[str, Any]]:
    """Each (size, inference mode) in its own subprocess; peak RSS summed over its process tree."""
    results = []
    for n in args.e2e:
        e2e_stack(cfg, n, args.workdir / "e2e" / f"stack-{n}")  # inputs written outside the timing
        for mode in args.e2e_inference:
            if mode != "library":  # compile (cached) outside the timed child
                inference.prepare(model, mode, args.workdir / "compiled")
            cmd = [
                sys.executable, __file__, "--workdir", str(args.workdir), "--child", str(n), "--mode", mode,
                "--chunk", str(args.chunk), "--workers", str(args.workers),
            ]  # fmt: skip
            load0 = loadavg()
            stdout, returncode, _, peak = run_measured(cmd)
            if returncode != 0:
                raise RuntimeError(f"end-to-end {n} {mode} failed with status {returncode}")
            r = json.loads(stdout.strip().splitlines()[-1])
            r.update(size=n, mode=mode, peak_rss_mb=round(peak / 2**20, 1), load_before=load0)
            r.update(load_after=loadavg(), mpix_s=n * n / r["seconds"] / 1e6)
            r["mpix_per_cpu_s"] = n * n / r["cpu_seconds"] / 1e6
            results.append(r)
            print(
                f"  e2e {n}² {mode}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                f"{r['mpix_s']:.3f} Mpix/s, peak RSS {r['peak_rss_mb']:.0f} MB, load {load0} -> "
                f"{r['load_after']} ({r['inference']})",
                flush=True,
            )
    if results:
        print(
            f"\n| size | inference | bands | wall s | CPU s | Mpix/s (wall, {args.workers} workers) "
            "| Mpix per CPU-s | peak RSS MB | load before → after |"
        )
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in results:
            print(
                f"| {r['size']}² | {r['mode']} | {len(r['bands'])} | {r['seconds']:.1f} "
                f"| {r['cpu_seconds']:.1f} | {r['mpix_s']:.3f} | {r['mpix_per_cpu_s']:.3f} "
                f"| {r['peak_rss_mb']:.0f} | {r['load_before']} → {r['load_after']} |"
            )
    return results


if __name__ == "__main__":
    main()
