"""Partitioning of NEE into gross primary production (GPP) and ecosystem respiration (RECO).

* Night-time method (Reichstein et al. 2005): night-time NEE is respiration. The Lloyd & Taylor (1994)
  temperature sensitivity E0 is fitted in short windows with enough temperature range; the three most
  reliable short-term E0 are averaged into one E0 for the period; with E0 fixed, the reference respiration
  R_ref is fitted in consecutive few-day windows and interpolated in time. RECO = R_ref(t)·f(TA; E0) for every
  record, GPP = RECO − NEE.
* Day-time method (Lasslop et al. 2010): in moving 4-day windows a rectangular-hyperbolic light response with
  an exponential VPD limitation of its saturation and a Lloyd & Taylor respiration term is fitted to
  day-time NEE, with E0 from night-time data of the surrounding 12 days.

Sign convention: NEE < 0 is uptake; GPP and RECO are positive fluxes, all in umol CO2 m-2 s-1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from geoflux.towers.read import TowerDataWarning

# Lloyd & Taylor (1994): reference temperature 10 degC and T0 = -46.02 degC, in kelvin.
T_REF_K = 283.15
T0_K = 227.13
# Coarse-to-fine E0 search (K): a 10 K grid, then 0.5 K steps around the coarse optimum.
_E0_COARSE = np.linspace(0.0, 1000.0, 101)
_E0_FINE = np.linspace(-10.0, 10.0, 41)


def lloyd_taylor(ta: np.ndarray, rref: np.ndarray | float, e0: float) -> np.ndarray:
    """Respiration after Lloyd & Taylor (1994).

    Parameters
    ----------
    ta : ndarray, degC
        Air (or soil) temperature. Converted to kelvin here: the equation needs absolute temperature.
    rref : ndarray or float, umol m-2 s-1
        Respiration at the reference temperature 10 degC.
    e0 : float, K
        Temperature sensitivity (activation-energy parameter).

    Returns
    -------
    ndarray, umol m-2 s-1
    """
    tk = np.asarray(ta, dtype=float) + 273.15
    return rref * np.exp(e0 * (1.0 / (T_REF_K - T0_K) - 1.0 / (tk - T0_K)))


def q10_from_e0(e0: float, ta: float = 10.0) -> float:
    """Q10 of the Lloyd & Taylor curve between ``ta - 5`` and ``ta + 5`` degC.

    Parameters
    ----------
    e0 : float, K
    ta : float, degC
        Centre temperature.

    Returns
    -------
    float, dimensionless
    """
    return float(lloyd_taylor(np.array(ta + 5.0), 1.0, e0) / lloyd_taylor(np.array(ta - 5.0), 1.0, e0))


@dataclass(frozen=True)
class NightOptions:
    """Options of the night-time partitioning (defaults after Reichstein et al. 2005 / REddyProc).

    Attributes
    ----------
    day_sw : float, W m-2
        Records with SW_IN above this are day.
    e0_window : float, days
        Length of the short-term windows for E0.
    e0_step : float, days
        Shift between E0 windows.
    min_temp_range : float, K
        A window is fitted only if its night temperatures span at least this range.
    min_records : int
        Least number of night records in an E0 window.
    e0_min, e0_max : float, K
        Plausible E0 range; estimates outside are discarded.
    max_rel_se : float
        Largest relative standard error of an accepted short-term E0.
    n_best : int
        Number of most precise short-term E0 averaged.
    rref_window, rref_step : float, days
        Windows of the R_ref fits (with E0 fixed).
    outlier_z : float or None
        Night NEE deviating more than this many robust standard deviations (MAD) from the window median is
        excluded from the E0 fit; None keeps all.
    loss : {"l1", "l2"}
        Least absolute deviations (default, as hesseflux: robust to the right-skewed night-time NEE) or least
        squares (as REddyProc) for E0 and R_ref.
    """

    day_sw: float = 10.0
    e0_window: float = 15.0
    e0_step: float = 5.0
    min_temp_range: float = 5.0
    min_records: int = 6
    e0_min: float = 30.0
    e0_max: float = 450.0
    max_rel_se: float = 0.5
    n_best: int = 3
    rref_window: float = 4.0
    rref_step: float = 4.0
    outlier_z: float | None = 4.5
    loss: str = "l1"


@dataclass
class NightPartition:
    """Result of :func:`partition_nighttime`.

    Attributes
    ----------
    gpp, reco : ndarray, umol m-2 s-1
    rref : ndarray, umol m-2 s-1
        Interpolated reference respiration (10 degC) per record.
    e0 : float, K
    e0_se : float, K
        Mean standard error of the E0 estimates averaged.
    e0_windows : DataFrame
        Short-term fits: ``start``, ``n``, ``ta_range`` (K), ``e0`` (K), ``e0_se`` (K), ``rref``
        (umol m-2 s-1), ``accepted``, ``used``.
    rref_windows : DataFrame
        ``time`` (centre), ``n``, ``rref`` (umol m-2 s-1).
    warnings : list of str
    """

    gpp: np.ndarray
    reco: np.ndarray
    rref: np.ndarray
    e0: float
    e0_se: float
    e0_windows: pd.DataFrame
    rref_windows: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def _weighted_median(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted median along the last axis (the value where the cumulative weight reaches one half)."""
    order = np.argsort(v, axis=-1)
    vs = np.take_along_axis(v, order, axis=-1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=-1), axis=-1)
    k = (cw < 0.5 * cw[..., -1:]).sum(axis=-1)
    return np.take_along_axis(vs, k[..., None], axis=-1)[..., 0]


