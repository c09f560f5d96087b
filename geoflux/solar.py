"""Solar geometry shared by tower features and reanalysis aggregation."""

from __future__ import annotations

import numpy as np


def spencer_declination(g: np.ndarray) -> np.ndarray:
    """Solar declination, rad, from the day angle ``g = 2π (doy − 1) / 365`` (Spencer 1971 Fourier series).

    Accurate to ~0.0006 rad; the one-term FAO-56 approximation is off by up to 0.4 degree.
    """
    return (
        0.006918
        - 0.399912 * np.cos(g)
        + 0.070257 * np.sin(g)
        - 0.006758 * np.cos(2 * g)
        + 0.000907 * np.sin(2 * g)
        - 0.002697 * np.cos(3 * g)
        + 0.00148 * np.sin(3 * g)
    )
