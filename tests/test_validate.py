"""Footprint validation: metrics, truth at the towers, any-CRS maps, NetCDF exports, strata and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
from click.testing import CliRunner
from odc.geo.geobox import GeoBox

from geoflux import towers as tw
from geoflux import validate as V
from geoflux.cog import RasterSpec, write_cog
from geoflux.config import load_config
from geoflux.cube import target_grid
from geoflux.demo import WORLD_SIZES, generate_fields, place_towers, synthesize_tower
from geoflux.errors import GeofluxError
from geoflux.footprint.regrid import footprints_on_grid
from geoflux.metrics import grouped_skill, skill

N_GEN_SITES = 5  # towers replayed through the generator (its rng is sequential: the first k are exact)


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def cfg(tiny_world_pristine):
    return load_config(tiny_world_pristine / "config.yaml")


@pytest.fixture(scope="module")
def generator_truth(tiny_world_pristine):
    """Noise-free per-period NEE and the footprint of the first towers, replayed as write_world made them."""
    spec = WORLD_SIZES["tiny"]
    fields = generate_fields(spec)
    sites = place_towers(spec, fields)
    rng = np.random.default_rng(spec.seed + 2)  # write_world's tower stream
    frames, fps = [], {}
    for _, site in sites.head(N_GEN_SITES).iterrows():
        _, truth = synthesize_tower(site, fields, spec, rng)
        frames.append(pd.DataFrame({"site": site.SITE_ID, "time": spec.periods, "nee_true": truth["nee"]}))
        fps[site.SITE_ID] = truth["footprint"]
    return pd.concat(frames, ignore_index=True), fps


@pytest.fixture(scope="module")
def observations(cfg):
    sites = tw.read_sites(cfg.path(cfg.towers.sites))
    records = tw.qc_filter(tw.read_towers(str(cfg.path(cfg.towers.files)), sites), qc_max=cfg.towers.qc_max)
    return tw.aggregate(records, cfg.periods(), min_coverage=cfg.towers.min_coverage)


@pytest.fixture(scope="module")
def truth_series(cfg):
    return V.open_geotiff_series(str(cfg.path("world/truth/nee_*.tif")))


# --------------------------------------------------------------------------------------------------
# metrics


def test_skill_matches_definitions():
    rng = np.random.default_rng(0)
    o = rng.normal(0, 2, 200)
    p = 0.7 * o + 0.4 + rng.normal(0, 0.5, 200)
    p[3] = np.nan
    s = skill(o, p)
    ok = ~np.isnan(p)
    oo, pp = o[ok], p[ok]
    r = np.corrcoef(oo, pp)[0, 1]
    assert s["n"] == 199
    assert s["r2_pearson"] == pytest.approx(r**2)
    assert s["nse"] == pytest.approx(1 - ((pp - oo) ** 2).sum() / ((oo - oo.mean()) ** 2).sum())
    assert s["rma_slope"] == pytest.approx(pp.std() / oo.std())
    assert s["bias"] == pytest.approx((pp - oo).mean())
    # RMA is symmetric: swapping obs and pred inverts the slope (OLS would not)
    assert skill(p, o)["rma_slope"] == pytest.approx(1 / s["rma_slope"])
    const = skill(o, np.full_like(o, 1.0))
    assert np.isnan(const["r2_pearson"]) and np.isnan(const["rma_slope"]) and np.isfinite(const["nse"])
    assert skill([1.0], [2.0])["n"] == 1 and np.isnan(skill([1.0], [2.0])["nse"])
    df = pd.DataFrame(
        {"site": ["a", "a", "b", "b"], "g": [1, 1, 2, 2], "obs": [1, 2, 3, 4], "pred": [1, 2, 3, 5]}
    )
    t = grouped_skill(df, "g")
    assert list(t["n_sites"]) == [1, 1] and t.loc[0, "rmse"] == 0.0


# --------------------------------------------------------------------------------------------------
# the known truth


def test_footprint_weighted_truth_equals_tower_truth(truth_series, generator_truth):
    """Σw·M/Σw of the true-NEE COGs through the generator's footprint is the towers' noise-free NEE."""
    truth, fps = generator_truth
    vals = V.footprint_values(truth_series, fps)
    m = vals.merge(truth, on=["site", "time"])
    assert len(m) == N_GEN_SITES * len(truth_series.times)
    np.testing.assert_allclose(m["map"], m["nee_true"], atol=1e-4)  # float32 rasters, float64 sums
    np.testing.assert_allclose(m["fp_valid"], [fps[s].coverage for s in m["site"]], rtol=1e-12)


def test_truth_maps_score_at_the_generator_noise(truth_series, generator_truth, observations, cfg):
    """Validating the true field against the towers leaves exactly the towers' own noise.

    The tower's aggregated NEE minus its noise-free truth is the generator's noise (Laplace noise, gap-fill
    scatter, QC gaps); scoring the truth maps through the footprints must give that same error.
    """
    truth, fps = generator_truth
    sites = tw.read_sites(cfg.path(cfg.towers.sites)).loc[list(fps)]
    val = V.validate_maps(
        truth_series, sites, observations, footprints=fps, footprint_geobox=target_grid(cfg.grid)
    )
    pairs = val.pairs.merge(truth, on=["site", "time"])
    noise = pairs["obs"] - pairs["nee_true"]
    err = pairs["pred"] - pairs["obs"]
    np.testing.assert_allclose(err, -noise, atol=1e-4)
    overall = val.tables["overall"].iloc[0]
    assert overall["rmse"] == pytest.approx(np.sqrt((noise**2).mean()), abs=1e-4)
    # the generator's noise averages out over ~8 days of half-hours: period means within ~0.1 gC m-2 d-1
    assert abs(overall["bias"]) < 0.05 and overall["rmse"] < 0.25
    assert overall["r2_pearson"] > 0.98 and 0.95 < overall["rma_slope"] < 1.05


def test_pipeline_footprints_reproduce_generator_truth(tiny_run, generator_truth):
    """The run's own footprints (towers/footprints.npz) weight the truth as the generator did."""
    from geoflux import pipeline

    out, _ = tiny_run
    cfg = load_config(out / "config.yaml")
    truth, gen_fps = generator_truth
    sites = pipeline.load_sites(cfg).loc[list(gen_fps)]
    fps = pipeline.footprints_for(cfg, sites)
    vals = V.footprint_values(V.open_geotiff_series(str(cfg.path("world/truth/nee_*.tif"))), fps)
    m = vals.merge(truth, on=["site", "time"])
    assert len(m) == N_GEN_SITES * len(cfg.periods())
    assert np.abs(m["map"] - m["nee_true"]).max() < 0.05
    # and metrics.json carries the stratified validation with training and CV rows apart
    metrics = json.loads((out / pipeline.METRICS).read_text())
    fv = metrics["footprint_validation"]
    roles = {(r["source"], r["role"]) for r in fv["tables"]["overall"]}
    assert ("map", "training") in roles and ("cv", "held-out (CV)") in roles
    for name in ("igbp", "representativeness", "site"):
        assert all("role" in r and "source" in r for r in fv["tables"][name])
    assert (out / pipeline.VALIDATION_PAIRS).exists() and (out / "validation/skill_igbp.csv").exists()


