"""FFP (Kljun et al. 2015): agreement with Kljun's reference code (pyffp) and model invariants."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tracemalloc

import numpy as np
import pytest

from geoflux.errors import GeofluxError
from geoflux.footprint import kljun

os.environ.setdefault("MPLBACKEND", "Agg")

# zm, z0, h, L, sigma_v, u*: one case per stability regime
CASES = {
    "unstable": dict(zm=20.0, z0=0.3, h=1500.0, ol=-30.0, sigmav=0.9, ustar=0.35),
    "near-neutral": dict(zm=20.0, z0=0.3, h=800.0, ol=-1e6, sigmav=0.8, ustar=0.45),
    "stable": dict(zm=20.0, z0=0.3, h=400.0, ol=150.0, sigmav=0.5, ustar=0.25),
}


def _pyffp():
    mod = pytest.importorskip("pyffp.calc_footprint_FFP")
    import matplotlib

    matplotlib.use("Agg")
    return mod.FFP


def _pyffp_clim():
    return pytest.importorskip("pyffp.calc_footprint_FFP_climatology").FFP_climatology


def _quiet(fn, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(**kw)


def _scales(case: dict, wind_dir: float | None = None, use_umean: float | None = None) -> kljun.FFPScales:
    c = dict(case)
    z0 = None if use_umean else c["z0"]
    return kljun.ffp_scales(
        c["zm"], c["h"], c["ol"], c["sigmav"], c["ustar"], z0=z0, umean=use_umean, wind_dir=wind_dir
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    ffp = _pyffp()
    return {name: _quiet(ffp, **case, nx=600, rs=[0.3, 0.5, 0.8]) for name, case in CASES.items()}


# ------------------------------------------------------------------ agreement with the reference code


@pytest.mark.parametrize("name", list(CASES))
def test_peak_distance_matches_reference(reference, name):
    s = _scales(CASES[name])
    np.testing.assert_allclose(kljun.peak_distance(s)[0], reference[name]["x_ci_max"], rtol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_crosswind_integrated_matches_reference(reference, name):
    ref = reference[name]
    f = kljun.crosswind_integrated(ref["x_ci"], _scales(CASES[name]))[0]
    np.testing.assert_allclose(f, ref["f_ci"], rtol=1e-6, atol=1e-9 * ref["f_ci"].max())


@pytest.mark.parametrize("name", list(CASES))
def test_2d_field_matches_reference_on_same_nodes(reference, name):
    ref = reference[name]
    f = kljun.footprint_2d(ref["x_2d"], ref["y_2d"], _scales(CASES[name]))[0]
    assert f.shape == ref["f_2d"].shape
    np.testing.assert_allclose(f, ref["f_2d"], rtol=1e-6, atol=1e-9 * ref["f_2d"].max())


@pytest.mark.parametrize("wind_dir", [0.0, 37.0, 200.0, 359.0])
def test_rotated_field_matches_reference(wind_dir):
    ffp = _pyffp()
    case = CASES["unstable"]
    ref = _quiet(ffp, **case, wind_dir=wind_dir, nx=600, rs=None)
    f = kljun.footprint_on_nodes(ref["x_2d"], ref["y_2d"], _scales(case, wind_dir=wind_dir))[0]
    np.testing.assert_allclose(f, ref["f_2d"], rtol=1e-6, atol=1e-9 * ref["f_2d"].max())


def test_umean_branch_matches_reference():
    ffp = _pyffp()
    c = {k: v for k, v in CASES["stable"].items() if k != "z0"}
    ref = _quiet(ffp, **c, umean=3.2, nx=600, rs=None)
    s = kljun.ffp_scales(c["zm"], c["h"], c["ol"], c["sigmav"], c["ustar"], umean=3.2)
    np.testing.assert_allclose(kljun.peak_distance(s)[0], ref["x_ci_max"], rtol=1e-9)
    f = kljun.footprint_2d(ref["x_2d"], ref["y_2d"], s)[0]
    np.testing.assert_allclose(f, ref["f_2d"], rtol=1e-6, atol=1e-9 * ref["f_2d"].max())


@pytest.mark.parametrize("name", list(CASES))
def test_r_percent_distances_match_reference_integral(reference, name):
    ref = reference[name]
    x, f = ref["x_ci"], ref["f_ci"]
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(x))])
    rs = np.array([0.3, 0.5, 0.8])
    x_ref = np.interp(rs, cum, x)
    s = _scales(CASES[name])
    np.testing.assert_allclose(kljun.distance_containing(rs, s, method="numeric")[0], x_ref, rtol=2e-3)
    # the paper's closed form (Eq. 25) is an approximation of the same integral, good to a few per cent
    np.testing.assert_allclose(kljun.distance_containing(rs, s)[0], x_ref, rtol=0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_source_area_levels_and_contours_match_reference(reference, name):
    ref = reference[name]
    f = kljun.footprint_2d(ref["x_2d"], ref["y_2d"], _scales(CASES[name]))[0]
    dx = ref["x_ci"][2] - ref["x_ci"][1]
    levels = kljun.source_area_levels(f, dx, dx, ref["rs"])
    np.testing.assert_allclose(levels, ref["fr"], rtol=1e-6)
    for lev, xr, yr in zip(levels, ref["xr"], ref["yr"], strict=True):
        # contour of the reference: grid x along rows; ours on the same nodes
        lines = kljun.source_area_contours(ref["y_2d"][0], ref["x_2d"][:, 0], f, lev)
        assert lines, "no contour found"
        ours = lines[0]  # (k, 2): crosswind, along-wind
        assert abs(ours[:, 1].max() - max(xr)) < 2 * dx
        assert abs(ours[:, 1].min() - min(xr)) < 2 * dx
        assert abs(np.abs(ours[:, 0]).max() - np.abs(yr).max()) < 2 * dx


def _regime_records(regime: str, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ol = {
        "unstable": -np.exp(rng.uniform(np.log(5), np.log(300), n)),
        "near-neutral": rng.choice([-1e6, 1e5, -8000.0, 6000.0], n),
        "stable": np.exp(rng.uniform(np.log(20), np.log(800), n)),
    }[regime]
    ustar = rng.uniform(0.15, 0.8, n)
    rec = {
        "h": rng.uniform(300, 1500, n),
        "ol": ol,
        "sigmav": ustar * rng.uniform(1.5, 2.5, n),
        "ustar": ustar,
        "wind_dir": rng.uniform(0, 360, n),
    }
    rec["ustar"][:2] = 0.05  # two invalid records: both implementations must skip them
    rec["wind_dir"][2:5] = [0.0, 359.9, 360.0]  # wrap-around of the azimuth ranges
    return rec


@pytest.mark.parametrize("regime", ["unstable", "near-neutral", "stable"])
def test_climatology_matches_reference(regime):
    ffp_clim = _pyffp_clim()
    rec = _regime_records(regime, 40, seed={"unstable": 1, "near-neutral": 2, "stable": 3}[regime])
    ref = _quiet(
        ffp_clim,
        zm=10.0,
        z0=0.1,
        **{k: [float(v) for v in vals] for k, vals in rec.items()},
        domain=[-400.0, 400.0, -400.0, 400.0],
        dx=8.0,
        dy=8.0,
        rs=[0.3, 0.5, 0.8],
        verbosity=0,
    )
    s = kljun.ffp_scales(
        10.0, rec["h"], rec["ol"], rec["sigmav"], rec["ustar"], z0=0.1, wind_dir=rec["wind_dir"]
    )
    nodes = kljun.node_grid(400.0, 8.0)
    clim = kljun.climatology(s, nodes, nodes, rs=[0.3, 0.5, 0.8])
    np.testing.assert_array_equal(clim.x, ref["x_2d"][0])
    np.testing.assert_array_equal(clim.y, ref["y_2d"][:, 0])
    assert clim.n == ref["n"] == 38
    np.testing.assert_allclose(clim.f, ref["fclim_2d"], rtol=1e-6, atol=1e-9 * ref["fclim_2d"].max())
    for r, lev, fr, xr, yr in zip(clim.rs, clim.levels, ref["fr"], ref["xr"], ref["yr"], strict=True):
        if fr is None:  # the reference drops contours that touch the domain edge
            continue
        np.testing.assert_allclose(lev, fr, rtol=1e-6)
        # the reference keeps one piece of the iso-line; it must lie on ours (same level, same field)
        ours = np.concatenate(clim.contours(r))
        theirs = np.column_stack([xr, yr])
        gap = np.min(np.hypot(*(theirs[:, None, :] - ours[None, :, :]).transpose(2, 0, 1)), axis=1)
        assert gap.max() < 1.0


# ------------------------------------------------------------------ reference-free invariants


def test_crosswind_integral_of_2d_footprint_is_f_ci():
    s = _scales(CASES["unstable"])
    x = np.array([30.0, 80.0, 250.0, 900.0])
    y = np.linspace(-3000, 3000, 60001)
    f = kljun.footprint_2d(x[:, None], y[None, :], s)[0]
    integral = f.sum(axis=1) * (y[1] - y[0])
    np.testing.assert_allclose(integral, kljun.crosswind_integrated(x, s)[0], rtol=1e-6)


def test_footprint_nonnegative_zero_downwind_and_mass_bounded():
    s = _scales(CASES["stable"], wind_dir=123.0)
    g = np.linspace(-2000, 2000, 801)
    ee, nn = np.meshgrid(g, g)
    f = kljun.footprint_on_nodes(ee, nn, s)[0]
    assert np.all(f >= 0)
    upwind = ee * np.sin(np.deg2rad(123.0)) + nn * np.cos(np.deg2rad(123.0))
    assert np.all(f[upwind <= 0] == 0)
    mass = f.sum() * (g[1] - g[0]) ** 2
    assert 0.3 < mass <= 1.0


def test_centroid_bearing_is_upwind():
    for wd in (10.0, 135.0, 250.0, 355.0):
        s = _scales(CASES["unstable"], wind_dir=wd)
        g = np.linspace(-1500, 1500, 601)
        ee, nn = np.meshgrid(g, g)
        f = kljun.footprint_on_nodes(ee, nn, s)[0]
        f[ee**2 + nn**2 > 1400.0**2] = 0  # a disk, so the domain edge does not skew the centroid
        bearing = np.degrees(np.arctan2((f * ee).sum(), (f * nn).sum())) % 360
        assert abs((bearing - wd + 180) % 360 - 180) < 0.05


def _numeric_peak(s: kljun.FFPScales) -> float:
    x = np.linspace(0.1, 3000, 300_001)
    return float(x[np.argmax(kljun.crosswind_integrated(x, s)[0])])


def test_peak_moves_closer_with_lower_zm():
    base = CASES["unstable"]
    peaks = [
        _numeric_peak(kljun.ffp_scales(zm, base["h"], base["ol"], 0.9, 0.35, z0=0.3))
        for zm in (40, 20, 10, 5)
    ]
    assert all(a > b for a, b in itertools.pairwise(peaks))


def test_peak_moves_closer_as_stability_becomes_more_unstable():
    ols = [50.0, 500.0, -1e6, -500.0, -50.0, -10.0]
    peaks = [_numeric_peak(kljun.ffp_scales(20.0, 1500.0, ol, 0.9, 0.35, z0=0.3)) for ol in ols]
    assert all(a > b for a, b in itertools.pairwise(peaks))


def test_flags_per_record_never_raise():
    zm = np.array([20, 20, 20, 20, 20, 20, 20, 20, 20.0, 20.0])
    h = np.array([1000, 1000, 15, 1000, 1000, 1000, 1000, 1000, 1000, 1000.0])
    ol = np.array([-50, np.nan, -50, -1.0, -50, -50, -50, -50, -50, -50.0])
    sv = np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    us = np.array([0.4, 0.4, 0.4, 0.4, 0.4, 0.05, 0.4, 0.4, 0.4, 0.4])
    wd = np.array([10, 10, 10, 10, 10, 10, 400, 10, 10, 10.0])
    z0 = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3.0, -1.0, 0.1])
    s = kljun.ffp_scales(zm, h, ol, sv, us, z0=z0, wind_dir=wd)
    expected = [
        0,
        kljun.FLAG_MISSING,
        kljun.FLAG_ZM_H,
        kljun.FLAG_ZL,
        kljun.FLAG_SIGMAV,
        kljun.FLAG_USTAR,
        kljun.FLAG_WD,
        kljun.FLAG_RSL,
        kljun.FLAG_Z0,
        0,
    ]
    for flag, exp in zip(s.flags, expected, strict=True):
        assert flag & exp == exp and (exp == 0) == (flag == 0), kljun.describe_flags(int(flag))
    peaks = kljun.peak_distance(s)
    assert np.all(np.isfinite(peaks) == s.valid)
    # the rough-sublayer limit is configurable (20 z0 is stricter than the reference code's 12.5 z0)
    strict = kljun.ffp_scales(20.0, 1000.0, -50.0, 0.5, 0.4, z0=1.2, rsl_factor=20.0)
    assert strict.flags[0] & kljun.FLAG_RSL
    assert kljun.ffp_scales(20.0, 1000.0, -50.0, 0.5, 0.4, z0=1.2).flags[0] == 0


def test_climatology_skips_invalid_records():
    rec = _regime_records("unstable", 30, seed=3)
    args = (10.0, rec["h"], rec["ol"], rec["sigmav"], rec["ustar"])
    s = kljun.ffp_scales(*args, z0=0.1, wind_dir=rec["wind_dir"])
    nodes = kljun.node_grid(300.0, 10.0)
    full = kljun.climatology(s, nodes, nodes)
    only_valid = kljun.climatology(s.subset(s.valid), nodes, nodes)
    assert full.n == only_valid.n == 28
    np.testing.assert_allclose(full.f, only_valid.f, rtol=1e-12)


@pytest.mark.parametrize(("chunk", "workers"), [(1, 1), (7, 2), (64, 3)])
def test_vectorized_sum_equals_record_by_record(chunk, workers):
    rng = np.random.default_rng(7)
    rec = _regime_records("stable", 25, seed=11)
    s = kljun.ffp_scales(
        10.0, rec["h"], rec["ol"], rec["sigmav"], rec["ustar"], z0=0.1, wind_dir=rec["wind_dir"]
    )
    e, n = rng.uniform(-800, 800, 5000), rng.uniform(-800, 800, 5000)
    fast = kljun.footprint_sum(e, n, s, chunk_records=chunk, block_nodes=999, workers=workers)
    per_record = kljun.footprint_on_nodes(e, n, s.subset(s.valid))
    slow = np.nansum(per_record, axis=0)
    # nodes beyond CROSSWIND_CUT sigma_y are skipped: each record loses at most exp(-cut^2/2) of its
    # centreline value, itself below the record's maximum
    skipped = np.exp(-(kljun.CROSSWIND_CUT**2) / 2) * np.nanmax(per_record, axis=1).sum()
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=skipped)


def test_climatology_memory_does_not_grow_with_records():
    nodes = kljun.node_grid(250.0, 5.0)

    def peak(n: int) -> int:
        rec = _regime_records("unstable", n, seed=5)
        s = kljun.ffp_scales(
            10.0, rec["h"], rec["ol"], rec["sigmav"], rec["ustar"], z0=0.1, wind_dir=rec["wind_dir"]
        )
        tracemalloc.start()
        kljun.climatology(s, nodes, nodes, workers=1)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(100), peak(1500)
    assert large < 1.5 * small + 2**20


def test_bad_arguments_raise_geoflux_errors():
    s = _scales(CASES["unstable"])
    with pytest.raises(GeofluxError, match="r:"):
        kljun.distance_containing(1.2, s)
    with pytest.raises(GeofluxError, match="zm"):
        kljun.ffp_scales(np.array([10.0, 10.0]), np.array([1000.0, 1000.0, 1000.0]), -10.0, 0.5, 0.3, z0=0.1)
    with pytest.raises(GeofluxError, match="wind_dir"):
        kljun.climatology(s, np.arange(5.0), np.arange(5.0))
