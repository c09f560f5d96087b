"""Carbon budgets from the written NEE maps: per pixel, per land-cover class and for the region, with a 90 %
interval from the maps' calibrated band.

A window's budget (gC m-2; gC m-2 yr-1 for a calendar year) is the sum over the map periods of NEE
(gC m-2 d-1) times the days each period overlaps the window, so a MODIS8D year's 5- or 6-day last period
counts 5 or 6 days and a monthly step its month's length. The region total is the pixel mean times the area
of the valid pixels (Tg C). Everything is read chunk by chunk from the COGs (``maps/nee_*``,
``nee-q05_*``, ``nee-q95_*``): one dask task per output chunk reads that chunk of every period.

Interval propagation. The band gives each pixel-period a lower and upper error (NEE − q05, q95 − NEE). How
the errors of many pixel-periods combine depends on their correlation, which a per-pixel band cannot tell.
Three assumptions are computed; ``correlation`` chooses the one reported as ``interval`` and written as the
q05/q95 budget maps:

``full`` (default)
    errors fully correlated across pixels and periods within a window: the budget's bounds are the sums of
    the bounds (comonotone errors: quantiles add). Conservative: the widest of the three for near-normal
    errors. Chosen as the default because a regression model's errors are systematic (a drought year's
    conditions are mis-modelled everywhere and all summer), and an interval that is too wide misleads
    less than one that is too narrow.
``period``
    errors fully correlated across pixels within a period but independent between periods (half-widths
    add in quadrature over periods): the error of a period is dominated by that period's regional weather.
``independent``
    errors independent across pixels and periods (quadrature over both). Shown for contrast: regional
    intervals become implausibly narrow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import rasterio

from geoflux.atomic import atomic_path
from geoflux.config import RunConfig
from geoflux.errors import GeofluxError

log = logging.getLogger(__name__)

BUDGETS = "budgets"
BUDGETS_JSON = "budgets/budgets.json"
CORRELATIONS = ("full", "period", "independent")
BUDGET_UNITS = "gC m-2 yr-1"
MAP_BANDS = ("NEE", "NEE_q05", "NEE_q95")
# stats per region and period accumulated chunk by chunk (see _chunk_stats)
_STATS = ("n", "nee", "lo", "hi", "dlo2", "dhi2", "truth")
# per-pixel stats per region accumulated chunk by chunk: squared error, count covered, count
_PIXEL_STATS = ("n", "se", "covered", "err")


@dataclass(frozen=True)
class Window:
    """A budget window [start, end): a calendar year (name ``YYYY``) or any span of dates."""

    name: str
    start: pd.Timestamp
    end: pd.Timestamp

    @property
    def days(self) -> float:
        return (self.end - self.start) / pd.Timedelta(days=1)


def year_windows(cfg: RunConfig) -> list[Window]:
    """One window per calendar year the map periods touch."""
    starts, ends = cfg.period_bounds()
    years = range(starts[0].year, (ends[-1] - pd.Timedelta("1ns")).year + 1)
    return [
        Window(str(y), pd.Timestamp(year=y, month=1, day=1), pd.Timestamp(year=y + 1, month=1, day=1))
        for y in years
    ]


def overlap_days(starts: pd.DatetimeIndex, ends: pd.DatetimeIndex, window: Window) -> np.ndarray:
    """Days each period [start, end) overlaps ``window`` (float; 0 for periods outside it)."""
    lo = np.maximum(starts.to_numpy(dtype="datetime64[ns]"), np.datetime64(window.start, "ns"))
    hi = np.minimum(ends.to_numpy(dtype="datetime64[ns]"), np.datetime64(window.end, "ns"))
    return np.clip((hi - lo) / np.timedelta64(1, "D"), 0.0, None)


def _open_stack(paths: Sequence[Path], chunk: int, geobox) -> da.Array:
    """(period, y, x) float64 dask array of single-band rasters, nodata NaN; a chunk spans all periods."""

    def read(path: Path, window) -> np.ndarray:
        with rasterio.open(path) as src:
            a = src.read(1, window=window, masked=True).astype("float64")
        return a.filled(np.nan)

    for p in paths:
        with rasterio.open(p) as src:
            if src.shape != tuple(geobox.shape) or not src.transform.almost_equals(geobox.affine):
                raise GeofluxError(f"{p}: grid differs from the run's grid (expected {geobox.shape} px)")
    ny, nx = geobox.shape
    rows = tuple(min(chunk, ny - r) for r in range(0, ny, chunk))
    cols = tuple(min(chunk, nx - c) for c in range(0, nx, chunk))

    def block(block_info=None) -> np.ndarray:
        (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
        win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
        return np.stack([read(p, win) for p in paths])

    return da.map_blocks(block, dtype="float64", chunks=((len(paths),), rows, cols))


def _pixel_budget(nee: np.ndarray, q05: np.ndarray, q95: np.ndarray, w: np.ndarray, correlation: str):
    """Per-pixel budget, lower and upper bound (gC m-2) of one chunk; NaN where any period is missing."""
    wb = w[:, None, None]
    b = (wb * nee).sum(axis=0)
    if correlation == "full":
        lo, hi = (wb * q05).sum(axis=0), (wb * q95).sum(axis=0)
    else:  # at one pixel, "period" and "independent" both mean independent between periods
        lo = b - np.sqrt(((wb * (nee - q05)) ** 2).sum(axis=0))
        hi = b + np.sqrt(((wb * (q95 - nee)) ** 2).sum(axis=0))
    return b, lo, hi


def _chunk_stats(
    nee: np.ndarray,
    q05: np.ndarray,
    q95: np.ndarray,
    truth: np.ndarray | None,
    labels: np.ndarray,
    codes: Sequence[int],
    w: np.ndarray,
    correlation: str,
) -> np.ndarray:
    """Sums over the chunk's valid pixels, per region (0: all, then one per class code) and period:
    count, NEE, q05, q95, (NEE − q05)², (q95 − NEE)², truth; plus per-pixel budget error sums. Returns
    a (region, period * 7 + 4) float64 array so that chunk results add up."""
    valid = np.isfinite(nee).all(axis=0) & np.isfinite(q05).all(axis=0) & np.isfinite(q95).all(axis=0)
    if truth is not None:
        valid &= np.isfinite(truth).all(axis=0)
    t = nee.shape[0]
    out = np.zeros((1 + len(codes), t * len(_STATS) + len(_PIXEL_STATS)))
    b, lo, hi = _pixel_budget(nee, q05, q95, w, correlation)
    tb = (w[:, None, None] * truth).sum(axis=0) if truth is not None else None
    for k, sel in enumerate([valid, *[valid & (labels == c) for c in codes]]):
        n = int(sel.sum())
        if n == 0:
            continue
        x, l5, h5 = nee[:, sel], q05[:, sel], q95[:, sel]
        per = [
            np.full(t, n, float),
            x.sum(axis=1),
            l5.sum(axis=1),
            h5.sum(axis=1),
            ((x - l5) ** 2).sum(axis=1),
            ((h5 - x) ** 2).sum(axis=1),
            truth[:, sel].sum(axis=1) if truth is not None else np.zeros(t),
        ]
        pix = [n, 0.0, 0.0, 0.0]
        if tb is not None:
            e = b[sel] - tb[sel]
            pix = [
                n,
                float((e**2).sum()),
                float(((lo[sel] <= tb[sel]) & (tb[sel] <= hi[sel])).sum()),
                float(e.sum()),
            ]
        out[k] = np.concatenate([np.stack(per, axis=1).ravel(), pix])
    return out


def _region_budget(stats: np.ndarray, w: np.ndarray, area_px_m2: float, has_truth: bool) -> dict:
    """Budget and its interval under each correlation assumption from one region's summed stats."""
    t = len(w)
    per = stats[: t * len(_STATS)].reshape(t, len(_STATS))
    n = per[0, 0]
    if n == 0:
        return {"pixels": 0}
    mean = {k: per[:, i] / n for i, k in enumerate(_STATS)}
    b = float((w * mean["nee"]).sum())
    dlo_mean = mean["nee"] - mean["lo"]  # region-mean lower half-width per period
    dhi_mean = mean["hi"] - mean["nee"]
    intervals = {
        "full": [float((w * mean["lo"]).sum()), float((w * mean["hi"]).sum())],
        "period": [
            b - float(np.sqrt(((w * dlo_mean) ** 2).sum())),
            b + float(np.sqrt(((w * dhi_mean) ** 2).sum())),
        ],
        "independent": [
            b - float(np.sqrt((w**2 * per[:, 4]).sum()) / n),
            b + float(np.sqrt((w**2 * per[:, 5]).sum()) / n),
        ],
    }
    out = {
        "pixels": int(n),
        "nee": b,
        "nee_total_tgc": b * n * area_px_m2 * 1e-12,
        "intervals": intervals,
    }
    if has_truth:
        px = stats[t * len(_STATS) :]
        tb = float((w * mean["truth"]).sum())
        out["truth"] = {
            "nee": tb,
            "error": b - tb,
            "covered": {c: bool(lo <= tb <= hi) for c, (lo, hi) in intervals.items()},
            "pixel_rmse": float(np.sqrt(px[1] / px[0])),
            "pixel_bias": float(px[3] / px[0]),
            "pixel_coverage": float(px[2] / px[0]),
        }
    return out


