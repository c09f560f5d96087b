"""Calendars that match products (MODIS 8-day periods restarting on 1 January), true period ends everywhere,
truth/time alignment checked before any stage, and multi-year generated worlds with known anomalies."""

from __future__ import annotations

import calendar
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from geoflux.config import config_from_dict, make_period_starts, period_edges, period_ends
from geoflux.errors import ConfigError, GeofluxError


def _cfg(tmp_path: Path, start: str, end: str, step: str, truth: str | None = None):
    data = {
        "catalog": "world/catalog.json",
        "variables": [{"name": "ta", "collection": "demo-ta", "asset": "data"}],
        "towers": {"files": "world/towers/*.csv", "sites": "world/sites.csv"},
        "grid": {"crs": "EPSG:32632", "resolution": 500, "bbox": [440000, 5564000, 448000, 5572000]},
        "time": {"start": start, "end": end, "step": step},
        "output": "out",
        **({"truth": truth} if truth else {}),
    }
    return config_from_dict(data, base_dir=tmp_path)


def test_modis_8day_periods_restart_every_january(tmp_path):
    cfg = _cfg(tmp_path, "2019-01-01", "2021-12-31", "modis8d")  # spelling is case-insensitive
    assert cfg.time.step == "MODIS8D"
    starts, ends = cfg.period_bounds()
    assert len(starts) == 3 * 46
    for year in (2019, 2020, 2021):
        s = starts[starts.year == year]
        # day of year 1, 9, ..., 361 (MODIS product dates), computed independently from day counts
        assert list(s.dayofyear) == list(range(1, 366, 8))
        e = ends[starts.year == year]
        assert e[-1] == pd.Timestamp(f"{year + 1}-01-01")
        days = cfg.period_days()[starts.year == year]
        assert days[-1] == (6 if calendar.isleap(year) else 5)
        assert days.sum() == (366 if calendar.isleap(year) else 365)
    # periods tile time without gaps or overlaps
    assert (ends[:-1] == starts[1:]).all()


def test_continuous_8d_drifts_from_products_but_is_kept(tmp_path):
    cfg = _cfg(tmp_path, "2021-01-01", "2022-12-31", "8D")
    starts, ends = cfg.period_bounds()
    assert pd.Timestamp("2022-01-01") not in starts  # why MODIS8D exists
    assert ((ends - starts) == pd.Timedelta("8D")).all()


def test_monthly_and_daily_steps_have_true_ends(tmp_path):
    cfg = _cfg(tmp_path, "2020-01-01", "2020-12-31", "MS")
    _, ends = cfg.period_bounds()
    assert list(cfg.period_days()) == [calendar.monthrange(2020, m)[1] for m in range(1, 13)]
    assert ends[-1] == pd.Timestamp("2021-01-01")
    daily = _cfg(tmp_path, "2021-02-27", "2021-03-02", "1D")
    assert list(daily.period_days()) == [1.0] * 4
    assert list(period_edges(daily.periods(), "1D"))[-1] == pd.Timestamp("2021-03-03")


def test_bad_steps_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"time: .*'MODIS8D'"):
        _cfg(tmp_path, "2021-01-01", "2021-12-31", "eight days")
    with pytest.raises(ConfigError, match="no MODIS8D period start"):
        _cfg(tmp_path, "2021-01-02", "2021-01-08", "MODIS8D")


