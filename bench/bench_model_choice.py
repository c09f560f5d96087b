"""Which model should be the default? Accuracy against the world's truth first, mapping speed second.

Usage::

    python bench/bench_model_choice.py [--worlds demo random] [--candidates rf hgb ...]
        [--demo-size default] [--pixels 1048576] [--threads 2] [--workdir DIR] [--no-compile]

Per world (``demo``: :func:`geoflux.demo.write_world` at ``--demo-size``; ``random``: the mixed-landscape
world of ``bench/bench_footprint_training.py``, towers anywhere regardless of land cover) it runs the
pipeline's ``towers`` and ``extract`` stages once (cached in the work dir), then trains every candidate
through geoflux's own path (:func:`geoflux.model.train` with the pixel table: footprint-consistent
``iterative`` training, leave-one-site-out CV through the map's path, conformal band, AOA) with the world's
model config except the candidate's ``kind``/``params``/``uncertainty``, and measures:

* ``truth_nse``: NEE of every pixel-step of the world (all periods, the full grid, features exactly as
  the map computes them) against the world's true NEE, 1 - SSE/SST pooled (no model code computes truth);
* ``cv_nse``: the leave-one-site-out CV (map path: footprint-weighted sums of per-pixel predictions);
* ``band``: share of pixel-steps whose true NEE lies in the calibrated 90 % band; ``cv_band``: the same for
  held-out towers in the CV; ``width``: mean band width over the pixel-steps (gC m-2 d-1);
* ``train_s``: seconds of :func:`geoflux.model.train` (CV + final fit), this machine at its load;
* ``nodes``: nodes visited per pixel, summed over the point model and the band's models (a 2,000-pixel
  sample; forests by ``decision_path``, HistGradientBoosting by walking its nodes, LightGBM by leaf depth);
* ``Mpix/s``: the production band set (NEE, q05, q95, DI, AOA: :meth:`TrainedModel.predict_bands`) on
  ``--pixels`` rows drawn at random from the world's pixel-steps, in 65,536-row tasks on ``--threads``
  threads, one thread per task (as a map runs them), best of 2; ``NEE Mpix/s`` the point model alone;
  ``auto Mpix/s`` the band set after :func:`geoflux.inference.prepare` ``auto`` (compiled estimators where
  measured faster and agreeing; compile time not included, libraries cached in the work dir).

The machine's load (``os.getloadavg``) is printed at start and end: cores are shared, so throughput is
for this machine at that load. One JSON line per candidate, then a table per world.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_footprint_training import WORLDS
from bench_production import nodes_visited

from geoflux import inference, pipeline
from geoflux.config import load_config
from geoflux.demo import write_world
from geoflux.features import feature_names, feature_units, pixel_features
from geoflux.mapping import single_threaded
from geoflux.model import train
from geoflux.run import PIXELS, TRAINING, load_sites

HGB = {"learning_rate": 0.1, "max_leaf_nodes": 31, "early_stopping": False}
CANDIDATES: dict[str, dict[str, Any]] = {
    # today's default (the demo config): 200 fully grown trees + two 100-iteration quantile models
    "rf": {"kind": "random_forest", "params": {"n_estimators": 200, "min_samples_leaf": 2}},
    "hgb300-d8": {"kind": "hist_gradient_boosting", "params": {**HGB, "max_iter": 300, "max_depth": 8}},
    "hgb300-d8-res": {
        "kind": "hist_gradient_boosting",
        "params": {**HGB, "max_iter": 300, "max_depth": 8},
        "uncertainty": "residual",
    },
    "hgb200-d6": {"kind": "hist_gradient_boosting", "params": {**HGB, "max_iter": 200, "max_depth": 6}},
    "hgb200-d6-res": {
        "kind": "hist_gradient_boosting",
        "params": {**HGB, "max_iter": 200, "max_depth": 6},
        "uncertainty": "residual",
    },
    "hgb100-d6-res": {
        "kind": "hist_gradient_boosting",
        "params": {**HGB, "learning_rate": 0.2, "max_iter": 100, "max_depth": 6},
        "uncertainty": "residual",
    },
    "lgbm300": {
        "kind": "lightgbm",
        "params": {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 31, "max_depth": 8},
    },
    "rf-res": {
        "kind": "random_forest",
        "params": {"n_estimators": 200, "min_samples_leaf": 2},
        "uncertainty": "residual",
    },
}
TASK_ROWS = 65_536


def prepare(workdir: Path, world: str, demo_size: str) -> Any:
    """The world, its towers and extraction in ``workdir/world`` (reused when present); the run config."""
    base = workdir / world
    if not (base / "config.yaml").exists():
        write_world(base, demo_size if world == "demo" else WORLDS[world])
    cfg = load_config(base / "config.yaml")
    if not (cfg.out_dir / TRAINING).exists():
        pipeline.stage_towers(cfg)
        pipeline.stage_extract(cfg)
    return cfg


def world_pixels(cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every valid pixel-step (float32), the true NEE there, and each row's period index."""
    from geoflux.cube import cube_from_config

    cube = cube_from_config(cfg)
    truth = sorted(glob.glob(str(cfg.path(cfg.truth))))
    nf = len(feature_names(cfg.variables))
    xs, ts, ks = [], [], []
    for i, tpath in enumerate(truth):
        step = cube.isel(time=i)
        values = {v.name: step[v.name].values for v in cfg.variables}
        f = pixel_features(values, cfg.variables).reshape(-1, nf)
        with rasterio.open(tpath) as ds:
            t = ds.read(1).astype(np.float64).reshape(-1)
        ok = ~np.isnan(f).any(axis=1) & np.isfinite(t)
        xs.append(f[ok])
        ts.append(t[ok])
        ks.append(np.full(ok.sum(), i))
    if len(truth) != cube.sizes["time"]:
        raise SystemExit(f"{len(truth)} truth files for {cube.sizes['time']} periods")
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ts), np.concatenate(ks)