# --------------------------------------------------------------------------------------------------
# any CRS, NetCDF


def _warp(src_path, dst_path, crs: str, res: float, nodata: float = -9999.0):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src_path) as src:
        tr, w, h = calculate_default_transform(
            src.crs, crs, src.width, src.height, *src.bounds, resolution=res
        )
        dst = np.full((h, w), nodata, "float32")
        reproject(
            rasterio.band(src, 1),
            dst,
            dst_transform=tr,
            dst_crs=crs,
            dst_nodata=nodata,
            resampling=Resampling.nearest,
        )
        tags = src.tags()
    gb = GeoBox((h, w), tr, crs)
    return write_cog(dst, gb, RasterSpec(dst_path, units="gC m-2 d-1", tags=tags)), gb


@pytest.mark.parametrize(("crs", "res"), [("EPSG:4326", 0.0015), ("EPSG:3035", 125.0)])
def test_maps_on_another_crs(tmp_path, cfg, truth_series, generator_truth, crs, res):
    """Maps warped to lon/lat or LAEA Europe give the same footprint-weighted values as on the native grid."""
    truth, fps = generator_truth
    times = truth_series.times[5:8]
    paths = {}
    for t in times:
        paths[t], gb = _warp(
            cfg.path(f"world/truth/nee_{t:%Y%m%d}.tif"), tmp_path / f"nee_{t:%Y%m%d}.tif", crs, res
        )
    series = V.open_geotiff_series(paths)
    assert series.geobox.crs == gb.crs
    moved = footprints_on_grid(
        pd.DataFrame(index=list(fps)), series.geobox, footprints=fps, footprint_geobox=target_grid(cfg.grid)
    )
    for s, fw in moved.items():  # weight is conserved, except slivers beyond the warped grid's edge
        assert fps[s].coverage * 0.999 < fw.coverage <= fps[s].coverage + 1e-12
    vals = V.footprint_values(series, moved).merge(truth, on=["site", "time"])
    diff = (vals["map"] - vals["nee_true"]).abs()
    # nearest-neighbour warping moves pixel edges by up to half a pixel: small differences remain
    assert diff.median() < 0.05 and diff.max() < 0.3
    sites = tw.read_sites(cfg.path(cfg.towers.sites))
    disk = footprints_on_grid(sites.loc[list(fps)], series.geobox, radius=300.0)
    assert set(disk) == set(fps) and all(abs(fw.coverage - 1) < 1e-9 for fw in disk.values())


