"""Footprint weights on a grid: the common value type and the fixed-radius disk kernel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from geoflux.errors import GridError


@dataclass(frozen=True)
class FootprintWeights:
    """Weights of one footprint on a window of a grid.

    Attributes
    ----------
    row_off, col_off : int
        offset of the window's top-left pixel in the grid.
    weights : ndarray (rows, cols), float64
        fraction of the footprint in each pixel (>= 0, sum <= 1).
    coverage : float
        sum of weights: the fraction of the footprint that lies inside the grid.
    method : str
        footprint method used ('disk', 'ffp', ...).
    """

    row_off: int
    col_off: int
    weights: np.ndarray
    coverage: float
    method: str

    @property
    def window(self) -> tuple[slice, slice]:
        """Row and column slices of the window in the grid."""
        r, c = self.weights.shape
        return slice(self.row_off, self.row_off + r), slice(self.col_off, self.col_off + c)

    def normalized(self) -> np.ndarray:
        """Weights rescaled to sum to 1 (for weighted means)."""
        return self.weights / self.weights.sum()


def tower_xy(geobox: GeoBox, lon: float, lat: float) -> tuple[float, float]:
    """Project a tower's lon/lat (EPSG:4326, degrees) into the grid CRS."""
    tr = Transformer.from_crs("EPSG:4326", geobox.crs.to_wkt(), always_xy=True)
    x, y = tr.transform(lon, lat)
    return float(x), float(y)


def disk_weights(
    geobox: GeoBox,
    x: float,
    y: float,
    radius: float,
    supersample: int = 8,
    site: str = "",
) -> FootprintWeights:
    """Uniform disk footprint of ``radius`` around a tower at grid coordinates ``x, y``.

    Each pixel is sampled on a ``supersample``² sub-grid so that weights are the area fraction of the
    disk in the pixel.

    Parameters
    ----------
    geobox : target grid (axis-aligned, units of its CRS; metres for UTM).
    x, y : tower position in the grid CRS.
    radius : disk radius in grid CRS units (m).
    supersample : sub-samples per pixel edge.
    site : name used in error messages.

    Raises
    ------
    GridError
        if the tower lies outside the grid.
    """
    aff = geobox.affine
    if aff.b != 0 or aff.d != 0:
        raise GridError(f"site {site}: rotated grids are not supported for footprints")
    col_f, row_f = (x - aff.c) / aff.a, (y - aff.f) / aff.e
    ny, nx = geobox.shape
    if not (0 <= col_f < nx and 0 <= row_f < ny):
        raise GridError(
            f"site {site}: tower at ({x:.1f}, {y:.1f}) lies outside the grid "
            f"(bbox {tuple(round(v, 1) for v in geobox.boundingbox)})"
        )
    px, py = abs(aff.a), abs(aff.e)
    rc, rr = int(np.ceil(radius / px)) + 1, int(np.ceil(radius / py)) + 1
    c0, c1 = int(np.floor(col_f)) - rc, int(np.floor(col_f)) + rc + 1
    r0, r1 = int(np.floor(row_f)) - rr, int(np.floor(row_f)) + rr + 1
    # sub-pixel centres in fractional pixel coordinates, then to metres from the tower
    s = (np.arange(supersample) + 0.5) / supersample
    cols = (np.arange(c0, c1)[:, None] + s[None, :]).ravel()
    rows = (np.arange(r0, r1)[:, None] + s[None, :]).ravel()
    dx = (cols - col_f) * px
    dy = (rows - row_f) * py
    inside = (dx[None, :] ** 2 + dy[:, None] ** 2) <= radius**2
    counts = inside.reshape(r1 - r0, supersample, c1 - c0, supersample).sum(axis=(1, 3))
    w = counts / inside.sum()
    # clip the window to the grid; weight outside is lost coverage
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r1, ny), min(c1, nx)
    w = w[rs - r0 : re - r0, cs - c0 : ce - c0]
    return FootprintWeights(rs, cs, w, float(w.sum()), "disk")
