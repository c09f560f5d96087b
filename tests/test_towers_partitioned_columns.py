"""ONEFlux's night-time partitioned fluxes read as tidy RECO and GPP, in NEE's units, and aggregated.

Expected values come from the raw files read here with pandas (``-9999`` as missing), never through geoflux's
readers, or from arithmetic written out by hand. Real files: ../shared/realdata/towers (read in place) and
ONEFlux's variable tables in ../shared/realdata/formats.
"""

from __future__ import annotations

import calendar
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.errors import TowerFormatError
from geoflux.towers import aggregate, fluxnet_units, qc_filter, read_tower_file
from geoflux.towers.read import TowerDataWarning

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TOWERS = REAL / "towers"
FORMATS = REAL / "formats"
needs_real = pytest.mark.skipif(not TOWERS.is_dir(), reason=f"shared real data not found at {TOWERS}")
needs_tables = pytest.mark.skipif(not FORMATS.is_dir(), reason=f"ONEFlux tables not found at {FORMATS}")

DAV = TOWERS / "FLX_CH-Dav_FLUXNET2015_SUBSET_MM_1997-2014_1-4.csv"
HAI = TOWERS / "FLX_DE-Hai_FLUXNET2015_SUBSET_MM_2000-2012_1-4.csv"
SA1 = TOWERS / "FLX_BR-Sa1_FLUXNET2015_SUBSET_MM_2002-2011_1-4.csv"  # RECO/GPP -9999 through 2007
LAE = TOWERS / "FLX_CH-Lae_FLUXDATAKIT_FULLSET_DD_2004_2014_2-3.csv"

# 12.011e-6 g C per umol x 86400 s per day, worked out by hand.
GC_PER_DAY_PER_UMOL = 1.0377504
PERCENTILES = ("05", "16", "25", "50", "75", "84", "95")


def _raw(path: Path) -> pd.DataFrame:
    """The file as pandas reads it, FLUXNET's -9999 as NaN."""
    return pd.read_csv(path, na_values=[-9999], keep_default_na=True)


# --------------------------------------------------------------------------------------- units, tables
def _partitioned_rows(table: str) -> list[tuple[str, str]]:
    """(variable, unit) of every RECO_*/GPP_* row of one ONEFlux table, 'XX' expanded to percentiles."""
    text = (FORMATS / f"ONEFlux_var_info_definitions_{table}.txt").read_bytes().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines()[1:]:
        name, unit = [*line.split("||"), "", ""][:2]
        if not name.startswith(("RECO_", "GPP_")):
            continue
        for n in [name.replace("XX", p) for p in PERCENTILES] if name.endswith("_XX") else [name]:
            rows.append((n.strip(), unit.strip()))
    return rows


def _norm_unit(u: str) -> str:
    # The tables spell micro as a latin-1 'µ' or (hh table) a UTF-8 replacement character.
    return re.sub(r"\s+", "", u.replace("\ufffd", "u").replace("µ", "u")).lower()


TABLE_RES = [("hh", "HH"), ("hh", "HR"), ("dd", "DD"), ("ww", "WW"), ("mm", "MM"), ("yy", "YY")]


@needs_tables
@pytest.mark.parametrize(("table", "res"), TABLE_RES)
def test_partitioned_units_match_oneflux_tables(table: str, res: str) -> None:
    rows = _partitioned_rows(table)
    # NT and DT x VUT and CUT x (REF, USTAR50, MEAN, SE, 7 percentiles) x RECO and GPP
    assert len(rows) == 2 * 2 * 2 * 11
    got = {n: fluxnet_units(n, res) for n, _ in rows}
    assert all(got.values())
    assert [(n, u) for n, u in rows if _norm_unit(got[n]) != _norm_unit(u)] == []
    # As the tables say for RECO_NT_VUT_REF / GPP_NT_VUT_REF (and NEE_VUT_REF):
    expect = {"HH": "umolCO2 m-2 s-1", "HR": "umolCO2 m-2 s-1", "YY": "gC m-2 y-1"}.get(res, "gC m-2 d-1")
    assert fluxnet_units("RECO_NT_VUT_REF", res) == fluxnet_units("GPP_NT_VUT_REF", res) == expect
    assert fluxnet_units("RECO_SR", res) is None  # soil respiration is not a partitioned flux


