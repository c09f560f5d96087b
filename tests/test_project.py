"""Scenario projection (`geoflux project`) and year-to-year attribution through the model (`attribute`).

Projection runs end to end on the tiny world (a small forest, so it stays fast); the scenario maps are checked
against the model applied by hand to drivers perturbed independently (Magnus formula written here), and a
scenario given as future driver rasters through a STAC catalog against the built-in delta it equals.
Attribution runs on a hand-made two-year MODIS 8-day world with a linear model, whose contributions are
known in closed form: coefficient x the anomaly of the driver's day-weighted annual sum.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from click.testing import CliRunner

from geoflux.cog import save_catalog, stac_item_for_cog


def _esat(t):
    return 6.1078 * np.exp(17.27 * t / (t + 237.3))


@pytest.fixture(scope="module")
def tiny_mapped(tiny_world_pristine: Path, tmp_path_factory) -> Path:
    """The tiny world trained with a small forest and mapped (base maps for the change)."""
    from geoflux import pipeline
    from geoflux.config import dump_config, load_config

    dst = tmp_path_factory.mktemp("proj") / "run"
    shutil.copytree(tiny_world_pristine, dst)
    cfg = load_config(dst / "config.yaml")
    # a small, quickly validated forest: the test is about projection, not skill
    small = {
        "kind": "random_forest",
        "params": {"n_estimators": 20, "min_samples_leaf": 3},
        "cv_folds": 3,
        "training": "averaged",
    }
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=small)})
    dump_config(cfg, dst / "config.yaml")
    cfg = load_config(dst / "config.yaml")
    pipeline.stage_towers(cfg)
    pipeline.stage_extract(cfg)
    pipeline.stage_train(cfg)
    pipeline.stage_map(cfg, progress=False, workers=2)
    return dst


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1, masked=True).astype("float64").filled(np.nan)


def test_project_cli_end_to_end(tiny_mapped: Path) -> None:
    from cli.main import cli
    from geoflux.cog import is_valid_cog
    from geoflux.config import load_config
    from geoflux.cube import cube_from_config
    from geoflux.features import pixel_features
    from geoflux.model import load_model

    cfg_path = tiny_mapped / "config.yaml"
    res = CliRunner().invoke(
        cli, ["-q", "project", str(cfg_path), "--scenario", "warming_2K", "--workers", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "outside the area of applicability" in res.output and "change" in res.output
    cfg = load_config(cfg_path)
    model = load_model(tiny_mapped / "model" / "model.skops")
    folder = tiny_mapped / "maps" / "scenarios" / "warming_2K"
    periods = cfg.periods()
    p = periods[7]
    for band in model.bands:
        f = folder / f"{band.lower().replace('_', '-')}_{p:%Y%m%d}.tif"
        ok, errors = is_valid_cog(f)
        assert ok, errors
        with rasterio.open(f) as src:
            assert src.tags()["scenario"] == "warming_2K" and src.tags()["period_start"] == f"{p:%Y-%m-%d}"
            assert src.dtypes[0] == ("uint8" if band == "AOA" else "float32")
    # independent: the drivers of that period perturbed by hand, through the model
    cube = cube_from_config(cfg).isel(time=7).compute()
    values = {v.name: cube[v.name].values.astype("float64") for v in cfg.variables}
    ta = values["ta"].copy()
    values["vpd"] = values["vpd"] * _esat(ta + 2.0) / _esat(ta)
    values["ta"] = ta + 2.0
    values["lst"] = values["lst"] + 2.0
    x = pixel_features(values, cfg.variables).reshape(-1, len(model.features))
    expected = model.predict(x).reshape(cube.sizes["y"], cube.sizes["x"])
    mapped = _read(folder / f"nee_{p:%Y%m%d}.tif")
    np.testing.assert_allclose(mapped, expected, rtol=1e-4, atol=1e-4)
    # the base map differs (the scenario did something)
    assert np.nanmean(np.abs(mapped - _read(tiny_mapped / "maps" / f"nee_{p:%Y%m%d}.tif"))) > 1e-3
    # budgets: day-weighted sums of the scenario and base NEE maps
    proj = json.loads((tiny_mapped / "budgets" / "scenarios" / "warming_2K" / "projection.json").read_text())
    days = cfg.period_days()
    scen = sum(d * _read(folder / f"nee_{q:%Y%m%d}.tif") for q, d in zip(periods, days, strict=True))
    base = sum(
        d * _read(tiny_mapped / "maps" / f"nee_{q:%Y%m%d}.tif") for q, d in zip(periods, days, strict=True)
    )
    (b,) = proj["budgets"].values()
    assert b["nee"] == pytest.approx(np.nanmean(scen), rel=1e-6)
    assert b["change"] == pytest.approx(np.nanmean(scen) - np.nanmean(base), rel=1e-5, abs=1e-6)
    assert (tiny_mapped / "budgets" / "scenarios" / "warming_2K" / "budgets.json").exists()
    # AOA share from the scenario's AOA band
    aoa = np.stack([_read(folder / f"aoa_{q:%Y%m%d}.tif") for q in periods])
    assert proj["aoa"]["outside_share"] == pytest.approx(np.nanmean(aoa == 0), abs=1e-9)
    share = _read(folder / "outside-aoa.tif")
    np.testing.assert_allclose(share, (aoa == 0).mean(axis=0), atol=1e-6)
    # a second run refuses to replace the outputs; an unknown scenario is one line
    res = CliRunner().invoke(cli, ["project", str(cfg_path), "--scenario", "warming_2K"])
    assert res.exit_code == 1 and "exists" in res.output and res.output.count("\n") == 1
    res = CliRunner().invoke(cli, ["project", str(cfg_path), "--scenario", "warming_9K"])
    assert res.exit_code == 1 and "warming_9K" in res.output and res.output.count("\n") == 1


def test_scenario_from_future_catalog_equals_the_delta(tiny_mapped: Path, tmp_path: Path) -> None:
    """Future ta rasters (the run's ta + 2 degC) through a STAC catalog give the maps of ta_plus_2K."""
    from cli.main import cli
    from geoflux.cog import RasterSpec, write_cog
    from geoflux.config import load_config
    from geoflux.cube import cube_from_config, target_grid

    cfg = load_config(tiny_mapped / "config.yaml")
    gb = target_grid(cfg.grid)
    ta = cube_from_config(cfg)["ta"].compute()
    items = []
    future = tmp_path / "future"
    for t in ta["time"].values:
        t0 = pd.Timestamp(t).to_pydatetime()
        path = future / "cogs" / f"ta_{t0:%Y%m%d}.tif"
        write_cog((ta.sel(time=t).values + 2.0).astype("float32"), gb, RasterSpec(path, units="degC"))
        items.append(stac_item_for_cog(path, gb, f"fta-{t0:%Y%m%d}", t0, t0 + dt.timedelta(days=8)))
    save_catalog(future, "future", "future drivers", {"future-ta": items}, gb)
    scen = tmp_path / "future2K.yaml"
    scen.write_text(
        "description: ta + 2 K as future rasters\ncatalog: future/catalog.json\n"
        "variables:\n  ta: {collection: future-ta, scale: 1.0, offset: 0.0, nodata: -9999}\n"
    )
    runner = CliRunner()
    for name in ("ta_plus_2K", str(scen)):
        res = runner.invoke(cli, ["-q", "project", str(tiny_mapped / "config.yaml"), "--scenario", name])
        assert res.exit_code == 0, res.output
    proj = json.loads((tiny_mapped / "budgets" / "scenarios" / "future2K" / "projection.json").read_text())
    assert proj["scenario"]["drivers_from_catalog"] == ["ta"]
    for p in cfg.periods()[::5]:
        a = _read(tiny_mapped / "maps" / "scenarios" / "future2K" / f"nee_{p:%Y%m%d}.tif")
        b = _read(tiny_mapped / "maps" / "scenarios" / "ta_plus_2K" / f"nee_{p:%Y%m%d}.tif")
        # float32 rounding of ta + 2 may flip a rare split: nearly every pixel identical
        assert np.mean(np.isclose(a, b, atol=1e-5)) > 0.99
    with rasterio.open(tiny_mapped / "maps" / "scenarios" / "future2K" / f"nee_{p:%Y%m%d}.tif") as src:
        assert src.tags()["scenario_drivers"] == "ta" and "fta-" in src.tags()["input_items"]
    # a scenario naming a driver the run does not have: one line naming the file and key
    bad = tmp_path / "bad.yaml"
    bad.write_text("variables:\n  tas: {collection: future-ta}\n")
    res = runner.invoke(cli, ["project", str(tiny_mapped / "config.yaml"), "--scenario", str(bad)])
    assert res.exit_code == 1 and "variables.tas" in res.output and res.output.count("\n") == 1


def test_attribute_needs_complete_years(tiny_mapped: Path) -> None:
    from cli.main import cli

    res = CliRunner().invoke(cli, ["attribute", str(tiny_mapped / "config.yaml")])
    assert res.exit_code == 1 and "complete calendar year" in res.output and res.output.count("\n") == 1


# ------------------------------------------------------------------------------------------------------
# attribution on a hand-made two-year world with a linear model
# ------------------------------------------------------------------------------------------------------

N = 16
COEF = {"ta": 0.3, "sw": -0.01, "lst": 0.1, "landcover_1": 1.0, "landcover_2": 0.0}


def _tif(a: np.ndarray, gb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": N, "height": N, "count": 1, "dtype": "float32"}
    with rasterio.open(path, "w", **profile, nodata=-9999.0, crs=gb.crs.to_wkt(), transform=gb.affine) as dst:
        dst.write(a.astype("float32"), 1)


@pytest.fixture(scope="module")
def linear_world(tmp_path_factory):
    from sklearn.linear_model import LinearRegression

    from geoflux.config import config_from_dict, dump_config
    from geoflux.cube import target_grid
    from geoflux.model import TrainedModel

    root = tmp_path_factory.mktemp("attr")
    variables = [{"name": n, "collection": f"c-{n}", "asset": "data"} for n in ("ta", "sw", "lst")]
    variables.append(
        {
            "name": "landcover",
            "collection": "c-landcover",
            "asset": "data",
            "kind": "categorical",
            "classes": [1, 2],
            "static": True,
        }
    )
    data = {
        "catalog": "world/catalog.json",
        "variables": variables,
        "towers": {"files": "world/towers/*.csv", "sites": "world/sites.csv"},
        "grid": {
            "crs": "EPSG:32632",
            "resolution": 500.0,
            "bbox": [440000, 5572000 - N * 500, 440000 + N * 500, 5572000],
            "chunk": 16,
        },
        "time": {"start": "2020-01-01", "end": "2021-12-31", "step": "MODIS8D"},
        "output": ".",
    }
    cfg = config_from_dict(data, base_dir=root)
    gb = target_grid(cfg.grid)
    periods, ends = cfg.period_bounds()
    rng = np.random.default_rng(5)
    nt = len(periods)
    season = np.sin(2 * np.pi * periods.day_of_year.to_numpy() / 365)[:, None, None]
    fields = {
        "ta": 10 + 8 * season + rng.normal(0, 2, (nt, N, N)),
        "sw": 200 + 100 * season + rng.normal(0, 30, (nt, N, N)),
    }
    fields["lst"] = fields["ta"] + rng.normal(0, 0.3, (nt, N, N))  # collinear with ta
    lc = np.where(np.arange(N)[None, :] < 7, 1, 2).repeat(N, axis=0)
    items: dict[str, list] = {}
    for name, f in fields.items():
        items[f"c-{name}"] = []
        for i, (p, e) in enumerate(zip(periods, ends, strict=True)):
            path = root / "world" / name / f"{name}_{p:%Y%m%d}.tif"
            _tif(f[i], gb, path)
            items[f"c-{name}"].append(stac_item_for_cog(path, gb, f"{name}-{p:%Y%m%d}", p, e))
    path = root / "world" / "landcover.tif"
    _tif(lc, gb, path)
    t0 = dt.datetime(2000, 1, 1)
    items["c-landcover"] = [stac_item_for_cog(path, gb, "landcover", t0, t0)]
    save_catalog(root / "world", "attr", "attribution test world", items, gb)
    dump_config(cfg, root / "config.yaml")
    # the training table: a few "towers" (pixels) with the drivers, for the collinearity check
    rows = []
    for s, (r, c) in enumerate([(2, 3), (8, 8), (12, 4), (5, 13)]):
        for i, p in enumerate(periods):
            rows.append({"site": f"S{s}", "time": p, **{k: float(f[i, r, c]) for k, f in fields.items()}})
    (root / "training").mkdir()
    pd.DataFrame(rows).to_parquet(root / "training" / "training.parquet")
    feats = list(COEF)
    x = rng.normal(0, 1, (200, len(feats)))
    est = LinearRegression().fit(x, x @ np.array(list(COEF.values())) + 0.5)
    model = TrainedModel(est, feats, {f: "" for f in feats})
    return root, cfg, model, fields, lc


def test_year_attribution_matches_closed_form(linear_world) -> None:
    from geoflux.analysis.attribution import year_attribution

    root, cfg, model, fields, lc = linear_world
    out = year_attribution(cfg, model=model, overwrite=True)
    periods = cfg.periods()
    days = cfg.period_days()
    years = periods.year.to_numpy()

    def anomaly(f: np.ndarray) -> dict[int, np.ndarray]:
        b = {y: (days[years == y][:, None, None] * f[years == y]).sum(axis=0) for y in (2020, 2021)}
        mean = (b[2020] + b[2021]) / 2
        return {y: b[y] - mean for y in b}

    def clim(f: np.ndarray) -> np.ndarray:
        # the mean over the two years of the same 8-day step (both years have 46)
        return np.concatenate([(f[:46] + f[46:]) / 2] * 2)

    # linear model: a driver's contribution is its coefficient times anomaly(x) - anomaly(climatology of
    # x); the latter is not zero, the last period being 6 days in 2020 and 5 in 2021
    contrib = {
        d: {y: COEF[d] * (anomaly(fields[d])[y] - anomaly(clim(fields[d]))[y]) for y in (2020, 2021)}
        for d in ("ta", "sw", "lst")
    }
    nee = sum(COEF[d] * fields[d] for d in contrib) + 0.5 + COEF["landcover_1"] * (lc == 1)
    full = anomaly(nee)
    assert out["groups"] == {"ta+lst": ["ta", "lst"]}
    assert any("ta and lst are collinear" in w for w in out["warnings"])
    table = pd.DataFrame(out["table"]).set_index(["region", "year"])
    for y in (2020, 2021):
        row = table.loc[("region", str(y))]
        assert row["anomaly"] == pytest.approx(full[y].mean(), abs=1e-3)
        for d in contrib:
            assert row[f"contrib_{d}"] == pytest.approx(contrib[d][y].mean(), abs=1e-3)
        assert row["contrib_ta+lst"] == pytest.approx((contrib["ta"][y] + contrib["lst"][y]).mean(), abs=1e-3)
        rest = full[y] - sum(contrib[d][y] for d in contrib)  # intercept x (366 - 365 days) / 2 etc.
        assert row["interaction"] == pytest.approx(rest.mean(), abs=1e-3)
        cls = table.loc[("landcover=1", str(y))]
        assert cls["contrib_sw"] == pytest.approx(contrib["sw"][y][lc == 1].mean(), abs=1e-3)
        first = max(contrib, key=lambda d: abs(contrib[d][y].mean()))
        assert row["first_driver"] == first
    # the maps hold the per-pixel contributions
    m = _read(root / "analysis" / "attribution" / "contrib-ta_2021.tif")
    np.testing.assert_allclose(m, contrib["ta"][2021], atol=2e-3)
    m = _read(root / "analysis" / "attribution" / "anomaly_2020.tif")
    np.testing.assert_allclose(m, full[2020], atol=2e-3)
    saved = pd.read_csv(root / "analysis" / "attribution_years.csv")
    assert len(saved) == 2 * 3 and set(saved["region"]) == {"region", "landcover=1", "landcover=2"}


def test_year_attribution_reports_where_counterfactuals_leave_the_aoa(linear_world, tmp_path) -> None:
    """The share of each year's days whose inputs are outside the AOA, for the run's own drivers and for
    each counterfactual, against a brute-force nearest-neighbour DI computed here."""
    from geoflux.analysis.attribution import EXTRAPOLATION_RATIO, _extrapolated, year_attribution
    from geoflux.model import AOA

    root, cfg, model, fields, _ = linear_world
    feats = list(COEF)
    sw_points = np.linspace(100.0, 250.0, 151)  # the AOA knows sw in [100, 250] only (weight 0 elsewhere)
    weights = np.array([1.0 if f == "sw" else 0.0 for f in feats])
    points = np.zeros((len(sw_points), len(feats)))
    points[:, feats.index("sw")] = sw_points
    aoa_model = copy.copy(model)
    aoa_model.aoa = AOA(np.zeros(len(feats)), np.ones(len(feats)), weights, points, dbar=10.0, threshold=1.0)
    cfg2 = cfg.model_copy(update={"output": str(tmp_path)})
    shutil.copytree(root / "training", tmp_path / "training")
    out = year_attribution(cfg2, model=aoa_model, overwrite=True)
    periods, days = cfg.periods(), cfg.period_days()
    years = periods.year.to_numpy()

    def share(sw: np.ndarray) -> dict[int, np.ndarray]:
        di = np.abs(sw[..., None] - sw_points).min(axis=-1) / 10.0
        o = di > 1.0
        return {
            y: (days[years == y][:, None, None] * o[years == y]).sum(0) / days[years == y].sum()
            for y in (2020, 2021)
        }

    clim_sw = np.concatenate([(fields["sw"][:46] + fields["sw"][46:]) / 2] * 2)
    own, held_sw = share(fields["sw"]), share(clim_sw)
    table = pd.DataFrame(out["table"]).set_index(["region", "year"])
    for y in (2020, 2021):
        row = table.loc[("region", str(y))]
        assert row["outside_aoa"] == pytest.approx(own[y].mean(), abs=1e-6)
        assert row["outside_aoa_sw"] == pytest.approx(held_sw[y].mean(), abs=1e-6)
        assert row["outside_aoa_ta"] == pytest.approx(own[y].mean(), abs=1e-6)  # sw untouched
        assert 0 < row["outside_aoa"] < 1 and row["outside_aoa_sw"] != row["outside_aoa"]
    m = _read(tmp_path / "analysis" / "attribution" / "outside-aoa-sw_2021.tif")
    np.testing.assert_allclose(m, held_sw[2021], atol=1e-6)
    with rasterio.open(tmp_path / "analysis" / "attribution" / "outside-aoa_2020.tif") as src:
        assert src.tags(1)["units"] == "1" and src.units == ("1",)
    assert out["extrapolation"]["flagged"] == _extrapolated(
        pd.DataFrame(out["table"]), ["ta", "sw", "lst", "ta+lst"]
    )
    # the flagging rule on a table where one counterfactual leaves the AOA twice as often as the run
    frame = pd.DataFrame(
        [
            {
                "region": "region",
                "year": "2022",
                "outside_aoa": 0.05,
                "contrib_sm": 30.0,
                "outside_aoa_sm": 0.11,
                "contrib_vpd": 20.0,
                "outside_aoa_vpd": 0.055,
            }
        ]
    )
    flagged = _extrapolated(frame, ["sm", "vpd"])
    assert [(f["year"], f["driver"]) for f in flagged] == [("2022", "sm")]
    assert flagged[0]["message"].startswith("2022: with sm held") and "11.0%" in flagged[0]["message"]
    frame["outside_aoa_sm"] = 0.05 * EXTRAPOLATION_RATIO - 1e-3
    assert _extrapolated(frame, ["sm", "vpd"]) == []


def test_attribute_cli_prints_each_warning_once(linear_world, tmp_path, caplog) -> None:
    from cli.main import cli
    from geoflux.model import save_model

    root, _, model, _, _ = linear_world
    run = tmp_path / "run"
    shutil.copytree(root, run)
    save_model(model, run / "model" / "model.skops")
    res = CliRunner().invoke(cli, ["attribute", str(run / "config.yaml"), "--overwrite"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    logged = [r.getMessage() for r in caplog.records if "ta and lst are collinear" in r.getMessage()]
    assert len(logged) == 1  # logged by the stage (stderr in a terminal), not echoed again by the command
    assert not [ln for ln in lines if "collinear" in ln]
    assert any(ln.startswith("  2021: anomaly") and "(first: " in ln for ln in lines)
