"""What governs NEE: grouped permutation importance, partial dependence with interaction strength, SHAP,
and the attribution of period anomalies to drivers through the model.

Importance is the increase of the held-out MSE ((gC m-2 d-1)²) when a driver is permuted, on site-grouped
folds; the land-cover class fractions are permuted together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.inspection import partial_dependence, permutation_importance
from sklearn.model_selection import GroupKFold

from geoflux.analysis.multiscale import _native_step
from geoflux.atomic import atomic_path
from geoflux.config import ModelSpec, RunConfig, VariableSpec
from geoflux.errors import ModelError
from geoflux.model import TrainedModel, cv_groups, make_estimator

log = logging.getLogger("geoflux")

NEE_UNITS = "gC m-2 d-1"


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
        est = make_estimator(spec, list(features)).fit(x[train], y[train])
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


# --------------------------------------------------------------------------------------------------------
# year-to-year budget attribution through the model, over the whole grid
# --------------------------------------------------------------------------------------------------------

COLLINEAR_R = 0.8
BUDGET_UNITS = "gC m-2 yr-1"


def step_of_year(periods: pd.DatetimeIndex) -> np.ndarray:
    """Position of each period within its calendar year (0 = the first period starting in that year).

    Periods at the same position in different years are "the same step" for a climatology: MODIS 8-day
    periods (restarting on 1 January), months and days of the year all line up this way.
    """
    periods = pd.DatetimeIndex(periods)
    return pd.Series(np.arange(len(periods))).groupby(periods.year.to_numpy()).cumcount().to_numpy()


def collinear_drivers(
    table: pd.DataFrame,
    drivers: Sequence[str],
    periods: pd.DatetimeIndex,
    threshold: float = COLLINEAR_R,
) -> dict[str, Any]:
    """Correlation of the driver anomalies at the tower sites, and the drivers too collinear to separate.

    The anomaly is what attribution moves: a driver's value minus its mean over years at the same site and
    step of the year (with one year only: minus the site's mean, i.e. the seasonal cycle). Pairs with
    \\|r\\| > ``threshold`` are flagged and joined into clusters (connected components): holding one member
    of a cluster at its climatology while the other keeps its anomaly asks the model about combinations
    the towers never saw, so such a driver's own contribution is not identifiable; the cluster's grouped
    effect is.

    Parameters
    ----------
    table : training table (``site``, ``time`` = period start, driver columns in physical units).
    drivers : the dynamic drivers to check.
    periods : the run's period starts (to find each row's step of the year).
    threshold : \\|r\\| above which two drivers are reported as collinear.

    Returns
    -------
    ``{"anomaly": "interannual" | "seasonal", "threshold", "r": {a: {b: r}}, "pairs": [[a, b, r], ...],
    "groups": {"a+b": [a, b], ...}}``.
    """
    t = pd.to_datetime(table["time"])
    pos = pd.Series(step_of_year(periods), index=pd.DatetimeIndex(periods))
    key = pos.reindex(pd.DatetimeIndex(t)).to_numpy()
    interannual = t.dt.year.nunique() >= 2 and not np.isnan(key).any()
    by = [table["site"], key] if interannual else [table["site"]]
    anom = table[list(drivers)] - table.groupby(by)[list(drivers)].transform("mean")
    r = anom.corr()
    pairs = [
        [a, b, float(r.loc[a, b])]
        for a, b in combinations(drivers, 2)
        if np.isfinite(r.loc[a, b]) and abs(r.loc[a, b]) > threshold
    ]
    # clusters: connected components of the flagged pairs
    parent = {d: d for d in drivers}

    def root(d: str) -> str:
        while parent[d] != d:
            d = parent[d]
        return d

    for a, b, _ in pairs:
        parent[root(b)] = root(a)
    clusters: dict[str, list[str]] = {}
    for d in drivers:
        clusters.setdefault(root(d), []).append(d)
    groups = {"+".join(m): m for m in clusters.values() if len(m) > 1}
    return {
        "anomaly": "interannual" if interannual else "seasonal",
        "threshold": threshold,
        "r": {a: {b: float(r.loc[a, b]) for b in drivers} for a in drivers},
        "pairs": pairs,
        "groups": groups,
    }


def _complete_years(cfg: RunConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The run's complete calendar years, and for the periods inside them: their index in the run, the
    year each belongs to (0..n-1) and its length in days."""
    from geoflux.analysis.budgets import overlap_days, year_windows

    starts, ends = cfg.period_bounds()
    names, idx, year_of, days = [], [], [], []
    for win in year_windows(cfg):
        w = overlap_days(starts, ends, win)
        if abs(w.sum() - win.days) > 1e-9:
            continue  # a year the map periods do not cover whole has no comparable budget
        k = np.flatnonzero(w > 0)
        if np.any(w[k] < (ends[k] - starts[k]) / pd.Timedelta(days=1) - 1e-9):
            continue  # a period straddling the new year (continuous steps): not one year's alone
        names.append(win.name)
        idx.append(k)
        year_of.append(np.full(len(k), len(names) - 1))
        days.append(w[k])
    if len(names) < 2:
        raise ModelError(
            f"time: {cfg.time.start}..{cfg.time.end} ({cfg.time.step}) holds {len(names)} complete calendar "
            "year(s) of map periods (expected two or more for year-to-year attribution)"
        )
    return names, np.concatenate(idx), np.concatenate(year_of), np.concatenate(days)