def bands_parallel(model: Any, x: np.ndarray, threads: int, nee_only: bool = False) -> np.ndarray:
    """``predict_bands`` (or NEE alone) in TASK_ROWS tasks on ``threads`` threads, one thread each."""
    one = single_threaded(model)
    if one.aoa is not None:
        one.aoa.di(x[:2])  # the KD-tree is built once per model and process, not per task

    def task(lo: int) -> np.ndarray:
        with threadpool_limits(1, user_api="openmp"):
            c = x[lo : lo + TASK_ROWS]
            return one.predict(c)[:, None] if nee_only else one.predict_bands(c)

    with cf.ThreadPoolExecutor(threads) as ex:
        return np.concatenate(list(ex.map(task, range(0, len(x), TASK_ROWS))))


def mpix_s(model: Any, x: np.ndarray, threads: int, nee_only: bool = False, repeats: int = 2) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        bands_parallel(model, x, threads, nee_only)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best / 1e6


def lgbm_nodes_visited(est: Any, x: np.ndarray) -> tuple[int, float]:
    """(trees, mean nodes visited per pixel) of a LightGBM model: depth of the reached leaf + 1, summed."""
    booster = est.booster_ if hasattr(est, "booster_") else est
    leaves = booster.predict(x, pred_leaf=True)
    total = np.zeros(len(x))
    for k, tree in enumerate(booster.dump_model()["tree_info"]):
        depth: dict[int, int] = {}

        def walk(node: dict, d: int, depth: dict[int, int] = depth) -> None:
            if "leaf_index" in node:
                depth[node["leaf_index"]] = d
            elif "split_index" in node:
                walk(node["left_child"], d + 1)
                walk(node["right_child"], d + 1)
            else:  # a single-leaf tree
                depth[0] = d

        walk(tree["tree_structure"], 1)
        total += np.vectorize(depth.get)(leaves[:, k])
    return leaves.shape[1], float(total.mean())


def visited(model: Any, x: np.ndarray) -> float:
    ests = [model.estimator, *(model.quantile_models or ())]
    total = 0.0
    for est in ests:
        if type(est).__module__.startswith("lightgbm."):
            total += lgbm_nodes_visited(est, x)[1]
        else:
            total += nodes_visited(est, x)[1]
    return total