def test_composite_bins_modis_scenes_by_true_period_edges():
    from geoflux.cube import composite

    periods = make_period_starts("2021-01-01", "2022-12-31", "MODIS8D")
    # one scene per product date, plus one on 2021-12-31 (inside the short last period, not the next one)
    times = periods.append(pd.DatetimeIndex(["2021-12-31"])).sort_values()
    arr = xr.DataArray(
        np.arange(len(times), dtype=float)[:, None, None] * np.ones((1, 2, 2)),
        dims=("time", "y", "x"),
        coords={"time": times},
    )
    out = composite(arr, periods, "MODIS8D", "max").compute()
    assert list(pd.DatetimeIndex(out.time.values)) == list(periods)
    k = list(periods).index(pd.Timestamp("2021-12-27"))
    assert out.isel(time=k).values[0, 0] == k + 1  # the 2021-12-31 scene (index k + 1) joined 2021-12-27
    assert out.isel(time=k + 1).values[0, 0] == k + 2  # 2022-01-01 starts the next period
    # a continuous 8D range would merge the 2022-01-01 scene into the period of 2021-12-27
    drift = pd.date_range("2021-01-01", "2022-12-31", freq="8D")
    assert drift[drift <= pd.Timestamp("2022-01-01")][-1] == pd.Timestamp("2021-12-27")


def test_period_ends_for_a_map_tag():
    assert period_ends(pd.DatetimeIndex(["2021-12-27"]), "MODIS8D")[0] == pd.Timestamp("2022-01-01")
    assert period_ends(pd.DatetimeIndex(["2021-12-01"]), "MS")[0] == pd.Timestamp("2022-01-01")


def _truth_files(folder: Path, dates) -> None:
    folder.mkdir(parents=True)
    for d in dates:
        (folder / f"nee_{d:%Y%m%d}.tif").write_bytes(b"")  # only names are read for the dates


def test_truth_alignment_is_checked_before_any_stage(tmp_path):
    from geoflux import pipeline

    _truth_files(tmp_path / "truth", make_period_starts("2021-01-01", "2022-12-31", "MODIS8D"))
    cfg = _cfg(tmp_path, "2021-01-01", "2022-12-31", "8D", truth="truth/*.tif")
    with pytest.raises(GeofluxError) as err:
        pipeline.run(cfg, progress=False)
    msg = str(err.value)
    assert "92 truth rasters for 92 map time steps" in msg  # same count, different dates
    assert "no truth raster for period 2022-01-04" in msg and "MODIS8D" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing written: no tower file was even read
    good = _cfg(tmp_path, "2021-01-01", "2022-12-31", "MODIS8D", truth="truth/*.tif")
    paired = pipeline.check_truth_alignment(good)
    assert len(paired) == 92
    assert all(f"{p:%Y%m%d}" in path.name for p, path in paired.items())
    # a truth raster more than the periods: named in the error
    (tmp_path / "truth" / "nee_20230101.tif").write_bytes(b"")
    with pytest.raises(GeofluxError, match=r"nee_20230101\.tif dated 2023-01-01 starts no period"):
        pipeline.check_truth_alignment(good)


# --- multi-year worlds ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multiyear():
    from geoflux.demo import WORLD_SIZES, generate_fields, true_budgets

    spec = WORLD_SIZES["tiny-multiyear"]
    fields = generate_fields(spec)
    calm = generate_fields(replace(spec, year_anomalies=()))  # same random weather, nothing imposed
    return spec, fields, calm, true_budgets(spec, fields)


def test_default_worlds_stay_one_year():
    from geoflux.demo import WORLD_SIZES, WorldSpec

    assert WORLD_SIZES["default"] == WorldSpec()
    assert WORLD_SIZES["default"].time_step == "8D"
    assert len(WORLD_SIZES["default"].periods) == 46
    assert len(WORLD_SIZES["tiny"].periods) == 16
    assert WORLD_SIZES["multiyear"].time_step == "MODIS8D" and len(WORLD_SIZES["multiyear"].periods) == 138


def test_multiyear_world_calendar(multiyear):
    spec, fields, _, _ = multiyear
    assert fields.nee.shape == (138, 32, 32)
    assert spec.period_days.sum() == 3 * 365
    assert list(spec.periods[spec.periods.year == 2022].dayofyear) == list(range(1, 366, 8))


def _year_mean(a: np.ndarray, spec, year: int, doy: tuple[int, int]) -> float:
    p = spec.periods
    sel = (p.year == year) & (p.dayofyear >= doy[0]) & (p.dayofyear <= doy[1])
    return float(a[sel].mean())