def _class_labels(cfg: RunConfig, geobox, chunk: int) -> tuple[da.Array, list[int], str | None]:
    """Land-cover codes on the grid (the run's categorical static driver, loaded lazily) and its codes."""
    cat = [v for v in cfg.variables if v.kind == "categorical" and v.static]
    if not cat:
        ny, nx = geobox.shape
        return da.zeros((ny, nx), chunks=chunk), [], None
    from geoflux.cube import cube_from_config

    var = cat[0]
    cube = cube_from_config(cfg.model_copy(update={"variables": [var]}))
    labels = cube[var.name].data.rechunk(chunk)
    return labels, list(var.classes or []), var.name


def compute_budgets(
    cfg: RunConfig,
    windows: Sequence[Window] | None = None,
    correlation: str = "full",
    write: bool = True,
    overwrite: bool = True,
    maps_dir: Path | None = None,
    out_dir: Path | None = None,
    truth: bool = True,
    tags: dict[str, str] | None = None,
) -> dict:
    """Budgets per window (default: calendar years), per pixel, per land-cover class and for the region.

    Parameters
    ----------
    cfg : the run configuration (maps are read from ``<output>/maps``, truth from ``truth``).
    windows : budget windows; default one per calendar year of the map periods.
    correlation : full, period or independent: which propagation gives ``interval`` and the q05/q95
        budget maps (all three are in the result; see the module docstring).
    write : write ``budgets/budgets.json`` and the budget COGs ``budgets/nee_<window>.tif``,
        ``nee-q05_<window>.tif``, ``nee-q95_<window>.tif`` and, over complete years,
        ``nee-anomaly_<window>.tif`` (budget minus the mean over complete years), all gC m-2 over the
        window (gC m-2 yr-1 for years).
    maps_dir : folder of the maps (default ``<output>/maps``; a scenario's ``maps/scenarios/<name>``).
    out_dir : folder of the outputs (default ``<output>/budgets``).
    truth : compare with the run's truth (a scenario's maps have none).
    tags : extra provenance tags of the budget COGs (e.g. the scenario).

    Returns
    -------
    dict with ``windows`` (per window: days covered by map periods, ``complete``, ``region`` and
    ``classes`` budgets in gC m-2, ``nee_total_tgc`` in Tg C, ``intervals`` per assumption, ``interval``
    the chosen one, and ``truth`` comparisons when the run has a truth), ``years`` summary and the units.
    """
    from geoflux.cog import RasterSpec, write_cogs
    from geoflux.cube import target_grid
    from geoflux.run import band_stem, layout
    from geoflux.validate import check_truth_alignment

    if correlation not in CORRELATIONS:
        raise GeofluxError(f"correlation: {correlation!r} (expected one of {', '.join(CORRELATIONS)})")
    starts, ends = cfg.period_bounds()
    windows = list(windows) if windows is not None else year_windows(cfg)
    paths = {b: layout(cfg).map_paths(cfg.periods(), b, maps_dir) for b in MAP_BANDS}
    for band, per in paths.items():
        missing = [p for p in per.values() if not p.exists()]
        if missing:
            hint = " (the model has no uncertainty band: model.uncertainty quantile)" if band != "NEE" else ""
            raise GeofluxError(f"{missing[0]}: map not found (run 'geoflux map' first){hint}")
    truths = check_truth_alignment(cfg) if truth else None
    geobox = target_grid(cfg.grid)
    chunk = cfg.grid.chunk
    labels, codes, class_var = _class_labels(cfg, geobox, chunk)
    # m2 per pixel; a geographic grid's pixels differ in area, so it gets no Tg C total
    area_px = float("nan") if geobox.crs.geographic else abs(geobox.affine.a * geobox.affine.e)

    results: dict = {}
    budget_maps: dict[str, tuple[da.Array, da.Array, da.Array]] = {}
    stats_tasks = []
    for win in windows:
        w_all = overlap_days(starts, ends, win)
        idx = np.flatnonzero(w_all > 0)
        if not len(idx):
            raise GeofluxError(
                f"budget window {win.name} ({win.start:%Y-%m-%d}..{win.end:%Y-%m-%d}): no map period in it "
                f"(maps cover {starts[0]:%Y-%m-%d}..{ends[-1]:%Y-%m-%d})"
            )
        w = w_all[idx]
        sel = [starts[i] for i in idx]
        stacks = [_open_stack([paths[b][p] for p in sel], chunk, geobox) for b in MAP_BANDS]
        truth = _open_stack([truths[p] for p in sel], chunk, geobox) if truths is not None else None

        def pix(nee, q05, q95, _w=w, k=0):
            return _pixel_budget(nee, q05, q95, _w, correlation)[k].astype("float32")

        budget_maps[win.name] = tuple(
            da.map_blocks(pix, *stacks, k=k, drop_axis=0, dtype="float32") for k in range(3)
        )
        n_out = len(idx) * len(_STATS) + len(_PIXEL_STATS)

        def stats(nee, q05, q95, lab, *tr, _w=w):
            s = _chunk_stats(nee, q05, q95, tr[0] if tr else None, lab[0], codes, _w, correlation)
            return s[None, None]  # (1, 1, region, stat): one entry per chunk

        args = [*stacks, labels[None], *([truth] if truth is not None else [])]
        per_chunk = da.map_blocks(
            stats,
            *args,
            dtype="float64",
            drop_axis=0,
            new_axis=[2, 3],
            chunks=(
                (1,) * len(stacks[0].chunks[1]),
                (1,) * len(stacks[0].chunks[2]),
                (1 + len(codes),),
                (n_out,),
            ),
        )
        stats_tasks.append(per_chunk.sum(axis=(0, 1)))
        results[win.name] = {
            "start": f"{win.start:%Y-%m-%d}",
            "end": f"{win.end:%Y-%m-%d}",
            "days": float(w.sum()),
            "complete": bool(abs(w.sum() - win.days) < 1e-9),
            "periods": len(idx),
            "_w": w,
        }
    (summed,) = dask.compute(stats_tasks)
    for win, s in zip(windows, summed, strict=True):
        r = results[win.name]
        w = r.pop("_w")
        r["region"] = _region_budget(s[0], w, area_px, truths is not None)
        r["classes"] = {
            f"{class_var}={c}": _region_budget(s[1 + i], w, area_px, truths is not None)
            for i, c in enumerate(codes)
        }
        for entry in (r["region"], *r["classes"].values()):
            if "intervals" in entry:
                entry["interval"] = entry["intervals"][correlation]
    complete = [w for w in windows if results[w.name]["complete"]]
    _add_anomalies(results, complete)
    out = {
        "units": "gC m-2 over the window (gC m-2 yr-1 for a complete year); nee_total_tgc: Tg C",
        "sign": "NEE > 0 is a source to the atmosphere",
        "time_step": cfg.time.step,
        "interval": f"{cfg.model.interval:.0%} band of the maps, propagated with correlation={correlation}",
        "correlation": correlation,
        "windows": results,
    }
    if truths is not None:
        out["truth_summary"] = _truth_summary(results, complete)
    if write:
        folder = Path(out_dir) if out_dir is not None else cfg.out_dir / BUDGETS
        _write_outputs(
            cfg,
            out,
            budget_maps,
            complete,
            geobox,
            overwrite,
            RasterSpec,
            write_cogs,
            band_stem,
            folder,
            tags,
        )
    return out