@pytest.mark.parametrize("engine", ["scipy", "h5netcdf"])
def test_netcdf_export_lonlat_units(tmp_path, cfg, truth_series, generator_truth, engine):
    """A FLUXCOM-X-like NetCDF (lat/lon, ascending lat, µmol m-2 s-1, mid-month-like stamps) is read."""
    import xarray as xr

    if engine == "h5netcdf":
        pytest.importorskip("h5netcdf")
    truth, fps = generator_truth
    times = truth_series.times[5:8]
    arrays = []
    for t in times:
        path, gb = _warp(
            cfg.path(f"world/truth/nee_{t:%Y%m%d}.tif"), tmp_path / f"w{t:%Y%m%d}.tif", "EPSG:4326", 0.0015
        )
        with rasterio.open(path) as ds:
            a = ds.read(1, masked=True).filled(np.nan)
        arrays.append(a[::-1] / 1.0377)  # ascending latitude, µmol m-2 s-1
    lon = gb.affine.c + gb.affine.a * (np.arange(gb.shape[1]) + 0.5)
    lat = (gb.affine.f + gb.affine.e * (np.arange(gb.shape[0]) + 0.5))[::-1]
    ds = xr.Dataset(
        {"NEE": (("time", "lat", "lon"), np.stack(arrays).astype("float32"), {"units": "umol m-2 s-1"})},
        coords={"time": times + pd.Timedelta(hours=12), "lat": lat, "lon": lon},
    )
    nc = tmp_path / "fluxcomx_like.nc"
    ds.to_netcdf(nc, engine=engine)
    series = V.open_maps(nc)
    assert series.geobox.crs.epsg == 4326
    series.times = V.period_starts(series.times, "8D")[0]
    moved = footprints_on_grid(
        pd.DataFrame(index=list(fps)), series.geobox, footprints=fps, footprint_geobox=target_grid(cfg.grid)
    )
    vals = V.footprint_values(series, moved).merge(truth, on=["site", "time"])
    assert len(vals) == len(fps) * len(times)
    diff = (vals["map"] - vals["nee_true"]).abs()
    assert diff.median() < 0.05 and diff.max() < 0.3
    bad = ds.assign(NEE=ds["NEE"].assign_attrs(units="furlongs"))
    bad.to_netcdf(tmp_path / "bad.nc", engine=engine)
    with pytest.raises(GeofluxError, match=r"bad\.nc.*units 'furlongs'"):
        V.open_maps(tmp_path / "bad.nc")


# --------------------------------------------------------------------------------------------------
# bands, AOA and strata