def run_candidate(
    name: str, cfg: Any, table: pd.DataFrame, pixels: pd.DataFrame, world: dict, args: argparse.Namespace
) -> dict[str, Any]:
    c = CANDIDATES[name]
    spec = cfg.model.model_copy(
        update={"kind": c["kind"], "params": c["params"], "uncertainty": c.get("uncertainty", "quantile")}
    )
    spec = type(spec).model_validate(spec.model_dump())  # a bad candidate fails like a bad config
    features = feature_names(cfg.variables)
    t0 = time.perf_counter()
    model, _, cv = train(
        table, features, feature_units(cfg.variables), spec, sites=load_sites(cfg), pixels=pixels
    )
    train_s = time.perf_counter() - t0
    x, t = world["x"], world["truth"]
    b = bands_parallel(model, x, args.threads).astype(np.float64)
    nee, lo, hi = b[:, 0], b[:, 1], b[:, 2]
    sst = float(((t - t.mean()) ** 2).sum())
    row: dict[str, Any] = {
        "world": world["name"],
        "candidate": name,
        "kind": spec.kind,
        "band_models": spec.uncertainty,
        "truth_nse": 1 - float(((nee - t) ** 2).sum()) / sst,
        "cv_nse": cv["nse"],
        "band": float(np.mean((t >= lo) & (t <= hi))),
        "cv_band": cv["uncertainty"]["coverage"],
        "width": float(np.mean(hi - lo)),
        "aoa_in": float(np.mean(b[:, 4] == 1)),
        "train_s": train_s,
    }
    block = world["block"]
    row["nodes"] = visited(single_threaded(model), block[:2000])
    row["nee_mpix_s"] = mpix_s(model, block, args.threads, nee_only=True)
    row["mpix_s"] = mpix_s(model, block, args.threads)
    if not args.no_compile:
        auto, how = inference.prepare(model, "auto", args.workdir / "compiled", sample=block[:16_384])
        row["auto_mpix_s"] = mpix_s(auto, block, args.threads)
        row["auto"] = how
    row["load"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    return row


COLS = [
    ("candidate", "{}"),
    ("band_models", "{}"),
    ("truth_nse", "{:.3f}"),
    ("cv_nse", "{:.3f}"),
    ("band", "{:.3f}"),
    ("cv_band", "{:.3f}"),
    ("width", "{:.2f}"),
    ("train_s", "{:.0f}"),
    ("nodes", "{:.0f}"),
    ("nee_mpix_s", "{:.3f}"),
    ("mpix_s", "{:.3f}"),
    ("auto_mpix_s", "{:.3f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", nargs="+", default=["demo", "random"], choices=["demo", *WORLDS])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--demo-size", default="default")
    ap.add_argument("--pixels", type=int, default=1024 * 1024, help="rows of the throughput block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the auto inference column")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geoflux-bench-model")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for w in args.worlds:
        cfg = prepare(args.workdir, w, args.demo_size)
        table = pd.read_parquet(cfg.out_dir / TRAINING)
        pixels = pd.read_parquet(cfg.out_dir / PIXELS)
        x, truth, _ = world_pixels(cfg)
        rng = np.random.default_rng(0)
        block = np.ascontiguousarray(x[rng.integers(0, len(x), args.pixels)])
        world = {"name": w, "x": x, "truth": truth, "block": block}
        print(f"{w}: {len(table)} tower-steps, {len(x):,} pixel-steps, {x.shape[1]} features", flush=True)
        for name in args.candidates:
            rows.append(run_candidate(name, cfg, table, pixels, world, args))
    print(f"\nload average at end: {os.getloadavg()}")
    for w in args.worlds:
        cols = [(c, f) for c, f in COLS if any(c in r for r in rows)]
        print(f"\n{w} ({args.pixels:,}-pixel block, {args.threads} threads)")
        print("| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            if r["world"] == w:
                print("| " + " | ".join(f.format(r[c]) if c in r else "" for c, f in cols) + " |")


if __name__ == "__main__":
    main()