def _add_anomalies(results: dict, complete: Sequence[Window]) -> None:
    """Each complete year's region budget minus the mean over complete years (mapped and true)."""
    if len(complete) < 2:
        return
    for key in ("nee",):
        mean = np.mean([results[w.name]["region"][key] for w in complete])
        for w in complete:
            results[w.name]["region"]["anomaly"] = results[w.name]["region"][key] - mean
    if "truth" in results[complete[0].name]["region"]:
        mean = np.mean([results[w.name]["region"]["truth"]["nee"] for w in complete])
        for w in complete:
            t = results[w.name]["region"]["truth"]
            t["anomaly"] = t["nee"] - mean


def _truth_summary(results: dict, complete: Sequence[Window]) -> dict:
    """Across complete windows: is the truth inside each interval, and do mapped and true budgets rank the
    windows alike (Spearman)?"""
    names = [w.name for w in complete] or list(results)
    mapped = np.array([results[n]["region"]["nee"] for n in names])
    true = np.array([results[n]["region"]["truth"]["nee"] for n in names])
    summary = {
        "windows": names,
        "mapped": mapped.tolist(),
        "true": true.tolist(),
        "bias": float((mapped - true).mean()),
        "rmse": float(np.sqrt(((mapped - true) ** 2).mean())),
        "covered": {
            c: int(sum(results[n]["region"]["truth"]["covered"][c] for n in names)) for c in CORRELATIONS
        },
        "ranking_matches": bool((np.argsort(mapped) == np.argsort(true)).all()),
    }
    if len(names) >= 3:
        from scipy.stats import spearmanr

        summary["spearman"] = float(spearmanr(mapped, true).statistic)
    return summary