def _stamps(res: str) -> dict[str, list[str]]:
    if res == "HH":
        return {
            "TIMESTAMP_START": ["200107010000", "200107010030"],
            "TIMESTAMP_END": ["200107010030", "200107010100"],
        }
    if res == "HR":
        return {
            "TIMESTAMP_START": ["200107010000", "200107010100"],
            "TIMESTAMP_END": ["200107010100", "200107010200"],
        }
    if res == "DD":
        return {"TIMESTAMP": ["20010701", "20010702"]}
    if res == "WW":
        return {"TIMESTAMP_START": ["20010702", "20010709"], "TIMESTAMP_END": ["20010708", "20010715"]}
    if res == "MM":
        return {"TIMESTAMP": ["200106", "200107"]}
    return {"TIMESTAMP": ["2003", "2004"]}  # YY: 365 and 366 days


@pytest.mark.parametrize("res", ["HH", "HR", "DD", "WW", "MM", "YY"])
def test_night_time_ref_read_in_nee_units_at_every_resolution(tmp_path: Path, res: str) -> None:
    f = tmp_path / f"FLX_XX-Tst_FLUXNET2015_FULLSET_{res}_2001-2004_1-4.csv"
    cols = {"NEE_VUT_REF": [-1.5, 0.5], "NEE_VUT_REF_QC": [0, 0], "RECO_NT_VUT_REF": [3.0, 2.0]}
    cols["GPP_NT_VUT_REF"] = [4.5, 1.5]
    pd.DataFrame({**_stamps(res), **cols}).to_csv(f, index=False)
    recs = read_tower_file(f)
    # HH/HR and DD-MM values are already the tidy unit; YY totals become per-day rates (2003: 365 d,
    # 2004: 366 d), as NEE's are.
    days = np.array([365.0, 366.0]) if res == "YY" else np.ones(2)
    np.testing.assert_allclose(recs["RECO"], np.array([3.0, 2.0]) / days, rtol=1e-15)
    np.testing.assert_allclose(recs["GPP"], np.array([4.5, 1.5]) / days, rtol=1e-15)
    np.testing.assert_allclose(recs["NEE"], np.array([-1.5, 0.5]) / days, rtol=1e-15)
    assert recs.attrs["units"]["RECO"].startswith("umol CO2 m-2 s-1 (half-hourly/hourly records); gC m-2 d-1")
    assert "positive = uptake" in recs.attrs["units"]["GPP"]
    assert recs.attrs["columns"]["RECO"] == "RECO_NT_VUT_REF"
    assert recs.attrs["source_units"]["GPP"] == fluxnet_units("GPP_NT_VUT_REF", res)


# --------------------------------------------------------------------------------------- real MM files
@needs_real
@pytest.mark.parametrize("path", [DAV, HAI, SA1], ids=["CH-Dav", "DE-Hai", "BR-Sa1"])
def test_monthly_files_reco_gpp_equal_the_raw_columns(path: Path) -> None:
    raw = _raw(path)
    recs = read_tower_file(path)
    assert len(recs) == len(raw)
    times = pd.to_datetime(raw["TIMESTAMP"].astype(str), format="%Y%m")
    np.testing.assert_array_equal(recs["time"].to_numpy(), times.to_numpy())
    # MM files hold gC m-2 d-1 (ONEFlux's mm table), the tidy unit: no conversion, NaN where -9999.
    np.testing.assert_array_equal(recs["RECO"].to_numpy(), raw["RECO_NT_VUT_REF"].to_numpy())
    np.testing.assert_array_equal(recs["GPP"].to_numpy(), raw["GPP_NT_VUT_REF"].to_numpy())
    assert recs.attrs["columns"]["RECO"] == "RECO_NT_VUT_REF"
    assert recs.attrs["columns"]["GPP"] == "GPP_NT_VUT_REF"
    assert recs.attrs["source_units"]["RECO"] == "gC m-2 d-1"
    assert list(recs.columns[:8]) == ["site", "time", "time_end", "NEE", "NEE_QC", "NEE_UNC", "RECO", "GPP"]


