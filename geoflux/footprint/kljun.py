"""Kljun et al. (2015) flux footprint prediction (FFP), vectorized over records.

Reference: Kljun, N., Calanca, P., Rotach, M. W., Schmid, H. P. (2015): A simple two-dimensional
parameterisation for Flux Footprint Prediction (FFP). Geosci. Model Dev. 8, 3695-3713,
doi:10.5194/gmd-8-3695-2015.

The FFP is self-similar: in scaled coordinates the crosswind-integrated footprint ``F*(x*)`` and the
crosswind dispersion ``sigma_y*(x*)`` are single universal functions. Each record only sets two lengths,

* ``x_scale`` (m): ``x = x* * x_scale`` with ``x_scale = zm / (1 - zm/h) * (ln(zm/z0) - psi_f)``
  (or ``* umean/ustar * k`` when z0 is unknown), and
* ``sigy_scale`` (m): ``sigma_y = sigma_y*(x*) * sigy_scale`` with
  ``sigy_scale = zm * sigmav / (ustar * ps1)``,

so every function here takes an :class:`FFPScales` (one entry per record) built once by :func:`ffp_scales`.
Frames: *along-wind* ``x`` points upwind from the tower, ``y`` crosswind; *node* coordinates are metres
east and north of the tower, wind direction in degrees clockwise from north (where the wind comes from).

Bad records never raise: :func:`ffp_scales` returns a per-record bit flag (:data:`FLAG_NAMES`) and
invalid records give NaN single-record results and are left out of climatologies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import signal

from geoflux.errors import GeofluxError

# Model parameters of Kljun et al. (2015), Eqs. (14), (17), (19).
A, B, C, D = 1.4524, -1.9914, 1.4622, 0.1359
AC, BC, CC = 2.17, 1.66, 20.0
KARMAN = 0.4
OL_NEUTRAL = 5000.0  # |L| above this is treated as neutral for the dispersion scaling (as FFP v1.42)
XSTAR_PEAK = -C / B + D  # scaled peak location, Eq. (20)

# Per-record validity flags (bit mask; 0 = valid). Limits follow the paper and its reference code.
FLAG_MISSING = 1 << 0  # a required input is NaN
FLAG_ZM = 1 << 1  # zm <= 0
FLAG_Z0 = 1 << 2  # z0 <= 0 (or umean <= 0 when umean is used)
FLAG_H = 1 << 3  # h <= 10 m
FLAG_ZM_H = 1 << 4  # zm >= h
FLAG_RSL = 1 << 5  # zm <= rsl_factor * z0: inside the roughness sublayer
FLAG_ZL = 1 << 6  # zm/L < -15.5
FLAG_SIGMAV = 1 << 7  # sigmav <= 0
FLAG_USTAR = 1 << 8  # ustar <= 0.1 m s-1
FLAG_WD = 1 << 9  # wind direction outside [0, 360]
FLAG_SCALE = 1 << 10  # ln(zm/z0) - psi_f <= 0 (no positive length scale)

FLAG_NAMES: dict[int, str] = {
    FLAG_MISSING: "missing input",
    FLAG_ZM: "zm <= 0",
    FLAG_Z0: "z0 <= 0 or umean <= 0",
    FLAG_H: "h <= 10 m",
    FLAG_ZM_H: "zm >= h",
    FLAG_RSL: "zm inside roughness sublayer",
    FLAG_ZL: "zm/L < -15.5",
    FLAG_SIGMAV: "sigmav <= 0",
    FLAG_USTAR: "ustar <= 0.1 m s-1",
    FLAG_WD: "wind_dir outside [0, 360]",
    FLAG_SCALE: "ln(zm/z0) - psi_f <= 0",
}

DEFAULT_RS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def describe_flags(flag: int) -> list[str]:
    """Names of the validity checks a record's ``flag`` failed (empty list when valid)."""
    return [name for bit, name in FLAG_NAMES.items() if flag & bit]


