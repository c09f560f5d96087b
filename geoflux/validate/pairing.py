"""Maps against towers through their footprints.

For each site and time step the footprint-weighted map value is Σw·M / Σw over the footprint's valid
(non-nodata) pixels, and Σw (the footprint fraction the value stands for) is reported as ``fp_valid``. Pairs
with the QC-filtered, aggregated tower observation are scored (:func:`geoflux.metrics.skill`: nse, r2_pearson,
rmse, bias, RMA slope) overall, per land-cover class, per representativeness class and inside/outside the area
of applicability, always separating sites the model was trained on from held-out sites.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from odc.geo.geobox import GeoBox

from geoflux.errors import GridError
from geoflux.footprint import FootprintWeights
from geoflux.footprint.regrid import footprints_on_grid
from geoflux.metrics import grouped_skill, summary
from geoflux.validate.series import MapSeries, open_geotiff_series

NEE_UNITS = "gC m-2 d-1"
ROLE_TRAINING = "training"
ROLE_HELD_OUT = "held-out"
ROLE_INDEPENDENT = "independent"  # a product whose training sites are unknown
ROLE_CV = "held-out (CV)"
RI_BINS = (0.5, 1.0)  # representativeness index class edges, in units of the context's spatial std
RI_LABELS = ("representative (RI<0.5)", "moderate (0.5-1)", "atypical (RI>1)")


# --------------------------------------------------------------------------------------------------
# Footprint-weighted map values


def _context(fw: FootprintWeights, factor: float = 3.0) -> tuple[slice, slice]:
    """A window ``factor`` times the footprint window's extent around its centre (for representativeness)."""
    rs, cs = fw.window
    h, w = rs.stop - rs.start, cs.stop - cs.start
    pr, pc = int(np.ceil(h * (factor - 1) / 2)), int(np.ceil(w * (factor - 1) / 2))
    return slice(rs.start - pr, rs.stop + pr), slice(cs.start - pc, cs.stop + pc)


def _clip(win: tuple[slice, slice], shape: tuple[int, int]) -> tuple[slice, slice]:
    rs, cs = win
    return slice(max(rs.start, 0), min(rs.stop, shape[0])), slice(max(cs.start, 0), min(cs.stop, shape[1]))


def footprint_values(series: MapSeries, footprints: Mapping[str, FootprintWeights]) -> pd.DataFrame:
    """Footprint-weighted map value per site and time step, with band and AOA when the maps have them.

    Returns
    -------
    DataFrame with ``site``, ``time``, ``map`` (Σw·M/Σw over valid pixels, gC m-2 d-1), ``fp_valid`` (Σw
    over valid pixels: the footprint fraction the value stands for), ``fp_coverage`` (Σw inside the map),
    and when available ``lo``/``hi`` (footprint-weighted band bounds, gC m-2 d-1) and ``aoa`` (footprint
    fraction inside the area of applicability, 0-1). ``attrs['ri']`` holds each site's representativeness
    index: the distance of the footprint's time-mean value from the mean of a 3× larger context window in
    units of the context's spatial standard deviation (after Chu et al. 2021, AFM 301:108350, applied to
    the map itself).
    """
    shape = series.geobox.shape
    plans = {}
    for site, fw in footprints.items():
        ctx = _clip(_context(fw), shape)
        fwin = _clip(fw.window, shape)
        # footprint weights inside the context window (the footprint window is clipped to the grid already)
        w = np.zeros((ctx[0].stop - ctx[0].start, ctx[1].stop - ctx[1].start))
        r0, c0 = fwin[0].start - fw.row_off, fwin[1].start - fw.col_off
        sub = fw.weights[r0 : r0 + fwin[0].stop - fwin[0].start, c0 : c0 + fwin[1].stop - fwin[1].start]
        dr, dc = fwin[0].start - ctx[0].start, fwin[1].start - ctx[1].start
        w[dr : dr + sub.shape[0], dc : dc + sub.shape[1]] = sub
        plans[site] = (ctx, w, fw.coverage)
    rows = []
    sums = {s: np.zeros(p[1].shape) for s, p in plans.items()}
    counts = {s: np.zeros(p[1].shape) for s, p in plans.items()}
    names = list(plans)
    for i, time in enumerate(series.times):
        step = series.read(i, [plans[s][0] for s in names])
        for site, vals in zip(names, step, strict=True):
            _, w, cov = plans[site]
            m = vals["NEE"]
            ok = np.isfinite(m)
            sums[site] += np.where(ok, m, 0.0)
            counts[site] += ok
            wv = np.where(ok, w, 0.0)
            wsum = float(wv.sum())
            row = {"site": site, "time": time, "fp_coverage": cov, "fp_valid": wsum}
            row["map"] = float((wv * np.where(ok, m, 0.0)).sum() / wsum) if wsum > 0 else np.nan
            for role in ("lo", "hi"):
                if role in vals:
                    b = vals[role]
                    okb = ok & np.isfinite(b)
                    wb = np.where(okb, w, 0.0)
                    row[role] = (
                        float((wb * np.where(okb, b, 0.0)).sum() / wb.sum()) if wb.sum() > 0 else np.nan
                    )
            if "AOA" in vals:
                a = vals["AOA"]
                oka = ok & np.isfinite(a)
                wa = np.where(oka, w, 0.0)
                row["aoa"] = float((wa * (a > 0.5)).sum() / wa.sum()) if wa.sum() > 0 else np.nan
            rows.append(row)
    df = pd.DataFrame(rows)
    ri = {}
    for site, (_, w, _) in plans.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts[site] > 0, sums[site] / counts[site], np.nan)
        ri[site] = _representativeness(mean, w)
    df.attrs["ri"] = ri
    return df