def test_imposed_anomalies_do_what_they_say(multiyear):
    from geoflux.demo import CLASSES

    spec, f, calm, _ = multiyear
    summer, spring = (170, 230), (80, 130)
    # drought summer 2022: drier soil, higher VPD than the same weather without the anomaly
    assert _year_mean(f.sm, spec, 2022, summer) < _year_mean(calm.sm, spec, 2022, summer) - 0.1
    assert _year_mean(f.vpd, spec, 2022, summer) > 1.3 * _year_mean(calm.vpd, spec, 2022, summer)
    # warm spring 2021: warmer and greener deciduous forest in spring
    dbf = f.landcover == next(k for k, v in CLASSES.items() if v == "DBF")
    assert _year_mean(f.ta, spec, 2021, spring) > _year_mean(calm.ta, spec, 2021, spring) + 2.0
    assert _year_mean(f.ndvi[:, dbf], spec, 2021, spring) > _year_mean(calm.ndvi[:, dbf], spec, 2021, spring)
    # dull 2023: less shortwave all year; other years untouched
    assert _year_mean(f.sw, spec, 2023, (1, 366)) < 0.9 * _year_mean(calm.sw, spec, 2023, (1, 366))
    assert _year_mean(f.sw, spec, 2022, (1, 366)) == pytest.approx(_year_mean(calm.sw, spec, 2022, (1, 366)))


def test_true_budgets_against_daily_sums(multiyear):
    spec, f, _, budgets = multiyear
    # independent: expand each period's region-mean NEE to its days, then sum by calendar year
    days = pd.date_range("2021-01-01", "2023-12-31", freq="D")
    daily = np.repeat(f.nee.mean(axis=(1, 2), dtype=np.float64), spec.period_days)
    by_year = pd.Series(daily, index=days).groupby(days.year).sum()
    for y in (2021, 2022, 2023):
        b = budgets["years"][str(y)]
        assert b["complete"] and b["days"] == 365
        assert b["region"]["nee"] == pytest.approx(by_year[y], rel=1e-9)
        assert b["region"]["nee"] == pytest.approx(b["region"]["reco"] - b["region"]["gpp"], rel=1e-6)
        area = 32 * 32 * 500.0**2
        assert b["region"]["nee_total_tgc"] == pytest.approx(by_year[y] * area * 1e-12)
    # the drought year is the weakest sink, as the anomaly intends
    nee = {y: budgets["years"][str(y)]["region"]["nee"] for y in (2021, 2022, 2023)}
    assert nee[2022] == max(nee.values())


def test_attribution_names_the_imposed_causes(multiyear):
    _, _, _, budgets = multiyear
    a = budgets["attribution"]["years"]
    assert sum(v["anomaly"] for v in a.values()) == pytest.approx(0.0, abs=1e-6)
    drought = a["2022"]
    # less uptake through drier soil, higher VPD and browner grass and crops
    assert drought["contrib_sm"] > 0 and drought["contrib_vpd"] > 0 and drought["contrib_ndvi"] > 0
    assert a["2023"]["contrib_sw"] > 0  # the dull year loses uptake to less light
    for v in a.values():
        parts = sum(v[k] for k in v if k.startswith("contrib_")) + v["interaction"]
        assert parts == pytest.approx(v["anomaly"])


def test_multiyear_tower_spans_the_years(multiyear):
    from geoflux.demo import place_towers, synthesize_tower, tower_file_name

    spec, f, _, _ = multiyear
    site = place_towers(spec, f).set_index("SITE_ID").iloc[0]
    df, truth = synthesize_tower(site, f, spec, np.random.default_rng(0))
    assert len(df) == 3 * 365 * 48
    assert df["TIMESTAMP_START"].iloc[-1] == "202312312330"
    assert truth["nee"].shape == (138,)
    assert tower_file_name("XX-D01", spec).endswith("_HH_2021-2023_1-4.csv")