def _rref_closed_form(y: np.ndarray, e: np.ndarray, loss: str) -> np.ndarray:
    """R_ref minimising the loss of ``y ≈ R_ref·e`` along the last axis.

    Least squares gives ``Σye/Σe²``; least absolute deviations ``Σ e·|y/e − R|`` is minimised by the
    e-weighted median of ``y/e``.
    """
    if loss == "l1":
        return _weighted_median(y / e, e)
    return (e * y).sum(axis=-1) / (e * e).sum(axis=-1)


def fit_lloyd_taylor(ta: np.ndarray, resp: np.ndarray, loss: str = "l2") -> tuple[float, float, float, float]:
    """Fit Lloyd & Taylor (1994) to respiration data.

    R_ref has a closed form for a given E0, so E0 is found by a grid search refined with a parabola, which is
    robust where iterative fitters stall on flat cost surfaces.

    Parameters
    ----------
    ta : ndarray, degC
    resp : ndarray, umol m-2 s-1
    loss : {"l2", "l1"}
        Least squares (REddyProc) or least absolute deviations (robust to skewed night NEE; hesseflux).

    Returns
    -------
    rref : float, umol m-2 s-1
    e0 : float, K
    rref_se, e0_se : float
        Standard errors from the linearised covariance (inf when undetermined).
    """
    tk = np.asarray(ta, float) + 273.15
    y = np.asarray(resp, float)
    g = 1.0 / (T_REF_K - T0_K) - 1.0 / (tk - T0_K)

    def cost(grid: np.ndarray) -> np.ndarray:
        e = np.exp(grid[:, None] * g[None, :])
        r_grid = _rref_closed_form(np.broadcast_to(y, e.shape), e, loss)
        res_grid = y[None, :] - r_grid[:, None] * e
        return (np.abs(res_grid) if loss == "l1" else res_grid * res_grid).sum(axis=1)

    i = int(np.argmin(cost(_E0_COARSE)))
    grid = np.clip(_E0_COARSE[i] + _E0_FINE, 0.0, _E0_COARSE[-1])
    sse = cost(grid)
    i = int(np.argmin(sse))
    e0 = grid[i]
    if 0 < i < grid.size - 1 and loss == "l2":
        # The least-squares cost is smooth: refine the grid optimum with a parabola through its neighbours.
        s0, s1, s2 = sse[i - 1], sse[i], sse[i + 1]
        den = s0 - 2 * s1 + s2
        if den > 0:
            e0 = e0 + 0.5 * (s0 - s2) / den * (grid[1] - grid[0])
    ee = np.exp(e0 * g)
    rref = float(_rref_closed_form(y, ee, loss))
    resid = y - rref * ee
    m = y.size
    jac = np.column_stack([ee, rref * ee * g])
    try:
        cov = np.linalg.inv(jac.T @ jac) * (resid @ resid) / max(m - 2, 1)
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        se = np.array([np.inf, np.inf])
    return rref, float(e0), float(se[0]), float(se[1])