def _representativeness(mean_map: np.ndarray, w: np.ndarray) -> float:
    ok = np.isfinite(mean_map)
    if not ok.any() or (w * ok).sum() <= 0:
        return float("nan")
    fp = float((w * np.where(ok, mean_map, 0)).sum() / (w * ok).sum())
    ctx_mean, ctx_std = float(np.nanmean(mean_map)), float(np.nanstd(mean_map))
    tol = 1e-9 * max(abs(ctx_mean), 1.0)
    if ctx_std <= tol:  # uniform surroundings (e.g. one coarse pixel): the footprint sees what they are
        return 0.0
    return abs(fp - ctx_mean) / ctx_std


def footprint_map_values(
    maps: Mapping[pd.Timestamp, Path], footprints: Mapping[str, FootprintWeights]
) -> pd.DataFrame:
    """Footprint-weighted map value Σw·M / Σw (valid pixels only) per site and time.

    ``footprints`` must be on the maps' grid (see :func:`footprints_on_grid` for any other grid).

    Returns
    -------
    DataFrame with ``site``, ``time``, ``map`` (map units) and ``fp_valid`` (Σw over valid pixels: the
    footprint fraction the value stands for), plus the columns of :func:`footprint_values`.
    """
    return footprint_values(open_geotiff_series(dict(maps)), footprints)


# --------------------------------------------------------------------------------------------------
# Stratified validation


@dataclass
class Validation:
    """Result of :func:`validate_maps`.

    Attributes
    ----------
    pairs : one row per source, site and time step: ``source`` ('map' or 'cv'), ``role`` ('training',
        'held-out', 'independent', 'held-out (CV)'), ``site``, ``time``, ``obs``/``pred`` (gC m-2 d-1),
        ``fp_valid``, ``igbp``, ``ri``, ``ri_class``, and ``aoa``/``aoa_class``, ``lo``/``hi`` when known.
    tables : skill tables by stratum (``overall``, ``igbp``, ``representativeness``, ``aoa``, ``site``), each
        grouped by ``source`` and ``role`` first so training and held-out sites never pool.
    info : what was compared (map source, units, footprints, thresholds).
    """

    pairs: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    info: dict

    def to_dict(self) -> dict:
        """JSON-ready form for metrics.json: info plus every table as a list of records."""

        def records(df: pd.DataFrame) -> list[dict]:
            return [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in df.to_dict(orient="records")
            ]

        return {**self.info, "tables": {k: records(v) for k, v in self.tables.items()}}

    def summary_text(self) -> str:
        """The overall table as aligned text."""
        cols = ["source", "role", "n_sites", "n", "bias", "rmse", "nse", "r2_pearson", "rma_slope"]
        t = self.tables["overall"]
        return t[[c for c in cols if c in t.columns]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        )


def _ri_class(ri: pd.Series) -> pd.Series:
    bins = [-np.inf, *RI_BINS, np.inf]
    return pd.cut(ri, bins, labels=list(RI_LABELS), right=False).astype("string").fillna("unknown")


