"""Footprint weights on a grid: the common value type and the fixed-radius disk kernel."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from odc.geo.geobox import GeoBox
from pyproj import CRS, Proj, Transformer
from pyproj.enums import TransformDirection

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


@lru_cache(maxsize=64)
def transformer(src: str, dst: str) -> Transformer:
    """The pyproj Transformer (``always_xy``) from CRS ``src`` to ``dst`` (WKT or any string pyproj takes).

    Built once per CRS pair and process: construction searches PROJ's database (1-25 ms), a call on a few
    points takes microseconds, and towers, footprints and validation ask for the same pairs again and again.
    Transformers are thread-safe (pyproj >= 3.1), so the cached one is shared.
    """
    return Transformer.from_crs(src, dst, always_xy=True)


def _local_crs(lon: float, lat: float) -> CRS:
    return CRS.from_proj4(f"+proj=aeqd +lat_0={lat:.10f} +lon_0={lon:.10f} +datum=WGS84 +units=m +no_defs")


class LocalFrame:
    """A tower's local frame (metres east and north of the tower: azimuthal equidistant on WGS84, centred
    on the tower) and a grid CRS, with transforms both ways.

    Equal, to float round-off (nanometres), to ``Transformer.from_crs(local, grid)`` and its reverse, at a
    fraction of the cost: that constructor searches PROJ's database for every tower (~25 ms), while here
    only the projection is per tower (~0.2 ms) and the step between its geographic CRS and the grid (the
    same for every tower) comes from :func:`transformer`'s cache.

    Parameters
    ----------
    lon, lat : tower, degrees (EPSG:4326).
    grid_crs : the grid's CRS as WKT (or any string pyproj takes).
    """

    def __init__(self, lon: float, lat: float, grid_crs: str) -> None:
        local = _local_crs(lon, lat)
        self._project = Transformer.from_crs(local.geodetic_crs, local, always_xy=True)
        self._geo_to_grid = transformer(local.geodetic_crs.to_wkt(), grid_crs)

    def to_grid(self, east: np.ndarray, north: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local metres east/north of the tower -> grid CRS coordinates."""
        lon, lat = self._project.transform(east, north, direction=TransformDirection.INVERSE)
        x, y = self._geo_to_grid.transform(lon, lat)
        return np.asarray(x), np.asarray(y)

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid CRS coordinates -> local metres east/north of the tower."""
        lon, lat = self._geo_to_grid.transform(x, y, direction=TransformDirection.INVERSE)
        e, n = self._project.transform(lon, lat)
        return np.asarray(e), np.asarray(n)


def tower_xy(geobox: GeoBox, lon: float, lat: float) -> tuple[float, float]:
    """Project a tower's lon/lat (EPSG:4326, degrees) into the grid CRS."""
    x, y = transformer("EPSG:4326", geobox.crs.to_wkt()).transform(lon, lat)
    return float(x), float(y)


# Largest Tissot distortion at the tower (|scale - 1| in any direction) for which the grid's own plane
# distances are taken as ground distances. UTM (scale 0.9996-1.001 inside its zone) and other metre grids that
# are nearly true to scale there keep their plane geometry (and their exact historical weights); geographic
# grids, sinusoidal grids away from the central meridian (shear: 600 m in the plane is 340-1058 m on the
# ground at 60 N, 40 E) and the like measure geodesic distances on the CRS's ellipsoid instead.
PLANE_TOLERANCE = 0.005
# Points on the ground circle used to find the window a geodesic disk covers on the grid.
_RIM_POINTS = 72


def plane_is_ground(crs: object, lon: float, lat: float, tolerance: float = PLANE_TOLERANCE) -> bool:
    """True when distances in ``crs``'s plane are ground metres near (``lon``, ``lat``) within ``tolerance``.

    Geographic CRSs (degrees) and CRSs whose axes are not in metres never are; a projected metre CRS is when
    both semi-axes of its Tissot indicatrix at the point are within ``tolerance`` of 1 (so a circle on the
    ground stays a circle of the same radius in the plane). ``crs``: anything pyproj accepts (odc-geo CRS
    too); ``lon``, ``lat`` in degrees on the CRS's own datum.
    """
    crs = CRS.from_user_input(crs)
    if not crs.is_projected or any(a.unit_name not in ("metre", "meter") for a in crs.axis_info[:2]):
        return False
    try:
        f = Proj(crs).get_factors(lon, lat)
    except Exception:  # PROJ cannot evaluate its factors here: do not trust the plane
        return False
    a, b = f.tissot_semimajor, f.tissot_semiminor
    return bool(np.isfinite(a) and np.isfinite(b) and max(abs(a - 1), abs(b - 1)) <= tolerance)


