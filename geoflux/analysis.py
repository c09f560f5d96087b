"""Analysis of a trained run: multi-scale skill, driver attribution, inter-annual variability, scenarios.

Answers the questions an upscaling run is for — how good is it on unseen sites and at which time scale,
which drivers govern NEE and how they interact, why budgets vary between periods, and how NEE responds to
a changed climate — from the run's own files (training table, CV predictions, model, driver cube).

* :func:`multiscale_scores` — the FLUXtrapolation protocol (Jung et al. 2011; Tramontana et al. 2016) on
  held-out predictions at towers: native step, weekly, monthly, mean seasonal cycle, anomalies,
  inter-annual variability and across-site means; per-site NSE and RMSE over sites plus pooled scores.
* :func:`grouped_permutation_importance` — permutation importance on site-grouped CV folds, with the
  features of one driver (the land-cover class fractions) permuted together.
* :func:`dependence` — partial dependence of the top drivers and 2-D dependence of the top pairs with an
  interaction strength; SHAP values when ``shap`` is installed.
* :func:`iav_attribution` — period NEE anomalies over a pixel sample and the part each driver's anomaly
  contributes through the model.
* :func:`scenario_projection` — documented driver perturbations, re-prediction and the fraction of
  pixels leaving the area of applicability.
* :func:`aoa_truth_scores` — generated worlds: map-vs-truth scores inside and outside the area of
  applicability, chunk by chunk.
* :func:`analyze` — all of the above for a run configuration, written under ``analysis/``.

Units: NEE and its errors in gC m-2 d-1 (MSE in (gC m-2 d-1)²); importance is the increase of the held-out
MSE when a driver is permuted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.inspection import partial_dependence, permutation_importance
from sklearn.model_selection import GroupKFold

from geoflux.atomic import atomic_path
from geoflux.config import ModelSpec, RunConfig, VariableSpec
from geoflux.errors import GeofluxError, ModelError
from geoflux.metrics import scores
from geoflux.model import TrainedModel, cv_groups, make_estimator

log = logging.getLogger("geoflux")

NEE_UNITS = "gC m-2 d-1"
ANALYSIS_DIR = "analysis"

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


# --------------------------------------------------------------------------------------------------------
# driver attribution
# --------------------------------------------------------------------------------------------------------


def driver_groups(
    features: Sequence[str], variables: Sequence[VariableSpec] | None = None
) -> dict[str, list]:
    """Features per driver: a categorical driver's class fractions form one group, others are alone."""
    groups: dict[str, list[str]] = {}
    cats = {
        v.name: [f"{v.name}_{c}" for c in v.classes or []] for v in variables or [] if v.kind == "categorical"
    }
    claimed = {f for fs in cats.values() for f in fs}
    for f in features:
        if f in claimed:
            name = next(k for k, fs in cats.items() if f in fs)
            groups.setdefault(name, []).append(f)
        else:
            groups[f] = [f]
    return groups


class _DriverView(RegressorMixin, BaseEstimator):
    """A fitted estimator seen through one integer column per driver holding row numbers.

    scikit-learn's :func:`~sklearn.inspection.permutation_importance` permutes columns one at a time;
    through this view a permuted column moves all of a driver's features (e.g. every land-cover class
    fraction) together, so a categorical driver is scored as one driver, not as independent fractions.
    """

    def __init__(self, estimator: Any = None, x: np.ndarray | None = None, cols: tuple = ()) -> None:
        self.estimator = estimator
        self.x = x
        self.cols = cols

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _DriverView:
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        rows = np.asarray(X, dtype=np.int64)
        full = np.empty((rows.shape[0], self.x.shape[1]), dtype=self.x.dtype)
        for g, cols in enumerate(self.cols):
            full[:, cols] = self.x[rows[:, g]][:, cols]
        return self.estimator.predict(full)