@dataclass(frozen=True)
class FFPScales:
    """Per-record length scales of the FFP (all arrays of shape ``(n,)``).

    Attributes
    ----------
    x_scale : m; along-wind distance per unit scaled distance x* (NaN for invalid records).
    sigy_scale : m; crosswind dispersion per unit sigma_y* (NaN for invalid records).
    wind_dir : degrees clockwise from true north, the direction the wind comes from (NaN if not given).
    flags : uint16 bit mask of failed validity checks, 0 when valid (see :data:`FLAG_NAMES`).
    """

    x_scale: np.ndarray
    sigy_scale: np.ndarray
    wind_dir: np.ndarray
    flags: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask of records that passed every check."""
        return self.flags == 0

    def __len__(self) -> int:
        return int(self.x_scale.shape[0])

    def subset(self, index: np.ndarray | slice) -> FFPScales:
        """Records selected by a boolean mask, index array or slice."""
        return FFPScales(self.x_scale[index], self.sigy_scale[index], self.wind_dir[index], self.flags[index])


def _as_records(name: str, value: float | Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    if value is None:
        return np.full(n, np.nan)
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise GeofluxError(f"{name}: expected a scalar or a 1-D array of {n} records, got shape {arr.shape}")
    return arr


def ffp_scales(
    zm: float | np.ndarray,
    h: float | np.ndarray,
    ol: float | np.ndarray,
    sigmav: float | np.ndarray,
    ustar: float | np.ndarray,
    z0: float | np.ndarray | None = None,
    umean: float | np.ndarray | None = None,
    wind_dir: float | np.ndarray | None = None,
    rsl_factor: float = 12.5,
) -> FFPScales:
    """Validate FFP inputs per record and compute the record length scales.

    Scalars broadcast against arrays; all arrays must have the same length (records).

    Parameters
    ----------
    zm : m; measurement height above displacement height (z - d).
    h : m; boundary-layer height.
    ol : m; Obukhov length L.
    sigmav : m s-1; standard deviation of lateral velocity fluctuations.
    ustar : m s-1; friction velocity.
    z0 : m; roughness length. Used where finite; elsewhere ``umean`` is used.
    umean : m s-1; mean wind speed at zm, used where z0 is missing.
    wind_dir : degrees clockwise from true north (direction the wind comes from); optional.
    rsl_factor : records with ``zm <= rsl_factor * z0`` are in the roughness sublayer and flagged.
        12.5 is the limit of Kljun's reference code; pass 20 for the stricter ``zm > 20 z0``.

    Returns
    -------
    FFPScales
        Invalid records are flagged (never raised) and have NaN scales.
    """
    sizes = [np.size(v) for v in (zm, h, ol, sigmav, ustar, z0, umean, wind_dir) if v is not None]
    n = max(sizes) if sizes else 1
    zm_, h_, ol_ = _as_records("zm", zm, n), _as_records("h", h, n), _as_records("ol", ol, n)
    sv_, us_ = _as_records("sigmav", sigmav, n), _as_records("ustar", ustar, n)
    z0_, um_ = _as_records("z0", z0, n), _as_records("umean", umean, n)
    wd_ = _as_records("wind_dir", wind_dir, n)

    use_z0 = np.isfinite(z0_)
    flags = np.zeros(n, dtype=np.uint16)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        missing = ~(
            np.isfinite(zm_) & np.isfinite(h_) & np.isfinite(ol_) & np.isfinite(sv_) & np.isfinite(us_)
        )
        missing |= ~use_z0 & ~np.isfinite(um_)
        missing |= (wind_dir is not None) & ~np.isfinite(wd_)
        flags[missing] |= FLAG_MISSING
        flags[zm_ <= 0] |= FLAG_ZM
        flags[(use_z0 & (z0_ <= 0)) | (~use_z0 & (um_ <= 0))] |= FLAG_Z0
        flags[h_ <= 10] |= FLAG_H
        flags[zm_ >= h_] |= FLAG_ZM_H
        flags[use_z0 & (zm_ <= rsl_factor * z0_)] |= FLAG_RSL
        zl = zm_ / ol_
        flags[(zl < -15.5) | (ol_ == 0)] |= FLAG_ZL
        flags[sv_ <= 0] |= FLAG_SIGMAV
        flags[us_ <= 0.1] |= FLAG_USTAR
        flags[(wd_ < 0) | (wd_ > 360)] |= FLAG_WD

        # psi_f, Eq. (10)-(11); L >= OL_NEUTRAL takes the unstable form as the reference code does
        chi = (1.0 - 19.0 * zl) ** 0.25
        psi_unstable = np.log((1 + chi**2) / 2) + 2 * np.log((1 + chi) / 2) - 2 * np.arctan(chi) + np.pi / 2
        stable = (ol_ > 0) & (ol_ < OL_NEUTRAL)
        psi_f = np.where(stable, -5.3 * zl, psi_unstable)
        log_term = np.where(use_z0, np.log(zm_ / z0_) - psi_f, um_ / us_ * KARMAN)
        flags[~(log_term > 0) & ~missing] |= FLAG_SCALE
        x_scale = zm_ / (1.0 - zm_ / h_) * log_term

        # ps1 of Eq. (13): the neutral limit uses L = -1e6, as the reference code
        ol_disp = np.where(np.abs(ol_) > OL_NEUTRAL, -1e6, ol_)
        base = np.where(ol_disp <= 0, 0.80, 0.55)
        ps1 = np.minimum(1e-5 / np.abs(zm_ / ol_disp) + base, 1.0)
        sigy_scale = zm_ * sv_ / (us_ * ps1)

    bad = flags != 0
    x_scale[bad] = np.nan
    sigy_scale = np.where(bad, np.nan, sigy_scale)
    return FFPScales(x_scale, sigy_scale, wd_, flags)


def _col(a: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-record array so it broadcasts over ``ndim`` trailing point axes."""
    return a.reshape(a.shape + (1,) * ndim)


