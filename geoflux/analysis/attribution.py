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
