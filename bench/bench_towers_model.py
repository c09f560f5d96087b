"""Benchmark: tower files straight to a leave-one-site-out NEE model (issue #17), nested selection.

Data: every FLUXNET2015 SUBSET monthly file in ../shared/realdata/towers (7 sites, 1,096 months with NEE
QC fraction >= 0.8) and the FLUXNET site list there. Monthly NEE, leave-one-site-out, the same outer
folds for the plain forest and every geoflux candidate.

The geoflux setup is ``auto``: inside each outer fold an inner leave-one-site-out loop over the fold's 6
training sites ranks 4 candidates (QC-weighted features with scikit-learn's default forest and with a
regularized one, unweighted features, QC-weighted carbon balance) by pooled NSE, and the outer site is
predicted by the winner. The outer score never saw the choice. Each candidate's own (non-nested) LOSO
score is printed too, for reference; it is optimistic for whichever candidate looks best.

Runs
----
* ``seed0``: ``geoflux towers model`` as shipped (100 trees, inner loop 50 trees, seed 0);
* ``seed1``: the same with seed 1 (how much of a difference is forest noise).

Prints, per run, the comparison at the monthly scale (pooled ``nse``, ``r2_pearson``, ``rmse``, ``bias``
in gC m-2 d-1, median per-site NSE), the wall and CPU time, then for seed0 the other time scales, the
per-site NSE next to the nested choice. Each run also prints the site flags (every flag and its inputs,
see ``modelling.site_flags``) with the counts the issue asks for: negative-NSE sites flagged, and sites
with NSE > 0.3 flagged. ``auto+site_level`` is an experiment: the nested predictions with each held-out
site's predicted mean swapped for its training sites' mean NEE where the inner loop prefers it
(``plain_forest+site_level``: the same swap, always, on the baseline). The last line is one JSON object.

Run ``python bench/bench_towers_model.py`` from the repository root.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from geoflux.towers import read_sites
from geoflux.towers.modelling import AUTO, LEVEL, comparison_table, expand_files, model_towers
from geoflux.towers.report import SITE_FLAG_COLUMNS

# Per held-out site: NSE, each flag and its inputs (modelling.site_flags), as the report's table shows them.
FLAG_TABLE = [c for c in SITE_FLAG_COLUMNS if c not in ("nse_plain_forest", "chosen", "nearest_site")]

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "towers"
PATTERN = str(REAL / "FLX_*_FLUXNET2015_SUBSET_MM_*.csv")


def main() -> int:
    if not (REAL / "FluxNET_sites.csv").is_file():
        print(f"shared real data not found at {REAL}; nothing to benchmark")
        return 0
    pd.set_option("display.width", 220)
    sites = read_sites(REAL / "FluxNET_sites.csv")
    files = expand_files([PATTERN])
    runs = {"seed0": {"seed": 0}, "seed1": {"seed": 1}}
    out: dict[str, dict] = {"load_1min": os.getloadavg()[0]}
    results = {}
    for name, kw in runs.items():
        t0, c0 = time.perf_counter(), time.process_time()
        res = model_towers(files, sites, **kw)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        results[name] = res
        table = comparison_table(res, "monthly")
        print(
            f"\n== {name} ({sec:.1f} s wall, {cpu:.1f} s CPU): monthly NEE, {res.info['scheme']}, gC m-2 d-1"
        )
        print(table.round(3).to_string(index=False))
        m = table.set_index("variant")
        gain = {
            k: round(float(m.loc[AUTO, k] - m.loc["plain_forest", k]), 4)
            for k in ("nse", "r2_pearson", "nse_site_median")
        }
        print(f"nested auto minus plain forest: {gain}; final model: {res.info['final_model']}")
        lvl = f"{AUTO}{LEVEL}"
        gain_level = {
            k: round(float(m.loc[lvl, k] - m.loc["plain_forest", k]), 4)
            for k in ("nse", "r2_pearson", "nse_site_median")
        }
        print(f"experiment {lvl} minus plain forest: {gain_level}")
        s = res.flags.attrs["summary"]
        print(
            f"flags: negative-NSE sites flagged {s['negative_nse_flagged']}/{s['negative_nse_sites']}, "
            f"sites with NSE > 0.3 flagged {s['nse_above_0.3_flagged']}/{s['nse_above_0.3_sites']}"
        )
        print(res.flags[FLAG_TABLE].round(2).to_string(index=False))
        monthly = m.drop(columns="selection").round(4).to_dict("index")
        flags = res.flags
        out[name] = {
            "seconds": round(sec, 1),
            "cpu_seconds": round(cpu, 1),
            "monthly": monthly,
            "gain_over_plain_forest": gain,
            "gain_site_level_over_plain_forest": gain_level,
            "site_level_per_outer_site": res.info["selection"].get("site_level_per_outer_site"),
            "flags": res.flags[FLAG_TABLE].round(4).to_dict("records"),
            "chosen": res.info["selection"]["chosen_per_outer_site"],
            "final_model": res.info["final_model"],
            "flag_summary": flags.attrs["summary"],
        }
    res = results["seed0"]
    for scale in ("seasonal_cycle", "annual", "annual_anomaly"):
        print(f"\n== seed0, {scale}")
        print(comparison_table(res, scale).round(3).to_string(index=False))
    cols = ["site", "IGBP", "nse", "nse_plain_forest", "chosen", "nearest_site"]
    print("\n== seed0, per held-out site (nested auto)")
    print(res.flags[cols].round(3).to_string(index=False))
    print("flag summary:", res.flags.attrs["summary"])
    attr = [c for c in res.annual.columns if c.startswith("attr_")]
    print("\n== seed0, annual anomalies (gC m-2 yr-1): mean |attribution| per driver group")
    print((res.annual[attr].abs().mean() * 365.25).round(1).to_string())
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