def _mad_outliers(x: np.ndarray, z: float) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    return np.abs(x - med) > z * mad / 0.6745


def _night_days(time: pd.Series | np.ndarray) -> np.ndarray:
    """Days since the first midnight, shifted by half a day so that one night never straddles two windows."""
    t = pd.to_datetime(np.asarray(time))
    t0 = t[0].normalize()
    return ((t - t0) / pd.Timedelta(days=1)).to_numpy(dtype=float) - 0.5


def partition_nighttime(
    time: pd.Series | np.ndarray,
    nee: np.ndarray,
    ta: np.ndarray,
    sw_in: np.ndarray,
    nee_fit: np.ndarray | None = None,
    options: NightOptions | None = None,
) -> NightPartition:
    """Night-time flux partitioning after Reichstein et al. (2005).

    Parameters
    ----------
    time : array of datetime64
        Record start times (equidistant).
    nee : ndarray, umol m-2 s-1
        Gap-filled NEE; GPP = RECO − NEE on every record where it is finite.
    ta : ndarray, degC
        Gap-free air temperature (drives RECO on every record).
    sw_in : ndarray, W m-2
        Incoming short-wave radiation; night is ``sw_in <= day_sw``.
    nee_fit : ndarray, umol m-2 s-1, optional
        NEE used to fit the respiration model (measured records only by default in the pipeline; NaN
        elsewhere). Defaults to ``nee``.
    options : NightOptions, optional

    Returns
    -------
    NightPartition
    """
    o = options or NightOptions()
    nee = np.asarray(nee, float)
    ta = np.asarray(ta, float)
    sw_in = np.asarray(sw_in, float)
    fit = nee if nee_fit is None else np.asarray(nee_fit, float)
    days = _night_days(time)
    msgs: list[str] = []

    night = (sw_in <= o.day_sw) & np.isfinite(fit) & np.isfinite(ta)
    idx = np.flatnonzero(night)
    if idx.size < o.min_records:
        raise ValueError("too few night-time records for a respiration fit")
    dn, tn, yn = days[idx], ta[idx], fit[idx]

    # 1. Short-term E0 in moving windows.
    rows = []
    starts = np.arange(np.floor(dn.min()), dn.max(), o.e0_step)
    lo = np.searchsorted(dn, starts)
    hi = np.searchsorted(dn, starts + o.e0_window)
    for s, a, b in zip(starts, lo, hi, strict=True):
        if b - a <= o.min_records:
            continue
        tw, yw = tn[a:b], yn[a:b]
        if o.outlier_z is not None:
            keep = ~_mad_outliers(yw, o.outlier_z)
            tw, yw = tw[keep], yw[keep]
        trange = float(np.ptp(tw)) if tw.size else 0.0
        if tw.size <= o.min_records or trange < o.min_temp_range:
            continue
        rref, e0, _, e0_se = fit_lloyd_taylor(tw, yw, o.loss)
        rows.append((s, tw.size, trange, e0, e0_se, rref))
    win = pd.DataFrame(rows, columns=["start", "n", "ta_range", "e0", "e0_se", "rref"])
    if win.empty:
        raise ValueError("no night-time window with enough records and temperature range for E0")
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (win.e0 >= o.e0_min) & (win.e0 <= o.e0_max) & (win.e0_se / win.e0 < o.max_rel_se)
    win["accepted"] = ok
    if not ok.any():
        # Documented fallback: no window passes the precision test, so take the most precise E0 > 0 ones.
        cand = win[win.e0 > 0]
        if cand.empty:
            raise ValueError("no positive temperature sensitivity (E0) in any night-time window")
        msgs.append("no short-term E0 passed the range/precision test; used the most precise E0 > 0")
    else:
        cand = win[ok]
    best = cand.nsmallest(o.n_best, "e0_se")
    win["used"] = win.index.isin(best.index)
    e0 = float(best.e0.mean())
    e0_se = float(best.e0_se.mean())

    # 2. R_ref with E0 fixed in consecutive windows; closed-form least squares.
    et = lloyd_taylor(tn, 1.0, e0)
    rstarts = np.arange(np.floor(dn.min()), dn.max(), o.rref_step)
    lo = np.searchsorted(dn, rstarts)
    hi = np.searchsorted(dn, rstarts + o.rref_window)
    n_w = hi - lo
    good = n_w > 3
    rref_w = np.full(n_w.size, np.nan)
    centre = np.full(n_w.size, np.nan)
    for j in np.flatnonzero(good):
        sl = slice(lo[j], hi[j])
        rref_w[j] = max(float(_rref_closed_form(yn[sl], et[sl], o.loss)), 0.0)
        centre[j] = dn[sl].mean()
    rwin = pd.DataFrame({"day": centre[good], "n": n_w[good], "rref": rref_w[good]})
    if rwin.empty:
        raise ValueError("no window with enough night-time records for R_ref")
    t0 = pd.to_datetime(np.asarray(time))[0].normalize()
    rwin.insert(0, "time", t0 + pd.to_timedelta(rwin.day + 0.5, unit="D"))
    rref = np.interp(days, rwin.day.to_numpy(), rwin.rref.to_numpy())
    reco = lloyd_taylor(ta, rref, e0)
    gpp = reco - nee
    return NightPartition(
        gpp=gpp,
        reco=reco,
        rref=rref,
        e0=e0,
        e0_se=e0_se,
        e0_windows=win,
        rref_windows=rwin.drop(columns="day"),
        warnings=msgs,
    )


