"""Skill scores shared by cross-validation and map validation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def scores(obs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pooled skill of predictions against observations (NaN pairs ignored).

    Parameters
    ----------
    obs, pred : array-like, same units (e.g. NEE in gC m-2 d-1).

    Returns
    -------
    dict with ``nse`` (Nash–Sutcliffe efficiency 1 − SSE/SST, the coefficient of determination against the
    observations' mean; ≤ 1, penalizes bias and scale), ``r2_pearson`` (squared Pearson correlation, 0..1,
    blind to bias and scale), ``rmse`` and ``bias`` = mean(pred − obs) (units of the inputs) and ``n``
    pairs. NaN where fewer than 2 pairs or no variance.
    """
    obs = np.asarray(obs, dtype=float)
    pred = np.asarray(pred, dtype=float)
    ok = ~(np.isnan(obs) | np.isnan(pred))
    o, p = obs[ok], pred[ok]
    n = int(ok.sum())
    nan = float("nan")
    if n < 2:
        return {"nse": nan, "r2_pearson": nan, "rmse": nan, "bias": nan, "n": n}
    sse = float(((p - o) ** 2).sum())
    sst = float(((o - o.mean()) ** 2).sum())
    # a constant prediction has no correlation (np.corrcoef would warn and return NaN)
    r = float(np.corrcoef(o, p)[0, 1]) if sst > 0 and float(p.std()) > 0 else nan
    return {
        "nse": 1.0 - sse / sst if sst > 0 else nan,
        "r2_pearson": r * r,
        "rmse": float(np.sqrt(sse / n)),
        "bias": float((p - o).mean()),
        "n": n,
    }


def per_site_scores(df: pd.DataFrame, obs: str = "obs", pred: str = "pred") -> pd.DataFrame:
    """:func:`scores` per site (``site``, ``nse`` against the site's own mean, ``rmse``, ``bias``, ``n``)."""
    rows = []
    for site, g in df.groupby("site", sort=True):
        s = scores(g[obs].to_numpy(), g[pred].to_numpy())
        rows.append({"site": site, "nse": s["nse"], "rmse": s["rmse"], "bias": s["bias"], "n": s["n"]})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, obs: str = "obs", pred: str = "pred") -> dict[str, float]:
    """Pooled :func:`scores` (``nse``, ``r2_pearson``, ``rmse``, ``bias``, ``n``) plus the median and
    10th-percentile per-site NSE, the per-site median RMSE (gC m-2 d-1 for NEE) and ``n_sites``."""
    pooled = scores(df[obs].to_numpy(), df[pred].to_numpy())
    sites = per_site_scores(df, obs, pred)
    return {
        **pooled,
        "nse_site_median": float(sites["nse"].median()),
        "nse_site_p10": float(sites["nse"].quantile(0.1)),
        "rmse_site_median": float(sites["rmse"].median()),
        "n_sites": len(sites),
    }


def skill(obs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Validation scores of predictions against observations (NaN pairs ignored).

    Parameters
    ----------
    obs, pred : array-like, same units (e.g. NEE in gC m-2 d-1).

    Returns
    -------
    dict with
        ``n`` pairs; ``bias`` mean(pred − obs) and ``rmse`` (units of the inputs); ``mae`` (units of the
        inputs); ``r2_pearson`` the squared Pearson correlation (0..1, insensitive to bias and scale);
        ``nse`` the Nash–Sutcliffe efficiency 1 − SSE/SST (≤ 1, penalizes bias and scale); ``rma_slope`` the
        reduced-major-axis slope sign(r)·sd(pred)/sd(obs) (1 for an unbiased scale; < 1 when predictions
        are damped); ``rma_intercept`` (units of the inputs). NaN where fewer than 2 pairs or no variance.
    """
    o = np.asarray(obs, dtype=float).ravel()
    p = np.asarray(pred, dtype=float).ravel()
    ok = np.isfinite(o) & np.isfinite(p)
    o, p = o[ok], p[ok]
    n = int(o.size)
    nan = float("nan")
    out = dict.fromkeys(("bias", "rmse", "mae", "r2_pearson", "nse", "rma_slope", "rma_intercept"), nan)
    out = {"n": n, **out}
    if n == 0:
        return out
    d = p - o
    out["bias"] = float(d.mean())
    out["rmse"] = float(np.sqrt((d * d).mean()))
    out["mae"] = float(np.abs(d).mean())
    if n < 2:
        return out
    so, sp = float(o.std()), float(p.std())
    sst = float(((o - o.mean()) ** 2).sum())
    if sst > 0:
        out["nse"] = 1.0 - float((d * d).sum()) / sst
    if so > 0 and sp > 0:
        r = float(np.corrcoef(o, p)[0, 1])
        out["r2_pearson"] = r * r
        # RMA (geometric mean) regression: symmetric in obs and pred, so noise in the tower data does
        # not flatten the slope the way an ordinary least-squares fit of pred on obs would
        out["rma_slope"] = float(np.sign(r) * sp / so) if r != 0 else nan
        out["rma_intercept"] = float(p.mean() - out["rma_slope"] * o.mean())
    return out


def grouped_skill(
    df: pd.DataFrame, by: str | list[str], obs: str = "obs", pred: str = "pred"
) -> pd.DataFrame:
    """:func:`skill` per group of ``df`` plus the number of sites per group (``n_sites``).

    Parameters
    ----------
    df : paired table with ``obs``/``pred`` columns (and ``site`` for ``n_sites``).
    by : grouping column(s).

    Returns
    -------
    One row per group: the group keys, ``n_sites`` and the :func:`skill` entries.
    """
    keys = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in df.groupby(keys, sort=True, dropna=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        row["n_sites"] = int(g["site"].nunique()) if "site" in g.columns else 0
        row.update(skill(g[obs].to_numpy(), g[pred].to_numpy()))
        rows.append(row)
    cols = [*keys, "n_sites", *skill(np.array([]), np.array([])).keys()]
    return pd.DataFrame(rows, columns=cols)


def summarize_metrics(metrics: dict) -> str:
    """A short human summary of metrics.json (NSE = 1 − SSE/SST; r² (Pearson) = squared correlation).

    RMSE and bias are in the metrics' ``units`` (gC m-2 d-1).
    """

    def num(d: dict, key: str, fmt: str = ".3f") -> str:
        v = d.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "–"

    lines = [f"NEE maps validated (units {metrics.get('units', '?')}):"]
    if "truth" in metrics:
        t = metrics["truth"]
        lines.append(
            f"  map vs true field : NSE {num(t, 'nse')}  RMSE {num(t, 'rmse')}  bias {num(t, 'bias', '+.3f')}"
            f"  (n={t.get('n')} pixel-steps)"
        )
    if "cv" in metrics:
        c = metrics["cv"]
        lines.append(
            f"  {c.get('scheme', 'grouped')} CV: NSE {num(c, 'nse')}  r² (Pearson) {num(c, 'r2_pearson')}  "
            f"RMSE {num(c, 'rmse')}  median site NSE {num(c, 'nse_site_median')}  ({c.get('n_sites')} sites)"
        )
    if "towers" in metrics and "nse" in metrics["towers"]:
        w = metrics["towers"]
        lines.append(
            f"  map vs towers (footprint-weighted): NSE {num(w, 'nse')}  "
            f"r² (Pearson) {num(w, 'r2_pearson')}  RMSE {num(w, 'rmse')}  bias {num(w, 'bias', '+.3f')}"
            f"  (n={w.get('n')} site-steps)"
        )
    return "\n".join(lines)