def year_matrices(
    periods: pd.DatetimeIndex, year_of: np.ndarray, days: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The two matrices attribution works with, for periods inside complete calendar years.

    Parameters
    ----------
    periods : period starts.
    year_of : index (0..n_years-1) of the year each period belongs to.
    days : days of each period inside its year.

    Returns
    -------
    ``year_w`` (year, period): days of each period in each year, so ``year_w @ nee`` is each year's budget
    (gC m-2 yr-1 from gC m-2 d-1); ``clim`` (period, period): averaging matrix giving each period the mean
    over years of its step of the year (:func:`step_of_year`).
    """
    year_of = np.asarray(year_of)
    year_w = np.zeros((int(year_of.max()) + 1, len(year_of)))
    year_w[year_of, np.arange(len(year_of))] = days
    pos = step_of_year(periods)
    same = (pos[:, None] == pos[None, :]).astype(float)
    return year_w, same / same.sum(axis=1, keepdims=True)


def _attribution_block(
    *blocks: np.ndarray,
    model: Any,
    variables: Sequence[VariableSpec],
    layers: Sequence[tuple[str, Sequence[int]]],
    year_w: np.ndarray,
    clim: np.ndarray,
) -> np.ndarray:
    """Per-pixel budget anomalies of one spatial chunk and their driver contributions.

    ``blocks``: one per variable, (time, y, x) or static (y, x). ``layers``: (name, feature columns held at
    climatology) per contribution. ``year_w`` (year, time): days of each period in each year. ``clim``
    (time, time): the averaging matrix giving each period the mean over years of its step of the year.
    Returns (year * n, y, x) float32: per year the anomaly, the contributions, then the interaction
    (anomaly minus the single-driver contributions), gC m-2 yr-1; then, when the model has an area of
    applicability, the share of the year's days (0-1) whose inputs are outside it: the run's own inputs,
    then each layer's counterfactual (its drivers at climatology). NaN where a driver is missing in any
    period.
    """
    from threadpoolctl import threadpool_limits

    from geoflux.features import pixel_features
    from geoflux.mapping.scheduler import Shared

    if isinstance(model, Shared):
        model = model.get()
    shape = next(b.shape for b in blocks if b.ndim == 3)
    values = {
        v.name: (np.broadcast_to(b, shape) if b.ndim == 2 else b)
        for v, b in zip(variables, blocks, strict=True)
    }
    feats = pixel_features(values, variables)  # (time, y, x, feature)
    nt, ny, nx, nf = feats.shape
    aoa = getattr(model, "aoa", None)
    n_years, n_lay = year_w.shape[0], 2 + len(layers) + (1 + len(layers) if aoa is not None else 0)
    out = np.full((n_years, n_lay, ny, nx), np.nan, dtype=np.float32)
    valid = np.isfinite(feats).all(axis=(0, 3))
    if valid.any():
        f = feats[:, valid].astype(np.float32)  # (time, pixel, feature)
        days = year_w.sum(axis=1, keepdims=True)

        def anomaly(x: np.ndarray) -> np.ndarray:
            with threadpool_limits(1, user_api="openmp"):
                nee = np.asarray(model.predict(x.reshape(-1, nf)), dtype=np.float64).reshape(nt, -1)
            b = year_w @ nee  # (year, pixel) gC m-2 yr-1
            return b - b.mean(axis=0)

        def outside(x: np.ndarray) -> np.ndarray:
            # The counterfactual asks the model about combinations of drivers; where they are unlike its
            # training data (DI above the AOA threshold) the contribution is an extrapolation.
            out_ = (aoa.di(x.reshape(-1, nf)) > aoa.threshold).reshape(nt, -1)
            return year_w @ out_ / days  # (year, pixel) share of the year's days

        a = anomaly(f)
        out[:, 0, valid] = a
        singles = np.zeros_like(a)
        first_share = 2 + len(layers)
        if aoa is not None:
            out[:, first_share, valid] = outside(f)
        for k, (_, cols) in enumerate(layers):
            held = f.copy()
            for j in cols:
                held[:, :, j] = (clim @ f[:, :, j].astype(np.float64)).astype(np.float32)
            c = a - anomaly(held)
            out[:, 1 + k, valid] = c
            if aoa is not None:
                out[:, first_share + 1 + k, valid] = outside(held)
            if len(cols) == 1:
                singles += c
        out[:, 1 + len(layers), valid] = a - singles
    return out.reshape(n_years * n_lay, ny, nx)


EXTRAPOLATION_RATIO = 1.5
EXTRAPOLATION_EXCESS = 0.02


def _extrapolated(frame: pd.DataFrame, layers: Sequence[str]) -> list[dict[str, Any]]:
    """The (year, driver) pairs of the region whose counterfactual leaves the AOA far more than the run.

    Holding a driver at its climatology while the others keep their anomaly asks the model about inputs
    the towers may never have seen; the model agrees with the data where it was trained, not there. A
    contribution whose counterfactual lies outside the AOA much more often than the run's own inputs is an
    extrapolation, whatever its size (bench/bench_attribution_limit.py: models trained on the world's
    exact fluxes misrank the drivers until counterfactual inputs are in their training data).
    """
    out = []
    for _, row in frame.loc[frame["region"] == "region"].iterrows():
        own = row["outside_aoa"]
        for d in layers:
            cf = row[f"outside_aoa_{d}"]
            if cf >= EXTRAPOLATION_RATIO * own and cf - own >= EXTRAPOLATION_EXCESS:
                out.append(
                    {
                        "year": str(row["year"]),
                        "driver": d,
                        "outside_aoa": float(cf),
                        "outside_aoa_run": float(own),
                        "message": f"{row['year']}: with {d} held at its climatology {cf:.1%} of the "
                        "pixel-days are outside the area of applicability (the run's own drivers: "
                        f"{own:.1%}); {d}'s contribution ({row[f'contrib_{d}']:+.1f} {BUDGET_UNITS}) is an "
                        "extrapolation of the model",
                    }
                )
    return out


def _layer_means(stack: Any, labels: Any, codes: Sequence[int]) -> np.ndarray:
    """(region, layer) means over the pixels valid in every layer; region 0 = all, then one per class."""
    import dask
    import dask.array as da

    n_reg, n_lay = 1 + len(codes), stack.shape[0]

    def sums(block: np.ndarray, lab: np.ndarray) -> np.ndarray:
        valid = np.isfinite(block).all(axis=0)
        out = np.zeros((n_reg, n_lay + 1))
        for r, sel in enumerate([valid, *[valid & (lab == c) for c in codes]]):
            out[r, 0] = sel.sum()
            out[r, 1:] = block[:, sel].sum(axis=1)
        return out[None, None]

    per_chunk = da.map_blocks(
        sums,
        stack,
        labels,
        dtype="float64",
        drop_axis=0,
        new_axis=[2, 3],
        chunks=((1,) * len(stack.chunks[1]), (1,) * len(stack.chunks[2]), (n_reg,), (n_lay + 1,)),
    )
    (total,) = dask.compute(per_chunk.sum(axis=(0, 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return total[:, 1:] / total[:, :1]


def year_attribution(
    cfg: RunConfig,
    *,
    threshold: float = COLLINEAR_R,
    write: bool = True,
    overwrite: bool = False,
    model: TrainedModel | None = None,
) -> dict[str, Any]:
    """Each year's budget anomaly decomposed into driver contributions through the model, over the grid.

    For every dynamic continuous driver d (and every cluster of collinear drivers, see
    :func:`collinear_drivers`), NEE is predicted for every pixel and period with d held at its
    climatology — per pixel, the mean over the complete years of the same step of the year — and the
    budgets are summed per year (NEE gC m-2 d-1 x days of each period). d's contribution to a year's
    anomaly (budget minus the mean over years) is anomaly(NEE) − anomaly(NEE with d at climatology), in
    gC m-2 yr-1, the generator's own definition (:func:`geoflux.demo.true_budgets`). The model is not
    additive: ``interaction`` is the anomaly minus the sum of the single-driver contributions.

    Lazy and chunk-wise: one dask task per spatial chunk holds all periods of its pixels, predicts them
    with each driver held in turn, and returns that chunk's per-year maps; the model enters the graph once.

    Parameters
    ----------
    cfg : the run configuration (two or more complete calendar years of periods; a trained model).
    threshold : \\|r\\| between driver anomalies at the towers above which drivers are grouped (warned).
    write : write ``analysis/attribution/<layer>_<year>.tif`` (COG, gC m-2 yr-1; layers ``anomaly``,
        ``contrib-<driver>``, ``contrib-<a+b>`` for clusters, ``interaction``; with an AOA also
        ``outside-aoa`` and ``outside-aoa-<driver>``, the share (1) of the year's days whose inputs, the
        run's or the counterfactual's, are outside it) and ``analysis/attribution_years.json``/``.csv``.
    overwrite : replace outputs that exist.
    model : the fitted model (default: the run's).

    Returns
    -------
    dict with ``years``, ``drivers``, ``groups``, ``collinearity``, ``warnings``, ``table`` (records: region,
    year, anomaly, contrib_<layer>…, interaction, outside_aoa, outside_aoa_<layer>…, first_driver,
    first_grouped), ``extrapolation`` (the rule and the flagged (year, driver) pairs; None without an AOA)
    and ``units``.
    """
    import dask
    import dask.array as da

    from geoflux.analysis.budgets import _class_labels, _open_stack
    from geoflux.cog import RasterSpec, write_cogs
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.features import feature_names
    from geoflux.mapping.predict import single_threaded
    from geoflux.model import load_model
    from geoflux.run import ATTRIBUTION_MAPS, ATTRIBUTION_YEARS, MODEL, TRAINING, layout

    run = layout(cfg)
    years, idx, year_of, days = _complete_years(cfg)
    if model is None:
        model = load_model(run.require(MODEL))
    features = feature_names(cfg.variables)
    if list(model.features) != features:
        raise ModelError(f"model features {model.features} differ from the configured drivers' {features}")
    dynamic = [v.name for v in cfg.variables if not v.static and v.kind == "continuous"]
    if not dynamic:
        raise ModelError("variables: no time-varying continuous driver to attribute anomalies to")
    periods = cfg.periods()
    table = run.read_parquet(TRAINING)
    col = collinear_drivers(table, dynamic, periods, threshold)
    warnings = [
        f"{a} and {b} are collinear at the tower sites (r = {r:+.2f} between their {col['anomaly']} "
        f"anomalies): their separate contributions are not identifiable; see the grouped effect "
        f"{next(g for g, m in col['groups'].items() if a in m)}"
        for a, b, r in col["pairs"]
    ]
    for w in warnings:
        log.warning("attribution: %s", w)
    layers = [(d, [features.index(d)]) for d in dynamic]
    layers += [(g, [features.index(d) for d in m]) for g, m in col["groups"].items()]
    names = ["anomaly", *[f"contrib_{n}" for n, _ in layers], "interaction"]
    shares = ["outside_aoa", *[f"outside_aoa_{n}" for n, _ in layers]] if model.aoa is not None else []
    names += shares

    n_years = len(years)
    year_w, clim = year_matrices(periods[idx], year_of, days)

    cube = cube_from_config(cfg)
    geobox = target_grid(cfg.grid)
    ref = next(cube[v.name].data for v in cfg.variables if cube[v.name].ndim == 3)
    ychunks, xchunks = ref.chunks[1], ref.chunks[2]
    args: list[Any] = []
    for v in cfg.variables:
        a = cube[v.name].data.astype(np.float32)
        if a.ndim == 3:
            args += [a[idx].rechunk((len(idx), ychunks, xchunks)), "tyx"]
        else:
            args += [a.rechunk((ychunks, xchunks)), "yx"]
    res = da.blockwise(
        _attribution_block,
        "kyx",
        *args,
        new_axes={"k": n_years * len(names)},
        concatenate=True,
        dtype=np.float32,
        model=dask.delayed(single_threaded(model), pure=True, traverse=False),
        variables=list(cfg.variables),
        layers=layers,
        year_w=year_w,
        clim=clim,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    labels, codes, class_var = _class_labels(cfg, geobox, cfg.grid.chunk)
    labels = labels.rechunk((ychunks, xchunks))
    folder = run.path(ATTRIBUTION_MAPS)
    paths = [folder / f"{n.replace('_', '-')}_{y}.tif" for y in years for n in names]
    if write:
        import geoflux

        tags = {
            "software": f"geoflux {geoflux.__version__}",
            "quantity": "contribution to the year's NEE budget anomaly (positive = towards a source)",
            "method": "model prediction with the driver(s) held at their per-pixel climatology",
            "years": ",".join(years),
        }
        share_tags = {
            **tags,
            "quantity": "share of the year's days whose inputs are outside the area of applicability "
            "(outside_aoa: the run's drivers; outside_aoa_<driver>: with the driver held at its climatology)",
        }
        specs = [
            RasterSpec(
                p,
                units="1" if n in shares else BUDGET_UNITS,
                description=f"{n} {y}",
                tags={**(share_tags if n in shares else tags), "year": y, "layer": n},
            )
            for p, (y, n) in zip(paths, [(y, n) for y in years for n in names], strict=True)
        ]
        write_cogs([res[k] for k in range(len(paths))], geobox, specs, overwrite=overwrite)
        # the table from the maps as written (cheap to read; predicting twice is not)
        stack = _open_stack(paths, cfg.grid.chunk, geobox).rechunk((-1, ychunks, xchunks))
    else:
        stack = res
    means = _layer_means(stack, labels, codes).reshape(1 + len(codes), n_years, len(names))
    regions = ["region", *[f"{class_var}={c}" for c in codes]]
    rows = []
    for r, region in enumerate(regions):
        for k, y in enumerate(years):
            row: dict[str, Any] = {"region": region, "year": y}
            row.update({n: float(means[r, k, j]) for j, n in enumerate(names)})
            singles = {d: row[f"contrib_{d}"] for d in dynamic}
            row["first_driver"] = max(singles, key=lambda d: abs(singles[d]))
            grouped = {g: row[f"contrib_{g}"] for g in col["groups"]}
            grouped |= {d: c for d, c in singles.items() if not any(d in m for m in col["groups"].values())}
            row["first_grouped"] = max(grouped, key=lambda d: abs(grouped[d]))
            rows.append(row)
    frame = pd.DataFrame(rows)
    extrapolated = _extrapolated(frame, [n for n, _ in layers]) if shares else []
    for e in extrapolated:
        log.warning("attribution: %s", e["message"])
    out = {
        "method": "per pixel and period, NEE predicted with the driver (group) held at its climatology (mean "
        "over the complete years of the same step of the year); contribution = anomaly(budget) - "
        "anomaly(budget with the driver at climatology); interaction = anomaly - sum of single-driver "
        "contributions",
        "units": f"{BUDGET_UNITS} (NEE budget anomaly against the mean over the complete years)",
        "years": years,
        "drivers": dynamic,
        "groups": col["groups"],
        "collinearity": col,
        "warnings": warnings + [e["message"] for e in extrapolated],
        "extrapolation": {
            "rule": "a driver's counterfactual is flagged when the share of the year's pixel-days outside "
            f"the AOA is at least {EXTRAPOLATION_RATIO:g} x the run's own and "
            f"{EXTRAPOLATION_EXCESS * 100:g} percentage points above it",
            "flagged": extrapolated,
        }
        if shares
        else None,
        "maps": [str(p) for p in paths] if write else [],
        "table": frame.to_dict(orient="records"),
    }
    if write:
        run.write_json(ATTRIBUTION_YEARS, out)
        csv = run.path(ATTRIBUTION_YEARS).with_suffix(".csv")
        with atomic_path(csv) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4f")
    return out
