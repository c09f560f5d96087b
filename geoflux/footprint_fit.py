"""Footprint-consistent learning: a per-pixel model from towers that each see a weighted set of pixels.

A tower measures the footprint-weighted sum of the per-pixel flux, ``y_T = Σ_i w_Ti f(x_i)``, and a map
applies ``f`` to single pixels. Fitting ``f`` on footprint *averages* of the drivers (``f(Σ w x)``) is a
change of support that a non-linear model does not survive, and its cross-validation cannot see it because
it predicts held-out towers from the same averaged rows. Here every tower-step keeps the pixels of its
footprint (:func:`geoflux.extract.extract_drivers`, the same features the map computes), and

* ``pixel``: each tower-step contributes footprint pixels drawn with probability ∝ weight, each with the
  tower's NEE as target (a Monte Carlo version of the weighted pixel expansion: the same expected loss,
  with a bounded number of rows);
* ``iterative``: starts from the pixel expansion, then repeatedly splits each tower's NEE over its pixels by
  a model that has *not* seen the tower's site (cross-fitting over two halves of the training sites):
  ``t_i = f(x_i) + (y_T − Σ_j w_Tj f(x_j))``, so ``Σ_i w_Ti t_i = y_T`` exactly while within-footprint
  contrasts come from what other sites taught; the final model is fitted on these per-pixel targets;
* ``averaged``: one row of footprint-averaged drivers per tower-step (for comparison).

Held-out predictions always go through the map's own path: per-pixel predictions of the held-out tower's
footprint pixels, summed with the footprint weights.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import RegressorMixin
from sklearn.ensemble import RandomForestRegressor
from threadpoolctl import threadpool_limits

DRAWS_PER_ROW = 4  # footprint pixels drawn per tower-step for a fit (rows = 4 x tower-steps)
QUANTILE_DRAWS = 2  # of those, per tower-step, for the band's quantile models (their cost is linear in rows)
CROSSFIT_TREES = (
    60  # trees of the cross-fitted forests that split tower NEE over pixels (not the final model)
)


@dataclass(frozen=True)
class FootprintRows:
    """The footprint pixels of a training table's rows (tower-steps), grouped by row.

    Attributes
    ----------
    x : (n_pixels, n_features) float32, each pixel's features exactly as the map computes them.
    weight : (n_pixels,) footprint weight of the pixel, summing to 1 over each owner's pixels.
    owner : (n_pixels,) int, the training-table row (tower-step) the pixel belongs to; non-decreasing.
    n_rows : number of rows of the training table.
    kernel : (n_pixels,) int8 or None, 0 for pixels of the modelled footprint, 1 for the broadened one.
    kernel_weight : (n_pixels,) or None, the pixel's weight within its own kernel (summing to 1 per owner
        and kernel); :meth:`hedged` blends the kernels from it.
    """

    x: np.ndarray
    weight: np.ndarray
    owner: np.ndarray
    n_rows: int
    kernel: np.ndarray | None = None
    kernel_weight: np.ndarray | None = None

    @property
    def can_hedge(self) -> bool:
        """Whether the rows carry a broadened footprint to blend in."""
        return self.kernel is not None and bool((self.kernel == 1).any())

    def hedged(self, share: float) -> FootprintRows:
        """The pixels with footprint weights ``(1 − share)·modelled + share·broadened``, zero-weight pixels
        dropped. A row without pixels of one kernel keeps the other's weights (renormalized)."""
        if self.kernel is None or self.kernel_weight is None:
            return self
        w = np.where(self.kernel == 1, share, 1.0 - share) * self.kernel_weight
        total = np.bincount(self.owner, weights=w, minlength=self.n_rows)
        lacking = total[self.owner] <= 0  # the row has no pixel of the kernel the share asks for
        w = np.where(lacking, self.kernel_weight, w)  # then whichever kernel it has
        keep = w > 0
        own = self.owner[keep]
        total = np.bincount(own, weights=w[keep], minlength=self.n_rows)
        return FootprintRows(
            x=self.x[keep],
            weight=w[keep] / total[own],
            owner=own,
            n_rows=self.n_rows,
            kernel=self.kernel[keep],
            kernel_weight=self.kernel_weight[keep],
        )

    def tower_sum(self, values: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Footprint-weighted sum per table row of per-pixel ``values`` (NaN for rows with no pixel).

        ``pixels`` (indices) restricts the sum to those pixels; ``values`` then has one entry per index.
        """
        own = self.owner if pixels is None else self.owner[pixels]
        w = self.weight if pixels is None else self.weight[pixels]
        num = np.bincount(own, weights=w * values, minlength=self.n_rows)
        den = np.bincount(own, weights=w, minlength=self.n_rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)

    def pixels_of(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the pixels owned by the given table rows (boolean mask or indices)."""
        mask = np.zeros(self.n_rows, bool)
        mask[rows] = True
        return np.flatnonzero(mask[self.owner])

    def draw(self, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` pixel indices per given table row, drawn with replacement with probability ∝ weight."""
        idx = self.pixels_of(rows)
        own = self.owner[idx]
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        cum = np.cumsum(self.weight[idx])
        lo = np.r_[0.0, cum][starts]  # cumulative weight before each group
        hi = cum[np.r_[starts[1:], len(idx)] - 1]
        u = lo[:, None] + rng.random((len(starts), k)) * (hi - lo)[:, None]
        pos = np.searchsorted(cum, u.ravel(), side="right")
        # guard rounding at a group's upper edge: stay inside the group
        end = np.repeat(np.r_[starts[1:], len(idx)] - 1, k)
        return idx[np.minimum(pos, end)]


THREADED_PREDICT_ROWS = 20_000  # rows from which a boosting model's predict in training uses every core


def stable_predict(est: RegressorMixin, x: np.ndarray) -> np.ndarray:
    """``est.predict(x)``, the same to the last bit on every run.

    A forest with ``n_jobs != 1`` adds its trees' predictions in whichever order its threads finish, so
    predictions differ in the last bits between runs; footprint-consistent training feeds predictions back
    as targets, so the fitted model (and the maps) would differ too. Here each row is predicted by one
    thread with the trees in order, and threads split the rows instead (tree prediction releases the GIL).
    """
    n_jobs = getattr(est, "n_jobs", None)
    if n_jobs is None:
        # Histogram boosting predicts with OpenMP threads over rows (each row by one thread, trees in
        # order: deterministic). Training runs on one OpenMP thread because small fits spin-wait; a large
        # predict is one big loop per tree, so it gets the cores back.
        if len(x) < THREADED_PREDICT_ROWS:
            return est.predict(x)
        with threadpool_limits(limits=os.cpu_count() or 1, user_api="openmp"):
            return est.predict(x)
    if n_jobs == 1 or len(x) < 2:
        return est.predict(x)
    one = copy.copy(est)  # shares the fitted trees; only n_jobs differs
    one.n_jobs = 1
    workers = min(os.cpu_count() or 1, len(x)) if n_jobs < 0 else min(n_jobs, len(x))
    parts = np.array_split(np.asarray(x), workers)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(one.predict, parts)))


def footprint_rows(table: pd.DataFrame, pixels: pd.DataFrame, features: list[str]) -> FootprintRows:
    """Match the pixel table to the training table's rows on (site, time).

    Parameters
    ----------
    table : training table (one row per tower-step) with ``site`` and ``time``.
    pixels : pixel table with ``site``, ``time``, ``fp_weight`` and the feature columns.
    features : feature columns, in model order.

    Returns
    -------
    FootprintRows with the modelled footprint's weights (broadened-footprint pixels, ``fp_kernel`` 1 in
    the pixel table, carry weight 0 until :meth:`FootprintRows.hedged` blends them in); table rows without
    any pixel have no pixel in it (callers drop them first, see :func:`rows_with_pixels`).
    """
    key = table[["site", "time"]].assign(_row=np.arange(len(table)))
    key["site"] = key["site"].astype(str)
    pix = pixels.assign(site=pixels["site"].astype(str)).merge(key, on=["site", "time"], how="inner")
    kern = pix["fp_kernel"].to_numpy(np.int8) if "fp_kernel" in pix else np.zeros(len(pix), np.int8)
    pix = pix.assign(_kernel=kern).sort_values(["_row", "_kernel"], kind="stable")
    w = pix["fp_weight"].to_numpy(np.float64)
    own = pix["_row"].to_numpy(np.int64)
    kern = pix["_kernel"].to_numpy(np.int8)
    total = np.bincount(own * 2 + kern, weights=w, minlength=2 * len(table))[own * 2 + kern]
    kw = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    fr = FootprintRows(
        x=pix[features].to_numpy(np.float32),
        weight=kw,
        owner=own,
        n_rows=len(table),
        kernel=kern,
        kernel_weight=kw,
    )
    return fr.hedged(0.0) if not fr.can_hedge else _modelled_only(fr)


def _modelled_only(fr: FootprintRows) -> FootprintRows:
    # all pixels kept (hedged() may blend the broadened ones in later), the broadened ones at weight 0
    return FootprintRows(
        fr.x,
        np.where(fr.kernel == 0, fr.kernel_weight, 0.0),
        fr.owner,
        fr.n_rows,
        fr.kernel,
        fr.kernel_weight,
    )


def rows_with_pixels(table: pd.DataFrame, pixels: pd.DataFrame) -> pd.DataFrame:
    """The table rows that own at least one pixel (index reset)."""
    have = pixels[["site", "time"]].drop_duplicates().assign(site=lambda d: d["site"].astype(str))
    t = table.assign(site=table["site"].astype(str))
    return t.merge(have, on=["site", "time"], how="inner").reset_index(drop=True)


def _fit(make: Callable[[], RegressorMixin], x: np.ndarray, y: np.ndarray, n_per_tree: int) -> RegressorMixin:
    est = make()
    # A forest's trees each see as many drawn pixels as there are tower-steps: the same cost per tree as
    # one averaged row per tower-step, while the ensemble averages over many footprint draws.
    if isinstance(est, RandomForestRegressor) and est.bootstrap and est.max_samples is None:
        est.set_params(max_samples=min(int(n_per_tree), len(y)))
    return est.fit(x, y)


def fit_pixels(
    make: Callable[[], RegressorMixin],
    fr: FootprintRows,
    y: np.ndarray,
    rows: np.ndarray,
    sites: np.ndarray,
    *,
    method: str,
    iterations: int = 2,
    seed: int = 0,
    blend: tuple[np.ndarray, float] | None = None,
) -> tuple[RegressorMixin, np.ndarray, np.ndarray]:
    """Fit a per-pixel model on the footprints of the given table rows.

    Parameters
    ----------
    make : returns a fresh unfitted regressor.
    fr : footprint pixels of the table.
    y : (n_rows,) tower NEE per table row, gC m-2 d-1.
    rows : indices of the table rows to learn from.
    sites : (n_rows,) site of every table row (the iterative method splits NEE by models of other sites).
    method : ``pixel`` or ``iterative`` (see module docstring).
    iterations : refits of the iterative method.
    seed : draws and site halves.
    blend : ``(x_rows, share)``: one row of footprint-averaged drivers per table row, and the share of an
        averaged-driver model's per-pixel prediction blended into the per-pixel targets (a hedge against a
        mis-modelled footprint, which the towers cannot reveal; README "Hedging the footprint").

    Returns
    -------
    The fitted model, the pixel indices it was fitted on (draws) and their targets (gC m-2 d-1).
    """
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows)
    n_rows = len(rows)
    draws = fr.draw(rows, DRAWS_PER_ROW, rng)
    if method == "pixel":
        target = _blended(make, fr, y, rows, draws, y[fr.owner[draws]], blend)
        return _fit(make, fr.x[draws], target, n_rows), draws, target
    if method != "iterative":
        raise ValueError(f"training method {method!r} (expected pixel or iterative)")
    t = y[fr.owner].astype(np.float64)  # per-pixel targets; the pixel expansion to start
    names = np.unique(sites[rows])
    if len(names) >= 2:
        order = rng.permutation(names)
        in_a = np.isin(sites, order[: len(order) // 2])
        halves = [rows[in_a[rows]], rows[~in_a[rows]]]

        def quick() -> RegressorMixin:
            est = make()
            if isinstance(est, RandomForestRegressor):
                est.set_params(n_estimators=min(est.n_estimators, CROSSFIT_TREES))
            return est

        for _ in range(iterations):
            f = np.empty_like(t)
            for fit_rows, pred_rows in ((halves[0], halves[1]), (halves[1], halves[0])):
                d = fr.draw(fit_rows, DRAWS_PER_ROW, rng)
                est = _fit(quick, fr.x[d], t[d], len(fit_rows))
                p = fr.pixels_of(pred_rows)
                f[p] = stable_predict(est, fr.x[p])
            pix = fr.pixels_of(rows)
            resid = y - fr.tower_sum(f[pix], pix)  # per table row
            t[pix] = f[pix] + resid[fr.owner[pix]]
    target = _blended(make, fr, y, rows, draws, t[draws], blend)
    return _fit(make, fr.x[draws], target, n_rows), draws, target


def _blended(
    make: Callable[[], RegressorMixin],
    fr: FootprintRows,
    y: np.ndarray,
    rows: np.ndarray,
    draws: np.ndarray,
    target: np.ndarray,
    blend: tuple[np.ndarray, float] | None,
) -> np.ndarray:
    """Per-pixel targets shrunk towards an averaged-driver model of the same table rows."""
    if blend is None or blend[1] <= 0:
        return target
    x_rows, share = blend
    g = make().fit(x_rows[rows], y[rows])
    return (1.0 - share) * target + share * stable_predict(g, fr.x[draws])


def predict_towers(est: RegressorMixin, fr: FootprintRows, rows: np.ndarray) -> np.ndarray:
    """Map-path prediction of table rows: footprint-weighted sum of per-pixel predictions (NaN elsewhere)."""
    pix = fr.pixels_of(rows)
    out = np.full(fr.n_rows, np.nan)
    if len(pix):
        out[rows] = fr.tower_sum(stable_predict(est, fr.x[pix]), pix)[rows]
    return out


HEDGE_FOLDS = 4  # site groups of the inner CV that chooses the footprint hedge
HEDGE_TOLERANCE = 0.005  # NSE a wider footprint must gain over a narrower one to be chosen


def choose_hedge(
    make: Callable[[], RegressorMixin],
    fr: FootprintRows,
    y: np.ndarray,
    sites: np.ndarray,
    shares: list[float],
    *,
    method: str,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The share of the broadened footprint the towers support best, by an inner site-grouped CV.

    For each candidate share the footprint is ``(1 − share)·modelled + share·broadened``; models are fitted
    (quick forests, one refit) on the footprints of :data:`HEDGE_FOLDS` − 1 groups of sites and predict the
    held-out towers through the map path with that same footprint. Only tower NEE is used. A wider
    footprint is chosen only when its pooled NSE beats the narrower ones by :data:`HEDGE_TOLERANCE`: the
    modelled footprint is the prior, the towers must argue against it.

    Parameters
    ----------
    make : returns a fresh unfitted regressor.
    fr : footprint pixels with both kernels (:func:`footprint_rows` of a pixel table with ``fp_kernel``).
    y : (n_rows,) tower NEE, gC m-2 d-1.
    sites : (n_rows,) site of every table row.
    shares : candidate shares in [0, 1].
    method : ``pixel`` or ``iterative``.
    seed : site groups and draws.

    Returns
    -------
    The chosen share and the inner CV's pooled NSE per candidate share (keys ``"0.5"`` etc.).
    """
    shares = sorted(set(shares))
    if not fr.can_hedge or len(shares) == 1:
        return (shares[0] if fr.can_hedge else 0.0), {}
    names = np.unique(sites)
    if len(names) < 3:
        return shares[0], {}
    rng = np.random.default_rng(seed)
    group_of = dict(zip(rng.permutation(names), np.arange(len(names)) % HEDGE_FOLDS, strict=True))
    group = np.array([group_of[s] for s in sites])

    def quick() -> RegressorMixin:
        est = make()
        if isinstance(est, RandomForestRegressor):
            est.set_params(n_estimators=min(est.n_estimators, CROSSFIT_TREES))
        return est

    nse = {}
    for share in shares:
        fa = fr.hedged(share)
        pred = np.full(fr.n_rows, np.nan)
        for g in np.unique(group):
            train, test = np.flatnonzero(group != g), np.flatnonzero(group == g)
            est, _, _ = fit_pixels(quick, fa, y, train, sites, method=method, iterations=1, seed=seed + g)
            pred[test] = predict_towers(est, fa, test)[test]
        ok = np.isfinite(pred)
        sst = float(((y[ok] - y[ok].mean()) ** 2).sum())
        nse[share] = 1.0 - float(((pred[ok] - y[ok]) ** 2).sum()) / sst if sst > 0 else float("nan")
    best = shares[0]
    for share in shares[1:]:
        if nse[share] > nse[best] + HEDGE_TOLERANCE:
            best = share
    return best, {f"{a:g}": v for a, v in nse.items()}