def test_band_files_aoa_and_strata(tmp_path):
    """Multi-band maps and sibling band files give the band, AOA fraction and their strata."""
    gb = GeoBox.from_bbox((500_000, 5_000_000, 502_000, 5_002_000), "EPSG:32632", resolution=100)
    times = pd.date_range("2021-06-01", periods=3, freq="8D")
    ny, nx = gb.shape
    nee = np.linspace(-3, 1, ny * nx).reshape(ny, nx).astype("float32")
    aoa = np.zeros((ny, nx), "float32")
    aoa[:, nx // 2 :] = 1  # east half inside
    multi, single = {}, {}
    for t in times:
        p = tmp_path / "multi" / f"nee_{t:%Y%m%d}.tif"
        p.parent.mkdir(exist_ok=True)
        prof = {
            "driver": "GTiff",
            "width": nx,
            "height": ny,
            "count": 4,
            "dtype": "float32",
            "crs": gb.crs.to_wkt(),
            "transform": gb.affine,
            "nodata": -9999.0,
        }
        with rasterio.open(p, "w", **prof) as dst:
            for i, (name, a) in enumerate(
                (("NEE", nee), ("NEE_q05", nee - 1), ("NEE_q95", nee + 1), ("AOA", aoa)), start=1
            ):
                dst.write(a, i)
                dst.set_band_description(i, name)
        multi[t] = p
        for stem, a in (("nee", nee), ("nee_q10", nee - 2), ("nee_q90", nee + 2), ("aoa", aoa)):
            q = write_cog(
                a, gb, RasterSpec(tmp_path / "single" / f"{stem}_{t:%Y%m%d}.tif", units="gC m-2 d-1")
            )
            if stem == "nee":
                single[t] = q
    from pyproj import Transformer

    lon, lat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(
        [500_450.0, 501_550.0], [5_001_000.0, 5_001_000.0]
    )
    sites = pd.DataFrame(
        {"LAT": lat, "LON": lon, "IGBP": ["GRA", "CRO"]}, index=pd.Index(["W", "E"], name="SITE_ID")
    )
    for maps, width in ((multi, 1.0), (single, 2.0)):
        series = V.open_geotiff_series(maps)
        assert set(series.bands) == {"lo", "hi", "AOA"}
        fps = footprints_on_grid(sites, series.geobox, radius=150.0)
        vals = V.footprint_values(series, fps)
        np.testing.assert_allclose(vals["hi"] - vals["map"], width, rtol=1e-5)
        aoa_frac = vals.groupby("site")["aoa"].first()
        assert aoa_frac["W"] == 0.0 and aoa_frac["E"] == 1.0
        obs = (
            vals[["site", "time", "map"]].rename(columns={"map": "NEE"}).assign(NEE=lambda d: d["NEE"] + 0.5)
        )
        val = V.validate_maps(series, sites, obs, radius=150.0, training_sites=["W"])
        t = val.tables["aoa"].set_index(["role", "aoa_class"])
        assert t.loc[("training", "outside"), "n"] == 3 and t.loc[("held-out", "inside"), "n"] == 3
        assert ("training", "inside") not in t.index  # the roles never pool
        np.testing.assert_allclose(val.tables["overall"]["bias"], -0.5, rtol=1e-6)
        assert (val.tables["overall"]["interval_coverage"] == 1.0).all()
        assert set(val.tables["igbp"]["igbp"]) == {"GRA", "CRO"}


def test_time_from_names_and_periods(tmp_path):
    gb = GeoBox.from_bbox((0, 0, 1000, 1000), "EPSG:32631", resolution=100)
    names = ["FLUXCOM_NEE_2019-02-15.tif", "prod.A2019046.tif", "x_201903.tif"]
    for n in names:
        write_cog(np.zeros(gb.shape, "float32"), gb, RasterSpec(tmp_path / n))
    got = [V.time_from_name(tmp_path / n) for n in names]
    assert got == [pd.Timestamp("2019-02-15"), pd.Timestamp("2019-02-15"), pd.Timestamp("2019-03-01")]
    starts, end = V.period_starts(pd.DatetimeIndex(["2019-01-15", "2019-02-15", "2019-03-15"]), None)
    assert list(starts) == list(pd.date_range("2019-01-01", periods=3, freq="MS")) and end == pd.Timestamp(
        "2019-04-01"
    )
    with pytest.raises(GeofluxError, match="cannot tell the map's date"):
        write_cog(np.zeros(gb.shape, "float32"), gb, RasterSpec(tmp_path / "nodate.tif"))
        V.open_geotiff_series([tmp_path / "nodate.tif"])


# --------------------------------------------------------------------------------------------------
# command line


def test_cli_validate_maps_made_elsewhere(tmp_path, tiny_world_pristine):
    from cli.main import cli

    w = tiny_world_pristine / "world"
    runner = CliRunner()
    args = [
        "validate",
        "--maps",
        str(w / "truth" / "nee_*.tif"),
        "--towers",
        str(w / "towers" / "*.csv"),
        "--sites",
        str(w / "sites.csv"),
        "--time-step",
        "8D",
        "--training-sites",
        "XX-D01,XX-D02",
        "--out",
        str(tmp_path / "val"),
        "--json",
    ]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    overall = {r["role"]: r for r in out["tables"]["overall"]}
    assert set(overall) == {"training", "held-out"} and overall["training"]["n_sites"] == 2
    assert overall["held-out"]["rmse"] < 0.3  # the true field vs the towers: only the towers' noise
    for f in ("validation.json", "pairs.csv", "skill_igbp.csv", "skill_representativeness.csv"):
        assert (tmp_path / "val" / f).exists()
    both = runner.invoke(cli, ["validate", str(tiny_world_pristine / "config.yaml"), "--maps", "x"])
    assert both.exit_code == 2 and "not both" in both.output
    half = runner.invoke(cli, ["validate", "--maps", "x"])
    assert half.exit_code == 2 and "--towers and --sites" in half.output
    none = runner.invoke(
        cli,
        [
            "validate",
            "--maps",
            str(tmp_path / "nothing*.tif"),
            "--towers",
            str(w / "towers"),
            "--sites",
            str(w / "sites.csv"),
        ],
    )
    assert none.exit_code == 1 and none.output.startswith("error: ") and "no map files match" in none.output
