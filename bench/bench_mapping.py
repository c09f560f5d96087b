"""Mapping at scale: geoflux vs the machine's limit vs the pipeline a user would write by hand.

Usage::

    python bench/bench_mapping.py --sizes 1024 2048 4096 8192 [--schedulers threads local]
        [--inference library compiled] [--trees 100] [--chunk 512] [--json out.json] [--workdir DIR]

For each size N it builds a synthetic driver stack of N x N pixels (12 float32 bands, tiled DEFLATE
GeoTIFFs described by in-memory STAC items, like a real catalog) and a random forest trained on samples
of the same drivers (100 trees by default, trained once), then measures in one run:

* the machine's **limit**: ``read`` (all pixels of all bands with rasterio, block-aligned windows, one
  thread per CPU), ``predict`` (the library's own ``predict`` on all pixels in 1-Mpixel batches, with its
  own parallelism, ``n_jobs=-1``), ``write`` (the predicted map as a COG with the GDAL COG driver, DEFLATE +
  overviews). limit = read + predict + write.
* **naive**: rioxarray ``open_rasterio`` per band, ``xr.apply_ufunc(model.predict, dask="parallelized")``
  and ``.rio.to_raster(driver="COG")`` (threads; and on a ``LocalCluster`` with ``local`` in
  ``--schedulers``).
* **geoflux**: the lazy cube (``geoflux.cube.load_cube``, odc-stac reads) + ``geoflux.mapping.write_maps``
  (streamed COG) per scheduler and inference mode (``compiled`` = treelite/tl2cgen, compiled once before
  the timed run and cached in the work dir).

Every naive/geoflux run happens in its own subprocess; its peak RSS is the maximum over time of the summed
RSS of the process and its children (psutil, polled every 50 ms), so worker processes count and runs do
not pollute each other. efficiency = limit time / run time (> 1: faster than the limit). The last line
printed is one JSON object with every figure and the machine load (``os.getloadavg``) at start and end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _proc import run_measured  # noqa: E402  (bench/ is the script folder)

N_BANDS = 12
BLOCK = 256
CRS = "EPSG:32632"
RES = 30.0
X0, Y1 = 300_000.0, 5_600_010.0  # multiples of RES: the stack is on the grid's pixel lattice


# ----------------------------------------------------------------------------------------------- data
def _band_field(b: int, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """Smooth gradients + texture per band: deterministic, cheap, different per band (float32)."""
    y = rows[:, None] / n
    x = cols[None, :] / n
    rng = np.random.default_rng(1000 * b + int(rows[0]) * 7 + int(cols[0]))
    base = np.sin(2 * np.pi * (x * (b + 1) / 3 + y * (b % 4 + 1) / 5)) + 0.5 * x - 0.3 * y
    return (base + 0.2 * rng.standard_normal(base.shape)).astype(np.float32) * (b + 1)


def make_stack(folder: Path, n: int) -> list[Path]:
    """12 tiled GeoTIFFs of n x n float32 pixels (written window by window, bounded memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in range(N_BANDS):
        path = folder / f"band{b:02d}.tif"
        paths.append(path)
        if path.exists():
            continue
        prof = {
            "driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": "float32", "crs": CRS,
            "transform": from_origin(X0, Y1, RES, RES), "tiled": True, "blockxsize": BLOCK,
            "blockysize": BLOCK, "compress": "deflate", "nodata": np.nan,
        }  # fmt: skip
        part = path.with_suffix(".part.tif")
        with rasterio.open(part, "w", **prof) as dst:
            step = 1024
            for r in range(0, n, step):
                for c in range(0, n, step):
                    h, w = min(step, n - r), min(step, n - c)
                    block = _band_field(b, np.arange(r, r + h), np.arange(c, c + w), n)
                    dst.write(block, 1, window=Window(c, r, w, h))
        os.replace(part, path)
    return paths


def variables():
    from geoflux.config import VariableSpec

    return [
        VariableSpec(name=f"b{b:02d}", collection=f"bench-b{b:02d}", asset="data") for b in range(N_BANDS)
    ]


def make_estimator(kind: str, trees: int):
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor

    if kind == "rf":
        return RandomForestRegressor(n_estimators=trees, min_samples_leaf=2, n_jobs=-1, random_state=0)
    if kind == "hgb":
        return HistGradientBoostingRegressor(max_iter=trees, early_stopping=False, random_state=0)
    import lightgbm

    return lightgbm.LGBMRegressor(n_estimators=trees, verbose=-1, random_state=0)


def train_model(path: Path, kind: str, trees: int):
    """A tree ensemble on drivers sampled like the stack's pixels (NEE a nonlinear function of them)."""
    from geoflux.model import TrainedModel

    if path.exists():
        return pickle.loads(path.read_bytes())  # written by this script in its own work dir
    rng = np.random.default_rng(0)
    n = 4000
    rows = rng.integers(0, 2048, n)
    cols = rng.integers(0, 2048, n)
    x = np.column_stack(
        [_band_field(b, np.arange(2048), np.arange(2048), 2048)[rows, cols] for b in range(N_BANDS)]
    )
    y = np.sin(x[:, 0]) + 0.1 * x[:, 1] * x[:, 2] - 0.05 * x[:, 3] + 0.3 * rng.standard_normal(n)
    est = make_estimator(kind, trees).fit(x, y)
    names = [v.name for v in variables()]
    model = TrainedModel(est, names, dict.fromkeys(names, ""))
    path.write_bytes(pickle.dumps(model))
    return model


def geobox_for(n: int):
    from odc.geo.geobox import GeoBox

    return GeoBox.from_bbox((X0, Y1 - n * RES, X0 + n * RES, Y1), CRS, resolution=RES)


def stac_items(paths: list[Path], n: int) -> dict:
    """One STAC item per band (projection extension), as a static catalog would hold them."""
    import datetime as dt

    import pystac
    from pystac.extensions.projection import ProjectionExtension

    gb = geobox_for(n)
    lon0, lat0, lon1, lat1 = gb.extent.to_crs("EPSG:4326").boundingbox
    geom = gb.extent.to_crs("EPSG:4326").json
    out = {}
    for v, p in zip(variables(), paths, strict=True):
        item = pystac.Item(
            id=f"{v.name}-{n}", geometry=geom, bbox=[lon0, lat0, lon1, lat1],
            datetime=dt.datetime(2021, 6, 1, tzinfo=dt.timezone.utc), properties={},
        )  # fmt: skip
        item.add_asset("data", pystac.Asset(href=str(p), media_type=pystac.MediaType.GEOTIFF, roles=["data"]))
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        proj.epsg = 32632
        proj.shape = [n, n]
        proj.transform = list(gb.affine)[:6]
        out[v.name] = [item]
    return out


# ---------------------------------------------------------------------------------------------- limit
def _cpu() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _windows(n: int, step: int):
    from rasterio.windows import Window

    for r in range(0, n, step):
        for c in range(0, n, step):
            yield Window(c, r, min(step, n - c), min(step, n - r))


def bare_read(paths: list[Path], n: int, workers: int) -> float:
    import rasterio

    def read(path: Path) -> None:
        with rasterio.open(path) as src:
            for w in _windows(n, 1024):
                src.read(1, window=w)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(read, paths))
    return time.perf_counter() - t0


