"""Benchmark: tower files straight to a leave-one-site-out NEE model (issue #17).

Data: every FLUXNET2015 SUBSET monthly file in ../shared/realdata/towers (7 sites, 1,096 months with NEE
QC fraction >= 0.8) and the FLUXNET site list there. Monthly NEE, leave-one-site-out, same folds for
every variant.

Runs
----
* ``default``: ``geoflux towers model`` as shipped (100 trees, seed 0; geoflux variants with leaves of
  >= 5 months and half the features per split, the plain forest with scikit-learn's defaults);
* ``seed1``: the same with seed 1 (how much of a difference is forest noise);
* ``sklearn_defaults``: every variant with scikit-learn's default forest, so the gain from the features
  can be told apart from the gain from the forest parameters.

Prints, per run, the comparison table at the monthly scale (pooled ``nse``, ``r2_pearson``, ``rmse``,
``bias`` in gC m-2 d-1, median per-site NSE), then for the default run the other time scales and the
per-site NSE next to the extrapolation flags. The last line is one JSON object.

Run ``python bench/bench_towers_model.py`` from the repository root.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd

from geoflux.towers import read_sites
from geoflux.towers.modelling import comparison_table, expand_files, model_towers

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "towers"
PATTERN = str(REAL / "FLX_*_FLUXNET2015_SUBSET_MM_*.csv")


def main() -> int:
    if not (REAL / "FluxNET_sites.csv").is_file():
        print(f"shared real data not found at {REAL}; nothing to benchmark")
        return 0
    pd.set_option("display.width", 200)
    sites = read_sites(REAL / "FluxNET_sites.csv")
    files = expand_files([PATTERN])
    runs = {"default": {}, "seed1": {"seed": 1}, "sklearn_defaults": {"forest_params": {}}}
    out: dict[str, dict] = {}
    results = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        res = model_towers(files, sites, **kw)
        sec = time.perf_counter() - t0
        results[name] = res
        table = comparison_table(res, "monthly")
        print(f"\n== {name} ({sec:.1f} s): monthly NEE, {res.info['scheme']}, gC m-2 d-1")
        print(table.round(3).to_string(index=False))
        monthly = table.set_index("variant").round(4).to_dict("index")
        out[name] = {"seconds": round(sec, 1), "monthly": monthly}
    res = results["default"]
    for scale in ("seasonal_cycle", "annual", "annual_anomaly"):
        print(f"\n== default, {scale}")
        print(comparison_table(res, scale).round(3).to_string(index=False))
    cols = ["site", "IGBP", "nse", "nse_plain_forest", "n_same_type_training", "climate_di"]
    cols += ["climate_threshold", "type_flag", "climate_flag", "flagged", "nearest_site"]
    print(f"\n== default, per held-out site ({res.setup})")
    print(res.flags[cols].round(3).to_string(index=False))
    print("flag summary:", res.flags.attrs["summary"])
    attr = [c for c in res.annual.columns if c.startswith("attr_")]
    print("\n== default, annual anomalies (gC m-2 d-1): mean |attribution| per driver group")
    print(res.annual[attr].abs().mean().round(4).to_string())
    out["flags"] = res.flags[cols].round(4).to_dict("records")
    out["flag_summary"] = res.flags.attrs["summary"]
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
