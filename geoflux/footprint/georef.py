"""Put FFP footprints on raster grids, derive FFP inputs from tower records, score representativeness.

The footprint lives in the tower's local frame: metres east and north of the tower with *true* north up.
A target grid (any CRS: UTM, EPSG:4326, MODIS sinusoidal WKT) is mapped into that frame by projecting its
pixel corners into an azimuthal-equidistant projection centred on the tower, whose distances and azimuths
from the centre are geodesic. The grid convergence of the target CRS (grid north vs true north), its scale
factor and any shear are therefore applied exactly at every pixel corner; :func:`grid_convergence` reports
the angle. Each pixel is integrated on a ``ss x ss`` sub-sample grid (bilinear inside the pixel quad) with
the true ground area of the quad, so weights are footprint fractions and their sum is the fraction of the
footprint (within ``max_distance``) that lies inside the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from odc.geo.geobox import GeoBox
from pyproj import CRS, Geod
from scipy import ndimage

from geoflux.errors import GeofluxError, GridError
from geoflux.footprint import kljun
from geoflux.footprint.weights import FootprintWeights, LocalFrame, disk_weights, tower_xy, transformer

# Neutral surface-layer ratio sigma_v / u* (Panofsky & Dutton 1984: 1.9 +- 0.2), used when V_SIGMA is missing.
NEUTRAL_SIGMAV_RATIO = 1.9
NEUTRAL_OL = -1e6  # m; |L| this large is the neutral limit of the FFP scalings

_GEOD = Geod(ellps="WGS84")


def _grid_crs(geobox: GeoBox) -> str:
    if geobox.crs is None:
        raise GridError("geobox: expected a grid with a CRS, got none")
    return geobox.crs.to_wkt()


def grid_convergence(crs: str | CRS, lon: float, lat: float) -> float:
    """Grid convergence of ``crs`` at a point: angle from true north to grid north, degrees clockwise.

    A wind direction from true north becomes ``wind_dir - grid_convergence`` in grid bearings. Positive
    east of a UTM zone's central meridian in the northern hemisphere.

    Parameters
    ----------
    crs : target CRS (any form pyproj accepts, e.g. WKT).
    lon, lat : degrees (EPSG:4326).
    """
    tr = transformer("EPSG:4326", CRS.from_user_input(crs).to_wkt())
    step = 1.0  # m; small enough for the local tangent, large enough for float precision
    lon_s, lat_s, _ = _GEOD.fwd(lon, lat - 0.0, 180.0, step / 2)
    lon_n, lat_n, _ = _GEOD.fwd(lon, lat, 0.0, step / 2)
    xs, ys = tr.transform([lon_s, lon_n], [lat_s, lat_n])
    # grid bearing of true north; grid north lies the same angle the other way
    return float(-np.degrees(np.arctan2(xs[1] - xs[0], ys[1] - ys[0])))


@dataclass(frozen=True)
class _Window:
    row0: int
    col0: int
    east: np.ndarray  # (R+1, C+1) pixel corners, m east of the tower
    north: np.ndarray  # (R+1, C+1)
    area: np.ndarray  # (R, C) ground area of each pixel, m2


def _window(geobox: GeoBox, lon: float, lat: float, radius: float, site: str) -> _Window:
    aff = geobox.affine
    if aff.b != 0 or aff.d != 0:
        raise GridError(f"site {site}: rotated grids are not supported for footprints")
    x_t, y_t = tower_xy(geobox, lon, lat)
    col_f, row_f = ~aff @ (x_t, y_t)
    ny, nx = geobox.shape
    if not (0 <= col_f < nx and 0 <= row_f < ny):
        raise GridError(
            f"site {site}: tower at ({x_t:.1f}, {y_t:.1f}) lies outside the grid "
            f"(bbox {tuple(round(v, 1) for v in geobox.boundingbox)})"
        )
    frame = LocalFrame(lon, lat, _grid_crs(geobox))
    ang = np.linspace(0, 2 * np.pi, 73)
    gx, gy = frame.to_grid(radius * np.sin(ang), radius * np.cos(ang))
    cols, rows = ~aff @ (gx, gy)
    c0 = max(int(np.floor(min(np.min(cols), col_f))) - 1, 0)
    c1 = min(int(np.ceil(max(np.max(cols), col_f))) + 1, nx)
    r0 = max(int(np.floor(min(np.min(rows), row_f))) - 1, 0)
    r1 = min(int(np.ceil(max(np.max(rows), row_f))) + 1, ny)
    cc, rr = np.meshgrid(np.arange(c0, c1 + 1, dtype=float), np.arange(r0, r1 + 1, dtype=float))
    px, py = aff @ (cc, rr)
    e, n = frame.to_local(px, py)
    # shoelace area of each pixel quad (corners in order around the pixel)
    qe = [e[:-1, :-1], e[:-1, 1:], e[1:, 1:], e[1:, :-1]]
    qn = [n[:-1, :-1], n[:-1, 1:], n[1:, 1:], n[1:, :-1]]
    area = 0.5 * np.abs(sum(qe[i] * qn[(i + 1) % 4] - qe[(i + 1) % 4] * qn[i] for i in range(4)))
    return _Window(r0, c0, e, n, area)


def _subsamples(corner: np.ndarray, r0: int, r1: int, ss: int) -> np.ndarray:
    """Bilinear sub-pixel centres of pixel rows r0..r1 -> shape (rows, ss, cols, ss)."""
    s = (np.arange(ss) + 0.5) / ss
    rows = (
        corner[r0:r1, None, :] * (1 - s)[None, :, None] + corner[r0 + 1 : r1 + 1, None, :] * s[None, :, None]
    )
    return rows[..., :-1, None] * (1 - s) + rows[..., 1:, None] * s


def _polar_density(scales: kljun.FFPScales, rho_min: float, rho_max: float, n_rho: int, n_theta: int):
    """Mean footprint of many records on a log-polar node set; returns an interpolating function."""
    lr = np.linspace(np.log(rho_min), np.log(rho_max), n_rho)
    th = np.arange(n_theta) * (2 * np.pi / n_theta)
    rr, tt = np.meshgrid(np.exp(lr), th, indexing="ij")
    n_valid = int(np.count_nonzero(scales.valid))
    f = kljun.footprint_sum(rr * np.sin(tt), rr * np.cos(tt), scales) / n_valid
    f = np.concatenate([f, f[:, :1]], axis=1)  # periodic in azimuth
    dlr, dth = lr[1] - lr[0], th[1] - th[0]

    def density(e: np.ndarray, n: np.ndarray) -> np.ndarray:
        # node coordinates written in place into the (2, N) array map_coordinates takes (a list of two
        # arrays would be copied into one): this runs on millions of sub-samples per tower
        coords = np.empty((2, e.size))
        i, j = coords
        np.hypot(e.ravel(), n.ravel(), out=i)
        with np.errstate(divide="ignore"):
            np.log(i, out=i)
        i -= lr[0]
        i /= dlr
        np.arctan2(e.ravel(), n.ravel(), out=j)
        np.mod(j, 2 * np.pi, out=j)
        j /= dth
        return ndimage.map_coordinates(f, coords, order=1, mode="constant", cval=0.0).reshape(e.shape)

    return density


def _grid_density(clim: kljun.FootprintClimatology):
    dx, dy = clim.x[1] - clim.x[0], clim.y[1] - clim.y[0]

    def density(e: np.ndarray, n: np.ndarray) -> np.ndarray:
        j = (e - clim.x[0]) / dx
        i = (n - clim.y[0]) / dy
        return ndimage.map_coordinates(
            clim.f, [i.ravel(), j.ravel()], order=1, mode="constant", cval=0.0
        ).reshape(e.shape)

    return density


def footprint_weights(
    geobox: GeoBox,
    lon: float,
    lat: float,
    footprint: kljun.FFPScales | kljun.FootprintClimatology,
    method: str = "ffp",
    r_max: float = 0.99,
    max_distance: float = 5000.0,
    resolution: float | None = None,
    max_samples: int = 8_000_000,
    site: str = "",
) -> FootprintWeights:
    """Integrate a footprint (one record, a climatology of records, or a node-grid climatology) over pixels.

    Parameters
    ----------
    geobox : target grid, any CRS, axis-aligned.
    lon, lat : tower position, degrees (EPSG:4326).
    footprint : :class:`~geoflux.footprint.kljun.FFPScales` of one or more records (their mean footprint is
        placed; wind directions are degrees from true north), or a
        :class:`~geoflux.footprint.kljun.FootprintClimatology` on nodes east/north of the tower.
    method : label stored in the result (e.g. ``'ffp'``, ``'ffp-neutral'``).
    r_max : the integration radius is the largest upwind distance holding ``r_max`` of the flux ...
    max_distance : ... capped at this many metres. Flux from farther away counts as outside.
    resolution : m; sub-sample spacing on the ground. Default: a quarter of the smallest footprint peak
        distance (node spacing for a node-grid climatology), at least 0.5 m.
    max_samples : cap on sub-samples per call (sets the largest sub-sampling factor).
    site : name used in error messages.

    Returns
    -------
    FootprintWeights
        window trimmed to pixels with weight > 0; ``coverage`` is the footprint fraction inside the grid.

    Raises
    ------
    GridError
        tower outside the grid, or rotated grid.
    GeofluxError
        no valid record with a wind direction.
    """
    if isinstance(footprint, kljun.FootprintClimatology):
        if footprint.n == 0:
            raise GeofluxError(f"site {site}: footprint climatology holds no valid record")
        radius = float(
            min(max(np.abs(footprint.x).max(), np.abs(footprint.y).max()) * np.sqrt(2), max_distance)
        )
        res = resolution or max(
            float(min(footprint.x[1] - footprint.x[0], footprint.y[1] - footprint.y[0])), 0.5
        )
        density = _grid_density(footprint)
    else:
        use = footprint.valid & np.isfinite(footprint.wind_dir)
        if not np.any(use):
            raise GeofluxError(
                f"site {site}: footprint: expected at least one valid record with a wind direction"
            )
        s = footprint.subset(use)
        reach = kljun.distance_containing(r_max, s, method="numeric")
        radius = float(min(np.max(reach), max_distance))
        peak = kljun.peak_distance(s)
        res = resolution or max(0.25 * float(np.percentile(peak, 10)), 0.5)
        if len(s) == 1:

            def density(e: np.ndarray, n: np.ndarray) -> np.ndarray:
                return kljun.footprint_on_nodes(e, n, s)[0]

        else:
            rho_min = 0.9 * kljun.D * float(np.min(s.x_scale))  # footprints are 0 closer than d * x_scale
            density = _polar_density(s, rho_min, radius * 1.01, 256, 720)

    win = _window(geobox, lon, lat, radius, site)
    n_rows, n_cols = win.area.shape
    pix = float(np.sqrt(np.median(win.area)))
    ss = int(np.clip(np.ceil(pix / res), 1, max(1, np.floor(np.sqrt(max_samples / max(win.area.size, 1))))))
    # ~1M sub-samples (~60 MB of temporaries) at a time: towers run on parallel threads (each pixel row's
    # sum is the same whatever the block size)
    rows_per_block = max(1, int(1_000_000 // max(n_cols * ss * ss, 1)))
    w = np.zeros((n_rows, n_cols))
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(r0 + rows_per_block, n_rows)
        e = _subsamples(win.east, r0, r1, ss)
        n = _subsamples(win.north, r0, r1, ss)
        inside = e**2 + n**2 <= radius**2
        # the density only where it counts: the integration disk fills about 2/3 of its square window
        f = np.zeros(e.shape)
        f[inside] = density(e[inside], n[inside])
        w[r0:r1] = f.sum(axis=(1, 3)) * win.area[r0:r1] / ss**2
    w = np.where(np.isfinite(w), w, 0.0)
    nz_r = np.flatnonzero(w.any(axis=1))
    nz_c = np.flatnonzero(w.any(axis=0))
    if nz_r.size == 0:
        return FootprintWeights(win.row0, win.col0, np.zeros((0, 0)), 0.0, method)
    w = w[nz_r[0] : nz_r[-1] + 1, nz_c[0] : nz_c[-1] + 1]
    return FootprintWeights(win.row0 + int(nz_r[0]), win.col0 + int(nz_c[0]), w, float(w.sum()), method)


# --------------------------------------------------------------------------------------------------------
# Inputs from tower records


@dataclass(frozen=True)
class RecordInputs:
    """FFP inputs derived from tower records.

    Attributes
    ----------
    scales : per-record FFP scales (flags != 0 where unusable).
    method : per-record ``'ffp'`` (measured u*, L, sigma_v), ``'ffp-neutral'`` (some input from a neutral
        estimate), or ``'none'`` (no usable footprint: no wind direction, invalid input).
    """

    scales: kljun.FFPScales
    method: np.ndarray

    def counts(self) -> dict[str, int]:
        """Number of records per method."""
        vals, cnt = np.unique(self.method, return_counts=True)
        return {str(v): int(c) for v, c in zip(vals, cnt, strict=True)}


def _column(records: pd.DataFrame, *names: str) -> np.ndarray | None:
    for name in names:
        if name in records.columns:
            return pd.to_numeric(records[name], errors="coerce").to_numpy(dtype=float)
    return None


def ffp_inputs_from_records(
    records: pd.DataFrame,
    zm: float,
    z0: float | None = None,
    h: float | np.ndarray = 1000.0,
    sigmav_ratio: float = NEUTRAL_SIGMAV_RATIO,
    rsl_factor: float = 12.5,
) -> RecordInputs:
    """Derive FFP inputs from tidy tower records (FLUXNET column names), with documented fallbacks.

    Columns: ``USTAR`` (m s-1), ``WD`` (degrees from true north), ``WS`` (m s-1), optional ``MO_LENGTH``
    (Obukhov length, m; or ``ZL`` = zm/L) and ``V_SIGMA`` (m s-1). Per record:

    * ``'ffp'`` when u*, WD, L and sigma_v are all measured;
    * ``'ffp-neutral'`` when a missing input is replaced by its neutral, stability-free estimate:
      L -> neutral (|L| = 1e6 m), sigma_v -> ``sigmav_ratio * u*``, u* -> ``k WS / ln(zm/z0)`` (needs z0);
    * ``'none'`` when WD is missing or the inputs fail the FFP validity checks.

    Parameters
    ----------
    records : tidy records of one site (one row per half-hour or hour).
    zm : m; measurement height above the displacement height.
    z0 : m; roughness length. When None, the mean wind speed ``WS`` is used instead (FFP accepts either).
    h : m; boundary-layer height (tower files rarely carry one), scalar or per record.
    sigmav_ratio : sigma_v / u* for the neutral estimate of sigma_v.
    rsl_factor : roughness-sublayer limit, see :func:`~geoflux.footprint.kljun.ffp_scales`.

    Returns
    -------
    RecordInputs
    """
    n = len(records)
    nan = np.full(n, np.nan)
    ustar = _column(records, "USTAR")
    ustar = nan.copy() if ustar is None else ustar
    wd = _column(records, "WD")
    wd = nan.copy() if wd is None else wd
    ws = _column(records, "WS", "WS_F")
    ws = nan.copy() if ws is None else ws
    ol = _column(records, "MO_LENGTH")
    if ol is None:
        zl = _column(records, "ZL")
        ol = nan.copy() if zl is None else np.where(zl != 0, zm / np.where(zl != 0, zl, 1.0), NEUTRAL_OL)
    sv = _column(records, "V_SIGMA")
    sv = nan.copy() if sv is None else sv

    neutral = np.zeros(n, dtype=bool)
    if z0 is not None and z0 > 0 and zm > z0:
        est = np.isnan(ustar) & np.isfinite(ws)
        ustar = np.where(est, kljun.KARMAN * ws / np.log(zm / z0), ustar)
        neutral |= est
    est = ~np.isfinite(ol)
    ol = np.where(est, NEUTRAL_OL, ol)
    neutral |= est
    est = ~np.isfinite(sv)
    sv = np.where(est, sigmav_ratio * ustar, sv)
    neutral |= est

    scales = kljun.ffp_scales(
        zm, h, ol, sv, ustar, z0=z0, umean=None if z0 is not None else ws, wind_dir=wd, rsl_factor=rsl_factor
    )
    method = np.where(scales.valid, np.where(neutral, "ffp-neutral", "ffp"), "none")
    return RecordInputs(scales, method)


def site_footprint_weights(
    geobox: GeoBox,
    lon: float,
    lat: float,
    records: pd.DataFrame,
    zm: float,
    z0: float | None = None,
    h: float | np.ndarray = 1000.0,
    disk_radius: float = 500.0,
    min_records: int = 1,
    site: str = "",
    **kwargs: float,
) -> FootprintWeights:
    """Footprint weights of a site from its records: FFP climatology, else a disk.

    The mean FFP footprint of the usable records (:func:`ffp_inputs_from_records`) is placed on the grid
    (:func:`footprint_weights`). ``method`` is ``'ffp'`` when every used record had measured inputs,
    ``'ffp-neutral'`` when some used a neutral estimate, and ``'disk'`` (uniform disk of ``disk_radius`` m,
    :func:`~geoflux.footprint.weights.disk_weights`) when fewer than ``min_records`` records are usable or the
    records are coarser than hourly (``records.attrs['resolution']`` not HH/HR).

    Parameters
    ----------
    geobox : target grid; lon, lat : tower, degrees; records : tidy records of the site;
    zm, z0, h : see :func:`ffp_inputs_from_records`; disk_radius : m; min_records : records needed for FFP;
    site : name for messages; kwargs : passed to :func:`footprint_weights`.
    """
    resolution = records.attrs.get("resolution", "HH")
    if resolution in ("HH", "HR") and len(records):
        inp = ffp_inputs_from_records(records, zm, z0=z0, h=h)
        used = inp.method != "none"
        if np.count_nonzero(used) >= max(min_records, 1):
            label = "ffp-neutral" if np.any(inp.method[used] == "ffp-neutral") else "ffp"
            return footprint_weights(geobox, lon, lat, inp.scales, method=label, site=site, **kwargs)
    x, y = tower_xy(geobox, lon, lat)
    if geobox.crs is not None and geobox.crs.geographic:
        raise GridError(f"site {site}: disk fallback needs a projected grid in metres, got a geographic CRS")
    return disk_weights(geobox, x, y, disk_radius, site=site)


# --------------------------------------------------------------------------------------------------------
# Representativeness


@dataclass(frozen=True)
class Representativeness:
    """Footprint vs disk view of one driver at one site.

    Attributes
    ----------
    footprint_mean : footprint-weighted mean of the driver (driver units).
    disk_mean : disk-weighted mean of the driver.
    disk_std : spatial standard deviation of the driver inside the disk.
    index : ``|footprint_mean - disk_mean| / disk_std``; 0 when the footprint sees what the disk sees,
        larger when the footprint samples an atypical part of the disk (0 if both means agree exactly,
        inf when they differ on a uniform disk).
    """

    footprint_mean: float
    disk_mean: float
    disk_std: float
    index: float


def _weighted(values: np.ndarray, fw: FootprintWeights) -> tuple[float, float]:
    rs, cs = fw.window
    v = values[rs, cs]
    w = np.where(np.isfinite(v), fw.weights[: v.shape[0], : v.shape[1]], 0.0)
    if w.sum() <= 0:
        return np.nan, np.nan
    vv = np.where(np.isfinite(v), v, 0.0)
    mean = float((w * vv).sum() / w.sum())
    var = float((w * (vv - mean) ** 2).sum() / w.sum())
    return mean, np.sqrt(var)


def representativeness_index(
    values: np.ndarray, footprint: FootprintWeights, disk: FootprintWeights
) -> Representativeness:
    """Representativeness of a tower footprint for its surroundings (after Chu et al. 2021, AFM 301:108350).

    Compares the footprint-weighted mean of a driver raster (e.g. EVI) with its mean over a disk around the
    tower, in units of the driver's spatial standard deviation within the disk. NaN pixels are ignored.

    Parameters
    ----------
    values : 2-D driver raster on the grid both weights refer to (driver units).
    footprint : footprint weights (e.g. :func:`site_footprint_weights`).
    disk : disk weights (:func:`~geoflux.footprint.weights.disk_weights`).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise GridError(f"values: expected a 2-D raster, got {values.ndim} dimensions")
    fp_mean, _ = _weighted(values, footprint)
    d_mean, d_std = _weighted(values, disk)
    diff = abs(fp_mean - d_mean)
    tol = 1e-12 * max(abs(d_mean), 1.0)  # rounding of the weighted sums is not variability
    if not np.isfinite(diff):
        index = np.nan
    elif d_std > tol:
        index = diff / d_std
    else:
        index = 0.0 if diff <= tol else np.inf
    return Representativeness(fp_mean, d_mean, d_std, float(index))


__all__ = [
    "NEUTRAL_SIGMAV_RATIO",
    "RecordInputs",
    "Representativeness",
    "ffp_inputs_from_records",
    "footprint_weights",
    "grid_convergence",
    "representativeness_index",
    "site_footprint_weights",
]
