"""Model stage: fit a regressor on the training table, validate it by group, save/load safely.

Validation is always grouped (by site by default; or spatial blocks, climate bins, or temporal blocks):
random-row splits leak a site's own data into its test fold and overstate skill.

Besides NEE, a fitted model can give

* an uncertainty band (``NEE_q05``/``NEE_q95`` for a 90 % band): conformalized quantile regression
  (Romano et al. 2019) — two gradient-boosting quantile regressors (``uncertainty: quantile``), or one
  gradient-boosting model of the absolute residual's ``interval`` quantile around NEE (``residual``: a
  symmetric band at half the prediction cost), widened by a margin taken from the grouped-CV held-out
  scores so that the band holds its nominal coverage on sites the model has not seen; the margin grows with
  the dissimilarity index where held-out errors do (:func:`_di_scaled_margin`), and with footprints the
  scores are those of held-out pixels against a pseudo-truth (``model.band_contrast``);
* the area of applicability (Meyer & Pebesma 2021): the dissimilarity index ``DI`` (distance to the nearest
  training sample in importance-weighted standardized predictor space, divided by the mean distance between
  training samples) and ``AOA`` (1 where DI is at most the threshold derived from the cross-validated
  training DI, else 0). DI is computed per chunk with a KD-tree rebuilt from the stored training points.

Model files are written with skops (no code runs on load): one file holding a dict of the estimators and
arrays, next to a JSON card with the feature list, units, training domain, provenance and the SHA-256 of the
skops file. Loading refuses a file whose hash does not match or that contains types outside the expected
libraries (scikit-learn, numpy, LightGBM, XGBoost).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import skops.io as sio
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.inspection import permutation_importance
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut
from threadpoolctl import threadpool_limits

import geoflux
from geoflux.atomic import atomic_path
from geoflux.config import ModelSpec
from geoflux.errors import ModelError
from geoflux.features import harden_class_fractions
from geoflux.footprint_fit import (
    DRAWS_PER_ROW,
    QUANTILE_DRAWS,
    FootprintRows,
    choose_hedge,
    fit_pixels,
    footprint_rows,
    predict_towers,
    rows_with_pixels,
    stable_predict,
)
from geoflux.metrics import per_site_scores, scores, summary

TARGET_UNITS = "gC m-2 d-1"


class PartitionedRegressor(RegressorMixin, BaseEstimator):
    """NEE = RECO − GPP from two regressors, one per partitioned flux (``model.target: partitioned``).

    Respiration and photosynthesis answer to the drivers differently (RECO grows with temperature, GPP
    falls with dry air); in NEE their responses partly cancel, and a single model of NEE, fitted on a few
    towers whose drivers share one seasonal cycle, credits an effect to whichever collinear driver splits
    best. The towers' night-time records separate the two (README 'Why budgets differ between years, and
    projection').

    Parameters
    ----------
    reco, gpp : unfitted (for :meth:`fit`) or fitted regressors of RECO and GPP, gC m-2 d-1.
    """

    def __init__(self, reco: RegressorMixin, gpp: RegressorMixin) -> None:
        self.reco = reco
        self.gpp = gpp

    def fit(
        self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> PartitionedRegressor:
        """Fit both heads; ``y`` is (n, 2): RECO and GPP, gC m-2 d-1."""
        y = np.asarray(y, dtype=np.float64)
        kw = {} if sample_weight is None else {"sample_weight": sample_weight}
        self.reco.fit(x, y[:, 0], **kw)
        self.gpp.fit(x, y[:, 1], **kw)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        from sklearn.utils.validation import check_is_fitted

        try:
            check_is_fitted(self.reco)
            check_is_fitted(self.gpp)
        except Exception:
            return False
        return True

    def predict(self, x: np.ndarray) -> np.ndarray:
        """NEE (gC m-2 d-1) = predicted RECO − predicted GPP."""
        return stable_predict(self.reco, x) - stable_predict(self.gpp, x)


_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "lightgbm.", "xgboost.", "collections.OrderedDict")
_FORMAT_VERSION = 2  # 1: the skops file is the bare estimator; 2: a dict of estimators and arrays


@dataclass
class AOA:
    """What the area of applicability needs at prediction time (all in the model's feature order).

    ``points`` are the training samples in weighted standardized space, ``(x - center) / scale * weights``;
    ``dbar`` is the mean distance between them and ``threshold`` the DI above which a prediction is outside.
    """

    center: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    points: np.ndarray
    dbar: float
    threshold: float
    _tree: cKDTree | None = field(default=None, repr=False, compare=False)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.center) / self.scale * self.weights

    def di(self, x: np.ndarray) -> np.ndarray:
        """Dissimilarity index (dimensionless) of each row of ``x``: exact nearest-neighbour distance."""
        if self._tree is None:  # rebuilt on first use after load: the tree itself is never serialized
            # Leaves of 32 points, split at the midpoint: the same exact nearest neighbour, found ~10 %
            # faster than with scipy's defaults on the demo's AOA points (then 40,000) in 11 dimensions.
            self._tree = cKDTree(self.points, leafsize=32, balanced_tree=False)
        dist, _ = self._tree.query(self.transform(x), k=1)
        return dist / self.dbar


@dataclass
class TrainedModel:
    """A fitted estimator and what it needs to be applied honestly elsewhere."""

    estimator: RegressorMixin
    features: list[str]
    feature_units: dict[str, str]
    target_units: str = TARGET_UNITS
    domain: dict[str, list[float]] = field(default_factory=dict)  # feature → [min, max] seen in training
    provenance: dict = field(default_factory=dict)

    bands: tuple[str, ...] = ("NEE",)  # output bands of predict_bands, NEE first
    # (lower, upper) quantile models, or (scale,): one model of the absolute residual's interval quantile
    quantile_models: tuple[RegressorMixin, ...] | None = None
    interval: float = 0.9  # nominal coverage of the band
    conformal_margin: float = 0.0  # gC m-2 d-1 added on both sides (from grouped-CV scores)
    # the margin grows with dissimilarity: margin x (1 + slope x DI / AOA threshold); 0 = a flat margin
    margin_di_slope: float = 0.0
    aoa: AOA | None = None
    train_di: np.ndarray | None = field(default=None, repr=False)  # cross-validated DI of training rows
    # held-out band (lo, hi) of every CV row under the map's rule (DI-scaled margin); for train(), not saved
    cv_band: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predict NEE (gC m-2 d-1) for a (n, n_features) float array (the same bits on every run)."""
        return stable_predict(self.estimator, x)

    def predict_interval(
        self, x: np.ndarray, nee: np.ndarray | None = None, di: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound (gC m-2 d-1) of the ``interval`` band; raises if the model has none.

        ``nee`` and ``di`` (the point prediction and the dissimilarity index of ``x``) are computed here
        when not given.
        """
        if self.quantile_models is None:
            raise ModelError("model was trained without uncertainty (model.uncertainty: none)")
        nee = self.predict(x) if nee is None else nee
        lo, hi = raw_bounds(self.quantile_models, x, nee)
        return _band(nee, lo, hi, self.margin(x, di))

    def margin(self, x: np.ndarray, di: np.ndarray | None = None) -> float | np.ndarray:
        """The conformal margin (gC m-2 d-1) for the rows of ``x``: flat, or growing with their DI."""
        if self.margin_di_slope <= 0 or self.aoa is None:
            return self.conformal_margin
        di = self.aoa.di(x) if di is None else np.asarray(di, dtype=np.float64)
        return self.conformal_margin * (1.0 + self.margin_di_slope * di / self.aoa.threshold)

    def predict_bands(self, x: np.ndarray) -> np.ndarray:
        """All output bands for a (n, n_features) array: (n, len(bands)) float32, NEE in column 0.

        Bands (as listed in :attr:`bands`): ``NEE`` (gC m-2 d-1); with uncertainty the lower and upper
        bound of the band (gC m-2 d-1, e.g. ``NEE_q05``, ``NEE_q95``); with an area of applicability ``DI``
        (dimensionless) and ``AOA`` (1 inside, 0 outside).
        """
        x = np.asarray(x, dtype=np.float32)
        nb = 1 + 2 * (self.quantile_models is not None) + 2 * (self.aoa is not None)
        out = np.empty((len(x), nb), dtype=np.float32)  # filled column by column: no float64 stack
        nee = np.asarray(self.predict(x))
        out[:, 0] = nee
        di = self.aoa.di(x) if self.aoa is not None else None
        k = 1
        if self.quantile_models is not None:
            lo, hi = self.predict_interval(x, nee, di)
            out[:, k], out[:, k + 1] = lo, hi
            k += 2
        if di is not None:
            out[:, k], out[:, k + 1] = di, di <= self.aoa.threshold
        return out


def raw_bounds(
    models: tuple[RegressorMixin, ...], x: np.ndarray, nee: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated lower and upper bound (gC m-2 d-1) from the band's models, before the conformal margin.

    Two models: their lower and upper quantile predictions. One model: it predicts the ``interval``
    quantile of the absolute residual (gC m-2 d-1), and the band is ``nee`` -/+ that (a scale below 0, which
    the pinball loss does not exclude, counts as 0).
    """
    if len(models) == 1:
        s = np.maximum(models[0].predict(x), 0.0)
        return nee - s, nee + s
    return models[0].predict(x), models[1].predict(x)


def _band(nee: np.ndarray, lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    # Independently fitted quantile models can cross each other or miss the point prediction; the band is
    # kept ordered and around NEE so a map never shows a lower bound above its own NEE.
    lo2 = np.minimum(np.minimum(lo, hi) - margin, nee)
    hi2 = np.maximum(np.maximum(lo, hi) + margin, nee)
    return lo2, hi2


def band_names(spec: ModelSpec) -> tuple[str, ...]:
    """Output bands a model trained with ``spec`` will have."""
    names = ["NEE"]
    if spec.uncertainty != "none":
        lo, hi = _quantile_levels(spec.interval)
        names += [f"NEE_q{lo * 100:02.0f}", f"NEE_q{hi * 100:02.0f}"]
    if spec.aoa:
        names += ["DI", "AOA"]
    return tuple(names)


def _quantile_levels(interval: float) -> tuple[float, float]:
    return (1 - interval) / 2, 1 - (1 - interval) / 2


# The default model (README "Choosing the model", bench/bench_model_choice.py): 200 boosting iterations of
# depth-6 trees plus one residual band model visit 2,086 nodes per pixel where the 200-tree fully grown
# forest plus two quantile models visited 3,148 (mixed-landscape world), with truth NSE 0.921 vs 0.914
# there. A fixed number of iterations
# (no early stopping): early stopping would hold out random pixel draws, i.e. footprints of towers the
# model also trains on, which says nothing about new sites.
BOOSTING_DEFAULTS: dict[str, Any] = {
    "max_iter": 200,
    "max_depth": 6,
    "max_leaf_nodes": 31,
    "learning_rate": 0.1,
    "early_stopping": False,
}


def make_estimator(spec: ModelSpec, features: Sequence[str] | None = None) -> RegressorMixin:
    """The configured regressor; ``spec.params`` override the defaults.

    ``features`` (the columns the estimator will be fitted on, in order) resolves ``spec.monotonic``.

    LightGBM and XGBoost are optional extras (``pip install geoflux[boost]``); a clear error says so when the
    configured one is not installed.
    """
    est = _construct(spec, _monotonic(spec, features))
    # scikit-learn checks parameter values only in fit; check them now so a bad value is a config error
    # (LightGBM/XGBoost wrappers inherit the method without scikit-learn's parameter constraints)
    check = getattr(est, "_validate_params", None)
    if check is not None and type(est).__module__.startswith("sklearn."):
        try:
            check()
        except (ValueError, TypeError) as exc:
            raise ModelError(f"model.params: {str(exc).splitlines()[0]}") from None
    return est


def _monotonic(spec: ModelSpec, features: Sequence[str] | None) -> list[int] | None:
    """``spec.monotonic`` as one sign per feature column, or None when there is no constraint."""
    if not any(spec.monotonic.values()):
        return None
    if features is None:
        raise ModelError("model.monotonic: the estimator was built without its feature names")
    bad = sorted(set(spec.monotonic) - set(features))
    if bad:
        raise ModelError(
            f"model.monotonic: unknown feature(s) {bad} (expected some of {', '.join(features)})"
        )
    return [int(spec.monotonic.get(f, 0)) for f in features]


def _construct(spec: ModelSpec, mono: list[int] | None = None) -> RegressorMixin:
    params = dict(spec.params)
    if mono is not None:  # each library's own name for the sign constraints
        if spec.kind in ("lightgbm", "xgboost"):
            params["monotone_constraints"] = tuple(mono) if spec.kind == "xgboost" else mono
        else:
            params["monotonic_cst"] = mono
    try:
        if spec.kind == "random_forest":
            return RandomForestRegressor(
                **{"n_estimators": 200, "n_jobs": -1, "random_state": spec.seed, **params}
            )
        if spec.kind == "lightgbm":
            lgb = _optional("lightgbm")
            return lgb.LGBMRegressor(
                **{
                    "n_estimators": 300,
                    "learning_rate": 0.05,
                    "random_state": spec.seed,
                    "verbose": -1,
                    **params,
                }
            )
        if spec.kind == "xgboost":
            xgb = _optional("xgboost")
            return xgb.XGBRegressor(
                **{"n_estimators": 300, "learning_rate": 0.05, "random_state": spec.seed, **params}
            )
        return HistGradientBoostingRegressor(**{**BOOSTING_DEFAULTS, "random_state": spec.seed, **params})
    except TypeError as exc:
        raise ModelError(f"model.params: {exc}") from None


def _optional(name: str) -> Any:
    if importlib.util.find_spec(name) is None:
        raise ModelError(f"model.kind: {name} is not installed (pip install {name}, or use random_forest)")
    return importlib.import_module(name)


def _quantile_estimator(spec: ModelSpec, q: float) -> RegressorMixin:
    # Gradient boosting with the pinball loss whatever the point model is: scikit-learn's random forest
    # has no quantile mode, and boosting quantiles are cheap to predict per map chunk.
    return HistGradientBoostingRegressor(loss="quantile", quantile=q, random_state=spec.seed)


def _fit_band(
    spec: ModelSpec, est: RegressorMixin, x: np.ndarray, y: np.ndarray
) -> tuple[RegressorMixin, ...]:
    """The models of the ``spec.interval`` band, fitted on (x, y): see :func:`raw_bounds`.

    ``quantile``: the lower and upper quantile regressors. ``residual``: one regressor of the
    ``interval`` quantile of ``|y - est(x)|`` (in-sample residuals of the point model ``est``: they
    understate its error on new sites, which the conformal margin from the grouped CV makes up for).
    """
    q_lo, q_hi = _quantile_levels(spec.interval)
    # One OpenMP thread: on small tables the thread start-up and spin-waiting cost more than they save,
    # many times over when other processes share the cores.
    with threadpool_limits(limits=1, user_api="openmp"):
        if spec.uncertainty == "residual":
            resid = np.abs(y - stable_predict(est, x))
            return (_quantile_estimator(spec, spec.interval).fit(x, resid),)
        return (
            _quantile_estimator(spec, q_lo).fit(x, y),
            _quantile_estimator(spec, q_hi).fit(x, y),
        )


# Below this many fitted rows, model fitting and prediction during training run on one OpenMP thread
# (HistGradientBoosting, LightGBM): thread start-up and spin-waiting cost more than they save, many times
# over when other processes share the cores (a 40-iteration boosting fit on 900 rows: 11 s on all threads
# at load 16 on 2 cores, 0.44 s on one). Forests parallelize with joblib threads and are not affected.
OPENMP_MIN_ROWS = 100_000


def _omp_for_table(func: Callable) -> Callable:
    """Run ``func(table, ...)`` on one OpenMP thread when the table gives fewer than OPENMP_MIN_ROWS fits."""

    @functools.wraps(func)
    def wrapper(table: pd.DataFrame, *args: Any, **kwargs: Any) -> Any:
        pixel_rows = kwargs.get("footprints") is not None or kwargs.get("pixels") is not None
        fits = len(table) * (DRAWS_PER_ROW if pixel_rows else 1)
        small = fits < OPENMP_MIN_ROWS
        with threadpool_limits(limits=1, user_api="openmp") if small else nullcontext():
            return func(table, *args, **kwargs)

    return wrapper


def _check_table(table: pd.DataFrame, features: list[str], spec: ModelSpec) -> None:
    missing = [c for c in [*features, "site", "NEE"] if c not in table.columns]
    if missing:
        raise ModelError(f"training table lacks column(s) {missing}")
    if spec.target == "partitioned":
        if "RECO" not in table.columns:
            raise ModelError(
                "model.target: partitioned, but the training table has no RECO column (re-run 'geoflux "
                "towers' and 'geoflux extract' with this configuration: the towers stage partitions NEE)"
            )
        bad = sorted(map(str, table.loc[table["RECO"].isna(), "site"].unique()))
        if bad:
            raise ModelError(f"model.target: partitioned, but site(s) {bad[:5]} have NEE without RECO")
    # a temporal hold-out is the only scheme that can validate a single site (e.g. one real tower)
    if spec.cv != "temporal" and table["site"].nunique() < 2:
        raise ModelError("training table has fewer than 2 sites: site-grouped validation is impossible")


def _site_xy_km(sites: pd.DataFrame, ids: np.ndarray) -> np.ndarray:
    # A local equirectangular projection is enough to cut blocks of tens of km; blocks only group sites.
    missing = sorted(set(map(str, ids)) - set(map(str, sites.index)))
    if missing:
        raise ModelError(
            f"model.cv: spatial_block needs coordinates of site(s) {missing[:3]} in the site table"
        )
    s = sites.set_axis(sites.index.map(str)).loc[[str(i) for i in ids]]
    lat0 = np.deg2rad(float(s["LAT"].mean()))
    return np.column_stack([s["LON"].to_numpy() * 111.32 * np.cos(lat0), s["LAT"].to_numpy() * 110.57])


def cv_groups(
    table: pd.DataFrame, spec: ModelSpec, sites: pd.DataFrame | None = None
) -> tuple[np.ndarray, str]:
    """Group label of each row for the configured validation scheme, and a description of the scheme.

    Parameters
    ----------
    table : training table with ``site`` and ``time``.
    spec : ``cv`` picks the scheme: ``site``; ``spatial_block`` (square blocks of ``cv_block_km`` km, needs
        ``sites`` with ``LAT``/``LON`` in degrees, indexed by site); ``climate`` (sites ordered by their mean
        ``cv_climate_var`` and cut into ``cv_folds`` (default 5) equal-count bins); ``temporal`` (blocks of
        ``cv_block_days`` days alternating between ``max(cv_folds, 2)`` folds).
    sites : site table for ``spatial_block``.
    """
    site = table["site"].astype(str).to_numpy()
    if spec.cv == "site":
        return site, "site"
    if spec.cv == "spatial_block":
        if sites is None:
            raise ModelError("model.cv: spatial_block needs the site table (LAT, LON)")
        ids = np.unique(site)
        xy = _site_xy_km(sites, ids)
        block = np.floor(xy / spec.cv_block_km).astype(int)
        label = {i: f"{bx}_{by}" for i, (bx, by) in zip(ids, block, strict=True)}
        return np.array([label[s] for s in site]), f"spatial blocks of {spec.cv_block_km:g} km"
    if spec.cv == "climate":
        var = spec.cv_climate_var
        if var not in table.columns:
            raise ModelError(f"model.cv_climate_var: '{var}' is not a column of the training table")
        means = table.groupby(site)[var].mean().sort_values()
        n_bins = spec.cv_folds if spec.cv_folds > 1 else 5
        bins = np.array_split(means.index.to_numpy(), min(n_bins, len(means)))
        label = {s: f"{var}_bin{k}" for k, b in enumerate(bins) for s in b}
        return np.array([label[s] for s in site]), f"climate bins of site-mean {var} ({len(bins)} bins)"
    t = pd.to_datetime(table["time"])
    days = ((t - t.min()) / pd.Timedelta("1D")).to_numpy()
    n = max(spec.cv_folds, 2)
    block = (np.floor(days / spec.cv_block_days).astype(int)) % n
    return block.astype(str), f"temporal: alternate {spec.cv_block_days}-day blocks in {n} folds"


def cv_splits(
    table: pd.DataFrame, spec: ModelSpec, sites: pd.DataFrame | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Train/test row indices of the grouped validation, and the scheme's name (never random rows)."""
    groups, desc = cv_groups(table, spec, sites)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ModelError(f"model.cv: '{spec.cv}' gives only {n_groups} group: validation is impossible")
    if spec.cv == "temporal" or spec.cv == "climate" or spec.cv_folds == 0:
        splitter = LeaveOneGroupOut()
        name = f"leave-one-group-out ({desc})" if spec.cv != "site" else "leave-one-site-out"
    else:
        k = min(spec.cv_folds, n_groups)
        splitter = GroupKFold(n_splits=k)
        name = f"GroupKFold({k}) ({desc})"
    x = np.zeros((len(table), 1))
    return list(splitter.split(x, groups=groups)), name


def _conformal_quantile(scores_: np.ndarray, interval: float, weights: np.ndarray | None = None) -> float:
    """The finite-sample conformal quantile ⌈(n+1)·interval⌉/n of the conformity scores.

    With ``weights`` (footprint weights of pixel scores, summing to 1 per tower-step), the weighted
    quantile at level ``interval · (n + 1) / n`` with n the total weight (the number of tower-steps).
    """
    ok = np.isfinite(scores_)
    if weights is None:
        s = np.sort(scores_[ok])
        if s.size == 0:
            return 0.0
        k = min(int(np.ceil((s.size + 1) * interval)), s.size)
        return float(s[k - 1])
    order = np.argsort(scores_[ok])
    s, w = scores_[ok][order], weights[ok][order]
    if s.size == 0:
        return 0.0
    total = w.sum()
    level = min(interval * (total + 1) / total, 1.0) * total
    return float(s[min(int(np.searchsorted(np.cumsum(w), level)), s.size - 1)])


def _method(spec: ModelSpec, fr: FootprintRows | None) -> str:
    return spec.training if fr is not None else "averaged"


def _fit_point(
    spec: ModelSpec,
    x: np.ndarray,
    y: np.ndarray,
    fr: FootprintRows | None,
    rows: np.ndarray,
    table: pd.DataFrame,
    seed: int,
    x_rows: np.ndarray | None = None,
    features: Sequence[str] | None = None,
) -> tuple[RegressorMixin, np.ndarray, np.ndarray]:
    """The point model fitted on ``rows`` of the table, and the (x, target) rows it learned from.

    ``x_rows``: averaged-driver rows for ``spec.averaged_share`` (class fractions hardened; default ``x``).
    """
    rows = np.asarray(rows)
    if spec.target == "partitioned":
        # one head per flux, each fitted exactly as the NEE model would be (same seed: same pixel draws);
        # every step from tower values to per-pixel targets is linear, so NEE's targets are RECO's − GPP's
        reco = table["RECO"].to_numpy(np.float64)
        heads = []
        for flux, target_ in (("reco", reco), ("gpp", reco - y)):
            head = _head_spec(spec, flux)
            heads.append(_fit_point(head, x, target_, fr, rows, table, seed, x_rows, features))
        (est_r, qx, t_r), (est_g, _, t_g) = heads
        return PartitionedRegressor(est_r, est_g), qx, t_r - t_g
    if _method(spec, fr) == "averaged":
        return make_estimator(spec, features).fit(x[rows], y[rows]), x[rows], y[rows]
    blend = (x if x_rows is None else x_rows, spec.averaged_share) if spec.averaged_share > 0 else None
    est, draws, target = fit_pixels(
        lambda: make_estimator(spec, features),
        fr,
        y,
        rows,
        table["site"].astype(str).to_numpy(),
        method=spec.training,
        iterations=spec.refit_iterations,
        seed=seed,
        blend=blend,
    )
    # the band's quantile models learn from the first QUANTILE_DRAWS draws of every tower-step
    sub = np.arange(len(draws)).reshape(-1, DRAWS_PER_ROW)[:, :QUANTILE_DRAWS].ravel()
    return est, fr.x[draws[sub]], target[sub]


def _head_spec(spec: ModelSpec, flux: str) -> ModelSpec:
    """The spec one head of a partitioned model is fitted with: a plain NEE-style target, and
    ``spec.monotonic`` (signs on NEE) applied to GPP with the sign turned (NEE = RECO − GPP) and not to
    RECO, whose response to light, greenness and dry air is not constrained by NEE's."""
    mono = {k: -v for k, v in spec.monotonic.items()} if flux == "gpp" else {}
    return spec.model_copy(update={"target": "nee", "monotonic": mono})


def align_footprints(
    table: pd.DataFrame, pixels: pd.DataFrame | None, features: list[str]
) -> tuple[pd.DataFrame, FootprintRows | None]:
    """The training rows that have footprint pixels, and those pixels (None without a pixel table)."""
    if pixels is None:
        return table, None
    missing = [c for c in [*features, "site", "time", "fp_weight"] if c not in pixels.columns]
    if missing:
        raise ModelError(f"pixel table lacks column(s) {missing} (re-run 'geoflux extract')")
    table = rows_with_pixels(table, pixels)
    if table.empty:
        raise ModelError("no training row has footprint pixels (re-run 'geoflux extract')")
    return table, footprint_rows(table, pixels, features)


def hedge_footprints(
    table: pd.DataFrame, fr: FootprintRows, spec: ModelSpec, features: Sequence[str] | None = None
) -> tuple[FootprintRows, dict]:
    """The footprint the towers are fitted and predicted with: the modelled one blended with its broadened
    version by the share an inner site CV through the map path chooses (:func:`choose_hedge`); averaged
    training keeps the modelled footprint. Returns the footprint rows and a summary for the CV metrics."""
    method = _method(spec, fr)
    if method == "averaged" or not fr.can_hedge:
        return fr.hedged(0.0), {"share": 0.0, "inner_cv_nse": {}}
    share, nse = choose_hedge(
        lambda: make_estimator(spec, features),
        fr,
        table["NEE"].to_numpy(np.float64),
        table["site"].astype(str).to_numpy(),
        spec.hedge_shares,
        method=method,
        seed=spec.seed,
    )
    return fr.hedged(share), {"share": share, "inner_cv_nse": nse}


@_omp_for_table
def cross_validate(
    table: pd.DataFrame,
    features: list[str],
    spec: ModelSpec,
    sites: pd.DataFrame | None = None,
    footprints: FootprintRows | None = None,
    averaged_rows: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Grouped cross-validation (by site unless ``spec.cv`` says otherwise).

    Parameters
    ----------
    table : training table with ``site``, ``time``, feature columns and ``NEE`` (gC m-2 d-1).
    features : feature columns.
    spec : model spec; ``cv_folds`` 0 = leave-one-group-out, k > 1 = GroupKFold(k); ``cv`` the grouping.
    sites : site table (``LAT``, ``LON`` by site), needed only for ``cv: spatial_block``.
    footprints : the footprint pixels of the table's rows (:func:`geoflux.footprint_fit.footprint_rows`).
        With them, models are fitted as ``spec.training`` says and every held-out prediction goes through
        the map's own path: the footprint-weighted sum of per-pixel predictions (band bounds likewise);
        without them, models are fitted on and predict the table's (averaged) rows.
    averaged_rows : (n_rows, n_features) averaged-driver rows with class fractions hardened, for
        ``spec.averaged_share`` (default: the table's features).

    Returns
    -------
    Held-out predictions (``site``, ``time``, ``obs``, ``pred``, ``fold``; with uncertainty also ``lo_raw``
    and ``hi_raw`` (the uncalibrated quantile predictions) and ``lo``/``hi``, the calibrated band where each
    fold's margin comes only from the *other* folds' scores) and a summary: pooled ``nse`` (1 − SSE/SST),
    ``r2_pearson`` (squared Pearson correlation), ``rmse``, ``bias`` (gC m-2 d-1), per-site
    ``nse_site_median``/``nse_site_p10``, the per-site table, per-fold scores (same keys) and, with
    uncertainty, ``uncertainty`` = {nominal, coverage, coverage_uncalibrated, margin,
    mean_width, coverage_site_median, coverage_site_p10}.
    """
    _check_table(table, features, spec)
    x = table[features].to_numpy(np.float32)
    y = table["NEE"].to_numpy(np.float64)
    folds, scheme = cv_splits(table, spec, sites)
    pred = np.full(len(y), np.nan)
    fold_id = np.full(len(y), -1)
    with_unc = spec.uncertainty != "none"
    lo_raw, hi_raw = np.full(len(y), np.nan), np.full(len(y), np.nan)
    fr = footprints
    rows_pred = np.full(len(y), np.nan)  # averaged training: prediction from the averaged row itself
    if fr is not None and with_unc:  # held-out per-pixel point and quantile predictions
        pix = {k: np.full(len(fr.weight), np.nan) for k in ("pred", "lo", "hi")}
    for k, (train, test) in enumerate(folds):
        est, qx, qy = _fit_point(
            spec, x, y, fr, train, table, seed=spec.seed + k, x_rows=averaged_rows, features=features
        )
        if fr is not None:
            pred[test] = predict_towers(est, fr, test)[test]
            if _method(spec, fr) == "averaged":
                rows_pred[test] = stable_predict(est, x[test])
        else:
            pred[test] = stable_predict(est, x[test])
        fold_id[test] = k
        if with_unc:
            band_models = _fit_band(spec, est, qx, qy)
            if fr is not None:
                p = fr.pixels_of(test)
                pix["pred"][p] = stable_predict(est, fr.x[p])
                pix["lo"][p], pix["hi"][p] = raw_bounds(band_models, fr.x[p], pix["pred"][p])
                lo_raw[test] = fr.tower_sum(pix["lo"][p], p)[test]
                hi_raw[test] = fr.tower_sum(pix["hi"][p], p)[test]
            else:
                lo_raw[test], hi_raw[test] = raw_bounds(band_models, x[test], pred[test])
    keys = [c for c in ("site", "time") if c in table.columns]
    out = table[keys].assign(obs=y, pred=pred, fold=fold_id)
    result: dict[str, Any] = summary(out)
    result["scheme"] = scheme
    result["training"] = _method(spec, fr)
    result["prediction_path"] = (
        "map: footprint-weighted sum of per-pixel predictions" if fr is not None else "averaged rows"
    )
    if np.isfinite(rows_pred).any():
        # what a CV on averaged rows reports: it cannot see the change of support the map makes
        result["averaged_rows"] = scores(y, rows_pred)
    result["per_site"] = per_site_scores(out).to_dict(orient="records")
    result["folds"] = [
        {"fold": k, "n_test_sites": int(out.loc[test, "site"].nunique()), **scores(y[test], pred[test])}
        for k, (_, test) in enumerate(folds)
    ]
    if with_unc:
        out["lo_raw"], out["hi_raw"] = lo_raw, hi_raw
        if fr is None:
            conf = np.maximum(lo_raw - y, y - hi_raw)  # CQR conformity score
            weight = np.ones_like(y)
            owner_fold = fold_id
        else:
            # The map's band is per pixel, and a pixel's error does not average out as a footprint's does:
            # each held-out pixel's band is scored (weighted by footprint weight) against a pseudo-truth,
            # its tower's NEE plus a share of the model's contrast between the pixel and the footprint.
            # No tower can tell a pixel's truth from its footprint's, so the share is an assumption
            # bracketed by 0 (a uniform footprint) and 1 (the model's contrasts exact); both margins
            # are reported.
            plo, phi = _band(pix["pred"], pix["lo"], pix["hi"], 0.0)
            contrast = pix["pred"] - fr.tower_sum(pix["pred"])[fr.owner]
            weight, owner_fold = fr.weight, fold_id[fr.owner]

            def pixel_scores(share: float) -> np.ndarray:
                yp = y[fr.owner] + share * contrast
                return np.maximum(plo - yp, yp - phi)

            conf = pixel_scores(spec.band_contrast)
            brackets = {
                f"margin_contrast_{s:g}": _conformal_quantile(pixel_scores(s), spec.interval, weight)
                for s in (0.0, 1.0)
            }
        lo, hi = np.empty_like(y), np.empty_like(y)
        for k in range(len(folds)):
            # the held-out fold's margin comes from the other folds only: the reported coverage is that of
            # the calibrated band on data that took no part in fitting or calibrating it
            m = fold_id == k
            other = owner_fold != k
            margin_k = _conformal_quantile(conf[other], spec.interval, weight[other])
            lo[m], hi[m] = _band(pred[m], lo_raw[m], hi_raw[m], margin_k)
        out["lo"], out["hi"] = lo, hi
        result["uncertainty"] = interval_summary(out, spec.interval)
        result["uncertainty"]["margin"] = _conformal_quantile(conf, spec.interval, weight)
        result["uncertainty"]["support"] = "pixel" if fr is not None else "row"
        if fr is not None:
            result["uncertainty"]["band_contrast"] = spec.band_contrast
            result["uncertainty"].update(brackets)
        out.attrs["conformal_margin"] = result["uncertainty"]["margin"]
        if fr is not None:  # for fit(): the margin's growth with DI is fitted on the same pixel scores
            yp = y[fr.owner] + spec.band_contrast * contrast
            out.attrs[_PIXEL_SCORES] = (conf, np.abs(yp - pix["pred"]), weight)
        raw_lo, raw_hi = _band(pred, lo_raw, hi_raw, 0.0)
        result["uncertainty"]["coverage_uncalibrated"] = float(np.mean((y >= raw_lo) & (y <= raw_hi)))
        result["uncertainty"]["method"] = (
            f"{_band_method(spec)}, margin from the other folds' held-out scores"
        )
    return out, result


_PIXEL_SCORES = "_pixel_scores"  # cross_validate -> fit: held-out pixel scores; train() drops them


def _di_scaled_margin(
    conf: np.ndarray, abs_err: np.ndarray, weight: np.ndarray, z: np.ndarray, interval: float
) -> tuple[float, float]:
    """A conformal margin that grows with dissimilarity, from held-out scores and their DI.

    The held-out absolute errors are regressed on ``z`` (DI / AOA threshold, cross-validated), by
    footprint weight: ``|e| ≈ a + b·z``. The scores are normalized by ``g = 1 + (b / a)·z`` and the margin
    is their conformal quantile, so the band is ``… ± margin·g`` (normalized split conformal; Papadopoulos
    et al. 2008). The map's error grows with DI where the towers are not representative of the region
    (on the homogeneous bench world from 0.31 to 1.05 gC m-2 d-1 RMSE between the lowest and highest DI
    quartile) while the residual model's band stays flat. Returns (margin, slope b/a); slope 0 when the
    errors do not grow with DI or the normalized margin is not positive.
    """
    ok = np.isfinite(conf) & np.isfinite(abs_err) & np.isfinite(z) & (weight > 0)
    conf, abs_err, weight, z = conf[ok], abs_err[ok], weight[ok], z[ok]
    plain = _conformal_quantile(conf, interval, weight)
    if conf.size < 10 or not np.ptp(z) > 0:
        return plain, 0.0
    sw = np.sqrt(weight)
    a, b = np.linalg.lstsq(np.column_stack([sw, sw * z]), sw * abs_err, rcond=None)[0]
    # an intercept near zero would make the scaling explode: at least a tenth of the mean error
    a = max(a, 0.1 * float(np.average(abs_err, weights=weight)))
    slope = max(float(b), 0.0) / a
    if slope == 0.0:
        return plain, 0.0
    margin = _conformal_quantile(conf / (1.0 + slope * z), interval, weight)
    return (margin, slope) if margin > 0 else (plain, 0.0)


def _band_method(spec: ModelSpec) -> str:
    q_lo, q_hi = _quantile_levels(spec.interval)
    if spec.uncertainty == "residual":
        return (
            "conformalized residual quantile (one gradient-boosting model of the |residual| "
            f"q{spec.interval:.2f}, band NEE -/+ it)"
        )
    return f"conformalized quantile regression (gradient-boosting q{q_lo:.2f}/q{q_hi:.2f})"


def interval_summary(df: pd.DataFrame, interval: float) -> dict[str, float]:
    """Coverage of a band (``lo``, ``hi`` columns) over observations ``obs``, pooled and per site."""
    inside = (df["obs"] >= df["lo"]) & (df["obs"] <= df["hi"])
    per_site = inside.groupby(df["site"]).mean()
    return {
        "nominal": float(interval),
        "coverage": float(inside.mean()),
        "coverage_site_median": float(per_site.median()),
        "coverage_site_p10": float(per_site.quantile(0.1)),
        "mean_width": float((df["hi"] - df["lo"]).mean()),
    }


def _importance_weights(est: RegressorMixin, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    # Meyer & Pebesma weight each standardized predictor by its importance so that dissimilarity in
    # drivers the model ignores does not push pixels out of the area of applicability.
    # scoring is scikit-learn's scorer name (its "r2" is 1 − SSE/SST, i.e. NSE), not a metrics key
    one = copy.copy(est)  # one thread: a forest's threaded predict differs in the last bits between runs
    if hasattr(one, "n_jobs"):
        one.n_jobs = 1
    r = permutation_importance(
        one, x, y, n_repeats=3, random_state=seed, max_samples=min(len(y), 2000), scoring="r2"
    )
    w = np.clip(r.importances_mean, 0.0, None)
    return w if w.sum() > 0 else np.ones(x.shape[1])


def fit_aoa(
    est: RegressorMixin,
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
) -> tuple[AOA, np.ndarray]:
    """Area of applicability of a fitted estimator (Meyer & Pebesma 2021).

    Parameters
    ----------
    est : the fitted estimator (its permutation importance weights the predictors).
    x, y : training features and target.
    folds : the grouped CV folds; a training sample's DI is its distance to the nearest training sample
        of *another* fold, as in cross-validation.
    seed : for the permutation importance and the subsample of the mean distance.

    Returns
    -------
    The :class:`AOA` and the cross-validated training DI of every row.
    """
    x = np.asarray(x, dtype=np.float64)
    center = np.nanmean(x, axis=0)
    scale = np.nanstd(x, axis=0)
    scale[~(scale > 0)] = 1.0  # a constant predictor contributes no distance
    weights = _importance_weights(est, x, y, seed)
    z = (x - center) / scale * weights
    rng = np.random.default_rng(seed)
    sub = z if len(z) <= 3000 else z[rng.choice(len(z), 3000, replace=False)]
    dbar = float(pdist(sub).mean())
    if not dbar > 0:
        raise ModelError("training samples are all identical in predictor space: no area of applicability")
    train_di = np.full(len(z), np.nan)
    for train, test in folds:
        dist, _ = cKDTree(z[train]).query(z[test], k=1)
        train_di[test] = dist / dbar
    q1, q3 = np.nanpercentile(train_di, [25, 75])
    # the upper whisker of the training DI's boxplot, as in CAST::aoa
    threshold = float(np.nanmax(train_di[train_di <= q3 + 1.5 * (q3 - q1)]))
    aoa = AOA(center, scale, weights, z.astype(np.float64), dbar, threshold)
    return aoa, train_di


# Training pixels kept for the area of applicability. The exact nearest-neighbour query of every map pixel
# grows with the tree: on the default demo's 11 features one CPU spent 8.2 / 5.0 / 2.9 us per pixel with
# 40,000 / 20,000 / 10,000 points (jittered training pixels as queries), the largest single cost of the
# production band set once the trees are compiled. DI and its threshold come from the same points.
AOA_MAX_POINTS = 10_000


def _fit_aoa_pixels(
    est: RegressorMixin, fr: FootprintRows, y: np.ndarray, folds: list, seed: int
) -> tuple[AOA, np.ndarray, np.ndarray]:
    """Area of applicability from per-pixel training features; returns the AOA, each row's DI and each
    pixel's cross-validated DI (NaN for pixels beyond the AOA_MAX_POINTS kept).

    A row's (tower-step's) DI is the footprint-weighted mean of its pixels' cross-validated DI.
    """
    n = len(fr.weight)
    keep = np.arange(n)
    if n > AOA_MAX_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(n, AOA_MAX_POINTS, replace=False))
    pos = np.full(n, -1)
    pos[keep] = np.arange(len(keep))
    pix_folds = []
    for train, test in folds:
        tr, te = pos[fr.pixels_of(train)], pos[fr.pixels_of(test)]
        pix_folds.append((tr[tr >= 0], te[te >= 0]))
    aoa, di = fit_aoa(est, fr.x[keep], y[fr.owner[keep]], pix_folds, seed)
    ok = np.isfinite(di)
    num = np.bincount(fr.owner[keep][ok], weights=(fr.weight[keep] * di)[ok], minlength=fr.n_rows)
    den = np.bincount(fr.owner[keep][ok], weights=fr.weight[keep][ok], minlength=fr.n_rows)
    pixel_di = np.full(n, np.nan)
    pixel_di[keep] = di
    with np.errstate(invalid="ignore", divide="ignore"):
        return aoa, np.where(den > 0, num / den, np.nan), pixel_di


@_omp_for_table
def fit(
    table: pd.DataFrame,
    features: list[str],
    feature_units: dict[str, str],
    spec: ModelSpec,
    provenance: dict | None = None,
    *,
    cv_predictions: pd.DataFrame | None = None,
    sites: pd.DataFrame | None = None,
    footprints: FootprintRows | None = None,
    averaged_rows: np.ndarray | None = None,
) -> TrainedModel:
    """Fit the configured regressor on all rows of the training table, plus uncertainty and AOA.

    Parameters
    ----------
    table, features, feature_units, spec : as for :func:`cross_validate`; units are recorded in the model.
    provenance : extra entries for the model card (catalog, tower files, ...).
    cv_predictions : the output of :func:`cross_validate` on the same table and spec; its held-out quantile
        predictions calibrate the band. When missing and the spec asks for uncertainty, the CV is run here.
    sites : site table, for ``cv: spatial_block``.
    footprints : footprint pixels of the table's rows; with them the model is a per-pixel model fitted as
        ``spec.training`` says, and the area of applicability is built from per-pixel features (what the
        map sees).
    averaged_rows : as for :func:`cross_validate`.
    """
    _check_table(table, features, spec)
    x = table[features].to_numpy(np.float32)
    y = table["NEE"].to_numpy(np.float64)
    fr = footprints
    est, qx, qy = _fit_point(
        spec, x, y, fr, np.arange(len(y)), table, seed=spec.seed, x_rows=averaged_rows, features=features
    )
    domain = {f: [float(np.nanmin(table[f])), float(np.nanmax(table[f]))] for f in features}
    prov: dict[str, Any] = {
        "geoflux_version": geoflux.__version__,
        "kind": spec.kind,
        "target": spec.target,
        "params": dict(spec.params),
        **({"monotonic": dict(spec.monotonic)} if spec.monotonic else {}),
        "n_samples": len(table),
        "sites": sorted(map(str, table["site"].unique())),
        "training": _method(spec, fr),
        # share of the averaged-driver model in the per-pixel targets (footprint-consistent training only)
        "averaged_share": spec.averaged_share if _method(spec, fr) != "averaged" else 0.0,
        # scikit-learn forests and our mapping never see a NaN feature: a pixel missing any driver is nodata
        "missing_drivers": "not accepted: a pixel with any missing driver is nodata in every band",
        **(provenance or {}),
    }
    model = TrainedModel(est, list(features), dict(feature_units), TARGET_UNITS, domain, prov)
    model.bands = band_names(spec)
    model.interval = spec.interval
    folds, scheme = cv_splits(table, spec, sites)
    prov["cv_scheme"] = scheme
    if spec.uncertainty != "none":
        model.quantile_models = _fit_band(spec, est, qx, qy)
        cv = cv_predictions
        stale = cv is None or len(cv) != len(table) or "lo_raw" not in cv
        if stale or (fr is not None and _PIXEL_SCORES not in cv.attrs):  # e.g. predictions read from disk
            cv, _ = cross_validate(table, features, spec, sites, footprints=fr, averaged_rows=averaged_rows)
        if "conformal_margin" in cv.attrs:  # from cross_validate (pixel support with footprints)
            model.conformal_margin = float(cv.attrs["conformal_margin"])
        else:
            conf = np.maximum(cv["lo_raw"].to_numpy() - y, y - cv["hi_raw"].to_numpy())
            model.conformal_margin = _conformal_quantile(conf, spec.interval)
        prov["uncertainty"] = {
            "interval": spec.interval,
            "conformal_margin": model.conformal_margin,
            "method": _band_method(spec),
        }
        if "conformal_margin" in cv.attrs:
            prov["uncertainty"]["band_contrast"] = spec.band_contrast  # pixel scores' pseudo-truth
    if spec.aoa:
        if fr is None:
            model.aoa, train_di = fit_aoa(est, x, y, folds, spec.seed)
            pixel_di = train_di
        else:
            model.aoa, train_di, pixel_di = _fit_aoa_pixels(est, fr, y, folds, spec.seed)
        prov["aoa"] = {
            "threshold": model.aoa.threshold,
            "dbar": model.aoa.dbar,
            "weights": dict(zip(features, map(float, model.aoa.weights), strict=True)),
            "train_di_inside": float(np.mean(train_di <= model.aoa.threshold)),
        }
        model.train_di = train_di  # for train()'s CV summary; not saved
        if model.quantile_models is not None:
            _scale_margin(model, cv, y, pixel_di)
            owner = None if fr is None else fr.owner
            model.cv_band = _cv_band_as_mapped(model, cv, y, pixel_di, train_di, folds, owner)
    return model


def _scale_margin(model: TrainedModel, cv: pd.DataFrame, y: np.ndarray, unit_di: np.ndarray) -> None:
    """Let the model's conformal margin grow with DI (:func:`_di_scaled_margin`), from the CV's held-out
    scores: footprint pixels with footprints (``unit_di`` per pixel), table rows without."""
    if _PIXEL_SCORES in cv.attrs:
        conf, abs_err, weight = cv.attrs[_PIXEL_SCORES]
    else:
        conf = np.maximum(cv["lo_raw"].to_numpy() - y, y - cv["hi_raw"].to_numpy())
        abs_err, weight = np.abs(y - cv["pred"].to_numpy()), np.ones_like(y)
    margin, slope = _di_scaled_margin(conf, abs_err, weight, unit_di / model.aoa.threshold, model.interval)
    model.conformal_margin, model.margin_di_slope = margin, slope
    model.provenance["uncertainty"].update(
        conformal_margin=margin,
        margin_di_slope=slope,
        margin_rule="margin x (1 + margin_di_slope x DI / AOA threshold), from the grouped CV's scores",
    )


def _cv_band_as_mapped(
    model: TrainedModel,
    cv: pd.DataFrame,
    y: np.ndarray,
    unit_di: np.ndarray,
    row_di: np.ndarray,
    folds: list,
    owner: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out band of every CV row under the rule the maps use: each fold's margin and its growth
    with DI (:func:`_di_scaled_margin`) from the other folds' scores only, applied at the row's
    cross-validated DI (a tower's footprint-weighted pixel DI; the footprint-weighted pixel band of the
    map is then ``margin x (1 + slope x row DI / threshold)`` wide beyond the raw bounds).

    ``unit_di``: DI of each scored unit: footprint pixels (``owner``: the row of each) with footprints,
    rows without."""
    if _PIXEL_SCORES in cv.attrs:
        conf, abs_err, weight = cv.attrs[_PIXEL_SCORES]
    else:
        conf = np.maximum(cv["lo_raw"].to_numpy() - y, y - cv["hi_raw"].to_numpy())
        abs_err, weight = np.abs(y - cv["pred"].to_numpy()), np.ones_like(y)
    fold_id = np.full(len(y), -1)
    for k, (_, test) in enumerate(folds):
        fold_id[test] = k
    owner_fold = fold_id if owner is None or _PIXEL_SCORES not in cv.attrs else fold_id[owner]
    z_unit = unit_di / model.aoa.threshold
    # a row without a DI (none of its pixels among the AOA's sampled points) gets the margin at DI 0
    z_row = np.nan_to_num(row_di / model.aoa.threshold, nan=0.0)
    pred, lo_raw, hi_raw = (cv[c].to_numpy() for c in ("pred", "lo_raw", "hi_raw"))
    lo, hi = np.full(len(y), np.nan), np.full(len(y), np.nan)
    for k in range(len(folds)):
        m, other = fold_id == k, owner_fold != k
        margin, slope = _di_scaled_margin(
            conf[other], abs_err[other], weight[other], z_unit[other], model.interval
        )
        lo[m], hi[m] = _band(pred[m], lo_raw[m], hi_raw[m], margin * (1.0 + slope * z_row[m]))
    return lo, hi


@_omp_for_table
def train(
    table: pd.DataFrame,
    features: list[str],
    feature_units: dict[str, str],
    spec: ModelSpec,
    provenance: dict | None = None,
    sites: pd.DataFrame | None = None,
    pixels: pd.DataFrame | None = None,
    class_groups: list[list[str]] | None = None,
) -> tuple[TrainedModel, pd.DataFrame, dict]:
    """Grouped CV, then the fit on all rows; what ``geoflux train`` runs.

    ``pixels`` is the extraction stage's pixel table (footprint pixels of every tower-step with their
    weights and per-pixel features); with it, training follows ``spec.training`` and the CV, band and AOA
    go through the map's per-pixel path. Rows without footprint pixels are left out. ``class_groups``
    (the class-fraction columns of each categorical driver, :func:`geoflux.features.class_groups`) are
    hardened to the dominant class in the averaged-driver rows that ``spec.averaged_share`` blends in.

    Returns
    -------
    The model, the held-out predictions (with the band ``lo``/``hi`` and the cross-validated training
    ``DI``/``AOA`` when configured) and the CV summary (see :func:`cross_validate`), to which an ``aoa``
    entry adds the threshold, the fraction of held-out samples inside and the CV scores inside and outside.
    """
    if spec.target == "partitioned" and "RECO" in table.columns and table["RECO"].isna().any():
        lost = table.loc[table["RECO"].isna(), "site"].astype(str)
        warnings.warn(
            f"model.target partitioned: {len(lost)} tower-step(s) without RECO left out (sites "
            f"{', '.join(sorted(lost.unique())[:5])})",
            stacklevel=2,
        )
        table = table.dropna(subset=["RECO"]).reset_index(drop=True)
    table, fr = align_footprints(table, pixels, features)
    hedge = None
    x_rows = None
    if fr is not None:
        fr, hedge = hedge_footprints(table, fr, spec, features)
        hard = harden_class_fractions(table, class_groups) if class_groups else table
        x_rows = hard[features].to_numpy(np.float32)
    cv_pred, cv = cross_validate(table, features, spec, sites, footprints=fr, averaged_rows=x_rows)
    if hedge is not None:
        cv["footprint_hedge"] = hedge
    if hedge is not None:  # the model card says which footprint the model was fitted with
        provenance = {**(provenance or {}), "footprint_hedge": hedge}
    model = fit(
        table,
        features,
        feature_units,
        spec,
        provenance,
        cv_predictions=cv_pred,
        sites=sites,
        footprints=fr,
        averaged_rows=x_rows,
    )
    if model.aoa is not None:
        di = model.train_di
        cv_pred["DI"] = di
        cv_pred["AOA"] = (di <= model.aoa.threshold).astype(int)
        inside = cv_pred["AOA"] == 1
        cv["aoa"] = {
            "threshold": model.aoa.threshold,
            "fraction_inside": float(inside.mean()),
            "cv_inside": scores(cv_pred.loc[inside, "obs"], cv_pred.loc[inside, "pred"]),
            "cv_outside": scores(cv_pred.loc[~inside, "obs"], cv_pred.loc[~inside, "pred"]),
            "weights": model.provenance["aoa"]["weights"],
        }
    cv_pred.attrs.pop(_PIXEL_SCORES, None)  # arrays for fit(), not part of the written predictions
    if model.quantile_models is not None:
        cv["uncertainty"]["margin_di_slope"] = model.margin_di_slope
        cv["uncertainty"]["margin_di_scaled"] = model.conformal_margin  # at DI 0; the map's margin
        if model.cv_band is not None and model.margin_di_slope > 0:
            # the coverage reported is that of the band the maps carry (margin growing with DI); the
            # flat-margin band's figures stay beside it for comparison
            flat = interval_summary(cv_pred, spec.interval)
            cv_pred["lo"], cv_pred["hi"] = model.cv_band
            cv["uncertainty"].update(interval_summary(cv_pred, spec.interval))
            cv["uncertainty"]["flat_margin"] = {k: v for k, v in flat.items() if k != "nominal"}
            cv["uncertainty"]["method"] += "; margin grows with DI as in the maps"
    model.cv_band = None  # train()'s, not part of the model
    cv["bands"] = list(model.bands)
    return model, cv_pred, cv


def _card_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _payload(model: TrainedModel) -> dict:
    # Everything prediction depends on goes into the hashed skops file; the card repeats it for humans.
    est = model.estimator
    if isinstance(est, PartitionedRegressor):  # its heads, so that only library types are stored
        p: dict[str, Any] = {"format_version": _FORMAT_VERSION, "estimator_reco": est.reco}
        p["estimator_gpp"] = est.gpp
    else:
        p = {"format_version": _FORMAT_VERSION, "estimator": est}
    if model.quantile_models is not None:
        if len(model.quantile_models) == 1:
            p["quantile_scale"] = model.quantile_models[0]
        else:
            p["quantile_lower"], p["quantile_upper"] = model.quantile_models
        p["conformal_margin"] = float(model.conformal_margin)
        p["margin_di_slope"] = float(model.margin_di_slope)
        p["interval"] = float(model.interval)
    if model.aoa is not None:
        a = model.aoa
        p["aoa"] = {
            "center": a.center,
            "scale": a.scale,
            "weights": a.weights,
            "points": a.points,
            "dbar": float(a.dbar),
            "threshold": float(a.threshold),
        }
    p["bands"] = list(model.bands)
    return p


def save_model(model: TrainedModel, path: str | Path) -> Path:
    """Write ``path`` (skops estimators and arrays) and ``path.with_suffix('.json')`` (card with its hash)."""
    path = Path(path)
    blob = sio.dumps(_payload(model))
    card = {
        "features": list(model.features),
        "feature_units": dict(model.feature_units),
        "target_units": model.target_units,
        "domain": model.domain,
        "provenance": model.provenance,
        "bands": list(model.bands),
        "interval": model.interval if model.quantile_models is not None else None,
        "conformal_margin": model.conformal_margin if model.quantile_models is not None else None,
        "margin_di_slope": model.margin_di_slope if model.quantile_models is not None else None,
        "aoa_threshold": model.aoa.threshold if model.aoa is not None else None,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "format": "skops",
        "format_version": _FORMAT_VERSION,
    }
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    with atomic_path(_card_path(path)) as tmp:
        tmp.write_text(json.dumps(card, indent=2, default=str))
    return path


def load_model(path: str | Path) -> TrainedModel:
    """Load a model saved by :func:`save_model`, refusing tampered or foreign files.

    Raises
    ------
    ModelError
        if the card is missing, the hash does not match, or the file holds types outside scikit-learn,
        numpy, LightGBM or XGBoost.
    """
    path = Path(path)
    card_path = _card_path(path)
    try:
        blob = path.read_bytes()
        card = json.loads(card_path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{exc.filename}: model file not found") from None
    except json.JSONDecodeError:
        raise ModelError(f"{card_path}: model card is not valid JSON") from None
    if card.get("format") != "skops" or "sha256" not in card:
        raise ModelError(f"{card_path}: not a geoflux model card (no skops format/sha256)")
    if hashlib.sha256(blob).hexdigest() != card["sha256"]:
        raise ModelError(f"{path}: content hash does not match its card {card_path.name} (file was altered)")
    try:
        untrusted = sio.get_untrusted_types(data=blob)
    except Exception:
        raise ModelError(f"{path}: not a skops model file") from None
    foreign = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise ModelError(f"{path}: refuses to load untrusted type(s) {foreign[:3]}")
    try:
        obj = sio.loads(blob, trusted=untrusted)
    except Exception as exc:
        raise ModelError(f"{path}: cannot be loaded as a skops model ({type(exc).__name__})") from None
    meta = (card["features"], card["feature_units"], card["target_units"], card["domain"], card["provenance"])
    if not isinstance(obj, dict):  # format 1: the bare estimator
        return TrainedModel(obj, *meta)
    if "estimator_reco" in obj and "estimator_gpp" in obj:
        est = PartitionedRegressor(obj["estimator_reco"], obj["estimator_gpp"])
    elif "estimator" in obj:
        est = obj["estimator"]
    else:
        raise ModelError(f"{path}: skops file holds no estimator")
    model = TrainedModel(est, *meta, bands=tuple(obj.get("bands", ("NEE",))))
    band_models = ("quantile_scale",) if "quantile_scale" in obj else ("quantile_lower", "quantile_upper")
    if all(k in obj for k in band_models):
        model.quantile_models = tuple(obj[k] for k in band_models)
        model.conformal_margin = float(obj["conformal_margin"])
        model.margin_di_slope = float(obj.get("margin_di_slope", 0.0))  # files before the DI scaling
        model.interval = float(obj["interval"])
    if "aoa" in obj:
        a = obj["aoa"]
        model.aoa = AOA(
            np.asarray(a["center"]),
            np.asarray(a["scale"]),
            np.asarray(a["weights"]),
            np.asarray(a["points"]),
            float(a["dbar"]),
            float(a["threshold"]),
        )
    n_feat = len(model.features)
    if model.aoa is not None and model.aoa.points.shape[1] != n_feat:
        raise ModelError(f"{path}: area-of-applicability data has the wrong number of features")
    return model
