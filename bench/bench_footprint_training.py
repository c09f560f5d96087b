"""Footprint-consistent training on worlds geoflux was not tuned to: training method × footprint × world.

Builds generated worlds (``geoflux.demo.WorldSpec``) whose towers stand in homogeneous patches, anywhere
(without regard to land cover, so many footprints mix classes), or anywhere with a mis-modelled footprint
(the true source area is the FFP of a wind rotated by 60°, or a fixed 1.2 km or 600 m box), runs the
pipeline's towers and extraction stages once per world and footprint method, then trains and maps with
each training method and scores the maps against the world's true NEE (which no model code computes).

Printed per variant (NEE in gC m-2 d-1):

* ``truth_nse``: map vs true field, 1 − SSE/SST over all pixel-steps (NSE);
* ``cv_nse``: leave-one-site-out CV through the map's path (footprint-weighted per-pixel predictions);
* ``rows_nse``: the CV a model on averaged rows reports about itself (averaged training only);
* ``band``: share of pixel-steps whose true NEE lies inside the nominal 90 % band;
* ``aoa_in``: share of pixel-steps inside the area of applicability;
* ``mixed``: share of towers whose second land-cover class holds > 20 % of the footprint weight;
* ``hedge``: share of the broadened footprint (footprint convolved with a ``footprint.hedge_radius`` disk)
  the inner site CV chose for training and the map-path CV (0 = the modelled footprint; see
  :func:`geoflux.footprint_fit.choose_hedge`; always 0 for averaged training);
* ``train_s``: seconds for ``geoflux train`` (CV + fit), this machine, whatever else it runs.

Usage::

    python bench/bench_footprint_training.py                 # all worlds, all methods (~25 min, 2 cores)
    python bench/bench_footprint_training.py --worlds random --methods iterative averaged
    python bench/bench_footprint_training.py --worlds random-box --hedge-shares 0   # no hedge (as before)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoflux import pipeline
from geoflux.config import load_config
from geoflux.demo import WorldSpec, write_world
from geoflux.footprint import load_footprints

BASE = WorldSpec(
    nx=160,
    ny=160,
    resolution=30.0,
    x0=440_100.0,
    patch_pixels=3.0,
    start="2021-03-06",
    n_steps=20,
    n_towers=24,
    seed=7,
)
WORLDS = {
    "homogeneous": dataclasses.replace(BASE, placement="homogeneous"),
    "random": dataclasses.replace(BASE, placement="random"),
    "random-rotated": dataclasses.replace(BASE, placement="random", source_area="rotated"),
    "random-box": dataclasses.replace(BASE, placement="random", source_area="box"),
    "random-box300": dataclasses.replace(BASE, placement="random", source_area="box", box_half_width=300.0),
}
METHODS = ("averaged", "pixel", "iterative")


def mixed_share(run: Path, cfg) -> float:
    """Share of towers whose second land-cover class holds more than 20 % of the footprint weight."""
    lc_path = sorted(glob.glob(str(cfg.path("world/cogs/landcover/*.tif"))))[0]
    with rasterio.open(lc_path) as ds:
        lc = ds.read(1)
    mixed = []
    for fw in load_footprints(run / pipeline.FOOTPRINTS).values():
        w = fw.weights / fw.weights.sum()
        cls = lc[fw.window]
        shares = sorted((w[cls == c].sum() for c in np.unique(cls)), reverse=True)
        mixed.append(len(shares) > 1 and shares[1] > 0.2)
    return float(np.mean(mixed))


def score_maps(run: Path, cfg) -> dict[str, float]:
    """Map vs truth over all pixel-steps: NSE, band coverage, AOA share (read with rasterio)."""
    truth = sorted(glob.glob(str(cfg.path(cfg.truth))))
    sse = sst_sum = n = inside = aoa = 0.0
    t_all = []
    for p, tpath in zip(cfg.periods(), truth, strict=True):
        with rasterio.open(tpath) as ds:
            t = ds.read(1).astype(np.float64)
        bands = {}
        for stem in ("nee", "nee-q05", "nee-q95", "aoa"):
            with rasterio.open(run / "maps" / f"{stem}_{p:%Y%m%d}.tif") as ds:
                a = ds.read(1, masked=True)
                bands[stem] = np.ma.filled(a.astype(np.float64), np.nan)
        ok = np.isfinite(bands["nee"]) & np.isfinite(t)
        sse += float(((bands["nee"] - t)[ok] ** 2).sum())
        t_all.append(t[ok])
        n += ok.sum()
        inside += float(((t >= bands["nee-q05"]) & (t <= bands["nee-q95"]))[ok].sum())
        aoa += float((bands["aoa"] == 1)[ok].sum())
    t_cat = np.concatenate(t_all)
    sst_sum = float(((t_cat - t_cat.mean()) ** 2).sum())
    return {"truth_nse": 1 - sse / sst_sum, "band": inside / n, "aoa_in": aoa / n}


def run_world(
    name: str,
    spec: WorldSpec,
    root: Path,
    methods: list[str],
    footprint: str,
    hedge_shares: list[float] | None = None,
    averaged_share: float | None = None,
) -> list[dict]:
    base = root / f"{name}-{footprint}"
    cfg_path = write_world(base, spec)
    cfg = load_config(cfg_path)
    cfg = cfg.model_copy(update={"footprint": cfg.footprint.model_copy(update={"method": footprint})})
    pipeline.stage_towers(cfg)
    pipeline.stage_extract(cfg)
    mix = mixed_share(base, cfg)
    rows = []
    for method in methods:
        run = base / f"run-{method}"
        run.mkdir()
        for sub in ("towers", "training"):
            os.symlink(base / sub, run / sub)
        mcfg = cfg.model_copy(
            update={
                "output": str(run),
                "model": cfg.model.model_copy(
                    update={
                        "training": method,
                        **({"hedge_shares": hedge_shares} if hedge_shares else {}),
                        **({"averaged_share": averaged_share} if averaged_share is not None else {}),
                    }
                ),
            }
        )
        t0 = time.perf_counter()
        cv = pipeline.stage_train(mcfg)
        train_s = time.perf_counter() - t0
        pipeline.stage_map(mcfg, progress=False)
        row = {
            "world": name,
            "footprint": footprint,
            "method": method,
            "mixed": mix,
            "hedge": float(cv.get("footprint_hedge", {}).get("share", float("nan"))),
            "inner_cv": json.dumps(cv.get("footprint_hedge", {}).get("inner_cv_nse", {})),
            "cv_nse": cv["nse"],
            "rows_nse": cv.get("averaged_rows", {}).get("nse", float("nan")),
            "cv_band": cv.get("uncertainty", {}).get("coverage", float("nan")),
            "train_s": train_s,
            **score_maps(run, mcfg),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--footprints", nargs="+", default=["ffp"], choices=["ffp", "disk"])
    ap.add_argument("--hedge-shares", nargs="+", type=float, default=None, help="override model.hedge_shares")
    ap.add_argument("--averaged-share", type=float, default=None, help="override model.averaged_share")
    ap.add_argument("--keep", type=Path, default=None, help="keep the worlds and runs in this folder")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="geoflux-fptrain-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for fp in args.footprints:
            for w in args.worlds:
                rows += run_world(
                    w, WORLDS[w], root, args.methods, fp, args.hedge_shares, args.averaged_share
                )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    cols = [
        "world",
        "footprint",
        "method",
        "mixed",
        "hedge",
        "truth_nse",
        "cv_nse",
        "rows_nse",
        "band",
        "cv_band",
        "aoa_in",
        "train_s",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
