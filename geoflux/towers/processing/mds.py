"""Marginal distribution sampling (MDS) gap-filling after Reichstein et al. (2005).

A gap is filled with the mean of measured fluxes recorded under similar meteorological conditions
(incoming short-wave radiation, air temperature, vapour-pressure deficit) within a time window around it;
if none are found the conditions are relaxed (radiation only), then the mean diurnal course of nearby days
is used, then ever wider windows. The sequence of look-ups and the quality classes follow the published
algorithm as implemented in REddyProc and hesseflux (the reference geoflux is tested against):

====  =====================================  ==============================  =======
step  similarity                             window (half-width, records)    quality
====  =====================================  ==============================  =======
1a    SW_IN, TA and VPD                      1 week                          1
1b    SW_IN, TA and VPD                      2 weeks                         1
2     SW_IN only                             1 week                          1
3a    same time of day (±1 h)                0.5 day                         1
3b    same time of day (±1 h)                1.5 days                        2
4     SW_IN, TA and VPD                      3 … 11 weeks                    2 (≤ 4 weeks), 3
5     SW_IN only                             2 … 11 weeks                    2 (2 weeks), 3
6     same time of day (±1 h)                3.5 … 119.5 days                3
====  =====================================  ==============================  =======

Every look-up is evaluated for all still-unfilled records at once on a (records × window) matrix built in
row chunks, so one site-year fills in well under a second instead of a Python loop over gaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Row chunks keep every (records × window) work matrix below this many cells (~ 40 MB of float64).
_MAX_CELLS = 5_000_000


@dataclass(frozen=True)
class MDSOptions:
    """Tolerances and limits of MDS gap-filling (published defaults of Reichstein et al. 2005).

    Attributes
    ----------
    sw_dev : float, W m-2
        Largest radiation difference of a similar record. The effective tolerance is
        ``clip(SW_IN of the gap, 20, sw_dev)``, so night-time gaps use 20 W m-2.
    ta_dev : float, degC
        Largest air-temperature difference of a similar record.
    vpd_dev : float, hPa
        Largest vapour-pressure-deficit difference of a similar record.
    longgap : float, days
        Gaps longer than this (and margins further than this from the first/last measurement) are left
        unfilled rather than extrapolated.
    min_samples : int
        Least number of similar records whose mean fills a gap.
    """

    sw_dev: float = 50.0
    ta_dev: float = 2.5
    vpd_dev: float = 5.0
    longgap: float = 60.0
    min_samples: int = 2


@dataclass
class MDSResult:
    """Output of :func:`mds_gapfill`, one value per record.

    Attributes
    ----------
    filled : ndarray, unit of the input
        Measured values where present, MDS estimate in gaps, NaN where no estimate exists.
    qc : ndarray of int8
        0 measured, 1–3 MDS quality class (1 best), -1 unfilled (long gap or no estimate).
    sd : ndarray, unit of the input
        Standard deviation of the similar records used for the estimate (random-error estimate after
        Lasslop et al. 2008); for measured records that of the similar records around them (steps 1a/1b).
    n : ndarray of int
        Number of similar records averaged.
    method : ndarray of int8
        Look-up step that produced the value (1–6, see module docstring), 0 for measured records.
    window : ndarray of int
        Half-width of the look-up window used, in records.
    """

    filled: np.ndarray
    qc: np.ndarray
    sd: np.ndarray
    n: np.ndarray
    method: np.ndarray
    window: np.ndarray


def _long_gap_mask(valid: np.ndarray, max_len: int) -> np.ndarray:
    """True on records of gaps longer than ``max_len`` and on margins further than it from any data."""
    n = valid.size
    big = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        big[:] = True
        return big
    # Runs of invalid records: starts where valid goes True→False, ends where False→True.
    padded = np.concatenate(([True], valid, [True])).astype(np.int8)
    d = np.diff(padded)
    starts = np.flatnonzero(d == -1)
    ends = np.flatnonzero(d == 1)
    for s, e in zip(starts, ends, strict=True):
        if e - s > max_len:
            big[s:e] = True
    # Margins: records before the first / after the last measurement stay unfilled beyond max_len.
    if idx[0] > max_len:
        big[: idx[0] - max_len] = True
    if idx[-1] < n - max_len:
        big[idx[-1] + max_len :] = True
    return big


class _Filler:
    """Windowed look-ups of similar records for many target records at once."""

    def __init__(
        self,
        y: np.ndarray,
        sw: np.ndarray,
        ta: np.ndarray,
        vpd: np.ndarray,
        hour: np.ndarray,
        opts: MDSOptions,
    ) -> None:
        self.opts = opts
        self.n = y.size
        valid = np.isfinite(y)
        self.valid = valid
        meteo = np.isfinite(sw) & np.isfinite(ta) & np.isfinite(vpd)
        self.meteo_ok = meteo
        self.sw_ok = np.isfinite(sw)
        self.sw, self.ta, self.vpd, self.hour = sw, ta, vpd, hour
        # Candidate records must have the flux and all three drivers (published algorithm), also for the
        # radiation-only look-ups. Setting the drivers of non-candidates to NaN makes every similarity test on
        # them False, so no mask has to be gathered.
        cand = meteo & valid
        self._src = {
            "y": np.where(valid, y, 0.0),
            "sw": np.where(cand, sw, np.nan),
            "ta": np.where(cand, ta, np.nan),
            "vpd": np.where(cand, vpd, np.nan),
            "hour": np.where(valid, hour, np.nan),
        }
        self._pad: dict[tuple[str, int], np.ndarray] = {}

    def _windows(self, name: str, half: int, targets: np.ndarray) -> np.ndarray:
        """Rows ``x[t - half : t + half + 1]`` for each target, NaN/0 beyond the series ends.

        Built from a padded copy through a sliding-window view, so each row is one contiguous copy instead of
        an element-wise gather.
        """
        key = (name, half)
        if key not in self._pad:
            fill = 0.0 if name == "y" else np.nan
            pad = np.full(half, fill)
            self._pad = {k: v for k, v in self._pad.items() if k[1] == half}
            self._pad[key] = np.concatenate([pad, self._src[name], pad])
        view = np.lib.stride_tricks.sliding_window_view(self._pad[key], 2 * half + 1)
        return view[targets]

    def lookup(self, targets: np.ndarray, half: int, kind: str) -> tuple[np.ndarray, ...]:
        """Mean, sd and count of similar records within ``±half`` records of each target.

        ``kind`` is ``"all"`` (SW_IN, TA, VPD), ``"sw"`` (SW_IN only) or ``"hour"`` (same time of day).
        """
        nt = targets.size
        mean = np.full(nt, np.nan)
        sd = np.full(nt, np.nan)
        cnt = np.zeros(nt, dtype=np.int64)
        if nt == 0:
            return mean, sd, cnt
        width = 2 * half + 1
        rows = max(1, _MAX_CELLS // width)
        o = self.opts
        for c0 in range(0, nt, rows):
            t = targets[c0 : c0 + rows]
            if kind == "hour":
                ok = np.abs(self._windows("hour", half, t) - self.hour[t][:, None]) < 1.1
            else:
                sw_t = self.sw[t][:, None]
                # Radiation tolerance shrinks with radiation: 20 W m-2 at night, up to sw_dev by day.
                sw_tol = np.maximum(20.0, np.minimum(sw_t, o.sw_dev))
                ok = np.abs(self._windows("sw", half, t) - sw_t) < sw_tol
                if kind == "all":
                    ok &= np.abs(self._windows("ta", half, t) - self.ta[t][:, None]) < o.ta_dev
                    ok &= np.abs(self._windows("vpd", half, t) - self.vpd[t][:, None]) < o.vpd_dev
            yw = self._windows("y", half, t)
            k = ok.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                m = np.where(ok, yw, 0.0).sum(axis=1) / k
                # Two-pass variance: subtract the mean before squaring to avoid cancellation.
                dev = np.where(ok, yw - m[:, None], 0.0)
                v = np.einsum("ij,ij->i", dev, dev) / (k - 1)
            mean[c0 : c0 + rows] = m
            sd[c0 : c0 + rows] = np.sqrt(v)
            cnt[c0 : c0 + rows] = k
        return mean, sd, cnt


def _steps(per_day: int) -> list[tuple[int, str, int, str]]:
    """The look-up sequence: (method id, kind, half-width in records, eligibility, quality)."""
    week = 7 * per_day
    seq: list[tuple[int, str, int, str]] = []
    seq.append((1, "all", week - 1, "meteo"))
    seq.append((1, "all", 2 * week - 1, "meteo"))
    seq.append((2, "sw", week - 1, "sw"))
    seq.append((3, "hour", per_day // 2 - 1, "any"))
    seq.append((3, "hour", (3 * per_day) // 2 - 1, "any"))
    for multi in range(3, 12):
        seq.append((4, "all", multi * week - 1, "meteo"))
    for multi in range(2, 12):
        seq.append((5, "sw", multi * week - 1, "sw"))
    for i in range(3, 120):
        seq.append((6, "hour", (per_day * (2 * i + 1)) // 2 - 1, "any"))
    return seq


def _quality(method: int, half: int, per_day: int) -> int:
    week = 7 * per_day
    if method in (1, 2):
        return 1
    if method == 3:
        return 1 if half < per_day else 2
    if method == 4:
        return 2 if half < 5 * week - 1 else 3
    if method == 5:
        return 2 if half < 3 * week - 1 else 3
    return 3


def mds_gapfill(
    y: np.ndarray,
    sw_in: np.ndarray,
    ta: np.ndarray,
    vpd: np.ndarray,
    hour: np.ndarray,
    per_day: int,
    options: MDSOptions | None = None,
    error_for_measured: bool = True,
) -> MDSResult:
    """Fill the gaps of one flux series by marginal distribution sampling.

    Parameters
    ----------
    y : ndarray, any unit (e.g. NEE, umol m-2 s-1)
        Flux on an equidistant time axis; NaN marks gaps (missing or rejected records).
    sw_in : ndarray, W m-2
        Incoming short-wave radiation; NaN where missing.
    ta : ndarray, degC
        Air temperature; NaN where missing.
    vpd : ndarray, hPa
        Vapour-pressure deficit; NaN where missing.
    hour : ndarray, h
        Time of day of each record (0–24); only differences matter, so start- or centre-stamps both work.
    per_day : int
        Records per day (48 half-hourly, 24 hourly).
    options : MDSOptions, optional
        Tolerances and limits; the published defaults when omitted.
    error_for_measured : bool
        Also estimate the random error (sd of similar records) of measured records.

    Returns
    -------
    MDSResult
        Filled series, quality classes, random-error estimate and bookkeeping.
    """
    opts = options or MDSOptions()
    y = np.asarray(y, dtype=float)
    n = y.size
    f = _Filler(
        y,
        np.asarray(sw_in, float),
        np.asarray(ta, float),
        np.asarray(vpd, float),
        np.asarray(hour, float),
        opts,
    )
    valid = f.valid
    filled = y.copy()
    qc = np.where(valid, 0, -1).astype(np.int8)
    sd = np.full(n, np.nan)
    cnt = np.zeros(n, dtype=np.int64)
    meth = np.zeros(n, dtype=np.int8)
    wind = np.zeros(n, dtype=np.int64)

    big = _long_gap_mask(valid, int(per_day * opts.longgap))
    todo = ~valid & ~big
    elig = {"meteo": f.meteo_ok, "sw": f.sw_ok, "any": np.ones(n, dtype=bool)}
    for method, kind, half, need in _steps(per_day):
        if not todo.any():
            break
        targets = np.flatnonzero(todo & elig[need])
        m, s, k = f.lookup(targets, half, kind)
        hit = k >= opts.min_samples
        t = targets[hit]
        filled[t] = m[hit]
        sd[t] = s[hit]
        cnt[t] = k[hit]
        meth[t] = method
        wind[t] = half
        qc[t] = _quality(method, half, per_day)
        todo[t] = False

    if error_for_measured:
        # Random error of measured records: spread of similar records around them (steps 1a, 1b).
        todo_e = valid & f.meteo_ok
        week = 7 * per_day
        for half in (week - 1, 2 * week - 1):
            targets = np.flatnonzero(todo_e)
            _, s, k = f.lookup(targets, half, "all")
            hit = k >= opts.min_samples
            sd[targets[hit]] = s[hit]
            cnt[targets[hit]] = k[hit]
            todo_e[targets[hit]] = False
    return MDSResult(filled=filled, qc=qc, sd=sd, n=cnt, method=meth, window=wind)
