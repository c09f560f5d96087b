"""Time geoflux's site-processing chain on the DE-Tha 1998 site-year (17,520 half-hours).

Usage::

    python bench/bench_processing.py [--repeat 3] [--hesseflux-python /tmp/hfenv/bin/python] [--tower PATH]

Prints seconds and peak memory of

* ``mds+nt``: what hesseflux 5.0 computes for the shared reference (MDS gap-filling and night-time
  partitioning, no spike/u* filtering), and
* ``full``: geoflux's full chain (spikes, u* moving-point test with 100 bootstrap samples, MDS with random
  error, night- and day-time partitioning, MDS + partitioning reruns at the 5th/95th u* percentiles),
* ``analyze``: the full chain plus all tables and PNG plots written to a temporary directory,

and, with ``--hesseflux-python``, hesseflux 5.0's ``gapfill`` + ``nee2gpp(method='reichstein')`` on the same
input, run in that interpreter (a virtualenv with numpy < 1.24 and pandas < 2.2, which hesseflux needs), with
the agreement of both gap-filled series. The last line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOWER = ROOT.parent / "shared" / "realdata" / "towers" / "Example_DETha98.txt"

# Run by the hesseflux interpreter: read the REddyProc file itself (no geoflux there), time gapfill and
# nee2gpp, write the filled NEE next to the timings.
HESSEFLUX_SCRIPT = r"""
import json, sys, time
import numpy as np, pandas as pd
import hesseflux as hf
path, out = sys.argv[1], sys.argv[2]
raw = pd.read_csv(path, sep="\t", skiprows=[1], lineterminator="\r")
# hesseflux stamps records at the centre of the half-hour; the file's Hour is the end.
t = (pd.Timestamp("1998-01-01") + pd.to_timedelta(raw["DoY"] - 1, unit="D")
     + pd.to_timedelta(raw["Hour"] - 0.25, unit="h"))
df = pd.DataFrame({"NEE": raw["NEE"].values, "Tair": raw["Tair"].values, "SW_IN": raw["Rg"].values,
                   "TA": raw["Tair"].values, "VPD": raw["VPD"].values}, index=pd.DatetimeIndex(t))
t0 = time.perf_counter()
filled, flags = hf.gapfill(df, sw_dev=50., ta_dev=2.5, vpd_dev=5., longgap=60, undef=-9999)
t1 = time.perf_counter()
part = pd.DataFrame({"NEE": filled["NEE"].values, "SW_IN": df["SW_IN"].values,
                     "TA": filled["Tair"].values + 273.15}, index=df.index)  # nee2gpp wants kelvin
ff = pd.DataFrame(0, index=part.index, columns=part.columns)
ff[part == -9999] = 2
t2 = time.perf_counter()
gr = hf.nee2gpp(part, flag=ff, undef=-9999, method="reichstein", swthr=10.)
t3 = time.perf_counter()
json.dump({"gapfill_s": t1 - t0, "nee2gpp_s": t3 - t2, "NEE_f": filled["NEE"].tolist(),
           "GPP": gr["GPP"].tolist(), "RECO": gr["RECO"].tolist()}, open(out, "w"))
"""


def _measure(fn) -> tuple[float, float, object]:
    """Wall time (s) and peak traced Python/numpy allocation (MiB) of one call."""
    tracemalloc.start()
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return dt, peak, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", type=Path, default=TOWER)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hesseflux-python", type=Path, default=None)
    args = ap.parse_args()
    if not args.tower.exists():
        sys.exit(f"error: {args.tower}: not found (expected the shared DE-Tha REddyProc file)")

    from geoflux.towers import read_tower_file
    from geoflux.towers.processing import analyze_site, process_site

    records = read_tower_file(args.tower)
    warnings.simplefilter("ignore", UserWarning)
    cases = {
        "mds+nt": lambda: process_site(
            records, despike=False, ustar=None, daytime=False, ustar_uncertainty=False
        ),
        "full": lambda: process_site(records),
    }
    figures: dict[str, dict] = {"records": {"n": len(records)}}
    results = {}
    for name, fn in cases.items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results[name] = fn()
            times.append(time.perf_counter() - t0)
        _, peak, _ = _measure(fn)
        figures[name] = {
            "seconds_best": min(times),
            "seconds_median": float(np.median(times)),
            "peak_traced_MiB": peak,
        }
        print(
            f"geoflux {name:8s}: best {min(times):6.2f} s  median {np.median(times):6.2f} s  "
            f"peak {peak:7.1f} MiB (traced)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # Not traced: tracemalloc slows matplotlib's many small allocations several-fold.
        t0 = time.perf_counter()
        analyze_site(records, Path(tmp))
        dt = time.perf_counter() - t0
    figures["analyze"] = {"seconds": dt}
    print(f"geoflux analyze : {dt:6.2f} s (chain + tables + 8 PNGs)")
    figures["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"geoflux process max RSS: {figures['max_rss_MiB']:.0f} MiB")

    if args.hesseflux_python is not None:
        with tempfile.TemporaryDirectory() as tmp:
            script, out = Path(tmp) / "hf_run.py", Path(tmp) / "hf_out.json"
            script.write_text(HESSEFLUX_SCRIPT)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [str(args.hesseflux_python), str(script), str(args.tower), str(out)],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"error: hesseflux run failed:\n{proc.stderr[-2000:]}")
            hf = json.loads(out.read_text())
        ours = results["mds+nt"].records
        gaps = records["NEE"].isna().to_numpy()
        a, b = ours["NEE_f"].to_numpy()[gaps], np.asarray(hf["NEE_f"])[gaps]
        r2 = float(np.corrcoef(a, b)[0, 1] ** 2)
        gc = 12.011e-6 * 1800

        def annual(values: list, col: str) -> dict:
            # hesseflux marks records it could not compute with -9999; leave them out of its sum.
            v = np.asarray(values, float)
            ok = v != -9999
            return {
                "hesseflux": float(v[ok].sum() * gc),
                "hesseflux_undef": int((~ok).sum()),
                "geoflux": float(ours[col].sum() * gc),
            }

        figures["hesseflux"] = {
            "gapfill_s": hf["gapfill_s"],
            "nee2gpp_s": hf["nee2gpp_s"],
            "process_wall_s": wall,
            "gap_R2": r2,
            "gap_max_abs_diff": float(np.max(np.abs(a - b))),
            "annual_NEE": annual(hf["NEE_f"], "NEE_f"),
            "annual_GPP": annual(hf["GPP"], "GPP_NT"),
            "annual_RECO": annual(hf["RECO"], "RECO_NT"),
        }
        h = figures["hesseflux"]
        print(
            f"hesseflux 5.0   : gapfill {h['gapfill_s']:.2f} s + nee2gpp {h['nee2gpp_s']:.2f} s "
            f"= {h['gapfill_s'] + h['nee2gpp_s']:.2f} s (subprocess wall {wall:.1f} s)"
        )
        speedup = (h["gapfill_s"] + h["nee2gpp_s"]) / figures["mds+nt"]["seconds_best"]
        print(
            f"speed-up mds+nt : {speedup:.1f}x; gap records R2 {r2:.6f}, "
            f"max |diff| {h['gap_max_abs_diff']:.2e} umol m-2 s-1"
        )
        for k in ("annual_NEE", "annual_GPP", "annual_RECO"):
            print(
                f"{k:12s}: hesseflux {h[k]['hesseflux']:8.1f}  geoflux {h[k]['geoflux']:8.1f} gC m-2 "
                f"({h[k]['hesseflux_undef']} hesseflux records undefined)"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
