"""Footprints on raster grids: pixel integration, grid convergence, record inputs, representativeness."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
from odc.geo.geobox import GeoBox
from pyproj import CRS, Geod, Proj, Transformer

from geoflux.errors import GeofluxError, GridError
from geoflux.footprint import georef, kljun
from geoflux.footprint.weights import FootprintWeights, disk_weights, tower_xy

LON, LAT = 20.9, 65.0  # 5.9 deg east of the central meridian of UTM zone 33N (15 E)
UTM33 = "EPSG:32633"
MODIS_WKT = CRS.from_proj4("+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs").to_wkt()
GEOD = Geod(ellps="WGS84")


def _utm_grid(lon: float, lat: float, half: float, res: float, crs: str = UTM33) -> GeoBox:
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    return GeoBox.from_bbox((x - half, y - half, x + half, y + half), crs, resolution=res)


def _scales(
    wind_dir: float | np.ndarray, zm: float = 20.0, ol: float | np.ndarray = -100.0
) -> kljun.FFPScales:
    return kljun.ffp_scales(zm, 1500.0, ol, 0.6, 0.4, z0=0.3, wind_dir=wind_dir)


def _centroid(gb: GeoBox, fw: FootprintWeights) -> tuple[float, float]:
    """Weighted centroid of the pixel centres, in the grid CRS."""
    rr, cc = np.mgrid[fw.window[0], fw.window[1]]
    x, y = gb.affine * (cc + 0.5, rr + 0.5)
    return float((fw.weights * x).sum() / fw.weights.sum()), float((fw.weights * y).sum() / fw.weights.sum())


def _bearing_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def test_grid_convergence_matches_proj():
    for crs, lon, lat in [(UTM33, LON, LAT), (UTM33, 11.0, -35.0), (MODIS_WKT, 100.0, 55.0)]:
        ours = georef.grid_convergence(crs, lon, lat)
        ref = Proj(crs).get_factors(lon, lat).meridian_convergence
        assert abs(ours - ref) < 1e-4
    assert abs(georef.grid_convergence(UTM33, LON, LAT)) > 5  # far from the central meridian
    assert abs(georef.grid_convergence("EPSG:4326", LON, LAT)) < 1e-9


def test_centroid_bearing_on_utm_far_from_central_meridian_is_convergence_corrected():
    gb = _utm_grid(LON, LAT, 3000.0, 10.0)
    gamma = georef.grid_convergence(UTM33, LON, LAT)
    x_t, y_t = tower_xy(gb, LON, LAT)
    for wd in (0.0, 90.0, 225.0):
        fw = georef.footprint_weights(gb, LON, LAT, _scales(wd))
        cx, cy = _centroid(gb, fw)
        grid_bearing = np.degrees(np.arctan2(cx - x_t, cy - y_t)) % 360
        # footprint points upwind in true bearings: in grid bearings that is wd - gamma (gamma ~ 5.4 deg)
        assert _bearing_diff(grid_bearing, wd - gamma) < 0.2
        assert _bearing_diff(grid_bearing, wd) > 4.0


def test_weights_non_negative_sum_le_one_and_coverage_is_the_sum():
    gb = _utm_grid(LON, LAT, 4000.0, 30.0)
    fw = georef.footprint_weights(gb, LON, LAT, _scales(300.0), method="ffp")
    assert fw.method == "ffp"
    assert np.all(fw.weights >= 0)
    assert fw.weights.sum() <= 1.0
    assert fw.coverage == pytest.approx(fw.weights.sum())


def test_coverage_matches_the_crosswind_integrated_mass_within_the_radius():
    # grid much larger than the integration radius: coverage = flux fraction within max_distance
    gb = _utm_grid(LON, LAT, 2600.0, 20.0)
    s = _scales(45.0)
    fw = georef.footprint_weights(gb, LON, LAT, s, max_distance=2000.0)
    xs_tab, cum = kljun._cumulative_table()
    expected = np.interp(2000.0 / s.x_scale[0], xs_tab, cum)  # mass upwind of 2 km along the axis
    assert fw.coverage == pytest.approx(expected, rel=0.02)


def test_partial_coverage_near_grid_edge():
    x, y = Transformer.from_crs("EPSG:4326", UTM33, always_xy=True).transform(LON, LAT)
    gb = GeoBox.from_bbox((x - 3900, y - 2000, x + 100, y + 2000), UTM33, resolution=20)
    gamma = georef.grid_convergence(UTM33, LON, LAT)
    scale = Proj(UTM33).get_factors(LON, LAT).meridional_scale
    s_east = _scales(90.0 + gamma)  # wind blowing from grid east: the east edge is perpendicular to it
    from_east = georef.footprint_weights(gb, LON, LAT, s_east, max_distance=2000.0)
    from_west = georef.footprint_weights(gb, LON, LAT, _scales(270.0 + gamma), max_distance=2000.0)
    # inside the grid is exactly the part of the footprint closer upwind than the east edge
    edge = (gb.boundingbox.right - tower_xy(gb, LON, LAT)[0]) / scale
    xs_tab, cum = kljun._cumulative_table()
    assert from_east.coverage == pytest.approx(np.interp(edge / s_east.x_scale[0], xs_tab, cum), rel=0.02)
    assert from_east.coverage < 0.5 < 0.8 < from_west.coverage
    assert from_east.weights.sum() == pytest.approx(from_east.coverage)


def test_pixel_weights_match_reference_field_integrated_on_a_fine_grid():
    """Weights on a 10 m grid in the tower's AEQD frame vs pyffp's field on 1 m nodes, summed per pixel."""
    ffp_clim = pytest.importorskip("pyffp.calc_footprint_FFP_climatology").FFP_climatology
    import matplotlib

    matplotlib.use("Agg")
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={LAT} +lon_0={LON} +datum=WGS84 +units=m +no_defs")
    gb = GeoBox.from_bbox((-400, -400, 400, 400), local.to_wkt(), resolution=10)
    case = dict(zm=10.0, z0=0.1, h=1000.0, ol=-50.0, sigmav=0.5, ustar=0.35, wind_dir=230.0)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = ffp_clim(
            **case,
            domain=[-400.0, 400.0, -400.0, 400.0],
            dx=1.0,
            dy=1.0,
            smooth_data=None,
            rs=None,
            verbosity=0,
        )
    f = (
        ref["fclim_2d"][:-1, :-1]
        + ref["fclim_2d"][1:, 1:]
        + ref["fclim_2d"][:-1, 1:]
        + ref["fclim_2d"][1:, :-1]
    )
    f = f / 4  # 1 m cell means from the node values
    ref_pix = f.reshape(80, 10, 80, 10).sum(axis=(1, 3))[::-1]  # rows north to south like the grid
    s = kljun.ffp_scales(**{k: v for k, v in case.items() if k != "z0"}, z0=0.1)
    fw = georef.footprint_weights(gb, LON, LAT, s, resolution=0.5)
    ours = np.zeros((80, 80))
    ours[fw.window] = fw.weights
    assert fw.coverage == pytest.approx(ref_pix.sum(), rel=5e-3)
    big = ref_pix > 0.01 * ref_pix.max()
    np.testing.assert_allclose(ours[big], ref_pix[big], rtol=0.03)


@pytest.mark.parametrize(
    ("crs", "res"),
    [(UTM33, 30.0), ("EPSG:4326", 0.0005), (MODIS_WKT, 463.3127)],
    ids=["utm", "epsg4326", "modis-sinusoidal"],
)
def test_same_footprint_on_utm_geographic_and_sinusoidal_grids(crs, res):
    s = _scales(135.0, zm=40.0)
    if crs == "EPSG:4326":
        gb = GeoBox.from_bbox((LON - 0.12, LAT - 0.05, LON + 0.12, LAT + 0.05), crs, resolution=res)
    else:
        gb = _utm_grid(LON, LAT, 5600.0 if crs != UTM33 else 5000.0, res, crs)
    fw = georef.footprint_weights(gb, LON, LAT, s, max_distance=4000.0)
    assert np.all(fw.weights >= 0)
    cx, cy = _centroid(gb, fw)
    clon, clat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(cx, cy)
    az, _, dist = GEOD.inv(LON, LAT, clon, clat)
    tol = 0.5 if crs != MODIS_WKT else 6.0  # a few 463 m pixels only resolve the bearing coarsely
    assert _bearing_diff(az % 360, 135.0) < tol
    utm = georef.footprint_weights(_utm_grid(LON, LAT, 5000.0, 30.0), LON, LAT, s, max_distance=4000.0)
    assert fw.coverage == pytest.approx(utm.coverage, rel=0.02)
    assert dist > 0


def test_climatology_weights_from_records_and_node_grid_agree():
    rng = np.random.default_rng(0)
    n = 40
    wd = np.mod(rng.normal(200.0, 25.0, n), 360)
    s = kljun.ffp_scales(
        20.0, 1200.0, rng.uniform(-300, -20, n), 0.7, rng.uniform(0.3, 0.6, n), z0=0.3, wind_dir=wd
    )
    gb = _utm_grid(LON, LAT, 2500.0, 25.0)
    direct = georef.footprint_weights(gb, LON, LAT, s, max_distance=2000.0)
    nodes = kljun.node_grid(1500.0, 5.0)
    clim = kljun.climatology(s, nodes, nodes, smooth=False)
    via_nodes = georef.footprint_weights(gb, LON, LAT, clim, max_distance=2000.0)
    a = np.zeros(gb.shape)
    b = np.zeros(gb.shape)
    a[direct.window] = direct.weights
    b[via_nodes.window] = via_nodes.weights
    assert abs(a - b).sum() < 0.03 * a.sum()


def test_tower_outside_grid_and_no_valid_record_raise():
    gb = _utm_grid(LON, LAT, 1000.0, 30.0)
    with pytest.raises(GridError, match="outside the grid"):
        georef.footprint_weights(gb, LON + 1.0, LAT, _scales(90.0))
    bad = kljun.ffp_scales(20.0, 1500.0, -100.0, 0.6, 0.05, z0=0.3, wind_dir=90.0)  # u* too low
    with pytest.raises(GeofluxError, match="valid record"):
        georef.footprint_weights(gb, LON, LAT, bad)


# ------------------------------------------------------------------ inputs from records


def _records(n: int = 48, **drop: bool) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        {
            "USTAR": rng.uniform(0.2, 0.6, n),
            "WD": rng.uniform(0, 360, n),
            "WS": rng.uniform(1.5, 5.0, n),
            "MO_LENGTH": rng.choice([-50.0, -300.0, 200.0], n),
            "V_SIGMA": rng.uniform(0.4, 1.2, n),
        }
    )
    df.attrs["resolution"] = "HH"
    return df.drop(columns=[k for k, v in drop.items() if v])


def test_inputs_from_full_records_are_ffp():
    df = _records()
    inp = georef.ffp_inputs_from_records(df, zm=20.0, z0=0.3)
    assert inp.counts() == {"ffp": 48}
    direct = kljun.ffp_scales(
        20.0, 1000.0, df["MO_LENGTH"], df["V_SIGMA"], df["USTAR"], z0=0.3, wind_dir=df["WD"]
    )
    np.testing.assert_allclose(inp.scales.x_scale, direct.x_scale)
    np.testing.assert_allclose(inp.scales.sigy_scale, direct.sigy_scale)


def test_missing_stability_and_sigma_v_fall_back_to_neutral_estimates():
    df = _records(MO_LENGTH=True, V_SIGMA=True)
    inp = georef.ffp_inputs_from_records(df, zm=20.0, z0=0.3)
    assert inp.counts() == {"ffp-neutral": 48}
    neutral = kljun.ffp_scales(
        20.0, 1000.0, -1e6, georef.NEUTRAL_SIGMAV_RATIO * df["USTAR"], df["USTAR"], z0=0.3, wind_dir=df["WD"]
    )
    np.testing.assert_allclose(inp.scales.x_scale, neutral.x_scale)
    np.testing.assert_allclose(inp.scales.sigy_scale, neutral.sigy_scale)


def test_missing_ustar_uses_log_law_and_missing_wd_or_low_ustar_is_unusable():
    df = _records()
    df.loc[0, "USTAR"] = np.nan
    df.loc[1, "WD"] = np.nan
    df.loc[2, "USTAR"] = 0.05
    inp = georef.ffp_inputs_from_records(df, zm=20.0, z0=0.3)
    assert list(inp.method[:3]) == ["ffp-neutral", "none", "none"]
    assert inp.scales.flags[1] & kljun.FLAG_MISSING and inp.scales.flags[2] & kljun.FLAG_USTAR
    ustar0 = kljun.KARMAN * df.loc[0, "WS"] / np.log(20.0 / 0.3)
    one = kljun.ffp_scales(20.0, 1000.0, df.loc[0, "MO_LENGTH"], df.loc[0, "V_SIGMA"], ustar0, z0=0.3)
    np.testing.assert_allclose(inp.scales.x_scale[0], one.x_scale[0])


def test_site_weights_method_ffp_then_neutral_then_disk():
    gb = _utm_grid(LON, LAT, 2000.0, 30.0)
    full = georef.site_footprint_weights(gb, LON, LAT, _records(12), zm=20.0, z0=0.3, max_distance=1500.0)
    assert full.method == "ffp" and 0 < full.coverage <= 1
    neutral = georef.site_footprint_weights(
        gb, LON, LAT, _records(12, MO_LENGTH=True), zm=20.0, z0=0.3, max_distance=1500.0
    )
    assert neutral.method == "ffp-neutral"
    no_wd = _records(12, WD=True)
    disk = georef.site_footprint_weights(gb, LON, LAT, no_wd, zm=20.0, z0=0.3, disk_radius=300.0)
    ref = disk_weights(gb, *tower_xy(gb, LON, LAT), 300.0)
    assert disk.method == "disk"
    np.testing.assert_array_equal(disk.weights, ref.weights)
    daily = _records(12)
    daily.attrs["resolution"] = "DD"
    assert georef.site_footprint_weights(gb, LON, LAT, daily, zm=20.0, z0=0.3).method == "disk"


# ------------------------------------------------------------------ representativeness


def test_representativeness_index():
    gb = _utm_grid(LON, LAT, 1500.0, 30.0)
    gamma = georef.grid_convergence(UTM33, LON, LAT)
    fw = georef.footprint_weights(gb, LON, LAT, _scales(90.0 + gamma), max_distance=1000.0)  # looks east
    disk = disk_weights(gb, *tower_xy(gb, LON, LAT), 1000.0)
    cols = np.arange(gb.shape[1], dtype=float)
    gradient = np.broadcast_to(cols, gb.shape).copy()  # driver grows eastwards
    rep = georef.representativeness_index(gradient, fw, disk)
    assert rep.footprint_mean > rep.disk_mean
    full_fp, full_disk = np.zeros(gb.shape), np.zeros(gb.shape)
    full_fp[fw.window] = fw.weights
    full_disk[disk.window] = disk.weights
    fp_mean = (full_fp * gradient).sum() / full_fp.sum()
    d_mean = (full_disk * gradient).sum() / full_disk.sum()
    d_std = np.sqrt((full_disk * (gradient - d_mean) ** 2).sum() / full_disk.sum())
    assert rep.index == pytest.approx(abs(fp_mean - d_mean) / d_std)
    assert rep.index > 0.3
    uniform = np.full(gb.shape, 3.0)
    flat = georef.representativeness_index(uniform, fw, disk)
    assert flat.index == 0.0 and flat.footprint_mean == pytest.approx(3.0)
    gradient[:, : gb.shape[1] // 2] = np.nan  # west half missing: only the east half counts
    part = georef.representativeness_index(gradient, fw, disk)
    assert part.disk_mean > rep.disk_mean
    with pytest.raises(GridError, match="2-D"):
        georef.representativeness_index(cols, fw, disk)


@pytest.mark.parametrize(
    "grid",
    [UTM33, "EPSG:25833", "EPSG:4326", "EPSG:3035", MODIS_WKT],
    ids=["utm", "etrs", "ll", "laea", "sinu"],
)
def test_local_frame_equals_direct_proj_transform(grid):
    # LocalFrame replaces Transformer.from_crs(aeqd at the tower, grid) (and back), which costs ~25 ms per
    # tower; it must place points where that transformer does, to round-off, on grids of other datums too
    from geoflux.footprint.weights import LocalFrame, _local_crs

    wkt = CRS.from_user_input(grid).to_wkt()
    local = _local_crs(LON, LAT)
    rng = np.random.default_rng(0)
    e, n = rng.uniform(-5000, 5000, (2, 500))
    direct = np.array(Transformer.from_crs(local, wkt, always_xy=True).transform(e, n))
    frame = LocalFrame(LON, LAT, wkt)
    ours = np.array(frame.to_grid(e, n))
    scale = 1e-6 if CRS.from_user_input(grid).is_geographic else 1.0  # degrees: ~1e-6 deg per 0.1 m
    assert np.abs(ours - direct).max() < 1e-6 * scale  # micrometres (m) or the degrees' equivalent
    back = np.array(frame.to_local(*direct))
    ref_back = np.array(Transformer.from_crs(wkt, local, always_xy=True).transform(*direct))
    assert np.abs(back - ref_back).max() < 1e-6
    assert np.abs(back - [e, n]).max() < 1e-3  # round trip home (PROJ's LAEA inverse: within 0.1 mm)
