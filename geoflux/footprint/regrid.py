"""Footprints on a map's own grid: re-projected footprint weights or a geodesic disk around each tower.

Validation reads maps on any CRS and affine, so tower footprints computed on the run grid (or not at all) are
put on the map's grid here; weights are conserved (they sum to the source-area fraction they stood for).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from affine import Affine
from odc.geo.geobox import GeoBox

from geoflux.errors import GridError
from geoflux.footprint.weights import FootprintWeights, LocalFrame, transformer

log = logging.getLogger("geoflux")


# --------------------------------------------------------------------------------------------------
# Footprints on the map's grid


def _apply(aff: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``aff`` applied to coordinate arrays (written out: affine's ``*`` on arrays is deprecated)."""
    x, y = np.asarray(x, dtype="float64"), np.asarray(y, dtype="float64")
    return aff.a * x + aff.b * y + aff.c, aff.d * x + aff.e * y + aff.f


def _pixel_size_m(geobox: GeoBox, lon: float, lat: float) -> float:
    """Smaller edge (m on the ground) of the map pixel under the tower."""
    x, y = transformer("EPSG:4326", geobox.crs.to_wkt()).transform(lon, lat)
    c, r = _apply(~geobox.affine, x, y)
    c, r = np.floor(c), np.floor(r)
    xs, ys = _apply(geobox.affine, np.array([c, c + 1, c]), np.array([r, r, r + 1]))
    e, n = LocalFrame(lon, lat, geobox.crs.to_wkt()).to_local(xs, ys)
    edges = np.hypot(np.diff(e[[0, 1]]), np.diff(n[[0, 1]])), np.hypot(np.diff(e[[0, 2]]), np.diff(n[[0, 2]]))
    size = float(min(edges[0][0], edges[1][0]))
    return size if np.isfinite(size) and size > 0 else 1.0


def points_to_grid(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, geobox: GeoBox, method: str
) -> FootprintWeights | None:
    """Bin weighted points (grid CRS coordinates) into the pixels of ``geobox``.

    Any affine works (rotated, south-up): points go through the inverse affine to fractional pixel indices.
    Weight falling outside the grid is lost, so ``coverage`` is the footprint fraction inside. Returns None
    when no point falls inside the grid.
    """
    col, row = _apply(~geobox.affine, np.asarray(x), np.asarray(y))
    ok = np.isfinite(col) & np.isfinite(row)
    col, row = np.floor(col[ok]).astype(np.int64), np.floor(row[ok]).astype(np.int64)
    w = np.asarray(w, dtype="float64")[ok]
    ny, nx = geobox.shape
    inside = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
    if not inside.any():
        return None
    col, row, w = col[inside], row[inside], w[inside]
    r0, c0 = int(row.min()), int(col.min())
    out = np.zeros((int(row.max()) - r0 + 1, int(col.max()) - c0 + 1))
    np.add.at(out, (row - r0, col - c0), w)
    return FootprintWeights(r0, c0, out, float(out.sum()), method)


def disk_on_grid(
    geobox: GeoBox, lon: float, lat: float, radius: float, method: str = "disk", min_points: int = 20
) -> FootprintWeights | None:
    """A uniform geodesic disk of ``radius`` (m) around a tower on any grid.

    The disk is sampled on a regular grid in the tower's azimuthal-equidistant frame, fine enough that each
    map pixel holds at least ``min_points``² samples (or the disk at least 40² samples), then the samples are
    projected to the map CRS and binned (:func:`points_to_grid`). Returns None when the disk misses the grid.
    """
    px = _pixel_size_m(geobox, lon, lat)
    spacing = min(radius / 20.0, px / min_points)
    spacing = max(spacing, radius / 400.0)  # at most ~500k samples in the disk
    k = np.arange(-radius + spacing / 2, radius, spacing)
    e, n = np.meshgrid(k, k)
    inside = e * e + n * n <= radius * radius
    e, n = e[inside], n[inside]
    x, y = LocalFrame(lon, lat, geobox.crs.to_wkt()).to_grid(e, n)
    return points_to_grid(x, y, np.full(e.size, 1.0 / e.size), geobox, method)


def reproject_weights(
    fw: FootprintWeights, source: GeoBox, target: GeoBox, supersample: int | None = None
) -> FootprintWeights | None:
    """Move footprint weights from the grid they were computed on to another grid (any CRS/affine).

    Each source pixel is split into ``supersample``² sub-pixels carrying an equal share of its weight; their
    centres are projected to the target CRS and binned. Weight is conserved except for what falls outside the
    target grid. Default ``supersample``: enough that a sub-pixel is at most a quarter of a target pixel.
    """
    if source.crs == target.crs and source.affine == target.affine:
        return fw
    rows, cols = np.nonzero(fw.weights > 0)
    if rows.size == 0:
        return None
    if supersample is None:
        # compare pixel areas in a common unit via the target's inverse affine of source pixel corners
        tr = transformer(source.crs.to_wkt(), target.crs.to_wkt())
        r, c = rows[0] + fw.row_off, cols[0] + fw.col_off
        xs, ys = _apply(source.affine, np.array([c, c + 1, c]), np.array([r, r, r + 1]))
        tx, ty = tr.transform(xs, ys)
        tc, trow = _apply(~target.affine, np.asarray(tx), np.asarray(ty))
        edge = max(np.hypot(tc[1] - tc[0], trow[1] - trow[0]), np.hypot(tc[2] - tc[0], trow[2] - trow[0]))
        supersample = int(np.clip(np.ceil(4 * edge), 1, 32)) if np.isfinite(edge) else 4
    s = (np.arange(supersample) + 0.5) / supersample
    sc = (cols[:, None, None] + fw.col_off + s[None, None, :]).repeat(supersample, axis=1).ravel()
    sr = (rows[:, None, None] + fw.row_off + s[None, :, None]).repeat(supersample, axis=2).ravel()
    sw = np.repeat(fw.weights[rows, cols] / supersample**2, supersample**2)
    xs, ys = _apply(source.affine, sc, sr)
    tr = transformer(source.crs.to_wkt(), target.crs.to_wkt())
    tx, ty = tr.transform(xs, ys)
    return points_to_grid(np.asarray(tx), np.asarray(ty), sw, target, fw.method)


def footprints_on_grid(
    sites: pd.DataFrame,
    geobox: GeoBox,
    radius: float = 300.0,
    footprints: Mapping[str, FootprintWeights] | None = None,
    footprint_geobox: GeoBox | None = None,
) -> dict[str, FootprintWeights]:
    """Footprint weights of every site on a map's grid.

    Parameters
    ----------
    sites : site table indexed by SITE_ID with LAT/LON (degrees, EPSG:4326).
    geobox : the map grid.
    radius : m; radius of the disk used for sites without given footprints.
    footprints, footprint_geobox : footprints computed elsewhere (e.g. the run's FFP climatologies) and the
        grid they are on; re-projected to ``geobox`` unless it is the same grid.

    Sites whose footprint misses the map are left out (logged), so a regional product can be scored on the
    towers it covers.
    """
    out: dict[str, FootprintWeights] = {}
    for site, row in sites.iterrows():
        site = str(site)
        if footprints is not None and site in footprints:
            if footprint_geobox is None:
                raise GridError(f"site {site}: footprints given without the grid they are on")
            fw = reproject_weights(footprints[site], footprint_geobox, geobox)
        else:
            fw = disk_on_grid(geobox, float(row["LON"]), float(row["LAT"]), radius)
        if fw is None or fw.coverage <= 0:
            log.info("site %s: footprint lies outside the map grid; skipped", site)
            continue
        out[site] = fw
    return out
