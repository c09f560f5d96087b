"""Benchmark: FFP footprint climatology, geoflux vs Kljun's reference code (pyffp).

A synthetic year of half-hourly records (17,520) on a 401 x 401 node grid at 5 m (domain +-1000 m), the
layout of ``FFP_climatology(domain=[-1000, 1000, -1000, 1000], dx=5, dy=5)``. geoflux runs on all records;
the reference is timed on the first ``--ref-records`` records and scaled linearly (its cost is one full-grid
evaluation per record). Agreement is checked on the same first records, where both have run.

Run::

    python bench/bench_footprint.py [--ref-records 1000] [--json bench_footprint.json]

Prints the figures and writes them as one JSON line (stdout, and appended to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

from geoflux.footprint import kljun

ZM, Z0 = 10.0, 0.1  # m


def synthetic_year(n: int = 17_520, seed: int = 42) -> dict[str, np.ndarray]:
    """Half-hourly FFP inputs with a diurnal stability cycle and a prevailing south-westerly wind."""
    rng = np.random.default_rng(seed)
    hour = (np.arange(n) % 48) / 2.0
    day = np.sin(np.pi * (hour - 6.0) / 12.0) > 0
    ustar = np.clip(rng.lognormal(np.log(0.35), 0.45, n), 0.05, 1.5)  # ~3 % below 0.1: flagged
    ol = np.where(
        day,
        -np.exp(rng.uniform(np.log(5.0), np.log(2000.0), n)),
        np.exp(rng.uniform(np.log(10.0), np.log(2000.0), n)),
    )
    ol[rng.random(n) < 0.05] = -1e6  # some neutral records
    h = np.where(day, rng.uniform(800.0, 2000.0, n), rng.uniform(150.0, 600.0, n))
    sigmav = ustar * rng.uniform(1.6, 2.6, n)
    prevailing = rng.random(n) < 0.6
    wd = np.where(
        prevailing, np.mod(rng.vonmises(np.deg2rad(225.0), 4.0, n), 2 * np.pi), rng.uniform(0, 2 * np.pi, n)
    )
    return {"h": h, "ol": ol, "sigmav": sigmav, "ustar": ustar, "wind_dir": np.rad2deg(wd)}


def run_reference(rec: dict[str, np.ndarray], n: int) -> tuple[float, float, dict]:
    """Wall and CPU seconds of pyffp's FFP_climatology on the first ``n`` records, and its result."""
    from pyffp.calc_footprint_FFP_climatology import FFP_climatology

    args = {k: [float(v) for v in rec[k][:n]] for k in rec}
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        out = FFP_climatology(
            zm=ZM, z0=Z0, domain=[-1000.0, 1000.0, -1000.0, 1000.0], dx=5.0, dy=5.0, verbosity=0, **args
        )
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_geoflux(
    rec: dict[str, np.ndarray], n: int | None = None
) -> tuple[float, float, kljun.FootprintClimatology]:
    """Wall and CPU seconds (CPU summed over threads) of geoflux's climatology, and its result."""
    sl = slice(None) if n is None else slice(0, n)
    nodes = kljun.node_grid(1000.0, 5.0)
    t0, c0 = time.perf_counter(), time.process_time()
    scales = kljun.ffp_scales(
        ZM,
        rec["h"][sl],
        rec["ol"][sl],
        rec["sigmav"][sl],
        rec["ustar"][sl],
        z0=Z0,
        wind_dir=rec["wind_dir"][sl],
    )
    clim = kljun.climatology(scales, nodes, nodes)
    return time.perf_counter() - t0, time.process_time() - c0, clim


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=17_520)
    ap.add_argument("--ref-records", type=int, default=1000)
    ap.add_argument("--json", default=None, help="append the JSON line to this file")
    a = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")

    rec = synthetic_year(a.records)
    load = os.getloadavg()[0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_geo, c_geo, clim = run_geoflux(rec)
    rss_geo = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    tracemalloc.start()
    run_geoflux(rec, min(a.records, 2000))  # memory does not grow with records (chunked); untimed
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    try:
        t_ref_part, c_ref_part, ref = run_reference(rec, a.ref_records)
    except ImportError:
        print("pyffp is not installed: reference not timed (pip install pyffp)", file=sys.stderr)
        raise SystemExit(2) from None
    t_ref = t_ref_part * a.records / a.ref_records
    c_ref = c_ref_part * a.records / a.ref_records
    _, _, clim_part = run_geoflux(rec, a.ref_records)

    f_ref = ref["fclim_2d"]
    diff = np.abs(clim_part.f - f_ref)
    rel_to_max = float(diff.max() / np.abs(f_ref).max())
    big = f_ref > 1e-3 * f_ref.max()
    rel_pointwise = float((diff[big] / f_ref[big]).max())
    fr = np.array([np.nan if v is None else v for v in ref["fr"]], dtype=float)
    rel_levels = float(np.nanmax(np.abs(clim_part.levels / fr - 1)))

    figures = {
        "bench": "footprint_climatology",
        "records": a.records,
        "valid_records": clim.n,
        "grid": list(clim.f.shape),
        "dx_m": 5.0,
        "geoflux_s": round(t_geo, 3),
        "reference_records_timed": a.ref_records,
        "reference_s_timed": round(t_ref_part, 3),
        "reference_s_scaled": round(t_ref, 1),
        "speedup": round(t_ref / t_geo, 1),
        "geoflux_cpu_s": round(c_geo, 3),
        "reference_cpu_s_scaled": round(c_ref, 1),
        "speedup_cpu": round(c_ref / c_geo, 1),
        "load_average_at_start": round(load, 2),
        "max_rel_diff_to_max": rel_to_max,
        "max_rel_diff_pointwise_above_1e-3_max": rel_pointwise,
        "max_rel_diff_levels": rel_levels,
        "geoflux_peak_rss_mb": round(rss_geo / 1024, 1),
        "geoflux_rss_growth_mb": round((rss_geo - rss0) / 1024, 1),
        "geoflux_traced_peak_mb": round(traced_peak / 2**20, 1),
        "cpus": os.cpu_count(),
    }
    print(f"geoflux   : {a.records} records in {t_geo:.2f} s ({clim.n} valid)")
    print(
        f"reference : {a.ref_records} records in {t_ref_part:.2f} s -> {t_ref:.1f} s for {a.records} (scaled)"
    )
    print(f"speedup   : {t_ref / t_geo:.1f}x wall clock (target >= 20x); {c_ref / c_geo:.1f}x in CPU time")
    print(
        f"cpu time  : geoflux {c_geo:.1f} s (all threads), reference {c_ref:.1f} s (scaled); load {load:.2f}"
    )
    print(
        f"max rel diff (first {a.ref_records} records): {rel_to_max:.2e} of max, "
        f"{rel_pointwise:.2e} pointwise where f > 1e-3 max, {rel_levels:.2e} in source-area levels"
    )
    print(
        f"peak memory: process RSS {rss_geo / 1024:.0f} MB "
        f"(+{(rss_geo - rss0) / 1024:.0f} MB during the run), "
        f"traced numpy peak {traced_peak / 2**20:.1f} MB"
    )
    line = json.dumps(figures)
    print(line)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(line + "\n")
    return figures


if __name__ == "__main__":
    main()
