"""Validation stage: maps against the truth (generated worlds) and against towers through their footprints.

Reads maps window by window, so memory is bounded by the window size, not the map size. Works on any
single-band GeoTIFF/COG time series whose grid matches the footprints' grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from geoflux.errors import GeofluxError
from geoflux.footprint import FootprintWeights
from geoflux.metrics import summary


def _read_masked(ds: rasterio.io.DatasetReader, window=None) -> np.ndarray:
    a = ds.read(1, window=window, masked=True).astype("float64")
    return a.filled(np.nan)


def truth_scores(maps: Sequence[Path], truths: Sequence[Path]) -> dict[str, float]:
    """Pixel-wise R², RMSE and bias of maps against true fields, pooled over all time steps.

    Streams block windows and accumulates sums (float64), so memory does not grow with the map size.
    """
    if len(maps) != len(truths):
        raise GeofluxError(f"truth: {len(maps)} maps but {len(truths)} truth rasters")
    n = so = soo = sp = see = 0.0
    for mp, tp in zip(maps, truths, strict=True):
        with rasterio.open(mp) as m, rasterio.open(tp) as t:
            if (m.width, m.height) != (t.width, t.height) or m.transform != t.transform:
                raise GeofluxError(f"{mp}: grid differs from truth raster {tp}")
            for _, win in m.block_windows(1):
                p = _read_masked(m, win)
                o = _read_masked(t, win)
                ok = ~(np.isnan(p) | np.isnan(o))
                p, o = p[ok], o[ok]
                n += o.size
                so += o.sum()
                soo += (o * o).sum()
                sp += p.sum()
                see += ((p - o) ** 2).sum()
    if n < 2:
        return {"r2": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": int(n)}
    sst = soo - so * so / n
    return {"r2": 1 - see / sst, "rmse": float(np.sqrt(see / n)), "bias": (sp - so) / n, "n": int(n)}


def footprint_map_values(
    maps: Mapping[pd.Timestamp, Path], footprints: Mapping[str, FootprintWeights]
) -> pd.DataFrame:
    """Footprint-weighted map value Σw·M / Σw (valid pixels only) per site and time.

    Returns
    -------
    DataFrame with ``site``, ``time``, ``map`` (map units) and ``fp_valid`` (Σw over valid pixels: the
    footprint fraction the value stands for).
    """
    rows = []
    for time, path in sorted(maps.items()):
        with rasterio.open(path) as ds:
            for site, fw in footprints.items():
                r, c = fw.window
                win = rasterio.windows.Window(c.start, r.start, c.stop - c.start, r.stop - r.start)
                m = _read_masked(ds, win)
                ok = ~np.isnan(m)
                wsum = float(fw.weights[ok].sum())
                val = float((fw.weights[ok] * m[ok]).sum() / wsum) if wsum > 0 else np.nan
                rows.append({"site": site, "time": pd.Timestamp(time), "map": val, "fp_valid": wsum})
    return pd.DataFrame(rows)


def tower_scores(
    maps: Mapping[pd.Timestamp, Path],
    footprints: Mapping[str, FootprintWeights],
    observations: pd.DataFrame,
) -> tuple[pd.DataFrame, dict]:
    """Compare maps with tower observations through each tower's footprint.

    Parameters
    ----------
    maps : map path per period start.
    footprints : footprint weights per site on the maps' grid.
    observations : aggregated tower NEE (``site``, ``time``, ``NEE``) in the maps' units.

    Returns
    -------
    The paired table (``site``, ``time``, ``obs``, ``pred``, ``fp_valid``) and its summary scores.
    """
    vals = footprint_map_values(maps, footprints)
    obs = observations[["site", "time", "NEE"]].rename(columns={"NEE": "obs"})
    pairs = vals.merge(obs, on=["site", "time"], how="inner").rename(columns={"map": "pred"})
    pairs = pairs.dropna(subset=["obs", "pred"])
    result = summary(pairs) if len(pairs) > 1 else {"n": len(pairs)}
    result["footprint_method"] = {s: fw.method for s, fw in footprints.items()}
    return pairs, result