def _interval_coverage(g: pd.DataFrame) -> float:
    ok = g[["obs", "lo", "hi"]].notna().all(axis=1)
    if not ok.any():
        return float("nan")
    inside = (g.loc[ok, "obs"] >= g.loc[ok, "lo"]) & (g.loc[ok, "obs"] <= g.loc[ok, "hi"])
    return float(inside.mean())


def stratified_tables(pairs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Skill tables of a paired table, grouped by ``source`` and ``role`` and then by each stratum."""
    base = ["source", "role"]
    strata = {"overall": [], "igbp": ["igbp"], "representativeness": ["ri_class"], "site": ["site"]}
    if "aoa_class" in pairs.columns and pairs["aoa_class"].notna().any():
        strata["aoa"] = ["aoa_class"]
    tables = {}
    for name, extra in strata.items():
        sub = pairs.dropna(subset=extra) if extra else pairs
        if sub.empty:
            continue
        t = grouped_skill(sub, base + extra)
        if {"lo", "hi"} <= set(sub.columns):
            cov = sub.groupby(base + extra, sort=True, dropna=False, observed=True).apply(
                _interval_coverage, include_groups=False
            )
            t["interval_coverage"] = cov.to_numpy()
        tables[name] = t
    return tables


def _site_attrs(sites: pd.DataFrame) -> pd.DataFrame:
    igbp = sites["IGBP"] if "IGBP" in sites.columns else pd.Series("unknown", index=sites.index)
    out = pd.DataFrame({"igbp": igbp.astype("string").fillna("unknown")}, index=sites.index.astype(str))
    for col in ("REPRESENTATIVENESS", "RI"):
        if col in sites.columns:
            out["ri_table"] = pd.to_numeric(sites[col], errors="coerce").to_numpy()
            break
    out.index.name = "site"
    return out


def validate_maps(
    series: MapSeries,
    sites: pd.DataFrame,
    observations: pd.DataFrame,
    *,
    footprints: Mapping[str, FootprintWeights] | None = None,
    footprint_geobox: GeoBox | None = None,
    radius: float = 300.0,
    training_sites: Collection[str] | None = None,
    cv_predictions: pd.DataFrame | None = None,
    min_footprint_valid: float = 0.5,
) -> Validation:
    """Score a map time series against towers through their footprints, stratified.

    Parameters
    ----------
    series : the maps (:func:`open_maps`).
    sites : site table indexed by SITE_ID with LAT, LON (degrees) and IGBP; an optional ``REPRESENTATIVENESS``
        (or ``RI``) column overrides the map-based representativeness index.
    observations : aggregated QC-filtered tower NEE (``site``, ``time`` = period start, ``NEE`` in
        gC m-2 d-1), e.g. from :func:`geoflux.towers.aggregate` on the maps' periods.
    footprints, footprint_geobox : footprints and their grid (re-projected to the maps' grid); sites without
        one get a disk of ``radius`` m.
    training_sites : sites the map's model was trained on (model card ``provenance.sites``); None when
        unknown (an external product: every site is 'independent').
    cv_predictions : held-out predictions of the grouped CV (``site``, ``time``, ``obs``, ``pred``,
        optionally ``AOA``, ``lo``, ``hi``): scored as source 'cv', role 'held-out (CV)'.
    min_footprint_valid : drop site-steps whose valid footprint fraction Σw is below this (0-1).
    """
    fps = footprints_on_grid(sites, series.geobox, radius, footprints, footprint_geobox)
    if not fps:
        raise GridError(f"{series.source}: no tower footprint overlaps the map grid")
    vals = footprint_values(series, fps)
    obs = observations[["site", "time", "NEE"]].rename(columns={"NEE": "obs"})
    obs = obs.assign(site=obs["site"].astype(str), time=pd.to_datetime(obs["time"]))
    pairs = vals.merge(obs, on=["site", "time"], how="inner").rename(columns={"map": "pred"})
    n_low = int((pairs["fp_valid"] < min_footprint_valid).sum())
    pairs = pairs.loc[pairs["fp_valid"] >= min_footprint_valid].dropna(subset=["obs", "pred"])
    if training_sites is None:
        pairs["role"] = ROLE_INDEPENDENT
    else:
        train = {str(s) for s in training_sites}
        pairs["role"] = np.where(pairs["site"].isin(train), ROLE_TRAINING, ROLE_HELD_OUT)
    pairs.insert(0, "source", "map")
    attrs = _site_attrs(sites)
    ri_map = pd.Series(vals.attrs.get("ri", {}), dtype="float64")
    attrs["ri"] = attrs["ri_table"] if "ri_table" in attrs.columns else ri_map.reindex(attrs.index)
    frames = [pairs]
    if cv_predictions is not None and len(cv_predictions):
        cv = cv_predictions.copy()
        cv["site"] = cv["site"].astype(str)
        keep = [c for c in ("site", "time", "obs", "pred", "lo", "hi", "AOA") if c in cv.columns]
        cv = cv[keep].rename(columns={"AOA": "aoa"}).assign(source="cv", role=ROLE_CV)
        if "ri_table" not in attrs.columns:
            # the CV rows take the site's map-based index so both sources stratify alike
            attrs["ri"] = attrs["ri"].fillna(ri_map.reindex(attrs.index))
        frames.append(cv)
    allp = pd.concat(frames, ignore_index=True)
    allp = allp.merge(attrs[["igbp", "ri"]], left_on="site", right_index=True, how="left")
    allp["igbp"] = allp["igbp"].fillna("unknown")
    allp["ri_class"] = _ri_class(allp["ri"])
    if "aoa" in allp.columns:
        allp["aoa_class"] = np.where(
            allp["aoa"].isna(), None, np.where(allp["aoa"] >= 0.5, "inside", "outside")
        )
    tables = stratified_tables(allp)
    info = {
        "maps": series.source,
        "units": NEE_UNITS,
        "n_maps": len(series.times),
        "bands": list(series.bands),
        "interval": series.interval,
        "footprint_method": sorted({fw.method for fw in fps.values()}),
        "n_sites_on_map": len(fps),
        "min_footprint_valid": min_footprint_valid,
        "n_dropped_low_footprint_valid": n_low,
        "training_sites": sorted(map(str, training_sites)) if training_sites is not None else None,
        "representativeness": "site table" if "ri_table" in attrs.columns else "map (footprint vs 3x window)",
        "metrics": {
            "bias": "mean(pred - obs), gC m-2 d-1",
            "rmse": "gC m-2 d-1",
            "nse": "Nash-Sutcliffe efficiency 1 - SSE/SST",
            "r2_pearson": "squared Pearson correlation",
            "rma_slope": "reduced-major-axis slope of pred on obs",
        },
    }
    return Validation(allp, tables, info)


def tower_summary(
    val: Validation, footprints: Mapping[str, FootprintWeights] | None = None
) -> dict[str, Any]:
    """Pooled map-vs-tower scores from the paired table of :func:`validate_maps` (metrics.json ``towers``).

    The same pairs as the ``footprint_validation`` tables (source 'map', footprint-valid fraction at least
    ``min_footprint_valid``), pooled over every role, so the headline and the tables never disagree.

    Parameters
    ----------
    val : the validation of the maps.
    footprints : the footprints used (adds ``footprint_method`` per site).

    Returns
    -------
    :func:`geoflux.metrics.summary` of the map pairs (``nse``, ``r2_pearson``, ``rmse``, ``bias`` in
    gC m-2 d-1, ``n`` site-steps, per-site NSE median/p10, ``n_sites``; only ``n`` with fewer than two
    pairs) plus ``min_footprint_valid`` and ``footprint_method``.
    """
    pairs = val.pairs.loc[val.pairs["source"] == "map"]
    result: dict[str, Any] = summary(pairs) if len(pairs) > 1 else {"n": len(pairs)}
    result["min_footprint_valid"] = val.info.get("min_footprint_valid")
    if footprints is not None:
        result["footprint_method"] = {s: fw.method for s, fw in footprints.items()}
    return result


def write_validation(val: Validation, out_dir: str | Path) -> Path:
    """Write ``validation.json`` (info + tables), ``pairs.csv`` and ``skill_<stratum>.csv`` into ``out_dir``.

    Each file is written atomically; returns the JSON path.
    """
    import json

    from geoflux.atomic import atomic_path

    out = Path(out_dir)
    with atomic_path(out / "pairs.csv") as tmp:
        val.pairs.to_csv(tmp, index=False, float_format="%.5g")
    for name, table in val.tables.items():
        with atomic_path(out / f"skill_{name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "validation.json") as tmp:
        tmp.write_text(json.dumps(val.to_dict(), indent=2, default=str))
    return out / "validation.json"
