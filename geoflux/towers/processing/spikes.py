"""Spike detection in half-hourly fluxes after Papale et al. (2006).

A record is a spike when its double difference ``d_i = (x_i − x_{i−1}) − (x_{i+1} − x_i)`` lies further than
``z`` robust standard deviations (median absolute deviation / 0.6745) from the median double difference of its
block. Blocks are 13 days, split into day and night because the day-time flux is noisier.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def detect_spikes(
    y: np.ndarray, is_day: np.ndarray, per_day: int, z: float = 7.0, block_days: float = 13.0
) -> np.ndarray:
    """Flag spikes by the median-absolute-deviation test on double differences.

    Parameters
    ----------
    y : ndarray, flux unit (e.g. umol m-2 s-1)
        Flux on an equidistant axis; NaN where missing. Records with a missing neighbour are not tested.
    is_day : ndarray of bool
        Day-time records (tested separately from the night-time ones).
    per_day : int
        Records per day.
    z : float
        Threshold in robust standard deviations; Papale et al. (2006) use 4, 5.5 or 7 (the least
        aggressive, also hesseflux's default, is the default here).
    block_days : float, days
        Block length of the median statistics.

    Returns
    -------
    ndarray of bool
        True on spikes.
    """
    y = np.asarray(y, dtype=float)
    n = y.size
    d = np.full(n, np.nan)
    d[1:-1] = (y[1:-1] - y[:-2]) - (y[2:] - y[1:-1])
    block = (np.arange(n) // round(block_days * per_day)) * 2 + np.asarray(is_day, dtype=int)
    frame = pd.DataFrame({"d": d, "g": block})
    grp = frame.groupby("g")["d"]
    med = grp.transform("median").to_numpy()
    mad = (frame["d"] - med).abs().groupby(frame["g"]).transform("median").to_numpy()
    with np.errstate(invalid="ignore"):
        dev = np.abs(d - med)
        spike = dev > z * mad / 0.6745
    # A spike also inflates its neighbours' double differences (to half its own); flag only the local maximum.
    a = np.nan_to_num(dev, nan=0.0)
    local_max = np.ones(n, dtype=bool)
    local_max[1:] &= a[1:] >= a[:-1]
    local_max[:-1] &= a[:-1] >= a[1:]
    return spike & np.isfinite(d) & local_max