def fstar_ci(xstar: np.ndarray) -> np.ndarray:
    """Scaled crosswind-integrated footprint F*(x*), Eq. (14); 0 for x* <= d (dimensionless)."""
    xs = np.asarray(xstar, dtype=float)
    u = np.maximum(xs - D, 1e-12)  # below d the function is 0; the clamp keeps log/exp finite
    with np.errstate(over="ignore", under="ignore"):
        return np.where(xs > D, A * np.exp(B * np.log(u) - C / u), 0.0)


def crosswind_integrated(x: np.ndarray, scales: FFPScales) -> np.ndarray:
    """Crosswind-integrated footprint f_ci at upwind distances ``x``.

    Parameters
    ----------
    x : m; along-wind (upwind) distances from the tower, any shape.
    scales : records from :func:`ffp_scales`.

    Returns
    -------
    ndarray, shape ``(n_records, *x.shape)``, m-1 (NaN rows for invalid records).
    """
    x = np.asarray(x, dtype=float)
    xsc = _col(scales.x_scale, x.ndim)
    return fstar_ci(x / xsc) / xsc


def sigystar(xstar: np.ndarray) -> np.ndarray:
    """Scaled crosswind dispersion sigma_y*(x*), Eq. (17) (dimensionless)."""
    xs = np.abs(np.asarray(xstar, dtype=float))
    return AC * np.sqrt(BC * xs**2 / (1.0 + CC * xs))


def crosswind_dispersion(x: np.ndarray, scales: FFPScales) -> np.ndarray:
    """Crosswind dispersion sigma_y at upwind distances ``x``.

    Parameters
    ----------
    x : m; along-wind distances, any shape.
    scales : records from :func:`ffp_scales`.

    Returns
    -------
    ndarray, shape ``(n_records, *x.shape)``, m.
    """
    x = np.asarray(x, dtype=float)
    return sigystar(x / _col(scales.x_scale, x.ndim)) * _col(scales.sigy_scale, x.ndim)


