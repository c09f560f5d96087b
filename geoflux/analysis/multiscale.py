"""Multi-scale skill of held-out tower predictions (the FLUXtrapolation protocol).

Jung et al. 2011; Tramontana et al. 2016: native step, weekly, monthly, mean seasonal cycle, anomalies,
inter-annual variability and across-site means; per-site NSE and RMSE over sites plus pooled scores.
Units: gC m-2 d-1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from geoflux.metrics import scores

NEE_UNITS = "gC m-2 d-1"

# --------------------------------------------------------------------------------------------------------
# multi-scale evaluation
# --------------------------------------------------------------------------------------------------------

_SCALE_ORDER = ("native", "daily", "weekly", "monthly", "seasonal_cycle", "anomaly", "iav", "across_site")


def _native_step(times: pd.Series) -> pd.Timedelta:
    d = pd.Series(np.sort(pd.to_datetime(times).unique())).diff().dropna()
    return d.min() if len(d) else pd.Timedelta("1D")


def _scale_scores(df: pd.DataFrame, per_site: bool = True) -> dict[str, float]:
    """Pooled scores plus the distribution of per-site NSE and RMSE over sites."""
    d = df.dropna(subset=["obs", "pred"])
    out: dict[str, float] = scores(d["obs"].to_numpy(), d["pred"].to_numpy())
    if per_site:
        rows = [scores(g["obs"].to_numpy(), g["pred"].to_numpy()) for _, g in d.groupby("site")]
        nse = np.array([r["nse"] for r in rows], dtype=float)
        rmse = np.array([r["rmse"] for r in rows], dtype=float)
        ok_nse, ok_rmse = nse[np.isfinite(nse)], rmse[np.isfinite(rmse)]
        out["nse_site_median"] = float(np.median(ok_nse)) if ok_nse.size else float("nan")
        # "90th percentile over sites" taken in the bad direction: 90 % of sites do better than these
        out["nse_site_p10"] = float(np.percentile(ok_nse, 10)) if ok_nse.size else float("nan")
        out["rmse_site_median"] = float(np.median(ok_rmse)) if ok_rmse.size else float("nan")
        out["rmse_site_p90"] = float(np.percentile(ok_rmse, 90)) if ok_rmse.size else float("nan")
        out["n_sites"] = int(np.isfinite(nse).sum())
    return out


def multiscale_frames(pairs: pd.DataFrame, min_fraction: float = 0.0) -> dict[str, pd.DataFrame]:
    """Paired series (``site``, ``time``, ``obs``, ``pred``) at every scale of the protocol.

    Aggregates use only time steps where both the observation and the prediction exist, so both sides
    of a pair average the same steps; a daily, weekly or monthly value needs at least ``min_fraction`` of
    its period's native steps (e.g. 0.5 for half-hourly data with night gaps).
    The mean seasonal cycle is the site's mean per calendar month over years; anomalies are native
    values minus the site's seasonal cycle of that month; inter-annual variability is the site's annual
    means minus its mean over years (sites with ≥ 2 years only); the across-site level is one mean per
    site.
    """
    d = pairs.dropna(subset=["obs", "pred"]).copy()
    d["time"] = pd.to_datetime(d["time"])
    step = _native_step(d["time"])
    out: dict[str, pd.DataFrame] = {"native": d[["site", "time", "obs", "pred"]]}
    cols = ["obs", "pred"]

    def aggregate(freq: str, length: pd.Timedelta) -> pd.DataFrame:
        g = d.groupby(["site", pd.Grouper(key="time", freq=freq)])[cols]
        agg = g.mean().assign(count=g.size())
        agg = agg.loc[agg["count"] >= min_fraction * (length / step)]
        return agg[cols].reset_index()

    if step < pd.Timedelta("1D"):
        out["daily"] = aggregate("1D", pd.Timedelta("1D"))
    if step < pd.Timedelta("7D"):
        out["weekly"] = aggregate("7D", pd.Timedelta("7D"))
    out["monthly"] = aggregate("MS", pd.Timedelta("30.44D"))
    moy = d["time"].dt.month
    msc = d.groupby([d["site"], moy])[cols].transform("mean")
    out["seasonal_cycle"] = (
        out["monthly"]
        .assign(moy=lambda m: m["time"].dt.month)
        .groupby(["site", "moy"])[cols]
        .mean()
        .reset_index()
        .rename(columns={"moy": "time"})
    )
    out["anomaly"] = d[["site", "time"]].assign(obs=d["obs"] - msc["obs"], pred=d["pred"] - msc["pred"])
    annual = d.groupby(["site", d["time"].dt.year])[cols].mean()
    n_years = annual.groupby(level="site").size()
    multi = n_years[n_years >= 2].index
    if len(multi):
        a = annual.loc[annual.index.get_level_values("site").isin(multi)]
        out["iav"] = (a - a.groupby(level="site").transform("mean")).reset_index()
    out["across_site"] = d.groupby("site")[cols].mean().reset_index().assign(time=0)
    return out


def multiscale_scores(pairs: pd.DataFrame, min_fraction: float = 0.0) -> dict[str, Any]:
    """Scores of held-out predictions at each scale of the FLUXtrapolation protocol.

    Parameters
    ----------
    pairs : ``site``, ``time``, ``obs``, ``pred`` (gC m-2 d-1), e.g. the CV predictions.
    min_fraction : see :func:`multiscale_frames`.

    Returns
    -------
    ``{"native_step": "8 days", "scales": {scale: {nse, r2_pearson, rmse, bias, n, nse_site_median,
    nse_site_p10, rmse_site_median, rmse_site_p90, n_sites}}, "skipped": {scale: reason}}`` (RMSE and bias in
    gC m-2 d-1). The across-site level has
    one value per site, so it has pooled scores only.
    """
    frames = multiscale_frames(pairs, min_fraction)
    step = _native_step(pd.to_datetime(pairs["time"]))
    res: dict[str, Any] = {"native_step": _step_name(step), "units": NEE_UNITS, "scales": {}, "skipped": {}}
    for name in _SCALE_ORDER:
        if name not in frames:
            res["skipped"][name] = {
                "iav": "needs at least two years at a site",
                "daily": "native step is a day or longer",
                "weekly": "native step is a week or longer",
            }[name]
            continue
        res["scales"][name] = _scale_scores(frames[name], per_site=name != "across_site")
    return res


def _step_name(step: pd.Timedelta) -> str:
    if step >= pd.Timedelta("1D"):
        return f"{step / pd.Timedelta('1D'):g} days"
    return f"{step / pd.Timedelta('1min'):g} min"


def multiscale_table(ms: Mapping[str, Any]) -> str:
    """A readable fixed-width table of :func:`multiscale_scores` (one line per scale)."""
    head = (
        f"{'scale':<15}{'n':>7}{'NSE':>8}{'r² (Pearson)':>14}{'RMSE':>8}{'bias':>8}{'sites':>7}"
        f"{'NSE med':>9}{'NSE p10':>9}{'RMSE med':>10}{'RMSE p90':>10}"
    )
    lines = [f"held-out skill by time scale (native step {ms['native_step']}; {ms['units']})", head]
    for name, s in ms["scales"].items():
        label = f"{ms['native_step']}" if name == "native" else name.replace("_", " ")

        def f(key: str, width: int, s: Mapping = s) -> str:
            v = s.get(key, float("nan"))
            return f"{v:>{width}.3f}" if isinstance(v, float) and np.isfinite(v) else f"{'-':>{width}}"

        sites = s.get("n_sites", "-")
        lines.append(
            f"{label:<15}{s['n']:>7}{f('nse', 8)}{f('r2_pearson', 14)}{f('rmse', 8)}"
            f"{f('bias', 8)}{sites!s:>7}"
            f"{f('nse_site_median', 9)}{f('nse_site_p10', 9)}{f('rmse_site_median', 10)}"
            f"{f('rmse_site_p90', 10)}"
        )
    for name, why in ms.get("skipped", {}).items():
        lines.append(f"{name.replace('_', ' '):<15}skipped: {why}")
    return "\n".join(lines)
