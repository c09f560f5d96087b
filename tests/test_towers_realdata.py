"""Every real tower file under ../shared/realdata/towers: read, QC-filter, aggregate, check against raw.

Expected values are computed here from the raw bytes with the csv module / plain Python, never through
geoflux's readers, and a few are written out as read by hand from the file (with the line they come from).
"""

from __future__ import annotations

import calendar
import csv
import math
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.errors import TowerFormatError
from geoflux.towers import (
    TowerDataWarning,
    aggregate,
    qc_filter,
    read_sites,
    read_tower_file,
    read_towers,
    select_sites,
    summarize,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TOWERS = REAL / "towers"
pytestmark = pytest.mark.skipif(not TOWERS.is_dir(), reason=f"shared real data not found at {TOWERS}")

DETHA = TOWERS / "Example_DETha98.txt"
CRT = TOWERS / "AMF_US-CRT_BASE_HH_2-5.csv"
LAE = TOWERS / "FLX_CH-Lae_FLUXDATAKIT_FULLSET_DD_2004_2014_2-3.csv"
MONTHLY = sorted(TOWERS.glob("FLX_*_FLUXNET2015_SUBSET_MM_*.csv"))

# 12.011 g C per mol x 1e-6 mol per umol x 86400 s per day, worked out by hand.
GC_PER_DAY_PER_UMOL = 1.0377504
# Float tolerances: values are sums/means of at most a few thousand float64 numbers.
RTOL = 1e-9


def _detha_rows() -> list[list[str]]:
    """DE-Tha data rows split by hand: CR-only line ends, tab separated, two header lines."""
    lines = [ln for ln in DETHA.read_bytes().decode().split("\r") if ln.strip()]
    assert lines[0].split("\t")[:4] == ["Year", "DoY", "Hour", "NEE"]
    return [ln.split("\t") for ln in lines[2:]]


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    header = rows[0]
    return header, [dict(zip(header, r, strict=True)) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------- DE-Tha
@pytest.fixture(scope="module")
def detha() -> pd.DataFrame:
    return read_tower_file(DETHA, site="DE-Tha")


def test_detha_shape_and_time_convention(detha: pd.DataFrame) -> None:
    assert detha.attrs["resolution"] == "HH"
    assert len(detha) == 17520  # 365 days x 48 half-hours
    # Line 3 of the file is "1998 1 0.5 -1.21": Hour 0.5 is the END of the first half-hour.
    assert detha["time"].iloc[0] == pd.Timestamp("1998-01-01 00:00")
    assert detha["time_end"].iloc[0] == pd.Timestamp("1998-01-01 00:30")
    assert detha["NEE"].iloc[0] == -1.21
    # Last line "1998 366 0 0.32 ...": DoY 366 hour 0 is the end of 31 Dec 23:30-24:00.
    assert detha["time"].iloc[-1] == pd.Timestamp("1998-12-31 23:30")
    assert detha["NEE"].iloc[-1] == 0.32


def test_detha_known_values_by_hand(detha: pd.DataFrame) -> None:
    # Raw line "1998 180 12 -19.42 160.56 115.75 427.18 18.5 13.84 46.42 11.4 0.78": day 180 = 29 June,
    # record 11:30-12:00.
    row = detha.loc[detha["time"] == pd.Timestamp("1998-06-29 11:30")].iloc[0]
    assert row["NEE"] == -19.42
    assert row["SW_IN"] == 427.18
    assert row["TA"] == 18.5
    assert row["VPD"] == 11.4
    assert row["USTAR"] == 0.78
    # Counted with awk on the raw file: 6257 records have NEE = -9999.
    assert int(detha["NEE"].isna().sum()) == 6257


def test_detha_missing_count_matches_raw(detha: pd.DataFrame) -> None:
    raw_missing = sum(1 for r in _detha_rows() if float(r[3]) == -9999)
    assert int(detha["NEE"].isna().sum()) == raw_missing


def test_detha_daily_means_match_independent_recomputation(detha: pd.DataFrame) -> None:
    # A record ending at DoY d, Hour h > 0 belongs to day d; one ending at Hour 0 to day d - 1.
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for r in _detha_rows():
        doy, hour, nee = int(r[1]), float(r[2]), float(r[3])
        day = doy - 1 if hour == 0 else doy
        if nee != -9999:
            sums[day] += nee
            counts[day] += 1
    periods = pd.date_range("1998-01-01", "1998-12-31", freq="D")
    daily = aggregate(qc_filter(detha), periods, min_coverage=0.0)
    got = {
        int(t.day_of_year): (nee, n, cov)
        for t, nee, n, cov in zip(
            daily["time"], daily["NEE"], daily["n_records"], daily["NEE_coverage"], strict=True
        )
    }
    assert set(got) == set(counts)
    for day, n in counts.items():
        nee, got_n, cov = got[day]
        assert got_n == n
        assert cov == pytest.approx(n / 48, rel=RTOL)
        assert nee == pytest.approx(sums[day] / n * GC_PER_DAY_PER_UMOL, rel=RTOL)
    # Day 100 (10 April) by hand with awk: 30 valid records, mean -4.36767 umol m-2 s-1.
    day100 = daily.loc[daily["time"] == pd.Timestamp("1998-04-10")].iloc[0]
    assert day100["n_records"] == 30
    assert day100["NEE"] == pytest.approx(-4.36767 * GC_PER_DAY_PER_UMOL, abs=1e-5)
    # The default 50 % coverage rule keeps exactly the days with >= 24 valid half-hours.
    kept = aggregate(qc_filter(detha), periods)
    assert len(kept) == sum(1 for n in counts.values() if n >= 24)


def test_detha_summary(detha: pd.DataFrame) -> None:
    s = summarize(qc_filter(detha)).iloc[0]
    assert s["site"] == "DE-Tha" and s["years"] == "1998" and s["n_years"] == 1
    assert s["n_nee"] == 17520 - 6257
    assert s["coverage"] == pytest.approx((17520 - 6257) / 17520, rel=RTOL)
    assert s["measured"] == 1.0  # REddyProc input is unfilled data


# ----------------------------------------------------------------------------------------------- monthly
@pytest.mark.parametrize("path", MONTHLY, ids=lambda p: p.name.split("_")[1])
def test_fluxnet2015_monthly_values_against_raw(path: Path) -> None:
    _, rows = _csv_rows(path)
    recs = read_tower_file(path)
    site = path.name.split("_")[1]
    assert recs.attrs["resolution"] == "MM"
    assert (recs["site"] == site).all()
    assert len(recs) == len(rows)
    raw_nee = np.array([float(r["NEE_VUT_REF"]) for r in rows])
    raw_qc = np.array([float(r["NEE_VUT_REF_QC"]) for r in rows])
    raw_ta = np.array([float(r["TA_F"]) for r in rows])
    # Monthly NEE is already gC m-2 d-1 (ONEFlux MM table): read unchanged, -9999 -> NaN.
    np.testing.assert_array_equal(recs["NEE"].to_numpy(), np.where(raw_nee == -9999, np.nan, raw_nee))
    np.testing.assert_array_equal(recs["TA"].to_numpy(), np.where(raw_ta == -9999, np.nan, raw_ta))
    assert int(recs["NEE"].isna().sum()) == int((raw_nee == -9999).sum())
    first = rows[0]["TIMESTAMP"]
    assert recs["time"].iloc[0] == pd.Timestamp(f"{first[:4]}-{first[4:]}-01")
    # QC: keep months with a fraction of good half-hours >= 0.8.
    passed = qc_filter(recs)
    keep = (raw_nee != -9999) & (raw_qc >= 0.8)
    assert int(passed["NEE"].notna().sum()) == int(keep.sum())
    # Yearly aggregate: mean of passing months weighted by their days, computed by hand here.
    years = sorted({int(r["TIMESTAMP"][:4]) for r in rows})
    periods = pd.date_range(f"{years[0]}-01-01", f"{years[-1]}-01-01", freq="YS")
    yearly = aggregate(passed, periods, min_coverage=0.0).set_index("time")
    for year in years:
        days = [
            (calendar.monthrange(year, int(r["TIMESTAMP"][4:]))[1], float(r["NEE_VUT_REF"]))
            for r, k in zip(rows, keep, strict=True)
            if k and int(r["TIMESTAMP"][:4]) == year
        ]
        if not days:
            assert pd.Timestamp(f"{year}-01-01") not in yearly.index
            continue
        total_days = sum(d for d, _ in days)
        expect = sum(d * v for d, v in days) / total_days
        got = yearly.loc[pd.Timestamp(f"{year}-01-01")]
        assert got["NEE"] == pytest.approx(expect, rel=RTOL)
        ydays = 366 if calendar.isleap(year) else 365
        assert got["NEE_coverage"] == pytest.approx(total_days / ydays, rel=RTOL)


def test_dehai_july_2006_by_hand() -> None:
    # Line 80 of the file, "200607,...": NEE_VUT_REF (column 61) -6.72029, NEE_VUT_REF_QC 0.788306.
    recs = read_tower_file(TOWERS / "FLX_DE-Hai_FLUXNET2015_SUBSET_MM_2000-2012_1-4.csv")
    row = recs.loc[recs["time"] == pd.Timestamp("2006-07-01")].iloc[0]
    assert row["NEE"] == -6.72029
    assert row["NEE_QC"] == 0.788306
    assert row["time_end"] == pd.Timestamp("2006-08-01")
    # 0.788 < 0.8: rejected by default, kept with a looser rule.
    assert np.isnan(qc_filter(recs).set_index("time").loc["2006-07-01", "NEE"])
    assert qc_filter(recs, min_fraction=0.75).set_index("time").loc["2006-07-01", "NEE"] == -6.72029


def test_monthly_files_together_with_site_list() -> None:
    sites = read_sites(TOWERS / "FluxNET_sites.csv")
    recs = read_towers([str(p) for p in MONTHLY], sites)
    assert sorted(recs["site"].unique()) == sorted(p.name.split("_")[1] for p in MONTHLY)
    assert recs.attrs["resolution"] == "MM"
    summary = summarize(qc_filter(recs)).set_index("site")
    assert summary.loc["CH-Dav", "years"] == "1997-2014"
    assert summary.loc["US-Ha1", "first"] == pd.Timestamp("1991-01-01")


# ----------------------------------------------------------------------------------------------- US-CRT
def test_ameriflux_base_us_crt_against_raw() -> None:
    _, rows = _csv_rows(CRT)
    recs = read_tower_file(CRT)
    assert recs.attrs["resolution"] == "HH" and recs.attrs["format"] == "AmeriFlux BASE"
    assert (recs["site"] == "US-CRT").all()
    assert len(recs) == len(rows) == 96
    # Line 27 of the file: "201101011130,201101011200,...,-0.010147337 (FC),-0.010147337 (NEE_PI)".
    row = recs.loc[recs["time"] == pd.Timestamp("2011-01-01 11:30")].iloc[0]
    assert row["NEE"] == -0.010147337
    assert recs.attrs["columns"]["NEE"] == "NEE_PI"
    # 58 of 96 NEE_PI values are -9999 (counted with awk), same count by csv here.
    assert int(recs["NEE"].isna().sum()) == 58 == sum(r["NEE_PI"] == "-9999" for r in rows)
    ta = np.array([float(r["TA"]) for r in rows])
    np.testing.assert_array_equal(recs["TA"].to_numpy(), np.where(ta == -9999, np.nan, ta))
    # BASE has no VPD column here; it is derived from TA and RH (Magnus, hPa) and labelled so.
    r0 = rows[0]
    es = 6.1078 * math.exp(17.27 * float(r0["TA"]) / (float(r0["TA"]) + 237.3))
    assert recs["VPD"].iloc[0] == pytest.approx(es * (1 - float(r0["RH"]) / 100), rel=1e-12)
    assert "derived" in recs.attrs["columns"]["VPD"]
    # Daily aggregate of 1 January by hand from the csv rows.
    vals = [
        float(r["NEE_PI"])
        for r in rows
        if r["TIMESTAMP_START"].startswith("20110101") and r["NEE_PI"] != "-9999"
    ]
    day = aggregate(qc_filter(recs), pd.date_range("2011-01-01", periods=2, freq="D"), min_coverage=0.0)
    first = day.loc[day["time"] == pd.Timestamp("2011-01-01")].iloc[0]
    assert first["n_records"] == len(vals)
    assert first["NEE"] == pytest.approx(np.mean(vals) * GC_PER_DAY_PER_UMOL, rel=RTOL)
    # P is mm per half-hour in BASE; the daily aggregate is mm d-1 = the day's total.
    p = sum(float(r["P"]) for r in rows if r["TIMESTAMP_START"].startswith("20110101"))
    assert first["P"] == pytest.approx(p, rel=RTOL)


def test_renamed_base_file_is_recognised_by_its_header(tmp_path: Path) -> None:
    copy = tmp_path / "crt.csv"
    copy.write_bytes(CRT.read_bytes())
    recs = read_tower_file(copy, site="US-CRT")
    assert recs.attrs["format"] == "AmeriFlux BASE-like CSV"
    assert recs.attrs["columns"]["NEE"] == "NEE_PI"
    assert int(recs["NEE"].isna().sum()) == 58


# ----------------------------------------------------------------------------------------------- CH-Lae
def test_fluxdatakit_file_without_nee_is_rejected_clearly() -> None:
    with pytest.raises(TowerFormatError, match=r"FLX_CH-Lae.*FluxDataKit.*no NEE column"):
        read_tower_file(LAE)


def test_fluxdatakit_file_read_for_meteorology() -> None:
    _, rows = _csv_rows(LAE)
    with pytest.warns(TowerDataWarning, match="FluxDataKit"):
        recs = read_tower_file(LAE, require_nee=False)
    assert recs.attrs["resolution"] == "DD"
    assert len(recs) == len(rows) == 4018
    assert recs["NEE"].isna().all()
    assert recs["time"].iloc[0] == pd.Timestamp("2004-01-01")
    # First data row: TA_F_MDS -2.37681299845375, P_F 0.946000002659275 (mm d-1).
    assert recs["TA"].iloc[0] == pytest.approx(-2.37681299845375, rel=1e-14)
    assert recs["P"].iloc[0] == pytest.approx(0.946000002659275, rel=1e-14)
    na = sum(r["VPD_F_MDS"] == "NA" for r in rows)
    assert int(recs["VPD"].isna().sum()) == na
    months = pd.date_range("2004-01-01", "2014-12-01", freq="MS")
    monthly = aggregate(qc_filter(recs), months, min_coverage=0.0)
    assert monthly.empty  # no NEE, so no period passes: meteorology-only files do not leak into training


# ----------------------------------------------------------------------------------------------- zips, sites
def test_zipped_download_reads_like_the_csv(tmp_path: Path) -> None:
    src = TOWERS / "FLX_CH-Dav_FLUXNET2015_SUBSET_MM_1997-2014_1-4.csv"
    z = tmp_path / "FLX_CH-Dav_FLUXNET2015_SUBSET_1997-2014_1-4.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(src, src.name)
        zf.writestr("README.txt", "not data")
    a, b = read_tower_file(src), read_tower_file(z)
    pd.testing.assert_frame_equal(a, b)
    assert b.attrs["source"].endswith("!" + src.name)


def test_fluxnet_site_list() -> None:
    _, rows = _csv_rows(TOWERS / "FluxNET_sites.csv")
    sites = read_sites(TOWERS / "FluxNET_sites.csv")
    assert len(sites) == len(rows) == 267
    raw = {r["SITE_ID"]: r for r in rows}
    assert sites.loc["CH-Dav", "LAT"] == float(raw["CH-Dav"]["LOCATION_LAT"])
    assert sites.loc["US-Ha1", "LON"] == float(raw["US-Ha1"]["LOCATION_LONG"])
    assert int(sites["ELEV"].isna().sum()) == sum(r["LOCATION_ELEV"] == "" for r in rows)
    # Names with commas are quoted in the file and must not shift columns.
    assert sites["IGBP"].notna().all()
    europe_enf = select_sites(sites, bbox=(-10, 35, 40, 72), igbp=["enf"])
    expect = {
        k
        for k, r in raw.items()
        if r["IGBP"] == "ENF"
        and -10 <= float(r["LOCATION_LONG"]) <= 40
        and 35 <= float(r["LOCATION_LAT"]) <= 72
    }
    assert set(europe_enf.index) == expect
    assert {"CH-Dav", "FI-Hyy"} <= expect and "DE-Hai" not in expect


def test_select_by_data_years() -> None:
    sites = read_sites(TOWERS / "FluxNET_sites.csv")
    recs = read_towers([str(p) for p in MONTHLY], sites)
    # US-Ha1 is the only file with data before 1996.
    early = select_sites(sites.loc[sites.index.isin(recs["site"].unique())], years=(1991, 1995), records=recs)
    assert list(early.index) == ["US-Ha1"]