def bare_predict(model, paths: list[Path], n: int) -> tuple[float, np.ndarray]:
    """Library predict on every pixel, 1-Mpixel batches, library parallelism; reads are not timed."""
    import rasterio

    est = model.estimator
    if "n_jobs" in est.get_params():
        est.set_params(n_jobs=-1)
    out = np.empty((n, n), np.float32)
    srcs = [rasterio.open(p) for p in paths]
    spent = 0.0
    try:
        for w in _windows(n, 1024):
            x = np.stack([s.read(1, window=w).ravel() for s in srcs], axis=1)
            t0 = time.perf_counter()
            y = model.predict(x)
            spent += time.perf_counter() - t0
            out[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] = y.reshape(
                w.height, w.width
            )
    finally:
        for s in srcs:
            s.close()
    return spent, out


def bare_write(nee: np.ndarray, path: Path) -> float:
    import rasterio

    from geoflux.cog import _cog_blocksize

    n = nee.shape[0]
    gb = geobox_for(n)
    t0 = time.perf_counter()
    with rasterio.open(
        path, "w", driver="COG", width=n, height=n, count=1, dtype="float32", crs=CRS, transform=gb.affine,
        nodata=-9999.0, BLOCKSIZE=_cog_blocksize(n, n), COMPRESS="DEFLATE", PREDICTOR="YES",
        OVERVIEW_RESAMPLING="AVERAGE", NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER",
    ) as dst:  # fmt: skip
        dst.write(nee, 1)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ child processes