def disk_weights(
    geobox: GeoBox,
    x: float,
    y: float,
    radius: float,
    supersample: int = 8,
    site: str = "",
) -> FootprintWeights:
    """Uniform disk footprint of ``radius`` metres on the ground around a tower at grid coordinates ``x, y``.

    Each pixel is sampled on a ``supersample``² sub-grid so that weights are the area fraction of the
    disk in the pixel. On a grid that is true to scale at the tower (UTM and other metre grids within
    :data:`PLANE_TOLERANCE`, see :func:`plane_is_ground`) distances are measured in the grid's plane; on any
    other grid (geographic degrees, sinusoidal, ...) each sub-pixel centre's geodesic distance from the tower
    on the CRS's ellipsoid decides, and the window is sized from the disk's rim projected onto the grid, so
    the disk is ``radius`` metres on the ground whatever the CRS units.

    Parameters
    ----------
    geobox : target grid (axis-aligned).
    x, y : tower position in the grid CRS (grid units: m, or degrees on a geographic grid).
    radius : disk radius on the ground, m.
    supersample : sub-samples per pixel edge.
    site : name used in error messages.

    Raises
    ------
    GridError
        if the tower lies outside the grid, or the grid is rotated.
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
    crs = CRS.from_user_input(geobox.crs)
    to_lonlat = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    lon, lat = (float(v) for v in to_lonlat.transform(x, y))
    s = (np.arange(supersample) + 0.5) / supersample
    if plane_is_ground(crs, lon, lat):
        px, py = abs(aff.a), abs(aff.e)
        rc, rr = int(np.ceil(radius / px)) + 1, int(np.ceil(radius / py)) + 1
        c0, c1 = int(np.floor(col_f)) - rc, int(np.floor(col_f)) + rc + 1
        r0, r1 = int(np.floor(row_f)) - rr, int(np.floor(row_f)) + rr + 1
        # sub-pixel centres in fractional pixel coordinates, then to metres from the tower
        cols = (np.arange(c0, c1)[:, None] + s[None, :]).ravel()
        rows = (np.arange(r0, r1)[:, None] + s[None, :]).ravel()
        dx = (cols - col_f) * px
        dy = (rows - row_f) * py
        inside = (dx[None, :] ** 2 + dy[:, None] ** 2) <= radius**2
    else:
        geod = crs.get_geod()
        # the window: pixels touched by the ground circle of the disk, plus one pixel of margin
        az = np.linspace(0.0, 360.0, _RIM_POINTS, endpoint=False)
        rim_lon, rim_lat, _ = geod.fwd(
            np.full(az.size, lon), np.full(az.size, lat), az, np.full(az.size, radius)
        )
        rim_x, rim_y = to_lonlat.transform(rim_lon, rim_lat, direction="INVERSE")
        rim_c = (np.asarray(rim_x) - aff.c) / aff.a
        rim_r = (np.asarray(rim_y) - aff.f) / aff.e
        if not (np.all(np.isfinite(rim_c)) and np.all(np.isfinite(rim_r))):
            raise GridError(f"site {site}: a {radius:g} m disk around the tower cannot be drawn on this grid")
        c0, c1 = int(np.floor(min(rim_c.min(), col_f))) - 1, int(np.floor(max(rim_c.max(), col_f))) + 2
        r0, r1 = int(np.floor(min(rim_r.min(), row_f))) - 1, int(np.floor(max(rim_r.max(), row_f))) + 2
        cols = (np.arange(c0, c1)[:, None] + s[None, :]).ravel()
        rows = (np.arange(r0, r1)[:, None] + s[None, :]).ravel()
        gx, gy = np.meshgrid(aff.c + cols * aff.a, aff.f + rows * aff.e)
        plon, plat = to_lonlat.transform(gx.ravel(), gy.ravel())
        # equal-weight sub-samples: on a geographic grid their areas vary as cos(lat), < 0.2 % across a 5 km
        # disk at 60 N, so the count is the area fraction
        _, _, dist = geod.inv(np.full(plon.size, lon), np.full(plon.size, lat), plon, plat)
        inside = (np.asarray(dist) <= radius).reshape(gy.shape)
    counts = inside.reshape(r1 - r0, supersample, c1 - c0, supersample).sum(axis=(1, 3))
    w = counts / inside.sum()
    # clip the window to the grid; weight outside is lost coverage
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r1, ny), min(c1, nx)
    w = w[rs - r0 : re - r0, cs - c0 : ce - c0]
    return FootprintWeights(rs, cs, w, float(w.sum()), "disk")
