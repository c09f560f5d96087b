"""DE-Tha 1998: NEE from the site's own meteorology, checked on a blocked temporal hold-out.

A check of the model stage on real, noisy data (not a tuning target): the half-hourly REddyProc example
year of Tharandt (ENF, Germany) with shortwave radiation, air temperature, VPD and u* as drivers. The year
is cut into 8-day blocks; even blocks train a model that predicts the odd ones and vice versa
(``ModelSpec(cv="temporal")``), so every prediction comes from a model that never saw its block.

Predictions are made half-hourly for the measured records and aggregated with them (a day counts when at
least half its half-hours were measured, so observed and predicted daily means average the same records).
Prints the multi-scale table (half-hourly, daily, weekly, monthly, seasonal cycle, anomalies) and the
coverage of the 90 % band on the held-out half-hours.

Usage::

    python bench/bench_detha_holdout.py [path/to/Example_DETha98.txt] [--trees N]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from geoflux.analysis import multiscale_scores, multiscale_table
from geoflux.config import ModelSpec
from geoflux.model import cross_validate
from geoflux.towers import UMOL_TO_GC_PER_DAY, read_tower_file

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "towers" / "Example_DETha98.txt"
DRIVERS = ["SW_IN", "TA", "VPD", "USTAR"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=str(DEFAULT))
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--block-days", type=int, default=8)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    rec = read_tower_file(args.path, site="DE-Tha")
    # gC m-2 d-1 like every aggregated/modelled NEE in geoflux; measured records only (no gap-filling)
    table = rec.assign(NEE=rec["NEE"] * UMOL_TO_GC_PER_DAY).dropna(subset=["NEE", *DRIVERS])
    table = table[["site", "time", *DRIVERS, "NEE"]].reset_index(drop=True)
    spec = ModelSpec(
        kind="random_forest",
        params={"n_estimators": args.trees, "min_samples_leaf": 5},
        cv="temporal",
        cv_block_days=args.block_days,
        aoa=False,
        seed=0,
    )
    pred, summ = cross_validate(table, DRIVERS, spec)
    ms = multiscale_scores(pred, min_fraction=0.5)
    print(
        f"DE-Tha 1998, {len(table)} measured half-hours, drivers {DRIVERS}; {summ['scheme']}; "
        f"random forest ({args.trees} trees); {time.perf_counter() - t0:.0f} s"
    )
    print(multiscale_table(ms))
    u = summ["uncertainty"]
    print(
        f"90 % band on held-out half-hours: coverage {u['coverage']:.3f} "
        f"(uncalibrated {u['coverage_uncalibrated']:.3f}), mean width {u['mean_width']:.2f} gC m-2 d-1"
    )
    daily = ms["scales"]["daily"]
    print(json.dumps({"daily": {k: round(v, 3) if isinstance(v, float) else v for k, v in daily.items()}}))
    # annual sum over days observed at least half: both sides use the same records, so a bias shows
    d = pred.assign(day=pred["time"].dt.floor("D")).groupby("day")[["obs", "pred"]].agg(["mean", "size"])
    ok = d[("obs", "size")] >= 24
    obs_mean, pred_mean = d.loc[ok, ("obs", "mean")].mean(), d.loc[ok, ("pred", "mean")].mean()
    print(
        f"mean NEE over the {int(ok.sum())} half-covered days: observed {obs_mean:.3f}, "
        f"predicted {pred_mean:.3f} gC m-2 d-1"
    )
    assert np.isfinite(daily["nse"])


if __name__ == "__main__":
    main()