def child_naive(args) -> dict:
    import rioxarray  # registers the .rio accessor
    import xarray as xr

    model = pickle.loads(Path(args.model_file).read_bytes())
    paths = [Path(args.stack) / f"band{b:02d}.tif" for b in range(N_BANDS)]
    bands = [rioxarray.open_rasterio(p, chunks={"x": args.chunk, "y": args.chunk}).squeeze("band", drop=True)
             for p in paths]  # fmt: skip
    stack = xr.concat(bands, dim="feature").chunk({"feature": -1})

    def predict(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1])
        return model.predict(flat).reshape(x.shape[:-1]).astype(np.float32)

    t0 = time.perf_counter()
    ctx = _client(args)
    try:
        nee = xr.apply_ufunc(
            predict, stack, input_core_dims=[["feature"]], dask="parallelized", output_dtypes=[np.float32]
        )
        nee.rio.write_crs(CRS, inplace=True)
        nee.rio.write_nodata(-9999.0, encoded=False, inplace=True)
        nee.rio.to_raster(Path(args.out) / "naive.tif", driver="COG", compress="DEFLATE", BIGTIFF="IF_SAFER")
    finally:
        if ctx is not None:
            ctx.close()
    return {"seconds": time.perf_counter() - t0}


def _client(args):
    if args.scheduler != "local":
        return None
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0",
                           silence_logs=logging.ERROR)  # fmt: skip
    client = Client(cluster)

    class Both:
        def close(self):
            client.close()
            cluster.close()

    return Both()


def child_geoflux(args) -> dict:
    import pandas as pd

    from geoflux.cube import load_cube
    from geoflux.inference import prepare
    from geoflux.mapping import band_spec, write_maps

    model = pickle.loads(Path(args.model_file).read_bytes())
    model, how = prepare(model, args.inference, Path(args.workdir) / "compiled")
    n = args.size
    paths = [Path(args.stack) / f"band{b:02d}.tif" for b in range(N_BANDS)]
    gb = geobox_for(n)
    periods = pd.DatetimeIndex(["2021-06-01"])
    from geoflux.mapping.scheduler import open_scheduler

    t0 = time.perf_counter()
    with open_scheduler(args.scheduler, workers=args.workers) as sched:
        t1 = time.perf_counter()  # cluster start-up (LocalCluster: worker processes), reported apart
        cube = load_cube(stac_items(paths, n), variables(), gb, periods, "1D", args.chunk)
        out = Path(args.out) / "nee.tif"
        spec = band_spec("NEE", out, "gC m-2 d-1", {"software": "geoflux bench"})
        write_maps(cube, model, variables(), gb, {0: [spec]}, sched, overwrite=True)
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "startup_seconds": round(t1 - t0, 2), "inference": how}


