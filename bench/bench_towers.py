"""Benchmark: read one site-year of half-hourly tower data (target < 1 s).

Cases
-----
* ``fluxnet_hh_demo``: a generated FLUXNET2015 FULLSET HH file, 17,520 rows, the 11 columns of the demo
  world (``TIMESTAMP_START, TIMESTAMP_END, NEE_VUT_REF, NEE_VUT_REF_QC, TA_F, SW_IN_F, VPD_F, P_F, USTAR,
  WS, WD``).
* ``fluxnet_hh_wide``: the same rows with 240 columns, about as wide as a real FULLSET HH file (the reader
  parses only the columns it needs).
* ``detha_reddyproc``: the real DE-Tha 1998 REddyProc file (17,520 rows, CR line ends), if present.

Run ``python bench/bench_towers.py``; figures go to stdout, the last line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geoflux.towers import aggregate, qc_filter, read_tower_file

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "towers" / "Example_DETha98.txt"
N = 17_520
REPEAT = 7


def _write_fluxnet(path: Path, extra_columns: int) -> Path:
    rng = np.random.default_rng(0)
    t = pd.date_range("2001-01-01", periods=N, freq="30min")
    cols = {
        "TIMESTAMP_START": t.strftime("%Y%m%d%H%M"),
        "TIMESTAMP_END": (t + pd.Timedelta("30min")).strftime("%Y%m%d%H%M"),
        "NEE_VUT_REF": np.round(rng.normal(-1, 5, N), 4),
        "NEE_VUT_REF_QC": rng.integers(0, 4, N),
        "TA_F": np.round(rng.normal(8, 7, N), 3),
        "SW_IN_F": np.round(rng.uniform(0, 900, N), 2),
        "VPD_F": np.round(rng.uniform(0, 25, N), 3),
        "P_F": np.round(rng.exponential(0.05, N), 3),
        "USTAR": np.round(rng.uniform(0.05, 1.2, N), 3),
        "WS": np.round(rng.uniform(0, 8, N), 3),
        "WD": np.round(rng.uniform(0, 360, N), 1),
    }
    for i in range(extra_columns):
        cols[f"EXTRA_{i}"] = np.round(rng.normal(0, 1, N), 5)
    df = pd.DataFrame(cols)
    df.iloc[rng.integers(0, N, 500), 2] = -9999
    df.to_csv(path, index=False)
    return path


def _time(path: Path, **kw: object) -> dict[str, float]:
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        recs = read_tower_file(path, **kw)
        runs.append(time.perf_counter() - t0)
    assert len(recs) == N, len(recs)
    t0 = time.perf_counter()
    aggregate(qc_filter(recs), pd.date_range(recs["time"].iloc[0].normalize(), periods=365, freq="D"))
    agg = time.perf_counter() - t0
    return {
        "read_median_s": round(statistics.median(runs), 4),
        "read_min_s": round(min(runs), 4),
        "qc_and_daily_aggregate_s": round(agg, 4),
        "bytes": path.stat().st_size,
    }


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        demo = _write_fluxnet(Path(d) / "FLX_XX-D01_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", 0)
        wide = _write_fluxnet(Path(d) / "FLX_XX-D02_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", 229)
        results["fluxnet_hh_demo"] = _time(demo)
        results["fluxnet_hh_wide"] = _time(wide)
    if REAL.exists():
        results["detha_reddyproc"] = _time(REAL, site="DE-Tha")
    for name, r in results.items():
        agg_ms = r["qc_and_daily_aggregate_s"] * 1000
        print(
            f"{name:18s} read {r['read_median_s'] * 1000:7.1f} ms (median of {REPEAT}, min "
            f"{r['read_min_s'] * 1000:.1f} ms), qc+daily aggregate {agg_ms:.1f} ms, "
            f"{r['bytes'] / 1e6:.1f} MB"
        )
    ok = all(r["read_median_s"] < 1.0 for r in results.values())
    print(json.dumps({"bench": "towers_read_site_year", "rows": N, "target_s": 1.0, "ok": ok, **results}))


if __name__ == "__main__":
    main()
