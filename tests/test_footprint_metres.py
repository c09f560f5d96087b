"""The disk footprint is ``radius`` metres on the ground on every CRS (degrees, sinusoidal, UTM)."""

from __future__ import annotations

import numpy as np
import pytest
from odc.geo.geobox import GeoBox
from pyproj import Geod, Transformer

from geoflux.footprint.weights import disk_weights, plane_is_ground, tower_xy

MODIS_SINU = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
MODIS_PIXEL = 463.312716528


def _ground_check(gb: GeoBox, lon: float, lat: float, radius: float, geod: Geod, to_lonlat: Transformer):
    """Check the weights against geodesic distances computed here, pixel by pixel over the whole grid."""
    fw = disk_weights(gb, *tower_xy(gb, lon, lat), radius, supersample=8)
    assert fw.coverage == pytest.approx(1.0)
    w = np.zeros(gb.shape)
    w[fw.window] = fw.weights
    full = w.max()
    ny, nx = gb.shape
    rows, cols = np.mgrid[0:ny, 0:nx]
    aff = gb.affine
    # centre and corners of every pixel → lon/lat → geodesic distance from the tower
    centre = to_lonlat.transform(aff.c + (cols + 0.5) * aff.a, aff.f + (rows + 0.5) * aff.e)
    n = rows.size
    _, _, d = geod.inv(np.full(n, lon), np.full(n, lat), centre[0].ravel(), centre[1].ravel())
    d = d.reshape(gb.shape)
    half_diag = np.zeros(gb.shape)
    for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
        corner = to_lonlat.transform(aff.c + (cols + dc) * aff.a, aff.f + (rows + dr) * aff.e)
        _, _, h = geod.inv(centre[0].ravel(), centre[1].ravel(), corner[0].ravel(), corner[1].ravel())
        half_diag = np.maximum(half_diag, h.reshape(gb.shape))
    # no weight beyond the disk, every pixel well inside it fully weighted
    assert d[w > 0].max() <= radius + half_diag[w > 0].max()
    inner = d <= radius - half_diag
    assert inner.sum() >= 4
    np.testing.assert_allclose(w[inner], full, rtol=1e-12)
    # the ground area of the disk: pixel area / weight of a full pixel
    r0, c0 = np.argwhere(inner)[0]
    xs = aff.c + np.array([c0, c0 + 1, c0 + 1, c0]) * aff.a
    ys = aff.f + np.array([r0, r0, r0 + 1, r0 + 1]) * aff.e
    plon, plat = to_lonlat.transform(xs, ys)
    pixel_area = abs(geod.polygon_area_perimeter(plon, plat)[0])
    assert pixel_area / full == pytest.approx(np.pi * radius**2, rel=0.02)
    return fw


@pytest.mark.parametrize("lon, lat", [(10.0, 60.0), (-70.3, -3.1)])
def test_disk_on_a_degree_grid_is_metres_on_the_ground(lon, lat):
    gb = GeoBox.from_bbox((lon - 0.03, lat - 0.015, lon + 0.03, lat + 0.015), "EPSG:4326", resolution=0.001)
    fw = _ground_check(gb, lon, lat, 300.0, Geod(ellps="WGS84"), Transformer.from_crs(4326, 4326))
    # ~ 6 x 11 (60 N) pixels, not a 300-degree window
    assert fw.weights.size < 400
    assert not plane_is_ground(gb.crs, lon, lat)


def test_disk_on_modis_sinusoidal_is_round_on_the_ground():
    lon, lat = 40.0, 60.0  # far from the central meridian: the sinusoidal plane is strongly sheared here
    to_sinu = Transformer.from_crs("EPSG:4326", MODIS_SINU, always_xy=True)
    x, y = to_sinu.transform(lon, lat)
    gb = GeoBox.from_bbox((x - 6000, y - 6000, x + 6000, y + 6000), MODIS_SINU, resolution=MODIS_PIXEL)
    sphere = Geod(a=6371007.181, b=6371007.181)
    to_lonlat = Transformer.from_crs(MODIS_SINU, "+proj=longlat +R=6371007.181 +no_defs", always_xy=True)
    _ground_check(gb, lon, lat, 1000.0, sphere, to_lonlat)
    assert not plane_is_ground(gb.crs, lon, lat)
    # on the central meridian the sinusoidal plane is true to scale: plane distances are kept there
    assert plane_is_ground(gb.crs, 0.0, 30.0)


def _disk_before(gb: GeoBox, x: float, y: float, radius: float, ss: int = 8):
    """Today's plane disk, written pixel by pixel: sub-sample (i, j) of pixel (r, c) is in when its plane
    distance from the tower is at most the radius."""
    a = gb.affine
    px, py = abs(a.a), abs(a.e)
    col_f, row_f = (x - a.c) / a.a, (y - a.f) / a.e
    nr, nc = int(np.ceil(radius / py)) + 1, int(np.ceil(radius / px)) + 1
    r0, c0 = int(np.floor(row_f)) - nr, int(np.floor(col_f)) - nc
    sub = (np.arange(ss) + 0.5) / ss
    counts = np.zeros((2 * nr + 1, 2 * nc + 1), dtype=np.int64)
    for i in range(counts.shape[0]):
        dy = (r0 + i + sub - row_f) * py
        for j in range(counts.shape[1]):
            dx = (c0 + j + sub - col_f) * px
            counts[i, j] = np.count_nonzero(dy[:, None] ** 2 + dx[None, :] ** 2 <= radius**2)
    w = counts / counts.sum()
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + counts.shape[0], gb.shape[0]), min(c0 + counts.shape[1], gb.shape[1])
    return rs, cs, w[rs - r0 : re - r0, cs - c0 : ce - c0]


@pytest.mark.parametrize("res, radius", [(500.0, 300.0), (30.0, 250.0), (20.0, 300.0)])
def test_utm_weights_are_unchanged(res, radius):
    gb = GeoBox.from_bbox((440000, 5556000, 464000, 5580000), "EPSG:32632", resolution=res)
    rng = np.random.default_rng(int(res))
    for x, y in zip(rng.uniform(440000, 464000, 5), rng.uniform(5556000, 5580000, 5), strict=True):
        fw = disk_weights(gb, x, y, radius)
        rs, cs, w = _disk_before(gb, x, y, radius)
        assert (fw.row_off, fw.col_off) == (rs, cs)
        assert fw.weights.shape == w.shape and np.array_equal(fw.weights, w)
    lon, lat = Transformer.from_crs(32632, 4326, always_xy=True).transform(452000, 5568000)
    assert plane_is_ground(gb.crs, lon, lat)