def run_child(kind: str, size: int, scheduler: str, inference: str, common: dict) -> dict:
    """Run one timed job in a subprocess; peak RSS = max over time of the summed RSS of its process tree."""
    out = Path(tempfile.mkdtemp(dir=common["workdir"], prefix=f"{kind}-{scheduler}-{size}-"))
    cmd = [
        sys.executable, __file__, "--child", kind, "--size", str(size), "--scheduler", scheduler,
        "--inference", inference, "--out", str(out), "--chunk", str(common["chunk"]), "--workers",
        str(common["workers"]), "--stack", str(common["stack"]), "--model-file", str(common["model"]),
        "--workdir", str(common["workdir"]),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # sklearn/dask warnings of the naive run: noise here
    stdout, returncode, cpu, peak = run_measured(cmd, env)
    if returncode != 0:
        raise RuntimeError(f"{kind}/{scheduler}/{size} failed with status {returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    for f in out.glob("*"):
        f.unlink()
    out.rmdir()
    return {**result, "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak / 2**20, 1)}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--schedulers", nargs="+", default=["threads", "local"])
    ap.add_argument("--inference", nargs="+", default=["library", "compiled"])
    ap.add_argument(
        "--naive",
        nargs="*",
        default=None,
        help="schedulers for the naive pipeline (default: as --schedulers)",
    )
    ap.add_argument(
        "--model",
        choices=["rf", "hgb", "lightgbm"],
        default="rf",
        help="random forest, HistGradientBoosting, LightGBM",
    )
    ap.add_argument(
        "--trees", type=int, default=100, help="trees (rf, lightgbm) or boosting iterations (hgb)"
    )
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keeps stacks/model/compiled libs between runs"
    )
    ap.add_argument("--json", type=Path, default=None)
    # child mode
    ap.add_argument("--child", choices=["naive", "geoflux"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scheduler", default="threads", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--stack", help=argparse.SUPPRESS)
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.inference = args.inference[0]
        res = child_naive(args) if args.child == "naive" else child_geoflux(args)
        print(json.dumps(res))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="geoflux-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_train = time.perf_counter()
    model_path = workdir / f"model-{args.model}-{args.trees}.pkl"
    model = train_model(model_path, args.model, args.trees)
    t_train = time.perf_counter() - t_train
    compile_s = None
    if "compiled" in args.inference:
        from geoflux.inference import prepare

        t0 = time.perf_counter()
        prepare(model, "compiled", workdir / "compiled")  # once, cached for the timed runs
        compile_s = time.perf_counter() - t0
    naive_scheds = args.schedulers if args.naive is None else args.naive
    results = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_start": load0},
        "settings": {
            "bands": N_BANDS,
            "model": args.model,
            "trees": args.trees,
            "chunk": args.chunk,
            "workers": args.workers,
        },
        "train_seconds": round(t_train, 1),
        "compile_seconds": None if compile_s is None else round(compile_s, 1),
        "sizes": {},
    }
    cpus = results["machine"]["cpus"]
    print(f"# load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {cpus} CPUs; ", end="")
    print(f"model {args.model} {args.trees} trees; chunk {args.chunk}", flush=True)
    for n in args.sizes:
        stack = workdir / f"stack-{n}"
        paths = make_stack(stack, n)
        c0 = _cpu()
        r_read = bare_read(paths, n, args.workers)
        c1 = _cpu()
        r_pred, nee = bare_predict(model, paths, n)  # CPU of its untimed reads is subtracted below
        c2 = _cpu()
        r_write = bare_write(nee, workdir / f"bare-{n}.tif")
        c3 = _cpu()
        cpu_limit = (c1 - c0) + max(0.0, (c2 - c1) - (c1 - c0)) + (c3 - c2)
        (workdir / f"bare-{n}.tif").unlink()
        del nee
        limit = r_read + r_pred + r_write
        mpx = n * n / 1e6
        row = {
            "mpixel": mpx,
            "limit": {"read": r_read, "predict": r_pred, "write": r_write, "total": limit, "cpu": cpu_limit},
        }
        common = {"workdir": workdir, "stack": stack, "model": model_path,
                  "chunk": args.chunk, "workers": args.workers}  # fmt: skip
        runs = {}
        for s in naive_scheds:
            runs[f"naive/{s}"] = run_child("naive", n, s, "library", common)
        for s in args.schedulers:
            for inf in args.inference:
                runs[f"geoflux/{s}/{inf}"] = run_child("geoflux", n, s, inf, common)
        for r in runs.values():
            r["efficiency"] = round(limit / r["seconds"], 3)
            r["cpu_efficiency"] = round(cpu_limit / r["cpu_seconds"], 3)
            r["mpixel_per_s"] = round(mpx / r["seconds"], 3)
        row["runs"] = runs
        results["sizes"][str(n)] = row
        print(
            f"{n}: limit {limit:.1f} s (read {r_read:.1f}, predict {r_pred:.1f}, write {r_write:.1f})",
            flush=True,
        )
        for k, r in runs.items():
            eff, peak = r["efficiency"], r["peak_rss_mb"]
            print(f"{n}:   {k:28s} {r['seconds']:7.1f} s  eff {eff:5.2f}  peak {peak:7.0f} MB", flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


def print_table(results: dict) -> None:
    sizes = list(results["sizes"])
    keys = list(next(iter(results["sizes"].values()))["runs"])
    base = {k: results["sizes"][sizes[0]]["runs"][k]["peak_rss_mb"] for k in keys}
    print()
    print("| run | " + " | ".join(f"{s}²: eff (cpu eff) / peak MB (× {sizes[0]}²)" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    lim = " | ".join(
        f"{results['sizes'][s]['limit']['total']:.1f} s ({results['sizes'][s]['limit']['cpu']:.1f} s CPU)"
        for s in sizes
    )
    print(f"| limit (read+predict+write) | {lim} |")
    for k in keys:
        cells = []
        for s in sizes:
            r = results["sizes"][s]["runs"][k]
            growth = r["peak_rss_mb"] / base[k]
            cells.append(
                f"{r['efficiency']:.2f} ({r['cpu_efficiency']:.2f}) / {r['peak_rss_mb']:.0f} (×{growth:.2f})"
            )
        print(f"| {k} | " + " | ".join(cells) + " |")
    for s in sizes:
        runs = results["sizes"][s]["runs"]
        if "geoflux/threads/library" in runs and "geoflux/local/library" in runs:
            thr, loc = runs["geoflux/threads/library"], runs["geoflux/local/library"]
            ratio = thr["seconds"] / loc["seconds"]
            warm = (thr["seconds"] - thr["startup_seconds"]) / (loc["seconds"] - loc["startup_seconds"])
            print(f"LocalCluster / threads throughput at {s}²: {ratio:.2f} ({warm:.2f} without start-up)")
    print()


if __name__ == "__main__":
    main()
