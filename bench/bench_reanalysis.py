"""Benchmark: peak memory of ERA5-like Zarr drivers is bounded by the chunk, not by the region.

One generated month of hourly 0.25 degree ERA5-like stores (era5-pds layout: an items, one Zarr store per
variable, lat 44..58 N, lon 0..22 E) feeds ``ta`` and ``vpd`` (derived from t and
td) on a 250 m UTM 32N grid, 8-day periods, chunk 256. The same cube is written to Zarr for a region and
for a region 16 times larger (4 x per side), each in a fresh process (threads, 2 workers); peak RSS
(current RSS sampled every 20 ms during the write) is compared with the RSS once the graph is built and
with the size of the output.

Run::

    python bench/bench_reanalysis.py [--json bench_reanalysis.json]

Prints one JSON line (and appends it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAT = np.arange(58.0, 43.99, -0.25)
LON = np.arange(0.0, 22.01, 0.25)
CENTRE = (500_000.0, 5_650_000.0)  # UTM 32N, ~51 N 9 E
RES, CHUNK = 250.0, 256


def generate(root: Path) -> None:
    """Write the stores (tests' era5-pds-like generator) and their items as JSON under ``root/items``."""
    sys.path.insert(0, str(ROOT))
    from tests.test_reanalysis import write_era5_like

    items, _, _ = write_era5_like(
        root, "2021-01-01", 1, LAT, LON, store_chunks={"time": 24, "lat": 16, "lon": 16}
    )
    (root / "items").mkdir()
    for it in items:
        it.save_object(include_self_link=False, dest_href=str(root / "items" / f"{it.id}.json"))


def run_case(root: Path, side_px: int, out: Path) -> dict:
    import pandas as pd
    import pystac

    from geoflux.catalog.definitions import find_definition, variable_specs
    from geoflux.config import GridSpec
    from geoflux.cube import load_cube, target_grid

    items = [pystac.Item.from_file(str(p)) for p in sorted(root.glob("items/*.json")) if "-an" in p.name]
    specs = variable_specs(find_definition("pc-era5-pds"), ["ta", "vpd"])
    half = side_px * RES / 2
    x, y = CENTRE
    gb = target_grid(
        GridSpec(crs="EPSG:32632", resolution=RES, bbox=(x - half, y - half, x + half, y + half))
    )
    periods = pd.date_range("2021-01-01", "2021-01-25", freq="8D")
    cube = load_cube({s.name: items for s in specs}, specs, gb, periods, "8D", chunk=CHUNK)
    import threading

    import dask
    import psutil

    proc = psutil.Process()
    rss_built = proc.memory_info().rss / 2**20  # current RSS once the graph is built
    high = [rss_built]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss would include import-time transients: sample the current RSS
        while not done.wait(0.02):
            high[0] = max(high[0], proc.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        cube.to_zarr(out, mode="w")
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(high[0], proc.memory_info().rss / 2**20)
    out_mb = sum(cube[s.name].nbytes for s in specs) / 2**20
    tasks = sum(cube[s.name].data.npartitions for s in specs)
    return {
        "grid_px": side_px,
        "output_MB": round(out_mb, 1),
        "tasks": tasks,
        "rss_after_build_MB": round(rss_built, 1),
        "peak_rss_MB": round(peak, 1),
        "maxrss_process_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_minus_build_MB": round(peak - rss_built, 1),
        "seconds": round(secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case is not None:
        root = Path(args.root)
        print(json.dumps(run_case(root, args.case, root / f"cube_{args.case}.zarr")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root)
        results = []
        for side in (512, 2048):  # 16 x the area
            proc = subprocess.run(
                [sys.executable, __file__, "--case", str(side), "--root", str(root)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, large = results
    summary = {
        "bench": "reanalysis_memory",
        "chunk": CHUNK,
        "cases": results,
        "area_ratio": (large["grid_px"] / small["grid_px"]) ** 2,
        "output_ratio": round(large["output_MB"] / small["output_MB"], 1),
        "peak_growth_MB": round(large["peak_minus_build_MB"] - small["peak_minus_build_MB"], 1),
    }
    line = json.dumps(summary)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