# --------------------------------------------------------------------------------------------------------
# Day-time method


@dataclass(frozen=True)
class DayOptions:
    """Options of the day-time partitioning (Lasslop et al. 2010).

    Attributes
    ----------
    day_sw : float, W m-2
        Records with SW_IN above this are day.
    window, step : float, days
        Length and shift of the light-response windows.
    e0_window : float, days
        Night-time window (centred) for the E0 of each day-time window.
    vpd0 : float, hPa
        VPD above which the light-saturated uptake decreases exponentially.
    min_records : int
        Least number of day-time records in a window.
    alpha_max : float, umol CO2 J-1
        Upper bound of the quantum efficiency.
    """

    day_sw: float = 10.0
    window: float = 4.0
    step: float = 2.0
    e0_window: float = 12.0
    vpd0: float = 10.0
    min_records: int = 10
    alpha_max: float = 0.22


def light_response(
    sw_in: np.ndarray,
    vpd: np.ndarray,
    alpha: np.ndarray | float,
    beta0: np.ndarray | float,
    k: np.ndarray | float,
    vpd0: float = 10.0,
) -> np.ndarray:
    """Gross uptake of the rectangular hyperbola with VPD-limited saturation (Lasslop et al. 2010).

    Parameters
    ----------
    sw_in : ndarray, W m-2
    vpd : ndarray, hPa
    alpha : float, umol CO2 J-1
        Initial slope (canopy light-use efficiency).
    beta0 : float, umol CO2 m-2 s-1
        Uptake at light saturation below ``vpd0``.
    k : float, hPa-1
        e-folding rate of the saturation decrease above ``vpd0``.
    vpd0 : float, hPa

    Returns
    -------
    ndarray, umol CO2 m-2 s-1 (GPP, positive)
    """
    beta = beta0 * np.exp(-k * np.clip(vpd - vpd0, 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = alpha * beta * sw_in / (alpha * sw_in + beta)
    return np.where(alpha * sw_in + beta > 0, out, 0.0)


@dataclass
class DayPartition:
    """Result of :func:`partition_daytime`.

    Attributes
    ----------
    gpp, reco : ndarray, umol m-2 s-1
    params : DataFrame
        Per window: ``time`` (centre), ``alpha`` (umol J-1), ``beta0`` (umol m-2 s-1), ``k`` (hPa-1),
        ``rref`` (umol m-2 s-1), ``e0`` (K), ``n``, ``fitted`` (False where the previous window's
        parameters were carried over).
    warnings : list of str
    """

    gpp: np.ndarray
    reco: np.ndarray
    params: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def partition_daytime(
    time: pd.Series | np.ndarray,
    nee_fit: np.ndarray,
    ta: np.ndarray,
    sw_in: np.ndarray,
    vpd: np.ndarray,
    e0_default: float,
    options: DayOptions | None = None,
) -> DayPartition:
    """Day-time flux partitioning after Lasslop et al. (2010).

    Parameters
    ----------
    time : array of datetime64
    nee_fit : ndarray, umol m-2 s-1
        NEE to fit (measured records; NaN elsewhere).
    ta : ndarray, degC
        Gap-free air temperature.
    sw_in : ndarray, W m-2
        Gap-free incoming short-wave radiation.
    vpd : ndarray, hPa
        Gap-free vapour-pressure deficit.
    e0_default : float, K
        E0 used where the local night-time fit fails (e.g. the night-time method's E0).
    options : DayOptions, optional

    Returns
    -------
    DayPartition
    """
    o = options or DayOptions()
    y = np.asarray(nee_fit, float)
    ta, sw_in, vpd = (np.asarray(a, float) for a in (ta, sw_in, vpd))
    days = _night_days(time)
    ok = np.isfinite(y) & np.isfinite(ta) & np.isfinite(sw_in) & np.isfinite(vpd)
    is_day = sw_in > o.day_sw
    di = np.flatnonzero(ok & is_day)
    ni = np.flatnonzero(ok & ~is_day)
    msgs: list[str] = []
    starts = np.arange(np.floor(days.min()), days.max(), o.step)
    rows = []
    prev = None
    n_carried = 0
    for s in starts:
        centre = s + o.window / 2
        # E0 from night-time data around the window; fall back to the annual value.
        a, b = np.searchsorted(days[ni], [centre - o.e0_window / 2, centre + o.e0_window / 2])
        nn = ni[a:b]
        e0 = e0_default
        rnight = np.nan
        if nn.size > 6 and np.ptp(ta[nn]) >= 5.0:
            _, e_, _, se_ = fit_lloyd_taylor(ta[nn], y[nn])
            if 30.0 <= e_ <= 450.0 and se_ / e_ < 0.5:
                e0 = e_
        a, b = np.searchsorted(days[ni], [s, s + o.window])
        if b > a:
            rnight = float(np.mean(y[ni[a:b]] / lloyd_taylor(ta[ni[a:b]], 1.0, e0)))
        a, b = np.searchsorted(days[di], [s, s + o.window])
        dd = di[a:b]
        fitted = False
        if dd.size >= o.min_records:
            res = _fit_lrc(sw_in[dd], vpd[dd], lloyd_taylor(ta[dd], 1.0, e0), y[dd], rnight, o)
            if res is not None:
                prev = (*res, e0)
                fitted = True
        if prev is None:
            continue
        if not fitted:
            n_carried += 1
        rows.append((centre, *prev, dd.size, fitted))
    params = pd.DataFrame(rows, columns=["day", "alpha", "beta0", "k", "rref", "e0", "n", "fitted"])
    if params.empty:
        raise ValueError("no day-time window with enough records for a light-response fit")
    if n_carried:
        msgs.append(
            f"day-time partitioning: {n_carried} windows without a valid fit reused the previous "
            "window's parameters"
        )
    # Parameters belong to the window centre; records between centres get linearly interpolated values.
    par = {
        c: np.interp(days, params.day.to_numpy(), params[c].to_numpy())
        for c in ("alpha", "beta0", "k", "rref", "e0")
    }
    gpp = light_response(sw_in, vpd, par["alpha"], par["beta0"], par["k"], o.vpd0)
    gpp = np.where(is_day, gpp, 0.0)
    tk = ta + 273.15
    reco = par["rref"] * np.exp(par["e0"] * (1.0 / (T_REF_K - T0_K) - 1.0 / (tk - T0_K)))
    t0 = pd.to_datetime(np.asarray(time))[0].normalize()
    params.insert(0, "time", t0 + pd.to_timedelta(params.day + 0.5, unit="D"))
    return DayPartition(gpp=gpp, reco=reco, params=params.drop(columns="day"), warnings=msgs)


def _fit_lrc(
    sw: np.ndarray, vpd: np.ndarray, et: np.ndarray, nee: np.ndarray, rnight: float, o: DayOptions
) -> tuple[float, float, float, float] | None:
    """Least-squares light-response fit of one window; None when implausible (Lasslop et al. 2010 rules)."""
    r0 = (
        rnight
        if np.isfinite(rnight) and rnight > 0
        else max(float(np.mean(nee[sw < 100])) if (sw < 100).any() else 1.0, 0.1)
    )
    b0 = max(float(np.percentile(nee, 97) - np.percentile(nee, 3)), 1.0)
    x0 = np.array([0.01, b0, 0.05, r0])

    x = np.clip(vpd - o.vpd0, 0.0, None)

    def resid(p: np.ndarray) -> np.ndarray:
        return light_response(sw, vpd, p[0], p[1], p[2], o.vpd0) * -1.0 + p[3] * et - nee

    def jac(p: np.ndarray) -> np.ndarray:
        # Analytic derivatives of −αβR/(αR+β) + R_ref·et; numerical ones would cost five model calls per step.
        decay = np.exp(-p[2] * x)
        beta = p[1] * decay
        d = p[0] * sw + beta
        with np.errstate(invalid="ignore", divide="ignore"):
            g_a = np.where(d > 0, beta * beta * sw / (d * d), 0.0)
            g_b = np.where(d > 0, (p[0] * sw) ** 2 / (d * d), 0.0)
        return np.column_stack([-g_a, -g_b * decay, g_b * x * beta, et])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = least_squares(
                resid,
                x0,
                jac=jac,
                bounds=([0.0, 0.0, 0.0, 0.0], [o.alpha_max, 250.0, 1.0, np.inf]),
                method="trf",
                x_scale=[0.01, 10.0, 0.05, 1.0],
                max_nfev=200,
            )
    except ValueError:
        return None
    alpha, beta0, k, rref = r.x
    # Lasslop et al. (2010): reject windows whose saturation or respiration is implausible.
    if not r.success or beta0 <= 0 or beta0 > 100 or rref <= 0 or alpha <= 0:
        return None
    return float(alpha), float(beta0), float(k), float(rref)


def partition_records(records: pd.DataFrame, options: NightOptions | None = None) -> pd.DataFrame:
    """Night-time partitioning of every site and calendar year of a tidy record table.

    Parameters
    ----------
    records : sub-daily records as read by :func:`geoflux.towers.read_towers` (``site``, ``time``,
        gap-filled ``NEE`` and ``NEE_QC``, ``TA``, ``SW_IN``), before QC filtering.
    options : NightOptions, optional

    Returns
    -------
    A copy with ``RECO`` and ``GPP`` (umol m-2 s-1; NaN where NEE is missing, and for a site-year that
    cannot be partitioned, which a warning names). E0 is fitted per site and year from measured (QC 0)
    night-time records, as ONEFlux does per year.

    Raises
    ------
    ValueError
        naming the missing column, or the resolution when the records are not sub-daily.
    """
    missing = [c for c in ("site", "time", "NEE", "TA", "SW_IN") if c not in records.columns]
    if missing:
        raise ValueError(f"tower records lack column(s) {missing} for the night-time partitioning")
    res = records.attrs.get("resolution")
    if res not in ("HH", "HR"):
        raise ValueError(f"night-time partitioning needs half-hourly or hourly records (got {res})")
    # A shallow copy gets the two new columns; the caller's records are not copied.
    out = records.copy(deep=False)
    reco = np.full(len(out), np.nan)
    gpp = np.full(len(out), np.nan)
    nee = out["NEE"].to_numpy(np.float64)
    qc = out["NEE_QC"].to_numpy(np.float64) if "NEE_QC" in out.columns else np.zeros(len(out))
    measured = np.where(qc == 0, nee, np.nan)
    ta, sw = out["TA"].to_numpy(np.float64), out["SW_IN"].to_numpy(np.float64)
    times = out["time"].to_numpy("datetime64[ns]")
    years = pd.DatetimeIndex(times).year.to_numpy()
    for (site, year), idx in out.groupby([out["site"].astype(str).to_numpy(), years]).indices.items():
        idx = idx[np.argsort(times[idx], kind="stable")]  # in time order, whatever the table's order
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = partition_nighttime(
                    times[idx],
                    nee[idx],
                    ta[idx],
                    sw[idx],
                    nee_fit=measured[idx],
                    options=options,
                )
        except ValueError as exc:
            warnings.warn(f"site {site} {year}: not partitioned ({exc})", TowerDataWarning, stacklevel=2)
            continue
        reco[idx] = p.reco
        gpp[idx] = np.where(np.isfinite(nee[idx]), p.gpp, np.nan)
    out["RECO"] = reco
    out["GPP"] = gpp
    return out


def complete_partitioning(
    records: pd.DataFrame, options: NightOptions | None = None
) -> tuple[pd.DataFrame, int, int]:
    """RECO and GPP for every site of a record table: the files' own (ONEFlux night-time, as the reader
    keeps them) where a site has any, :func:`partition_records` for the other sites.

    Returns
    -------
    A copy of the records with ``RECO`` and ``GPP`` (units as NEE's), the number of sites that kept their
    files' partitioning and the number partitioned here.

    Raises
    ------
    ValueError
        naming the sites that have no RECO and cannot be partitioned here (e.g. daily records).
    """
    # Whole columns are replaced on a shallow copy: the caller's records are neither changed nor copied.
    out = records.copy(deep=False)
    for col in ("RECO", "GPP"):
        if col not in out.columns:
            out[col] = np.nan
    site = out["site"].astype(str)
    has = out["RECO"].notna().groupby(site).any()
    need = sorted(has.index[~has])
    if need:
        rows = site.isin(need).to_numpy()
        sub = out if rows.all() else out.loc[rows]
        sub.attrs = dict(records.attrs)
        try:
            part = partition_records(sub, options)
        except ValueError as exc:
            more = f" and {len(need) - 5} more" if len(need) > 5 else ""
            raise ValueError(
                f"site(s) {', '.join(need[:5])}{more} have no RECO in their files and cannot be "
                f"partitioned here ({exc})"
            ) from None
        for col in ("RECO", "GPP"):
            x = out[col].to_numpy(dtype="float64", copy=True)
            x[rows] = part[col].to_numpy(dtype="float64")
            out[col] = x
    return out, int(has.sum()), len(need)