def grouped_permutation_importance(
    table: pd.DataFrame,
    features: Sequence[str],
    spec: ModelSpec,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_folds: int = 5,
    n_repeats: int = 5,
    sites: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Permutation importance of each driver on held-out folds of the grouped CV.

    For each fold (GroupKFold over the spec's CV groups, by site by default) a fresh model is trained on
    the other folds and each driver's features are permuted jointly within the held-out fold. A driver
    the model only needs to recognise a site (not to generalise to new ones) gets no credit.

    Parameters
    ----------
    table : training table (``site``, ``time``, features, ``NEE`` gC m-2 d-1).
    features : feature columns, in model order.
    spec : model spec (estimator kind/params, CV grouping, seed).
    groups : driver → its features (default: one per feature); see :func:`driver_groups`.
    n_folds : folds of the GroupKFold (≤ number of groups).
    n_repeats : permutations per driver and fold.
    sites : site table, for ``cv: spatial_block``.

    Returns
    -------
    One row per driver, most important first: ``driver``, ``importance`` (mean increase of held-out MSE,
    (gC m-2 d-1)²), ``importance_std`` (over folds), ``relative`` (share of the sum of positive importances),
    ``rank``.
    """
    groups = dict(groups or {f: [f] for f in features})
    index = {f: i for i, f in enumerate(features)}
    cols = tuple(np.array([index[f] for f in fs]) for fs in groups.values())
    x = table[list(features)].to_numpy(np.float32)
    y = table["NEE"].to_numpy(np.float64)
    labels, _ = cv_groups(table, spec, sites)
    k = min(n_folds, len(np.unique(labels)))
    if k < 2:
        raise ModelError("importance needs at least two CV groups")
    per_fold, weights = [], []
    for f, (train, test) in enumerate(GroupKFold(n_splits=k).split(x, y, labels)):
        est = make_estimator(spec).fit(x[train], y[train])
        view = _DriverView(est, x[test], cols)
        rows = np.repeat(np.arange(len(test))[:, None], len(cols), axis=1)
        r = permutation_importance(
            view,
            rows,
            y[test],
            scoring="neg_mean_squared_error",
            n_repeats=n_repeats,
            random_state=spec.seed + f,
        )
        per_fold.append(r.importances_mean)
        weights.append(len(test))
    imp = np.average(np.array(per_fold), axis=0, weights=weights)
    std = np.array(per_fold).std(axis=0)
    out = pd.DataFrame({"driver": list(groups), "importance": imp, "importance_std": std})
    pos = out["importance"].clip(lower=0)
    out["relative"] = pos / pos.sum() if pos.sum() > 0 else 0.0
    out = out.sort_values("importance", ascending=False, ignore_index=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def _label(name: str, units: Mapping[str, str]) -> str:
    u = units.get(name, "")
    return f"{name} ({u})" if u else name


def dependence(
    model: TrainedModel,
    table: pd.DataFrame,
    drivers: Sequence[str],
    out_dir: str | Path,
    *,
    n_pairs: int = 3,
    grid_resolution: int = 20,
    max_rows: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Partial dependence of NEE on each driver and 2-D dependence for the top pairs, as PNG and CSV.

    Parameters
    ----------
    model : the fitted model.
    table : training table (its feature columns are the background data).
    drivers : continuous features to show, most important first; pairs are formed from the first
        ``n_pairs`` + 1 of them.
    out_dir : folder for ``pd_<driver>.png``, ``pd2_<a>__<b>.png`` and ``partial_dependence.csv``.

    Returns
    -------
    ``{"plots": [...], "interactions": [{"pair": [a, b], "h2": ...}]}``, where ``h2`` is Friedman's H²
    evaluated on the PD grid: the share of the 2-D partial dependence's variance not explained by the two
    1-D dependences (0 = additive).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    feats = list(model.features)
    x = table[feats].to_numpy(np.float32)
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    est = model.estimator
    units = model.feature_units
    rows, plots = [], []
    pd1: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in drivers:
        j = feats.index(name)
        r = partial_dependence(est, x, [j], grid_resolution=grid_resolution, kind="average")
        grid, avg = r["grid_values"][0], r["average"][0]
        pd1[name] = (grid, avg)
        rows += [{"driver": name, "value": float(g), "nee": float(a)} for g, a in zip(grid, avg, strict=True)]
        fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
        ax.plot(grid, avg, color="k")
        ax.set_xlabel(_label(name, units))
        ax.set_ylabel(f"partial dependence of NEE ({model.target_units})")
        fig.tight_layout()
        path = out_dir / f"pd_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        plots.append(str(path))
    pd.DataFrame(rows).to_csv(out_dir / "partial_dependence.csv", index=False)
    interactions = []
    top = list(drivers)[: n_pairs + 1]
    for a, b in list(combinations(top, 2))[:n_pairs]:
        ja, jb = feats.index(a), feats.index(b)
        r = partial_dependence(est, x, [(ja, jb)], grid_resolution=grid_resolution, kind="average")
        ga, gb = r["grid_values"]
        z = r["average"][0]  # (len(ga), len(gb))
        # Friedman's H² on the grid: variance of the 2-D PD not explained by the centred 1-D PDs
        za = np.interp(ga, *pd1[a])
        zb = np.interp(gb, *pd1[b])
        za, zb = za - za.mean(), zb - zb.mean()
        zc = z - z.mean()
        h2 = (
            float(((zc - za[:, None] - zb[None, :]) ** 2).sum() / (zc**2).sum()) if (zc**2).sum() > 0 else 0.0
        )
        interactions.append({"pair": [a, b], "h2": h2})
        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
        cs = ax.contourf(ga, gb, z.T, levels=12, cmap="RdYlGn_r")
        fig.colorbar(cs, ax=ax, label=f"NEE ({model.target_units})")
        ax.set_xlabel(_label(a, units))
        ax.set_ylabel(_label(b, units))
        ax.set_title(f"2-D partial dependence (H² = {h2:.2f})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"pd2_{a}__{b}.png"
        fig.savefig(path)
        plt.close(fig)
        plots.append(str(path))
    return {"plots": plots, "interactions": interactions}


def shap_importance(
    model: TrainedModel, table: pd.DataFrame, out_dir: str | Path, max_rows: int = 500, seed: int = 0
) -> dict[str, float] | None:
    """Mean |SHAP| per feature (gC m-2 d-1) and a summary plot, or None when ``shap`` is not installed."""
    try:
        import shap
    except ImportError:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = table[list(model.features)]
    if len(x) > max_rows:
        x = x.sample(max_rows, random_state=seed)
    try:
        values = shap.TreeExplainer(model.estimator).shap_values(x.to_numpy(np.float32))
    except Exception as exc:  # shap does not support every estimator; the rest of the analysis still runs
        log.warning("shap: %s", exc)
        return None
    shap.summary_plot(values, x, show=False)
    plt.gcf().savefig(Path(out_dir) / "shap_summary.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return dict(zip(model.features, map(float, np.abs(values).mean(axis=0)), strict=True))


# --------------------------------------------------------------------------------------------------------
# pixel samples, inter-annual variability, scenarios
# --------------------------------------------------------------------------------------------------------


def sample_drivers(cfg: RunConfig, n_pixels: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Driver values at a fixed random sample of pixels for every time step (lazy cube, points only).

    Returns
    -------
    Long table: ``pixel``, ``row``, ``col``, ``time``, one column per driver (physical units; categorical
    drivers as class codes), ``valid`` (no driver missing).
    """
    import xarray as xr

    from geoflux.cube import cube_from_config

    cube = cube_from_config(cfg)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    rng = np.random.default_rng(seed)
    flat = rng.choice(ny * nx, size=min(n_pixels, ny * nx), replace=False)
    rows, cols = np.divmod(flat, nx)
    iy, ix = xr.DataArray(rows, dims="pixel"), xr.DataArray(cols, dims="pixel")
    pts = cube[[v.name for v in cfg.variables]].isel(y=iy, x=ix).compute()
    times = pd.to_datetime(pts["time"].values)
    frame = {
        "pixel": np.tile(np.arange(len(flat)), len(times)),
        "row": np.tile(rows, len(times)),
        "col": np.tile(cols, len(times)),
        "time": np.repeat(times, len(flat)),
    }
    for v in cfg.variables:
        a = pts[v.name].values
        a = np.broadcast_to(a, (len(times), len(flat))) if a.ndim == 1 else a
        frame[v.name] = a.reshape(-1).astype(np.float64)
    df = pd.DataFrame(frame)
    df["valid"] = df[[v.name for v in cfg.variables]].notna().all(axis=1)
    return df


def _features(sample: pd.DataFrame, variables: Sequence[VariableSpec]) -> np.ndarray:
    from geoflux.features import pixel_features

    return pixel_features({v.name: sample[v.name].to_numpy() for v in variables}, variables)


def _regions(sample: pd.DataFrame, variables: Sequence[VariableSpec]) -> dict[str, np.ndarray]:
    regions = {"all": np.ones(len(sample), bool)}
    cat = next((v for v in variables if v.kind == "categorical"), None)
    if cat is not None:
        for c in cat.classes or []:
            regions[f"{cat.name}={c}"] = sample[cat.name].to_numpy() == c
    return regions


def iav_attribution(
    model: TrainedModel,
    sample: pd.DataFrame,
    variables: Sequence[VariableSpec],
    period: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Period NEE anomalies per region and the contribution of each driver's anomaly through the model.

    For each driver d, NEE is re-predicted with d held at its climatology; the driver's contribution to a
    period's anomaly is the anomaly of (NEE − NEE with d at climatology). Contributions need not sum to the
    anomaly (the model is not additive): the remainder is reported as ``interaction``.

    Parameters
    ----------
    model : fitted model.
    sample : :func:`sample_drivers` output (pixels × time steps).
    variables : driver definitions (static drivers have no anomaly and are skipped).
    period : ``"year"`` (climatology = the pixel's mean over years for the same day of year) or
        ``"month"`` (climatology = the pixel's mean over the whole record). With years, contributions of an
        additive model sum to the anomaly when every year has the same time steps (e.g. MODIS 8-day
        composites restarting on 1 January). Default: year when the sample spans ≥ 2 years, else month
        (then the "anomalies" are the seasonal deviations from the record mean).

    Returns
    -------
    Long table (``region``, ``period``, ``nee``, ``anomaly``, ``contrib_<driver>`` …, ``interaction``;
    gC m-2 d-1, means over the region's pixels and the period's steps) and a dict with the period kind,
    the drivers and, per region, the mean absolute contribution of each driver (its share of the anomaly).
    """
    s = sample.loc[sample["valid"]].reset_index(drop=True)
    t = pd.to_datetime(s["time"])
    years = t.dt.year
    if period is None:
        period = "year" if years.nunique() >= 2 else "month"
    if period == "year":
        key = years.to_numpy()
        # day-of-year bins one time step wide, so that steps of different years meet in one bin even when
        # the steps do not restart on 1 January
        step_days = max(int(_native_step(t) / pd.Timedelta("1D")), 1)
        clim_groups = [s["pixel"], (t.dt.dayofyear.to_numpy() - 1) // step_days]
    else:
        key = t.dt.to_period("M").dt.start_time.to_numpy()
        clim_groups = [s["pixel"]]
    x = _features(s, variables)
    base = model.predict(x)
    dynamic = [v for v in variables if not v.static and v.kind == "continuous"]
    frame = pd.DataFrame({"period": key, "nee": base})
    for v in dynamic:
        clim = s.groupby(clim_groups)[v.name].transform("mean")
        xs = _features(s.assign(**{v.name: clim}), variables)
        frame[f"d_{v.name}"] = base - model.predict(xs)
    rows = []
    for region, mask in _regions(s, variables).items():
        if not mask.any():
            continue
        per = frame.loc[mask].groupby("period").mean()
        anom = per - per.mean()
        out = pd.DataFrame({"region": region, "period": per.index, "nee": per["nee"], "anomaly": anom["nee"]})
        for v in dynamic:
            out[f"contrib_{v.name}"] = anom[f"d_{v.name}"].to_numpy()
        out["interaction"] = out["anomaly"] - out[[f"contrib_{v.name}" for v in dynamic]].sum(axis=1)
        rows.append(out.reset_index(drop=True))
    table = pd.concat(rows, ignore_index=True)
    shares = {}
    for region, g in table.groupby("region"):
        mag = {v.name: float(g[f"contrib_{v.name}"].abs().mean()) for v in dynamic}
        total = sum(mag.values())
        shares[region] = {k: (m / total if total > 0 else 0.0) for k, m in mag.items()}
    info = {
        "period": period,
        "note": (
            "one year only: monthly deviations from the record mean are attributed instead of IAV"
            if period == "month"
            else "annual anomalies against the mean over years"
        ),
        "drivers": [v.name for v in dynamic],
        "share_of_abs_contribution": shares,
        "units": NEE_UNITS,
    }
    return table, info


def _esat(t: np.ndarray) -> np.ndarray:
    """Saturation vapour pressure (hPa) at t (degC), Magnus formula."""
    return 6.1078 * np.exp(17.27 * t / (t + 237.3))


@dataclass(frozen=True)
class Scenario:
    """A documented driver perturbation.

    ``changes`` maps a driver to ``(op, value)``: ``("add", v)`` adds v (driver units), ``("scale", f)``
    multiplies by f, ``("vpd_at_constant_rh", dT)`` recomputes VPD (hPa) for air temperature ``ta`` (degC)
    raised by dT at unchanged relative humidity. Drivers absent from the run are ignored (and listed).
    """

    name: str
    description: str
    changes: tuple[tuple[str, str, float], ...]

    def _change(self, var: str, op: str, value: float, col: Any, ta: Any) -> Any:
        if op == "add":
            return col + value
        if op == "scale":
            return col * value
        if op == "vpd_at_constant_rh":
            if ta is None:
                raise GeofluxError(f"scenario {self.name}: {var} at constant humidity needs the driver 'ta'")
            return col * _esat(ta + value) / _esat(ta)
        raise GeofluxError(f"scenario {self.name}: unknown operation '{op}'")

    def apply(self, sample: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """The perturbed copy of a driver table and the drivers of the scenario it does not have."""
        out = sample.copy()
        skipped = []
        ta = sample["ta"] if "ta" in sample else None
        for var, op, value in self.changes:
            if var not in out:
                skipped.append(var)
                continue
            out[var] = self._change(var, op, value, out[var], ta)
        return out, skipped

    def apply_features(self, x: np.ndarray, features: Sequence[str]) -> np.ndarray:
        """The perturbed copy of a (n, n_features) feature array (e.g. one map chunk), same column order.

        For scenario maps: ``model.predict_bands(scenario.apply_features(x, model.features))`` per chunk.
        """
        out = np.array(x, dtype=np.float64, copy=True)
        idx = {f: i for i, f in enumerate(features)}
        ta = x[:, idx["ta"]].astype(np.float64) if "ta" in idx else None
        for var, op, value in self.changes:
            if var in idx:
                out[:, idx[var]] = self._change(var, op, value, out[:, idx[var]], ta)
        return out.astype(np.asarray(x).dtype)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "warming_2K",
        "+2 K air temperature with land-surface temperature following and VPD at constant relative humidity",
        (("ta", "add", 2.0), ("lst", "add", 2.0), ("vpd", "vpd_at_constant_rh", 2.0)),
    ),
    Scenario("ta_plus_2K", "+2 K air temperature only (other drivers unchanged)", (("ta", "add", 2.0),)),
    Scenario(
        "drying_20pct",
        "-20 % precipitation and relative soil moisture",
        (("precip", "scale", 0.8), ("sm", "scale", 0.8)),
    ),
)


def scenario_projection(
    model: TrainedModel,
    sample: pd.DataFrame,
    variables: Sequence[VariableSpec],
    scenarios: Sequence[Scenario] = SCENARIOS,
) -> pd.DataFrame:
    """Re-predict a pixel sample under each scenario and flag predictions leaving the area of applicability.

    Returns
    -------
    One row per scenario and region: mean NEE before/after and the change (gC m-2 d-1), the fraction of
    pixel-steps inside the AOA before and after, and the fraction that leave it (inside before, outside
    after) — changes there are extrapolations the towers cannot vouch for.
    """
    s = sample.loc[sample["valid"]].reset_index(drop=True)
    x0 = _features(s, variables)
    b0 = model.predict_bands(x0)
    has_aoa = "AOA" in model.bands
    a_idx = model.bands.index("AOA") if has_aoa else None
    rows = []
    for sc in scenarios:
        s1, skipped = sc.apply(s)
        b1 = model.predict_bands(_features(s1, variables))
        for region, m in _regions(s, variables).items():
            if not m.any():
                continue
            row: dict[str, Any] = {
                "scenario": sc.name,
                "region": region,
                "nee_base": float(b0[m, 0].mean()),
                "nee_scenario": float(b1[m, 0].mean()),
                "delta_nee": float((b1[m, 0] - b0[m, 0]).mean()),
                "skipped_drivers": ",".join(skipped),
                "description": sc.description,
            }
            if has_aoa:
                in0, in1 = b0[m, a_idx] == 1, b1[m, a_idx] == 1
                row |= {
                    "aoa_base": float(in0.mean()),
                    "aoa_scenario": float(in1.mean()),
                    "left_aoa": float((in0 & ~in1).mean()),
                    "delta_nee_inside_aoa": float((b1[m, 0] - b0[m, 0])[in1].mean()) if in1.any() else np.nan,
                }
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# maps against the truth, inside and outside the area of applicability
# --------------------------------------------------------------------------------------------------------

_STATS = ("n", "so", "soo", "sp", "see", "covered")


def _block_stats(*blocks: np.ndarray, model: TrainedModel, variables: Sequence[VariableSpec]) -> np.ndarray:
    from geoflux.features import pixel_features

    *drivers, truth = blocks
    values = {v.name: np.broadcast_to(b, truth.shape) for v, b in zip(variables, drivers, strict=True)}
    feats = pixel_features(values, variables).reshape(-1, len(model.features))
    o = np.asarray(truth, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(feats).any(axis=1) & np.isfinite(o)
    out = np.zeros((2, len(_STATS)))  # row 0 inside AOA, row 1 outside
    if not ok.any():
        return out
    bands = model.predict_bands(feats[ok]).astype(np.float64)
    o = o[ok]
    p = bands[:, 0]
    inside = bands[:, model.bands.index("AOA")] == 1 if "AOA" in model.bands else np.ones(len(p), bool)
    if model.quantile_models is not None:
        covered = (o >= bands[:, 1]) & (o <= bands[:, 2])
    else:
        covered = np.zeros(len(p), bool)
    for r, m in enumerate((inside, ~inside)):
        oo, pp = o[m], p[m]
        out[r] = (m.sum(), oo.sum(), (oo * oo).sum(), pp.sum(), ((pp - oo) ** 2).sum(), covered[m].sum())
    return out


def _stats_to_scores(s: np.ndarray) -> dict[str, float]:
    n, so, soo, sp, see, cov = s
    if n < 2:
        return {"nse": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": int(n)}
    sst = soo - so * so / n
    return {
        "nse": float(1 - see / sst) if sst > 0 else float("nan"),
        "rmse": float(np.sqrt(see / n)),
        "bias": float((sp - so) / n),
        "n": int(n),
        "band_covers_truth": float(cov / n),
    }


def aoa_truth_scores(cfg: RunConfig, model: TrainedModel | None = None) -> dict[str, Any]:
    """Map-vs-truth NSE (1 − SSE/SST), RMSE and bias inside and outside the area of applicability.

    Generated worlds only.

    Predicts from the model and the driver cube chunk by chunk (one task per chunk, the model entering the
    graph once) and compares with the truth rasters of ``cfg.truth``; only sums leave each task, so memory
    does not grow with the map. The scores equal those of the written maps (same model, same cube).

    Returns
    -------
    ``{"inside": {...}, "outside": {...}, "all": {...}, "aoa_fraction": f, "threshold": t}``, each score
    dict with ``nse``, ``rmse``, ``bias`` (gC m-2 d-1), ``n`` (pixel-steps) and ``band_covers_truth`` (the
    fraction of true values inside the uncertainty band).
    """
    import glob

    import dask
    import rioxarray

    from geoflux.cube import cube_from_config
    from geoflux.model import load_model
    from geoflux.run import MODEL

    if not cfg.truth:
        raise GeofluxError("truth: the configuration has no truth rasters (generated worlds only)")
    if model is None:
        model = load_model(cfg.out_dir / MODEL)
    cube = cube_from_config(cfg)
    ref = next(cube[v.name] for v in cfg.variables if "time" in cube[v.name].dims)
    truths = sorted(glob.glob(str(cfg.path(cfg.truth))))
    if len(truths) != ref.sizes["time"]:
        raise GeofluxError(f"{cfg.truth}: {len(truths)} truth rasters for {ref.sizes['time']} time steps")
    chunks = ref.data.chunks
    truth = [
        rioxarray.open_rasterio(p, chunks={"x": chunks[2][0], "y": chunks[1][0]}, masked=True)
        .squeeze("band", drop=True)
        .data
        for p in truths
    ]
    tstack = dask.array.stack(truth).rechunk(chunks)
    if tstack.shape != ref.shape:
        raise GeofluxError(
            f"{truths[0]}: truth grid {tstack.shape[1:]} differs from the run grid {ref.shape[1:]}"
        )
    arrays = [cube[v.name].data for v in cfg.variables]
    model_node = dask.delayed(model, pure=True, traverse=False)
    tasks = []
    for it in range(len(chunks[0])):
        for iy in range(len(chunks[1])):
            for ix in range(len(chunks[2])):
                blocks = [a.blocks[iy, ix] if a.ndim == 2 else a.blocks[it, iy, ix] for a in arrays]
                tasks.append(
                    dask.delayed(_block_stats)(
                        *blocks, tstack.blocks[it, iy, ix], model=model_node, variables=list(cfg.variables)
                    )
                )
    total = np.sum(dask.compute(*tasks), axis=0)
    inside, outside = total
    res: dict[str, Any] = {
        "inside": _stats_to_scores(inside),
        "outside": _stats_to_scores(outside),
        "all": _stats_to_scores(inside + outside),
        "aoa_fraction": float(inside[0] / max(inside[0] + outside[0], 1)),
        "units": NEE_UNITS,
    }
    if model.aoa is not None:
        res["threshold"] = model.aoa.threshold
    return res


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------


def _write_json(obj: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return path


def _bar_plot(df: pd.DataFrame, x: str, y: str, err: str | None, ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar(df[x].astype(str), df[y], yerr=df[err] if err else None, color="0.4")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _iav_plot(table: pd.DataFrame, drivers: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = table.loc[table["region"] == "all"]
    labels = [str(p)[:10] for p in g["period"]]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    pos, neg = np.zeros(len(g)), np.zeros(len(g))
    for d in [*drivers, "interaction"]:
        col = "interaction" if d == "interaction" else f"contrib_{d}"
        v = g[col].to_numpy()
        bottom = np.where(v >= 0, pos, neg)
        ax.bar(labels, v, bottom=bottom, label=d)
        pos += np.clip(v, 0, None)
        neg += np.clip(v, None, 0)
    ax.plot(labels, g["anomaly"], "k.-", label="NEE anomaly")
    ax.set_ylabel(f"NEE anomaly ({NEE_UNITS})")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def analyze(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    n_pixels: int = 2000,
    importance_folds: int = 5,
    n_repeats: int = 5,
    scenarios: Sequence[Scenario] = SCENARIOS,
    truth: bool = True,
) -> dict[str, Any]:
    """Everything ``geoflux analyze CONFIG`` produces, from a run that has been trained.

    Reads ``training/training.parquet``, ``model/model.skops`` and ``model/cv_predictions.parquet`` under
    ``cfg.output``; writes into ``out_dir`` (default ``<output>/analysis``): ``analysis.json`` (the returned
    dict), ``multiscale.txt``/``.csv``, ``importance.csv``/``.png``, ``pd_*.png``, ``pd2_*.png``,
    ``partial_dependence.csv``, ``iav.csv``/``.png``, ``scenarios.csv`` and, with ``shap`` installed,
    ``shap_summary.png``.

    Parameters
    ----------
    cfg : the run configuration.
    out_dir : output folder.
    n_pixels : pixels sampled from the cube for the IAV attribution and the scenarios.
    importance_folds, n_repeats : grouped folds and permutations of the importance.
    scenarios : driver perturbations to project.
    truth : also score the model against the truth inside/outside the AOA when ``cfg.truth`` is set.
    """
    from geoflux.features import feature_names
    from geoflux.model import load_model
    from geoflux.run import CV_PREDICTIONS, MODEL, TRAINING, load_sites

    out = Path(out_dir) if out_dir is not None else cfg.out_dir / ANALYSIS_DIR
    for rel, stage in ((TRAINING, "extract"), (MODEL, "train"), (CV_PREDICTIONS, "train")):
        if not (cfg.out_dir / rel).exists():
            raise GeofluxError(f"{cfg.out_dir / rel}: not found (run 'geoflux {stage}' first)")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are there: a refused run leaves nothing
    table = pd.read_parquet(cfg.out_dir / TRAINING)
    model = load_model(cfg.out_dir / MODEL)
    features = feature_names(cfg.variables)
    if list(model.features) != features:
        raise ModelError(f"model features {model.features} differ from the configured drivers' {features}")
    result: dict[str, Any] = {"units": NEE_UNITS}

    cv_pred = pd.read_parquet(cfg.out_dir / CV_PREDICTIONS)
    ms = multiscale_scores(cv_pred)
    result["multiscale"] = ms
    text = multiscale_table(ms)
    (out / "multiscale.txt").write_text(text + "\n")
    pd.DataFrame(ms["scales"]).T.rename_axis("scale").to_csv(out / "multiscale.csv")

    sites = load_sites(cfg)
    groups = driver_groups(features, cfg.variables)
    imp = grouped_permutation_importance(
        table, features, cfg.model, groups, n_folds=importance_folds, n_repeats=n_repeats, sites=sites
    )
    imp.to_csv(out / "importance.csv", index=False)
    _bar_plot(
        imp,
        "driver",
        "importance",
        "importance_std",
        "held-out MSE increase ((gC m-2 d-1)²)",
        out / "importance.png",
    )
    result["importance"] = imp.to_dict(orient="records")

    continuous = [d for d in imp["driver"] if d in features]
    result["dependence"] = dependence(model, table, continuous[:4], out, seed=cfg.model.seed)
    shap_vals = shap_importance(model, table, out, seed=cfg.model.seed)
    result["shap"] = shap_vals if shap_vals is not None else "shap not installed"

    sample = sample_drivers(cfg, n_pixels=n_pixels, seed=cfg.model.seed)
    iav, iav_info = iav_attribution(model, sample, cfg.variables)
    iav.to_csv(out / "iav.csv", index=False)
    _iav_plot(iav, iav_info["drivers"], out / "iav.png")
    result["iav"] = iav_info

    sc = scenario_projection(model, sample, cfg.variables, scenarios)
    sc.to_csv(out / "scenarios.csv", index=False)
    result["scenarios"] = sc.loc[sc["region"] == "all"].to_dict(orient="records")

    if truth and cfg.truth:
        result["truth_aoa"] = aoa_truth_scores(cfg, model)
    _write_json(result, out / "analysis.json")
    return result
