"""Friction-velocity (u*) threshold by the moving-point test (Papale et al. 2006), with bootstrap uncertainty.

Under weak turbulence the night-time NEE measured by eddy covariance underestimates respiration. Within each
season, night-time records are split into temperature classes of equal size (so that the temperature response
does not masquerade as a u* effect); within each temperature class into u* classes of equal size. The
threshold of a temperature class is the mean u* of the first u* class whose mean NEE reaches ``plateau``
(99 %) of the mean NEE of the following (up to ten) classes. The season's threshold is the median over
temperature classes and the year's the maximum over seasons (the REddyProc convention). Bootstrap samples of
the night-time records within each season give the threshold distribution (5th, 50th, 95th percentiles).

Everything runs on (bootstrap sample × temperature class × record) arrays: one sort per axis, no Python loop
over samples or classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SEASONS = {"DJF": (12, 1, 2), "MAM": (3, 4, 5), "JJA": (6, 7, 8), "SON": (9, 10, 11)}


@dataclass(frozen=True)
class UstarOptions:
    """Options of the moving-point test.

    Attributes
    ----------
    night_sw : float, W m-2
        Night-time records have SW_IN below this.
    n_temp : int
        Temperature classes per season.
    n_ustar : int
        u* classes per temperature class.
    min_per_temp : int
        Least number of records in a temperature class; a season needs ``n_temp × min_per_temp``.
    plateau : float
        Fraction of the mean NEE of the following classes the threshold class must reach.
    n_follow : int
        Number of following u* classes averaged for the plateau.
    max_corr : float
        Temperature classes where |corr(TA, u*)| reaches this are skipped (u* and TA confounded).
    n_boot : int
        Bootstrap samples.
    min_threshold : float, m s-1
        Lower bound of the threshold.
    seed : int
        Seed of the bootstrap, so results are reproducible.
    """

    night_sw: float = 10.0
    n_temp: int = 7
    n_ustar: int = 20
    min_per_temp: int = 100
    plateau: float = 0.99
    n_follow: int = 10
    max_corr: float = 0.5
    n_boot: int = 100
    min_threshold: float = 0.01
    seed: int = 0


@dataclass
class UstarResult:
    """Result of :func:`ustar_threshold`.

    Attributes
    ----------
    threshold : float, m s-1
        Annual threshold of the full data (max over seasons).
    seasonal : DataFrame
        ``season``, ``n`` (night records), ``threshold`` (m s-1, NaN where not determined).
    percentiles : dict
        Bootstrap percentiles of the annual threshold, ``{5: …, 50: …, 95: …}`` in m s-1.
    boot : ndarray, m s-1
        Annual threshold of every bootstrap sample.
    warnings : list of str
    """

    threshold: float
    seasonal: pd.DataFrame
    percentiles: dict[int, float]
    boot: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _mpt(nee: np.ndarray, ta: np.ndarray, ust: np.ndarray, o: UstarOptions) -> np.ndarray:
    """Thresholds of a batch of samples (rows); returns one season threshold per row (NaN if none)."""
    b, n = nee.shape
    m = n // o.n_temp
    # Temperature classes of equal size: sort by TA and cut; a remainder of < n_temp records is dropped.
    order = np.argsort(ta, axis=1, kind="stable")[:, : m * o.n_temp]
    take = lambda a: np.take_along_axis(a, order, axis=1).reshape(b, o.n_temp, m)  # noqa: E731
    nee_t, ta_t, ust_t = take(nee), take(ta), take(ust)
    # u* classes within each temperature class.
    o2 = np.argsort(ust_t, axis=2, kind="stable")
    nee_u = np.take_along_axis(nee_t, o2, axis=2)
    ust_u = np.take_along_axis(ust_t, o2, axis=2)
    edges = (np.arange(o.n_ustar + 1) * m) // o.n_ustar
    cum = lambda a: np.concatenate([np.zeros((*a.shape[:2], 1)), np.cumsum(a, axis=2)], axis=2)  # noqa: E731
    cn, cu = cum(nee_u), cum(ust_u)
    size = np.diff(edges)
    mean_nee = (cn[:, :, edges[1:]] - cn[:, :, edges[:-1]]) / size
    mean_ust = (cu[:, :, edges[1:]] - cu[:, :, edges[:-1]]) / size
    # Mean NEE of the following up-to-n_follow classes, by a cumulative sum over the class axis.
    cc = np.concatenate([np.zeros((b, o.n_temp, 1)), np.cumsum(mean_nee, axis=2)], axis=2)
    i = np.arange(o.n_ustar - 1)
    j = np.minimum(i + 1 + o.n_follow, o.n_ustar)
    follow = (cc[:, :, j] - cc[:, :, i + 1]) / (j - i - 1)
    reached = mean_nee[:, :, :-1] >= o.plateau * follow
    found = reached.any(axis=2)
    first = np.argmax(reached, axis=2)
    thr = np.where(found, np.take_along_axis(mean_ust, first[..., None], axis=2)[..., 0], np.nan)
    # Skip temperature classes where temperature and u* are correlated.
    ta_c = ta_t - ta_t.mean(axis=2, keepdims=True)
    us_c = ust_t - ust_t.mean(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ta_c * us_c).sum(axis=2) / np.sqrt((ta_c**2).sum(axis=2) * (us_c**2).sum(axis=2))
    thr = np.where(np.abs(r) < o.max_corr, thr, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(thr, axis=1)


def ustar_threshold(
    time: pd.Series | np.ndarray,
    nee: np.ndarray,
    ta: np.ndarray,
    ustar: np.ndarray,
    sw_in: np.ndarray,
    options: UstarOptions | None = None,
) -> UstarResult:
    """u* threshold of one site-year by the moving-point test with bootstrap.

    Parameters
    ----------
    time : array of datetime64
        Record start times.
    nee : ndarray, umol m-2 s-1
        Measured NEE (NaN where missing or rejected).
    ta : ndarray, degC
    ustar : ndarray, m s-1
    sw_in : ndarray, W m-2
    options : UstarOptions, optional

    Returns
    -------
    UstarResult
        ``threshold`` is NaN when no season has enough night-time records with a detectable plateau; the
        caller decides on the fallback.
    """
    o = options or UstarOptions()
    month = pd.DatetimeIndex(pd.to_datetime(np.asarray(time))).month.to_numpy()
    ok = np.isfinite(nee) & np.isfinite(ta) & np.isfinite(ustar) & np.isfinite(sw_in) & (sw_in < o.night_sw)
    rng = np.random.default_rng(o.seed)
    rows = []
    boot_all = []
    msgs: list[str] = []
    for name, months in SEASONS.items():
        sel = np.flatnonzero(ok & np.isin(month, months))
        if sel.size < o.n_temp * o.min_per_temp:
            rows.append((name, sel.size, np.nan))
            if sel.size:
                msgs.append(
                    f"u* season {name}: {sel.size} night-time records, fewer than "
                    f"{o.n_temp * o.min_per_temp} needed; season skipped"
                )
            boot_all.append(np.full(o.n_boot, np.nan))
            continue
        thr = _mpt(nee[sel][None], ta[sel][None], ustar[sel][None], o)[0]
        rows.append((name, sel.size, thr))
        bi = rng.integers(0, sel.size, size=(o.n_boot, sel.size))
        idx = sel[bi]
        boot_all.append(_mpt(nee[idx], ta[idx], ustar[idx], o))
    seasonal = pd.DataFrame(rows, columns=["season", "n", "threshold"])
    boot = np.vstack(boot_all)  # seasons × samples
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            annual = float(np.nanmax(seasonal.threshold)) if seasonal.threshold.notna().any() else np.nan
            boot_annual = np.nanmax(boot, axis=0) if np.isfinite(boot).any() else np.full(o.n_boot, np.nan)
    if np.isfinite(annual):
        annual = max(annual, o.min_threshold)
        boot_annual = np.maximum(boot_annual, o.min_threshold)
    fin = boot_annual[np.isfinite(boot_annual)]
    pct = {p: (float(np.percentile(fin, p)) if fin.size else np.nan) for p in (5, 50, 95)}
    return UstarResult(threshold=annual, seasonal=seasonal, percentiles=pct, boot=boot_annual, warnings=msgs)
