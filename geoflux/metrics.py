"""Skill scores shared by cross-validation and map validation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def scores(obs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """R² (coefficient of determination, 1 − SSE/SST, = NSE), RMSE, bias (pred − obs) and n.

    NaN pairs are ignored. Units of RMSE and bias are those of the inputs.
    """
    obs = np.asarray(obs, dtype=float)
    pred = np.asarray(pred, dtype=float)
    ok = ~(np.isnan(obs) | np.isnan(pred))
    o, p = obs[ok], pred[ok]
    n = int(ok.sum())
    if n < 2:
        return {"r2": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": n}
    sse = float(((p - o) ** 2).sum())
    sst = float(((o - o.mean()) ** 2).sum())
    return {
        "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
        "rmse": float(np.sqrt(sse / n)),
        "bias": float((p - o).mean()),
        "n": n,
    }


def per_site_scores(df: pd.DataFrame, obs: str = "obs", pred: str = "pred") -> pd.DataFrame:
    """Scores per site (NSE is R² against the site's own mean)."""
    rows = []
    for site, g in df.groupby("site", sort=True):
        s = scores(g[obs].to_numpy(), g[pred].to_numpy())
        rows.append({"site": site, "nse": s["r2"], "rmse": s["rmse"], "bias": s["bias"], "n": s["n"]})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, obs: str = "obs", pred: str = "pred") -> dict[str, float]:
    """Pooled R²/RMSE/bias plus the median and 10th-percentile per-site NSE and per-site median RMSE."""
    pooled = scores(df[obs].to_numpy(), df[pred].to_numpy())
    sites = per_site_scores(df, obs, pred)
    return {
        **pooled,
        "nse_site_median": float(sites["nse"].median()),
        "nse_site_p10": float(sites["nse"].quantile(0.1)),
        "rmse_site_median": float(sites["rmse"].median()),
        "n_sites": len(sites),
    }
