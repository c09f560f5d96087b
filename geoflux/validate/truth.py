"""Generated worlds: maps against their known truth.

The truth rasters are matched to map steps before any stage runs (:func:`check_truth_alignment`) and scored
chunk by chunk (:func:`truth_scores`); NSE, squared Pearson r, RMSE and bias in gC m-2 d-1.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import rasterio.windows

from geoflux.config import RunConfig
from geoflux.errors import GeofluxError
from geoflux.validate.series import _read_masked, time_from_name

NEE_UNITS = "gC m-2 d-1"


# --------------------------------------------------------------------------------------------------
# Truth


_STATS = ("n", "so", "soo", "sp", "see", "covered")


def _window_stats(o: np.ndarray, p: np.ndarray, covered: np.ndarray) -> np.ndarray:
    ok = ~(np.isnan(p) | np.isnan(o))
    o, p, c = o[ok].astype(np.float64), p[ok].astype(np.float64), covered[ok]
    return np.array([o.size, o.sum(), (o * o).sum(), p.sum(), ((p - o) ** 2).sum(), c.sum()])


def _stats_to_scores(s: np.ndarray, band: bool) -> dict[str, float]:
    n, so, soo, sp, see, cov = s
    if n < 2:
        return {"nse": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": int(n)}
    sst = soo - so * so / n
    out = {
        "nse": float(1 - see / sst) if sst > 0 else float("nan"),
        "rmse": float(np.sqrt(see / n)),
        "bias": float((sp - so) / n),
        "n": int(n),
    }
    if band:
        out["band_covers_truth"] = float(cov / n)
    return out


def _truth_sums(
    maps: Sequence[Path],
    truths: Sequence[Path],
    aoa: Sequence[Path] | None = None,
    lower: Sequence[Path] | None = None,
    upper: Sequence[Path] | None = None,
) -> np.ndarray:
    """Sums of (n, Σo, Σo², Σp, Σ(p−o)², covered) inside (row 0) and outside (row 1) the AOA, streamed by
    block windows of the written maps (no AOA: everything is inside)."""
    if len(maps) != len(truths):
        raise GeofluxError(f"truth: {len(maps)} maps but {len(truths)} truth rasters")
    for name, extra in (("AOA", aoa), ("lower band", lower), ("upper band", upper)):
        if extra is not None and len(extra) != len(maps):
            raise GeofluxError(f"truth: {len(maps)} NEE maps but {len(extra)} {name} maps")
    total = np.zeros((2, len(_STATS)))
    for k, (mp, tp) in enumerate(zip(maps, truths, strict=True)):
        with contextlib.ExitStack() as stack:
            m = stack.enter_context(rasterio.open(mp))
            t = stack.enter_context(rasterio.open(tp))
            if (m.width, m.height) != (t.width, t.height) or m.transform != t.transform:
                raise GeofluxError(f"{mp}: grid differs from truth raster {tp}")
            a = stack.enter_context(rasterio.open(aoa[k])) if aoa is not None else None
            lo = stack.enter_context(rasterio.open(lower[k])) if lower is not None else None
            hi = stack.enter_context(rasterio.open(upper[k])) if upper is not None else None
            for _, win in m.block_windows(1):
                p = _read_masked(m, win)
                o = _read_masked(t, win)
                if lo is not None and hi is not None:
                    covered = (o >= _read_masked(lo, win)) & (o <= _read_masked(hi, win))
                else:
                    covered = np.zeros(o.shape, bool)
                inside = _read_masked(a, win) == 1 if a is not None else np.ones(o.shape, bool)
                total[0] += _window_stats(o[inside], p[inside], covered[inside])
                total[1] += _window_stats(o[~inside], p[~inside], covered[~inside])
    return total


def truth_scores(maps: Sequence[Path], truths: Sequence[Path]) -> dict[str, float]:
    """Pixel-wise ``nse`` (1 − SSE/SST), ``rmse`` and ``bias`` (pred − obs, map units: gC m-2 d-1) and ``n``
    (pixel-steps) of maps against true fields, pooled over all time steps.

    Streams block windows and accumulates sums (float64), so memory does not grow with the map size.
    """
    return _stats_to_scores(_truth_sums(maps, truths).sum(axis=0), band=False)


def aoa_truth_scores(
    maps: Sequence[Path],
    truths: Sequence[Path],
    aoa: Sequence[Path],
    lower: Sequence[Path] | None = None,
    upper: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Map-vs-truth ``nse``, ``rmse`` and ``bias`` (gC m-2 d-1) inside and outside the area of applicability,
    read from the written NEE, AOA and (if given) band maps. Generated worlds only.

    Scored from the files a user gets (not by re-predicting), window by window, so memory does not grow
    with the map.

    Returns
    -------
    ``{"inside": {...}, "outside": {...}, "all": {...}, "aoa_fraction": f, "units": ...}``; each score dict
    has ``nse``, ``rmse``, ``bias``, ``n`` (pixel-steps) and, with the band maps, ``band_covers_truth`` (the
    fraction of true values inside the uncertainty band).
    """
    inside, outside = _truth_sums(maps, truths, aoa, lower, upper)
    band = lower is not None and upper is not None
    return {
        "inside": _stats_to_scores(inside, band),
        "outside": _stats_to_scores(outside, band),
        "all": _stats_to_scores(inside + outside, band),
        "aoa_fraction": float(inside[0] / max(inside[0] + outside[0], 1)),
        "units": NEE_UNITS,
    }


def check_truth_alignment(cfg: RunConfig) -> dict[pd.Timestamp, Path] | None:
    """The truth raster of every map period (None when the run has no ``truth``), checked before any stage.

    Each truth raster's date comes from its ``period_start`` tag or its name (``nee_YYYYMMDD.tif``); there
    must be exactly one per period start of ``time`` and none for other dates, so a calendar mismatch
    (``8D`` drifting from products that restart on 1 January) stops the run before hours of mapping.

    Raises
    ------
    GeofluxError
        naming the truth glob, the counts and the first date that has no partner.
    """
    if not cfg.truth:
        return None
    files = sorted(glob.glob(str(cfg.path(cfg.truth))))
    periods = cfg.periods()
    if not files:
        raise GeofluxError(f"{cfg.truth}: no truth raster matches (expected one per map period)")
    by_date: dict[pd.Timestamp, Path] = {}
    for f in files:
        t = time_from_name(f)
        if t is None:
            raise GeofluxError(f"{f}: truth raster without a date (expected a period_start tag or _YYYYMMDD)")
        if t in by_date:
            raise GeofluxError(f"{f}: second truth raster for {t:%Y-%m-%d} (first: {by_date[t]})")
        by_date[t] = Path(f)
    missing = [p for p in periods if p not in by_date]
    extra = sorted(t for t in by_date if t not in set(periods))
    if missing or extra:
        first = (
            f"no truth raster for period {missing[0]:%Y-%m-%d}"
            if missing
            else f"truth raster {by_date[extra[0]].name} dated {extra[0]:%Y-%m-%d} starts no period"
        )
        raise GeofluxError(
            f"{cfg.truth}: {len(files)} truth rasters for {len(periods)} map time steps of time.step "
            f"{cfg.time.step}; {first} (expected one truth raster per period start; a world whose "
            "periods restart on 1 January needs time.step MODIS8D)"
        )
    return {p: by_date[p] for p in periods}
