"""Bad input and the end-to-end writer of the site-processing chain, on small synthetic records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.errors import TowerFormatError
from geoflux.towers.processing import analyze_site, detect_spikes, mds_gapfill, process_site, ustar_threshold


def synthetic(
    days: int = 120, step: str = "30min", seed: int = 1, site: str = "XX-Syn", truth: bool = False
) -> pd.DataFrame:
    """A plausible forest: diurnal radiation and temperature, Lloyd–Taylor respiration, light-limited
    uptake, u*-dependent night-time underestimation, 25 % random gaps."""
    rng = np.random.default_rng(seed)
    t = pd.date_range("2001-04-01", periods=days * int(pd.Timedelta("1D") / pd.Timedelta(step)), freq=step)
    hour = t.hour + t.minute / 60.0
    doy = t.day_of_year.to_numpy()
    sw = np.clip(800 * np.sin(np.pi * (hour - 6) / 12), 0, None) * rng.uniform(0.4, 1.0, t.size)
    ta = (
        12
        + 6 * np.sin(2 * np.pi * (doy - 100) / 365)
        + 5 * np.sin(np.pi * (hour - 9) / 12)
        + rng.normal(0, 1, t.size)
    )
    vpd = np.clip(0.6 * (ta - 5) + rng.normal(0, 1, t.size), 0, None)
    ust = rng.gamma(3.0, 0.15, t.size)
    reco = 2.5 * np.exp(150 * (1 / 56.02 - 1 / (ta + 273.15 - 227.13)))
    gpp = 0.04 * 25 * sw / (0.04 * sw + 25)
    nee = reco - gpp + rng.normal(0, 1.0, t.size)
    nee = np.where((sw < 10) & (ust < 0.25), nee * ust / 0.25, nee)
    nee[rng.random(t.size) < 0.25] = np.nan
    out = pd.DataFrame({"site": site, "time": t, "NEE": nee, "TA": ta, "SW_IN": sw, "VPD": vpd, "USTAR": ust})
    if truth:
        out["GPP_true"], out["RECO_true"] = gpp, reco
    return out


FAST = dict(daytime=False, ustar_uncertainty=False, ustar_boot=10)


def test_missing_radiation_column_names_site_and_column():
    df = synthetic(20).drop(columns="SW_IN")
    with pytest.raises(TowerFormatError, match=r"site XX-Syn: column SW_IN: missing"):
        process_site(df, ustar=None)


def test_too_much_missing_nee_in_a_year():
    df = synthetic(30)
    df.loc[df.index[: int(0.6 * len(df))], "NEE"] = np.nan
    with pytest.raises(TowerFormatError, match=r"site XX-Syn: column NEE: \d+% missing in 2001"):
        process_site(df, ustar=None)


def test_non_equidistant_time_axis():
    df = synthetic(20)
    df.loc[100, "time"] = df.loc[100, "time"] + pd.Timedelta("7min")
    with pytest.raises(TowerFormatError, match=r"column time: non-equidistant time axis"):
        process_site(df, ustar=None)


def test_mixed_time_steps():
    hh = synthetic(20)
    hr = synthetic(20, step="60min")
    hr["time"] = hr["time"] + (hh["time"].iloc[-1] - hr["time"].iloc[0]) + pd.Timedelta("60min")
    with pytest.raises(TowerFormatError, match=r"column time: mixed time steps"):
        process_site(pd.concat([hh, hr], ignore_index=True), ustar=None)


def test_duplicated_timestamps():
    df = synthetic(20)
    df = pd.concat([df, df.iloc[[5]]], ignore_index=True)
    with pytest.raises(TowerFormatError, match=r"column time: duplicated timestamp"):
        process_site(df, ustar=None)


def test_missing_rows_are_inserted_with_a_recorded_warning():
    df = synthetic(40).drop(index=range(200, 204)).reset_index(drop=True)
    with pytest.warns(UserWarning, match="4 missing time steps inserted"):
        r = process_site(df, ustar=None, **{k: v for k, v in FAST.items() if k != "ustar_boot"})
    assert len(r.records) == 40 * 48
    assert any("missing time steps" in w for w in r.warnings)


def test_too_few_night_records_for_ustar_raises_or_falls_back():
    df = synthetic(25)  # one season, ~600 night records: fewer than 7 temperature classes × 100
    with pytest.raises(TowerFormatError, match=r"site XX-Syn: column USTAR: too few night-time records"):
        process_site(df, **FAST)
    with pytest.warns(UserWarning, match="default 0.2 m s-1"):
        r = process_site(df, ustar_default=0.2, **FAST)
    assert r.ustar["method"] == "default" and r.ustar["threshold"] == 0.2
    assert any("fewer than" in w for w in r.warnings) and any("default" in w for w in r.warnings)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="unknown option 'sw_tol'"):
        process_site(synthetic(10), sw_tol=20)


def test_ustar_threshold_finds_the_synthetic_plateau():
    df = synthetic(200, seed=3)
    r = ustar_threshold(
        df["time"], df["NEE"].to_numpy(), df["TA"].to_numpy(), df["USTAR"].to_numpy(), df["SW_IN"].to_numpy()
    )
    # NEE is damped below u* = 0.25 m s-1 in the synthetic data.
    assert 0.15 <= r.threshold <= 0.35
    assert r.percentiles[5] <= r.percentiles[50] <= r.percentiles[95]


def test_spikes_are_found():
    df = synthetic(30, seed=4)
    y = df["NEE"].interpolate().to_numpy(copy=True)
    idx = np.arange(300, 1400, 97)
    y[idx] += 40.0
    spk = detect_spikes(y, df["SW_IN"].to_numpy() > 10, 48, z=7)
    assert spk[idx].mean() > 0.9
    assert spk.sum() < 2 * idx.size


def test_mds_fills_every_gap_and_keeps_measurements():
    df = synthetic(60, seed=5)
    t = df["time"]
    res = mds_gapfill(
        df["NEE"].to_numpy(),
        df["SW_IN"].to_numpy(),
        df["TA"].to_numpy(),
        df["VPD"].to_numpy(),
        (t.dt.hour + t.dt.minute / 60).to_numpy(),
        48,
    )
    meas = df["NEE"].notna().to_numpy()
    np.testing.assert_array_equal(res.filled[meas], df["NEE"].to_numpy()[meas])
    assert (res.qc[meas] == 0).all() and (res.qc[~meas] >= 1).all()
    assert np.isfinite(res.filled).all() and np.isfinite(res.sd[~meas]).all()


def test_mds_leaves_long_gaps_unfilled():
    df = synthetic(120, seed=6)
    df.loc[df.index[2000 : 2000 + 48 * 20], "NEE"] = np.nan
    t = df["time"]
    res = mds_gapfill(
        df["NEE"].to_numpy(),
        df["SW_IN"].to_numpy(),
        df["TA"].to_numpy(),
        df["VPD"].to_numpy(),
        (t.dt.hour + t.dt.minute / 60).to_numpy(),
        48,
        options=None,
    )
    from geoflux.towers.processing import MDSOptions

    short = mds_gapfill(
        df["NEE"].to_numpy(),
        df["SW_IN"].to_numpy(),
        df["TA"].to_numpy(),
        df["VPD"].to_numpy(),
        (t.dt.hour + t.dt.minute / 60).to_numpy(),
        48,
        options=MDSOptions(longgap=10),
    )
    assert (res.qc[2000:2960] > 0).all()
    assert (short.qc[2000:2960] == -1).all() and np.isnan(short.filled[2000:2960]).all()


def test_hourly_records_are_processed():
    r = process_site(synthetic(200, step="60min", seed=7), **FAST)
    assert r.per_day == 24
    assert r.records["NEE_f"].notna().all()


def test_analyze_site_writes_tables_plots_and_summary(tmp_path: Path):
    df = synthetic(240, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = analyze_site(df, tmp_path, table_format="csv", ustar_boot=20)
    for name in (
        "records.csv",
        "driver_classes.csv",
        "fingerprint.csv",
        "budgets.csv",
        "diurnal_by_month.csv",
        "light_response.csv",
        "temperature_response.csv",
        "vpd_limitation.csv",
        "summary.json",
        "fingerprint.png",
        "diurnal_by_month.png",
        "cumulative_nee.png",
        "budgets.png",
        "seasonal_cycle.png",
        "light_response.png",
        "temperature_response.png",
        "vpd_limitation.png",
    ):
        assert (tmp_path / name).exists(), name
    png = (tmp_path / "fingerprint.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["site"] == "XX-Syn" and saved["e0"] == pytest.approx(s["e0"])
    # Synthetic truth: E0 = 150 K.
    assert 80 <= s["e0"] <= 250
    b = s["budgets"][0]
    assert b["NEE_unc"] > 0 and b["GPP_NT"] > 0 and b["RECO_NT"] > 0
    recs = pd.read_csv(tmp_path / "records.csv")
    assert set(recs["NEE_status"]) <= {"measured", "missing", "spike", "low_ustar"}
    drivers = pd.read_csv(tmp_path / "driver_classes.csv")
    assert set(drivers["light"].dropna()) <= {"night", "low", "moderate", "high"}
    assert len(drivers) == len(recs)


def test_partitioning_recovers_synthetic_gpp_and_reco():
    df = synthetic(200, seed=9, truth=True)
    r = process_site(
        df.drop(columns=["GPP_true", "RECO_true"]), ustar=0.25, despike=False, ustar_uncertainty=False
    )
    out = r.records
    for col, true in (
        ("GPP_NT", "GPP_true"),
        ("GPP_DT", "GPP_true"),
        ("RECO_NT", "RECO_true"),
        ("RECO_DT", "RECO_true"),
    ):
        assert out[col].sum() == pytest.approx(df[true].sum(), rel=0.1), col
    assert 100 <= r.night.e0 <= 220  # truth 150 K


def test_site_comparison_table_and_plot(tmp_path: Path):
    from geoflux.towers.processing import write_site_comparison

    summaries = [
        {
            "site": "AA-One",
            "budgets": [{"NEE": -300.0, "NEE_unc": 20.0, "GPP_NT": 1500.0, "RECO_NT": 1200.0}],
            "e0": 120.0,
            "q10": 1.6,
            "alpha_max": 0.05,
            "gpp_sat_max": 30.0,
            "seasonal_amplitude": 5.0,
            "ustar_threshold": 0.3,
        },
        {
            "site": "BB-Two",
            "budgets": [
                {"NEE": 50.0, "NEE_unc": 30.0, "GPP_NT": 800.0, "RECO_NT": 850.0},
                {"NEE": -10.0, "NEE_unc": 30.0, "GPP_NT": 900.0, "RECO_NT": 890.0},
            ],
            "e0": 200.0,
            "q10": 2.1,
            "alpha_max": 0.03,
            "gpp_sat_max": 15.0,
            "seasonal_amplitude": 2.0,
            "ustar_threshold": 0.15,
        },
    ]
    sites = pd.DataFrame(
        {"SITE_ID": ["AA-One", "BB-Two"], "IGBP": ["ENF", "GRA"], "MAT": [8.0, 15.0], "MAP": [800.0, 500.0]}
    )
    csv, png = write_site_comparison(summaries, tmp_path, sites)
    table = pd.read_csv(csv)
    assert list(table["site"]) == ["AA-One", "BB-Two"]
    assert table.loc[1, "NEE"] == pytest.approx(20.0) and table.loc[1, "years"] == 2
    assert list(table["IGBP"]) == ["ENF", "GRA"]
    assert png.read_bytes()[:4] == b"\x89PNG"