@needs_real
def test_monthly_values_as_read_by_hand() -> None:
    # FLX_CH-Dav ... line 8 (TIMESTAMP 199707): RECO_NT_VUT_REF 5.75813, GPP_NT_VUT_REF 6.15057.
    dav = read_tower_file(DAV).set_index("time")
    assert dav.loc["1997-07-01", "RECO"] == 5.75813
    assert dav.loc["1997-07-01", "GPP"] == 6.15057
    # FLX_DE-Hai ... line 8 (TIMESTAMP 200007): RECO_NT_VUT_REF 4.3808, GPP_NT_VUT_REF 11.5425.
    hai = read_tower_file(HAI).set_index("time")
    assert hai.loc["2000-07-01", "RECO"] == 4.3808
    assert hai.loc["2000-07-01", "GPP"] == 11.5425


@needs_real
def test_missing_partitioned_values_are_nan() -> None:
    raw = _raw(SA1)
    recs = read_tower_file(SA1)
    # BR-Sa1 lines 62-73 (200701-200712) write -9999 for RECO_NT_VUT_REF and GPP_NT_VUT_REF.
    missing = recs.loc[recs["RECO"].isna(), "time"]
    assert missing.tolist() == list(pd.date_range("2007-01-01", "2007-12-01", freq="MS"))
    assert recs["GPP"].isna().sum() == raw["GPP_NT_VUT_REF"].isna().sum() == 12
    assert not (recs[["RECO", "GPP"]] == -9999).any().any()


@needs_real
def test_file_without_partitioned_columns_reads_as_before(tmp_path: Path) -> None:
    raw = pd.read_csv(DAV, dtype={"TIMESTAMP": str})
    dropped = [c for c in raw.columns if c.startswith(("RECO_", "GPP_"))]
    assert "RECO_NT_VUT_REF" in dropped and "GPP_DT_VUT_REF" in dropped
    f = tmp_path / DAV.name
    raw.drop(columns=dropped).to_csv(f, index=False)
    without = read_tower_file(f)
    assert "RECO" not in without.columns and "GPP" not in without.columns
    assert "RECO" not in without.attrs["columns"] and "RECO" not in without.attrs["units"]
    full = read_tower_file(DAV)
    pd.testing.assert_frame_equal(without, full.drop(columns=["RECO", "GPP"]))


def _hh(path: Path, n: int = 96, **extra: list) -> Path:
    t = pd.date_range("2001-07-01", periods=n, freq="30min")
    cols = {
        "TIMESTAMP_START": t.strftime("%Y%m%d%H%M"),
        "TIMESTAMP_END": (t + pd.Timedelta("30min")).strftime("%Y%m%d%H%M"),
        "TA_F": [15.0] * n,
        "SW_IN_F": [200.0] * n,
        "NEE_VUT_REF": [-3.0] * n,
        "NEE_VUT_REF_QC": [0] * n,
        **extra,
    }
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def test_synthetic_hh_file_without_partitioning_has_no_reco_gpp(tmp_path: Path) -> None:
    # Day-time (DT) partitioning alone is not read: RECO/GPP are the night-time method only.
    f = _hh(tmp_path / "FLX_XX-Tst_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", RECO_DT_VUT_REF=[1.0] * 96)
    recs = read_tower_file(f)
    assert list(recs.columns) == ["site", "time", "time_end", "NEE", "NEE_QC", "TA", "SW_IN"]
    daily = aggregate(qc_filter(recs), pd.date_range("2001-07-01", periods=2, freq="D"))
    assert "RECO" not in daily.columns and "GPP" not in daily.columns


def test_first_candidate_with_data_wins(tmp_path: Path) -> None:
    n = 96
    empty = [-9999.0] * n
    # VUT present but all -9999: the CUT columns are taken.
    f = _hh(
        tmp_path / "FLX_XX-Vut_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
        RECO_NT_VUT_REF=empty,
        RECO_NT_CUT_REF=[2.5] * n,
        GPP_NT_VUT_REF=[7.0] + [-9999.0] * (n - 1),  # one value is data: VUT stays
        GPP_NT_CUT_REF=[9.0] * n,
    )
    recs = read_tower_file(f)
    assert recs.attrs["columns"]["RECO"] == "RECO_NT_CUT_REF" and (recs["RECO"] == 2.5).all()
    assert recs.attrs["columns"]["GPP"] == "GPP_NT_VUT_REF"
    assert recs["GPP"].iloc[0] == 7.0 and recs["GPP"].iloc[1:].isna().all()
    # Every candidate empty: no column at all.
    g = _hh(
        tmp_path / "FLX_XX-Non_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
        RECO_NT_VUT_REF=empty,
        RECO_NT_CUT_REF=empty,
        GPP_NT_CUT_REF=[1.0] * n,
    )
    recs = read_tower_file(g)
    assert "RECO" not in recs.columns
    assert recs.attrs["columns"]["GPP"] == "GPP_NT_CUT_REF" and (recs["GPP"] == 1.0).all()