def _write_outputs(
    cfg, out, budget_maps, complete, geobox, overwrite, RasterSpec, write_cogs, band_stem, folder, extra=None
) -> None:
    import geoflux

    tags_base = {
        "software": f"geoflux {geoflux.__version__}",
        "quantity": "net ecosystem exchange budget (positive = CO2 source to the atmosphere)",
        "correlation": out["correlation"],
        "time_step": cfg.time.step,
        **(extra or {}),
    }
    arrays, specs = [], []
    for name, (b, lo, hi) in budget_maps.items():
        win = out["windows"][name]
        units = BUDGET_UNITS if win["complete"] else f"gC m-2 over {win['start']}..{win['end']}"
        tags = {
            **tags_base,
            "window_start": win["start"],
            "window_end": win["end"],
            "days": f"{win['days']:g}",
        }
        for band, arr, what in (
            ("NEE", b, "NEE budget"),
            ("NEE_q05", lo, "NEE budget 5 % bound"),
            ("NEE_q95", hi, "NEE budget 95 % bound"),
        ):
            arrays.append(arr)
            specs.append(
                RasterSpec(folder / f"{band_stem(band)}_{name}.tif", units=units, description=what, tags=tags)
            )
    if len(complete) >= 2:
        mean = sum(budget_maps[w.name][0] for w in complete) / len(complete)
        for w in complete:
            win = out["windows"][w.name]
            arrays.append(budget_maps[w.name][0] - mean)
            specs.append(
                RasterSpec(
                    folder / f"nee-anomaly_{w.name}.tif",
                    units=BUDGET_UNITS,
                    description="NEE budget anomaly (year minus mean of complete years)",
                    tags={
                        **tags_base,
                        "window_start": win["start"],
                        "window_end": win["end"],
                        "years": ",".join(c.name for c in complete),
                    },
                )
            )
    write_cogs(arrays, geobox, specs, overwrite=overwrite)
    with atomic_path(folder / Path(BUDGETS_JSON).name) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    rows = []
    for name, win in out["windows"].items():
        for region, entry in {"region": win["region"], **win["classes"]}.items():
            if "nee" not in entry:
                continue
            row = {
                "window": name,
                "region": region,
                "complete": win["complete"],
                "days": win["days"],
                "pixels": entry["pixels"],
                "nee": entry["nee"],
                "q05": entry["interval"][0],
                "q95": entry["interval"][1],
                "nee_total_tgc": entry["nee_total_tgc"],
            }
            if "truth" in entry:
                row.update(
                    true_nee=entry["truth"]["nee"], covered=entry["truth"]["covered"][out["correlation"]]
                )
            rows.append(row)
    with atomic_path(folder / "budgets.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.4f")