def footprint_2d(x: np.ndarray, y: np.ndarray, scales: FFPScales) -> np.ndarray:
    """Two-dimensional footprint in the along-wind frame, Eq. (16).

    Parameters
    ----------
    x : m; upwind distance from the tower (array, broadcast with ``y``).
    y : m; crosswind distance.
    scales : records from :func:`ffp_scales`.

    Returns
    -------
    ndarray, shape ``(n_records, *broadcast(x, y).shape)``, m-2; 0 downwind of ``x* <= d``.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    fci = crosswind_integrated(x, scales)
    sy = crosswind_dispersion(x, scales)
    with np.errstate(invalid="ignore", divide="ignore", under="ignore"):
        f = fci / (np.sqrt(2 * np.pi) * sy) * np.exp(-(y**2) / (2 * sy**2))
    # x* <= d has f_ci = 0 but sigma_y may be 0 there (0/0)
    return np.where(fci > 0, f, np.where(np.isnan(fci), np.nan, 0.0))


def footprint_on_nodes(east: np.ndarray, north: np.ndarray, scales: FFPScales) -> np.ndarray:
    """Two-dimensional footprint at points given in metres east/north of the tower.

    The footprint of each record is rotated into its ``wind_dir`` (degrees from true north).

    Returns
    -------
    ndarray, shape ``(n_records, *broadcast(east, north).shape)``, m-2.
    """
    e, n = np.broadcast_arrays(np.asarray(east, dtype=float), np.asarray(north, dtype=float))
    wd = np.deg2rad(_col(scales.wind_dir, e.ndim))
    x = e * np.sin(wd) + n * np.cos(wd)  # upwind distance
    y = e * np.cos(wd) - n * np.sin(wd)  # crosswind distance
    return _footprint_rec(x, y, scales)


def _footprint_rec(x: np.ndarray, y: np.ndarray, scales: FFPScales) -> np.ndarray:
    """Footprint for per-record coordinate arrays ``x, y`` of shape ``(n_records, ...)``."""
    xsc = _col(scales.x_scale, x.ndim - 1)
    ssc = _col(scales.sigy_scale, x.ndim - 1)
    xs = x / xsc
    fci = fstar_ci(xs) / xsc
    sy = sigystar(xs) * ssc
    with np.errstate(invalid="ignore", divide="ignore", under="ignore"):
        f = fci / (np.sqrt(2 * np.pi) * sy) * np.exp(-(y**2) / (2 * sy**2))
    return np.where(fci > 0, f, np.where(np.isnan(fci), np.nan, 0.0))


def peak_distance(scales: FFPScales) -> np.ndarray:
    """Upwind distance of the footprint peak x_max, Eq. (20), m (NaN for invalid records)."""
    return XSTAR_PEAK * scales.x_scale


_XSTAR_TABLE: tuple[np.ndarray, np.ndarray] | None = None


def _cumulative_table() -> tuple[np.ndarray, np.ndarray]:
    """Cumulative integral of F* on a fine log grid of x* - d (computed once)."""
    global _XSTAR_TABLE
    if _XSTAR_TABLE is None:
        u = np.geomspace(1e-3, 1e7, 200_001)
        f = A * np.exp(B * np.log(u) - C / u)
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(u))])
        _XSTAR_TABLE = (u + D, cum)
    return _XSTAR_TABLE


def distance_containing(
    r: float | Sequence[float] | np.ndarray, scales: FFPScales, method: str = "paper"
) -> np.ndarray:
    """Upwind distance from the tower within which the fraction ``r`` of the flux originates.

    Parameters
    ----------
    r : fraction(s) of the crosswind-integrated footprint, 0 < r < 1 (0.8 = 80 %).
    scales : records from :func:`ffp_scales`.
    method : ``'paper'`` uses the closed form of Kljun et al. (2015), Eq. (25),
        ``x_R = (-c / ln R + d) * x_scale``; ``'numeric'`` inverts the exact integral of F*.

    Returns
    -------
    ndarray, m; shape ``(n_records,)`` for scalar ``r``, else ``(n_records, len(r))``.
    """
    r_arr = np.asarray(r, dtype=float)
    if np.any((r_arr <= 0) | (r_arr >= 1)):
        raise GeofluxError(f"r: expected fractions strictly between 0 and 1, got {r_arr.tolist()}")
    if method == "paper":
        xstar = -C / np.log(r_arr) + D
    elif method == "numeric":
        xs_tab, cum = _cumulative_table()
        xstar = np.interp(r_arr, cum, xs_tab)
    else:
        raise GeofluxError(f"method: expected 'paper' or 'numeric', got {method!r}")
    return np.multiply.outer(scales.x_scale, xstar)


# --------------------------------------------------------------------------------------------------------
# Climatology


@dataclass(frozen=True)
class FootprintClimatology:
    """Footprint climatology on a node grid centred on the tower.

    Attributes
    ----------
    x : (nx,) m east of the tower of the node columns.
    y : (ny,) m north of the tower of the node rows.
    f : (ny, nx) m-2; mean footprint of the valid records (``f[j, i]`` at ``(x[i], y[j])``).
    n : number of records averaged.
    flags : per-record validity flags of the input (0 = used).
    rs : source-area fractions of ``levels``.
    levels : m-2; footprint value whose super-level set holds fraction ``rs`` of the flux (NaN if n = 0).
    """

    x: np.ndarray
    y: np.ndarray
    f: np.ndarray
    n: int
    flags: np.ndarray
    rs: np.ndarray = field(default_factory=lambda: np.asarray(DEFAULT_RS))
    levels: np.ndarray = field(default_factory=lambda: np.full(len(DEFAULT_RS), np.nan))

    def source_area(self, r: float) -> np.ndarray:
        """Boolean node mask of the ``r`` source area (nodes with f >= level of r)."""
        level = source_area_levels(self.f, _spacing(self.x), _spacing(self.y), [r])[0]
        return self.f >= level

    def contours(self, r: float) -> list[np.ndarray]:
        """Polygons (list of ``(k, 2)`` arrays of east, north in m) of the ``r`` source area."""
        level = source_area_levels(self.f, _spacing(self.x), _spacing(self.y), [r])[0]
        return source_area_contours(self.x, self.y, self.f, level)


def _spacing(v: np.ndarray) -> float:
    return float(v[1] - v[0]) if v.size > 1 else 1.0


def source_area_levels(
    f: np.ndarray, dx: float, dy: float, rs: Sequence[float] | np.ndarray = DEFAULT_RS
) -> np.ndarray:
    """Footprint values bounding the smallest areas that hold fractions ``rs`` of the flux.

    Nodes are ranked by value; the level of ``r`` is the value at which the cumulative sum times the node
    area is closest to ``r`` (the rule of Kljun's reference code).

    Parameters
    ----------
    f : m-2; footprint on a regular node grid.
    dx, dy : m; node spacing.
    rs : fractions in (0, 1].

    Returns
    -------
    ndarray, m-2, one level per ``r``.
    """
    sf = np.sort(np.where(np.isfinite(f), f, -np.inf), axis=None)[::-1]
    sf = sf[np.isfinite(sf)]
    if sf.size == 0:
        return np.full(len(rs), np.nan)
    csf = np.cumsum(sf) * dx * dy
    rs_arr = np.asarray(rs, dtype=float)
    # index of the cumulative closest to r: csf is non-decreasing, so check both neighbours
    i = np.clip(np.searchsorted(csf, rs_arr), 0, csf.size - 1)
    j = np.clip(i - 1, 0, csf.size - 1)
    pick = np.where(np.abs(csf[j] - rs_arr) <= np.abs(csf[i] - rs_arr), j, i)
    return sf[pick]


def source_area_contours(x: np.ndarray, y: np.ndarray, f: np.ndarray, level: float) -> list[np.ndarray]:
    """Iso-lines of ``f`` at ``level`` as a list of ``(k, 2)`` vertex arrays (x, y in the units of x, y).

    Uses ``contourpy`` (installed with matplotlib); lines are returned longest first.
    """
    try:
        import contourpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise GeofluxError(
            "source_area_contours: needs the 'contourpy' package (pip install contourpy)"
        ) from None
    if not np.isfinite(level):
        return []
    gen = contourpy.contour_generator(x, y, f, line_type=contourpy.LineType.Separate)
    lines = [np.asarray(seg) for seg in gen.lines(level)]
    return sorted(lines, key=len, reverse=True)


# Nodes whose crosswind distance exceeds CROSSWIND_CUT sigma_y are skipped in sums over records: there a
# record's footprint is below exp(-CROSSWIND_CUT**2 / 2) = 7e-10 of its centreline value at the same
# distance (a climatology of 1,000 records then differs from the full sum by 4e-11 where f > 1e-3 max).
CROSSWIND_CUT = 6.5


def _kernel_block(
    en1: np.ndarray, mu: np.ndarray, my: np.ndarray, pref: np.ndarray, work: Sequence[np.ndarray]
) -> np.ndarray:
    """Sum over a record chunk of the footprint at a block of nodes.

    ``en1`` ``(3, b)`` holds the nodes' east, north (m) and 1. Per-record arrays: ``mu`` ``(g, 3)`` rows
    ``(sin wd / x_scale, cos wd / x_scale, -d)`` so that ``mu @ en1`` is ``u = x* - d``; ``my`` ``(g, 3)``
    rows ``(cos wd, -sin wd, 0) * sqrt(qs)`` so that ``my @ en1`` is the crosswind distance times
    ``sqrt(qs)``, with qs = 1 / (2 ac^2 bc sigy_scale^2) m-2; ``pref`` ``(g,)`` the constant factor.
    ``work``: four float64 buffers of at least ``g * b`` elements.

    With ``p = (1 + cc x*) / x*^2`` the footprint is ``pref * sqrt(p) * exp(b ln u - c/u - qs y^2 p)``
    (Eqs. 14, 16, 17). The cost is passes over the ``(g, b)`` block, so the per-record factors sit in the
    two small matrix products and in ``pref`` (a per-record column broadcast costs 3x a plain pass),
    every step writes into the preallocated buffers (a fresh large array costs a page fault per 4 KiB),
    and the record sum is a matrix-vector product.
    """
    g, b = mu.shape[0], en1.shape[1]
    u, y, p, e = (w[: g * b].reshape(g, b) for w in work)
    np.matmul(mu, en1, out=u)  # x* - d
    np.matmul(my, en1, out=y)  # sqrt(qs) y
    np.maximum(u, 1e-12, out=u)  # x* <= d: exp(-c/1e-12) = 0, so no mask is needed
    np.add(u, D, out=p)
    np.divide(1.0, p, out=p)  # 1 / x*
    np.add(p, CC, out=e)
    p *= e  # (1 + cc x*) / x*^2
    y *= y
    y *= p  # qs y^2 p = y^2 / (2 sigma_y^2)
    np.log(u, out=e)
    e *= B
    np.divide(C, u, out=u)
    e -= u
    e -= y
    with np.errstate(under="ignore"):
        np.exp(e, out=e)
    np.sqrt(p, out=p)
    e *= p
    return pref @ e


@dataclass(frozen=True)
class _Nodes:
    """Points grouped in distance bands, each sorted by azimuth and stored twice (0..4 pi) so that any
    azimuth range shorter than a full turn is one contiguous slice."""

    order: np.ndarray  # position of each stored node (first copy) in the input
    theta: np.ndarray  # azimuth, rad clockwise from north
    en1: np.ndarray  # (3, n): east, north (m), 1
    offsets: np.ndarray  # band b occupies [offsets[b], offsets[b] + 2 * sizes[b])
    sizes: np.ndarray
    r_in: np.ndarray  # band radii, m
    r_out: np.ndarray


def _band_nodes(east: np.ndarray, north: np.ndarray, n_bands: int = 24) -> _Nodes:
    rho = np.hypot(east, north)
    pos = np.flatnonzero(rho > 0)  # the tower node itself always has f = 0
    if pos.size == 0:
        z = np.zeros(0)
        return _Nodes(pos, z, np.ones((3, 0)), np.zeros(1, int), np.zeros(1, int), np.ones(1), np.ones(1))
    lo, hi = rho[pos].min(), rho[pos].max()
    edges = np.geomspace(lo, hi * (1 + 1e-12), n_bands + 1) if hi > lo else np.array([lo, hi * 1.01 + 1e-9])
    band = np.clip(np.searchsorted(edges, rho[pos], side="right") - 1, 0, len(edges) - 2)
    theta = np.mod(np.arctan2(east[pos], north[pos]), 2 * np.pi)
    idx = np.lexsort((theta, band))
    pos, band, theta = pos[idx], band[idx], theta[idx]
    sizes = np.bincount(band, minlength=len(edges) - 1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = {k: [] for k in ("order", "theta", "east", "north")}
    for b in range(len(sizes)):
        sl = slice(starts[b], starts[b + 1])
        for _ in range(2):
            parts["order"].append(pos[sl])
            parts["east"].append(east[pos[sl]])
            parts["north"].append(north[pos[sl]])
        parts["theta"] += [theta[sl], theta[sl] + 2 * np.pi]
    e = np.concatenate(parts["east"])
    return _Nodes(
        np.concatenate(parts["order"]),
        np.concatenate(parts["theta"]),
        np.stack([e, np.concatenate(parts["north"]), np.ones_like(e)]),
        2 * starts[:-1],
        sizes,
        edges[:-1],
        edges[1:],
    )


def _half_widths(x_scale: np.ndarray, sigy_scale: np.ndarray, r_in: np.ndarray) -> np.ndarray:
    """Largest azimuth off the wind axis (rad) at which a record can hold footprint beyond radius ``r_in``.

    A node at distance rho and azimuth phi off the wind axis is within CROSSWIND_CUT sigma_y iff
    ``tan(phi) * sqrt(1 + cc rho cos(phi) / x_scale) <= K`` with ``K = CROSSWIND_CUT ac sqrt(bc) sigy_scale /
    x_scale`` (Eq. 17). The left side grows with rho and phi, so solving it at ``rho = r_in`` bounds phi for
    the whole band. Bisection, vectorized over (records, bands); the upper end of the bracket is returned.
    """
    k = (CROSSWIND_CUT * AC * np.sqrt(BC) * sigy_scale / x_scale)[:, None]
    a = CC * r_in[None, :] / x_scale[:, None]
    lo = np.zeros(np.broadcast_shapes(k.shape, a.shape))
    hi = np.full(lo.shape, np.pi / 2)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        inside = np.tan(mid) * np.sqrt(1 + a * np.cos(mid)) <= k
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return np.minimum(hi + 1e-9, np.pi / 2)


def footprint_sum(
    east: np.ndarray,
    north: np.ndarray,
    scales: FFPScales,
    chunk_records: int = 16,
    block_nodes: int = 4096,
    workers: int | None = None,
) -> np.ndarray:
    """Sum over the valid records of the footprint at arbitrary points, without a loop per record.

    Points are grouped in distance bands and sorted by azimuth once; records are sorted by wind direction
    and processed in chunks. For each chunk and band only the contiguous azimuth range that can hold
    footprint is evaluated: upwind of the chunk's wind directions (the FFP is exactly 0 downwind) and within
    :data:`CROSSWIND_CUT` crosswind standard deviations (beyond, a record's value is below 7e-10 of its
    centreline value). Memory is O(points + chunk x block).

    Parameters
    ----------
    east, north : m; point coordinates relative to the tower (same shape).
    scales : records; invalid ones (flags != 0) and those without wind direction are skipped.
    chunk_records : records evaluated together.
    block_nodes : nodes per block.
    workers : threads (numpy releases the GIL); default ``min(4, os.cpu_count())``.

    Returns
    -------
    ndarray like ``east``, m-2: the sum (not the mean) over used records.
    """
    east = np.asarray(east, dtype=float)
    north = np.asarray(north, dtype=float)
    if east.shape != north.shape:
        raise GeofluxError(f"east/north: expected the same shape, got {east.shape} and {north.shape}")
    shape = east.shape
    m = east.size
    use = scales.valid & np.isfinite(scales.wind_dir)
    s = scales.subset(use)
    out = np.zeros(m)
    if len(s) == 0 or m == 0:
        return out.reshape(shape)
    nodes = _band_nodes(east.ravel(), north.ravel())

    wd = np.deg2rad(np.mod(s.wind_dir, 360.0))
    # chunks hold records of similar crosswind spread (sigy_scale / x_scale class) and wind direction, so
    # that each chunk's azimuth ranges stay narrow
    spread = s.sigy_scale / s.x_scale
    n_cls = int(np.clip(len(s) // (64 * chunk_records), 1, 8))
    cls = np.searchsorted(np.quantile(spread, np.linspace(0, 1, n_cls + 1)[1:-1]), spread, side="right")
    rec = np.lexsort((wd, cls))
    wd, xsc, ssc = wd[rec], s.x_scale[rec], s.sigy_scale[rec]
    sq = 1.0 / (np.sqrt(2 * AC**2 * BC) * ssc)  # sqrt(qs), m-1
    mu = np.stack([np.sin(wd) / xsc, np.cos(wd) / xsc, np.full(wd.shape, -D)], axis=1)
    my = np.stack([np.cos(wd) * sq, -np.sin(wd) * sq, np.zeros(wd.shape)], axis=1)
    # f = A exp(...) sqrt((1 + cc x*) / x*^2) / (x_scale sqrt(2 pi) ac sqrt(bc) sigy_scale), m-2
    pref = A / (xsc * np.sqrt(2 * np.pi) * AC * np.sqrt(BC) * ssc)

    # chunk boundaries never straddle two spread classes, so wind directions ascend within a chunk
    cls_sorted = cls[rec]
    starts, ends = [], []
    for c in range(n_cls):
        c_idx = np.flatnonzero(cls_sorted == c)
        if c_idx.size:
            for k0 in range(int(c_idx[0]), int(c_idx[-1]) + 1, chunk_records):
                starts.append(k0)
                ends.append(min(k0 + chunk_records, int(c_idx[-1]) + 1))
    eps = 1e-9

    half_all = _half_widths(xsc, ssc, nodes.r_in)

    def ranges(a: int, b: int) -> list[tuple[int, int]]:
        """Slices of the node arrays that may hold footprint of records a..b-1."""
        out_r = []
        half = half_all[a:b].max(axis=0)
        near = nodes.r_out <= D * np.min(xsc[a:b])  # x* <= d everywhere in the band
        for band in np.flatnonzero((nodes.sizes > 0) & ~near):
            off, size = int(nodes.offsets[band]), int(nodes.sizes[band])
            span = wd[b - 1] - wd[a] + 2 * half[band] + 2 * eps
            if span >= 2 * np.pi:
                out_r.append((off, off + size))
                continue
            lo_ang = np.mod(wd[a] - half[band] - eps, 2 * np.pi)
            th = nodes.theta[off : off + 2 * size]
            lo = int(np.searchsorted(th, lo_ang))
            hi = int(np.searchsorted(th, lo_ang + span))
            out_r.append((off + lo, off + hi))
        return out_r

    def run(chunk_ids: list[int]) -> np.ndarray:
        acc = np.zeros(nodes.en1.shape[1])
        work = [np.empty(chunk_records * block_nodes) for _ in range(4)]
        for c in chunk_ids:
            a, b = starts[c], ends[c]
            cols = (mu[a:b], my[a:b], pref[a:b])
            for lo, hi in ranges(a, b):
                for k in range(lo, hi, block_nodes):
                    k1 = min(k + block_nodes, hi)
                    acc[k:k1] += _kernel_block(nodes.en1[:, k:k1], *cols, work)
        return acc

    nw = workers or min(4, os.cpu_count() or 1)
    # interleaved static split: deterministic sums, balanced load
    parts = [list(range(w, len(starts), nw)) for w in range(nw)]
    if nw == 1:
        accs = [run(parts[0])]
    else:
        with ThreadPoolExecutor(max_workers=nw) as ex:
            accs = list(ex.map(run, parts))
    acc = np.sum(accs, axis=0)
    out = np.bincount(nodes.order, weights=acc, minlength=m)
    return out.reshape(shape)


_SMOOTH_KERNEL = np.array([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])


def climatology(
    scales: FFPScales,
    x: np.ndarray,
    y: np.ndarray,
    rs: Sequence[float] | None = DEFAULT_RS,
    smooth: bool = True,
    chunk_records: int = 16,
    workers: int | None = None,
) -> FootprintClimatology:
    """Footprint climatology (mean footprint of many records) on a regular node grid.

    Matches ``FFP_climatology`` of Kljun's reference code on the same nodes: the mean over valid records,
    optionally smoothed twice with its 3x3 kernel, and the levels of the ``rs`` source areas.

    Parameters
    ----------
    scales : records from :func:`ffp_scales` with ``wind_dir``; records with flags != 0 are skipped.
    x : (nx,) m east of the tower of node columns (regular spacing).
    y : (ny,) m north of the tower of node rows (regular spacing).
    rs : source-area fractions for :attr:`FootprintClimatology.levels` (None for none).
    smooth : apply the reference code's smoothing (two passes of a 3x3 kernel, zero padded).
    chunk_records : records per vectorized chunk.
    workers : threads; default ``min(4, os.cpu_count())``.

    Returns
    -------
    FootprintClimatology
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or x.size < 2 or y.size < 2:
        raise GeofluxError(f"x, y: expected 1-D node coordinates of >= 2 nodes, got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(scales.wind_dir[scales.valid])):
        raise GeofluxError("wind_dir: a climatology needs a wind direction for every valid record")
    ee, nn = np.meshgrid(x, y)
    total = footprint_sum(ee, nn, scales, chunk_records=chunk_records, workers=workers)
    n = int(np.count_nonzero(scales.valid))
    f = total / n if n else np.zeros_like(total)
    if smooth and n:
        f = signal.convolve2d(f, _SMOOTH_KERNEL, mode="same")
        f = signal.convolve2d(f, _SMOOTH_KERNEL, mode="same")
    rs_arr = np.asarray(rs if rs is not None else [], dtype=float)
    levels = source_area_levels(f, _spacing(x), _spacing(y), rs_arr) if n else np.full(rs_arr.size, np.nan)
    return FootprintClimatology(x, y, f, n, scales.flags.copy(), rs_arr, levels)


def node_grid(half_width: float, dx: float) -> np.ndarray:
    """Node coordinates ``-half_width .. half_width`` every ``dx`` m (the reference code's domain layout)."""
    if not (dx > 0 and half_width > 0):
        raise GeofluxError(f"half_width, dx: expected positive metres, got {half_width}, {dx}")
    k = round(2 * half_width / dx)
    return np.linspace(-half_width, half_width, k + 1)


__all__ = [
    "FLAG_NAMES",
    "FFPScales",
    "FootprintClimatology",
    "climatology",
    "crosswind_dispersion",
    "crosswind_integrated",
    "describe_flags",
    "distance_containing",
    "ffp_scales",
    "footprint_2d",
    "footprint_on_nodes",
    "footprint_sum",
    "fstar_ci",
    "node_grid",
    "peak_distance",
    "sigystar",
    "source_area_contours",
    "source_area_levels",
]