def test_an_empty_nee_column_falls_back_to_the_next_candidate(tmp_path: Path) -> None:
    """NEE was picked by name: a VUT column of -9999 only (ONEFlux writes it even when VUT could not be
    computed) left the site without NEE although the CUT column held every value."""
    n = 96
    f = _hh(
        tmp_path / "FLX_XX-Cut_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
        NEE_CUT_REF=[-2.0] * n,
        NEE_CUT_REF_QC=[1] * (n // 2) + [0] * (n // 2),
        NEE_CUT_REF_JOINTUNC=[0.4] * n,
    )
    frame = pd.read_csv(f)
    frame["NEE_VUT_REF"] = -9999.0
    frame.to_csv(f, index=False)
    with pytest.warns(TowerDataWarning, match="NEE_VUT_REF holds no value .* NEE is read from NEE_CUT_REF"):
        recs = read_tower_file(f)
    assert recs.attrs["columns"]["NEE"] == "NEE_CUT_REF" and (recs["NEE"] == -2.0).all()
    assert recs.attrs["columns"]["NEE_QC"] == "NEE_CUT_REF_QC"
    assert recs["NEE_QC"].tolist() == [1.0] * (n // 2) + [0.0] * (n // 2)
    assert recs.attrs["columns"]["NEE_UNC"] == "NEE_CUT_REF_JOINTUNC" and (recs["NEE_UNC"] == 0.4).all()
    # a QC column given by the caller is not swapped for the fall-back's own
    recs = read_tower_file(f, columns={"NEE_QC": "NEE_VUT_REF_QC"})
    assert recs.attrs["columns"]["NEE"] == "NEE_VUT_REF" and recs["NEE"].isna().all()
    assert recs.attrs["columns"]["NEE_QC"] == "NEE_VUT_REF_QC"
    # a VUT column with data is kept, whatever CUT holds
    g = _hh(tmp_path / "FLX_XX-Vut_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", NEE_CUT_REF=[-2.0] * n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TowerDataWarning)
        recs = read_tower_file(g)
    assert recs.attrs["columns"]["NEE"] == "NEE_VUT_REF" and (recs["NEE"] == -3.0).all()


def test_columns_override_reads_day_time_partitioning(tmp_path: Path) -> None:
    f = tmp_path / "FLX_XX-Tst_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv"
    f.write_text(
        "TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC,RECO_NT_VUT_REF,RECO_DT_VUT_REF\n"
        "20010701,-2.0,1,3.0,3.75\n20010702,-1.0,1,3.5,4.25\n"
    )
    recs = read_tower_file(f, columns={"RECO": "RECO_DT_VUT_REF"})
    assert recs["RECO"].tolist() == [3.75, 4.25]
    assert recs.attrs["columns"]["RECO"] == "RECO_DT_VUT_REF"


def test_unit_suspicious_reco_is_refused(tmp_path: Path) -> None:
    # gC m-2 y-1 written into a daily file: far beyond any daily respiration (60 gC m-2 d-1).
    f = tmp_path / "FLX_XX-Tst_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv"
    f.write_text(
        "TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC,RECO_NT_VUT_REF\n20010701,-2,1,900\n20010702,-1,1,950\n"
    )
    with pytest.raises(TowerFormatError, match=r"column RECO \(RECO_NT_VUT_REF\).*wrong units"):
        read_tower_file(f)


# --------------------------------------------------------------------------------------- aggregation
def test_hh_reco_gpp_stay_umol_and_aggregate_to_gc_per_day(tmp_path: Path) -> None:
    # two days of half-hours
    reco = [2.0] * 24 + [4.0] * 24 + [3.0] * 48
    gpp = [0.0] * 24 + [10.0] * 24 + [6.0] * 47 + [-9999.0]
    # Day 1: six QC-3 records (rejected at qc_max=1) in the RECO 4.0 / GPP 10.0 half.
    qc = [0] * 24 + [3] * 6 + [1] * 18 + [0] * 48
    f = _hh(
        tmp_path / "FLX_XX-Tst_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
        NEE_VUT_REF_QC=qc,
        RECO_NT_VUT_REF=reco,
        GPP_NT_VUT_REF=gpp,
    )
    recs = read_tower_file(f)
    assert recs.attrs["source_units"]["RECO"] == "umolCO2 m-2 s-1"
    np.testing.assert_array_equal(recs["RECO"], reco)  # umol m-2 s-1 kept at HH
    assert np.isnan(recs["GPP"].iloc[-1]) and recs["GPP"].iloc[-2] == 6.0  # -9999 -> NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error", TowerDataWarning)
        daily = aggregate(qc_filter(recs), pd.date_range("2001-07-01", periods=2, freq="D"), min_coverage=0.0)
    # Day 1 over its 42 QC-passed half-hours: (24 x 2 + 18 x 4) / 42 umol m-2 s-1, times 1.0377504.
    assert daily["RECO"].iloc[0] == pytest.approx((24 * 2.0 + 18 * 4.0) / 42 * GC_PER_DAY_PER_UMOL, rel=1e-12)
    assert daily["GPP"].iloc[0] == pytest.approx((24 * 0.0 + 18 * 10.0) / 42 * GC_PER_DAY_PER_UMOL, rel=1e-12)
    assert daily["NEE"].iloc[0] == pytest.approx(-3.0 * GC_PER_DAY_PER_UMOL, rel=1e-12)
    # Day 2: RECO 3 umol m-2 s-1 = 3.1132512 gC m-2 d-1; GPP misses a record NEE has, so no GPP that day.
    assert daily["RECO"].iloc[1] == pytest.approx(3.1132512, rel=1e-12)
    assert np.isnan(daily["GPP"].iloc[1])
    assert daily.attrs["units"]["RECO"].startswith("gC m-2 d-1")


@needs_real
def test_monthly_file_reco_gpp_aggregate_to_years_without_conversion() -> None:
    raw = _raw(HAI)
    recs = qc_filter(read_tower_file(HAI))  # NEE_QC >= 0.8
    years = pd.date_range("2000-01-01", "2012-01-01", freq="YS")
    annual = aggregate(recs, years, min_coverage=0.0).set_index("time")
    # Independently: day-weighted mean over the year's months whose NEE passes QC (months of
    # 28-31 days), the file's values being gC m-2 d-1 already.
    raw["year"] = raw["TIMESTAMP"] // 100
    raw["days"] = [calendar.monthrange(t // 100, t % 100)[1] for t in raw["TIMESTAMP"]]
    ok = raw[(raw["NEE_VUT_REF_QC"] >= 0.8) & raw["NEE_VUT_REF"].notna()]
    checked = 0
    for year, g in ok.groupby("year"):
        for col, var in (("RECO_NT_VUT_REF", "RECO"), ("GPP_NT_VUT_REF", "GPP")):
            expect = (g[col] * g["days"]).sum() / g["days"].sum()
            assert annual.loc[f"{year}-01-01", var] == pytest.approx(expect, rel=1e-12)
            checked += 1
    assert checked == 2 * 13
    # Calendar months of MM records: the values themselves where NEE passes QC.
    months = pd.date_range("2000-01-01", "2012-12-01", freq="MS")
    monthly = aggregate(recs, months, min_coverage=0.0)
    assert len(monthly) == len(ok) > 100
    np.testing.assert_allclose(monthly["RECO"].to_numpy(), ok["RECO_NT_VUT_REF"].to_numpy(), rtol=1e-14)


@needs_real
def test_fluxdatakit_daily_gpp_is_converted_from_umol() -> None:
    # FluxDataKit's daily GPP_NT_VUT_REF is a mean of half-hourly umol m-2 s-1 (fdk_downsample_fluxnet).
    raw = pd.read_csv(LAE)
    with pytest.warns(TowerDataWarning, match=r"GPP taken as the mean of half-hourly umol m-2 s-1"):
        recs = read_tower_file(LAE, require_nee=False)
    assert "RECO" not in recs.columns  # CH-Lae's FluxDataKit file carries GPP only
    np.testing.assert_allclose(
        recs["GPP"].to_numpy(), raw["GPP_NT_VUT_REF"].to_numpy() * GC_PER_DAY_PER_UMOL, rtol=1e-14
    )
    assert recs.attrs["source_units"]["GPP"] == "umolCO2 m-2 s-1"
