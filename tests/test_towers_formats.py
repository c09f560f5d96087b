"""FLUXNET-family readers against ONEFlux's own variable tables, and every supported file layout.

The ONEFlux tables (../shared/realdata/formats/ONEFlux_var_info_definitions_{hh,dd,ww,mm,yy}.txt) are
parsed here; the reader's column names and units are checked against them, not against a list in the code.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.errors import TowerFormatError
from geoflux.towers import fluxnet_units, qc_filter, read_tower_file
from geoflux.towers.columns import FLUXNET_CANDIDATES

FORMATS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "formats"
needs_tables = pytest.mark.skipif(not FORMATS.is_dir(), reason=f"ONEFlux tables not found at {FORMATS}")

GC_PER_DAY_PER_UMOL = 1.0377504  # 12.011e-6 g C per umol x 86400 s per day, by hand
PERCENTILES = ("05", "16", "25", "50", "75", "84", "95")  # what ONEFlux's "XX" stands for
MET_MEMBERS = {
    "TA": "TA",
    "SW_IN": "SW_IN",
    "(TA, RH)(VPD)": "VPD",
    "P": "P",
    "WS": "WS",
    "WD": "WD",
    "USTAR": "USTAR",
}


def _norm_unit(u: str) -> str:
    # The tables spell micro as a latin-1 'µ' or (hh table) a UTF-8 replacement character.
    return re.sub(r"\s+", "", u.replace("\ufffd", "u").replace("µ", "u")).lower()


def _table(res: str) -> list[tuple[str, str, str]]:
    """(variable, unit, members) rows of one ONEFlux table, 'XX' expanded to the percentiles."""
    path = FORMATS / f"ONEFlux_var_info_definitions_{res.lower()}.txt"
    text = path.read_bytes().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        name, unit, _desc, members = (line.split("||") + [""] * 4)[:4]
        for n in [name.replace("XX", p) for p in PERCENTILES] if "_XX" in name else [name]:
            rows.append((n.strip(), unit.strip(), members.strip()))
    return rows


def _nee_and_met_rows(res: str) -> list[tuple[str, str, str]]:
    """Rows the readers must accept: NEE family (members '(FC)(NEE)', name NEE_*) and met members."""
    out = []
    for name, unit, members in _table(res):
        if name.startswith("NEE_") and members == "(FC)(NEE)":
            out.append((name, unit, "NEE"))
        elif members in MET_MEMBERS and name.split("_")[0] == MET_MEMBERS[members].split("_")[0]:
            out.append((name, unit, MET_MEMBERS[members]))
    return out


TABLE_RES = [("hh", "HH"), ("hh", "HR"), ("dd", "DD"), ("ww", "WW"), ("mm", "MM"), ("yy", "YY")]


@needs_tables
@pytest.mark.parametrize(("table", "res"), TABLE_RES)
def test_units_match_oneflux_tables(table: str, res: str) -> None:
    rows = _nee_and_met_rows(table)
    assert len(rows) > 20  # the parse found the table's NEE and met sections
    mismatches = [
        (n, u, fluxnet_units(n, res))
        for n, u, _ in rows
        if fluxnet_units(n, res) is None or _norm_unit(fluxnet_units(n, res)) != _norm_unit(u)
    ]
    assert not mismatches


@needs_tables
@pytest.mark.parametrize(("table", "res"), TABLE_RES)
def test_qc_columns_of_nee_and_met_are_adimensional(table: str, res: str) -> None:
    names = {n for n, _, _ in _nee_and_met_rows(table)}
    qc = [(n, u) for n, u, _ in _table(table) if n.endswith("_QC") and n[:-3] in names]
    assert qc
    for n, u in qc:
        assert u == "adimensional"
        assert fluxnet_units(n, res) == "adimensional"


@needs_tables
def test_default_columns_are_oneflux_names() -> None:
    hh = {n for n, _, _ in _table("hh")}
    dd = {n for n, _, _ in _table("dd")}
    for var, cands in FLUXNET_CANDIDATES.items():
        assert cands[0] in hh, var
        if var != "WD":  # ONEFlux does not aggregate wind direction
            assert any(c in dd for c in cands), var


# ---------------------------------------------------------------------------------------------------
def _stamps(res: str, n: int) -> dict[str, list[str]]:
    if res in ("HH", "HR"):
        step = pd.Timedelta("30min" if res == "HH" else "1h")
        t = pd.date_range("2001-01-01", periods=n, freq=step)
        return {
            "TIMESTAMP_START": list(t.strftime("%Y%m%d%H%M")),
            "TIMESTAMP_END": list((t + step).strftime("%Y%m%d%H%M")),
        }
    if res == "WW":
        t = pd.date_range("2001-01-01", periods=n, freq="7D")
        return {
            "TIMESTAMP_START": list(t.strftime("%Y%m%d")),
            "TIMESTAMP_END": list((t + pd.Timedelta("6D")).strftime("%Y%m%d")),
        }
    if res == "DD":
        return {"TIMESTAMP": list(pd.date_range("2001-01-01", periods=n, freq="D").strftime("%Y%m%d"))}
    if res == "MM":
        return {"TIMESTAMP": list(pd.date_range("2001-01-01", periods=n, freq="MS").strftime("%Y%m"))}
    return {"TIMESTAMP": [str(2003 + i) for i in range(n)]}  # YY: 2003 (365 d), 2004 (366 d)


def _write(path: Path, res: str, cols: dict[str, list], n: int = 2) -> Path:
    df = pd.DataFrame({**_stamps(res, n), **cols})
    df.to_csv(path, index=False)
    return path


@needs_tables
@pytest.mark.parametrize(("table", "res"), TABLE_RES)
def test_every_oneflux_nee_and_met_column_is_read_in_tidy_units(tmp_path: Path, table: str, res: str) -> None:
    days = np.array([365.0, 366.0]) if res == "YY" else np.ones(2)
    checked = 0
    for name, unit, var in _nee_and_met_rows(table):
        if re.search(r"_(SD|SE|RANDUNC|JOINTUNC)$", name):
            continue  # spreads and uncertainties are not values of the variable itself
        if var == "WD" and res not in ("HH", "HR"):
            continue
        value = 2.0
        cols = {name: [value, value]}
        if var == "NEE":
            cols[f"{name}_QC"] = [0, 0]
        f = _write(tmp_path / f"FLX_XX-Tst_FLUXNET2015_FULLSET_{res}_2001-2004_1-4.csv", res, cols)
        got = read_tower_file(f, columns={var: name}, require_nee=(var == "NEE"))
        u = _norm_unit(unit)
        if u == "umolco2m-2s-1" and res not in ("HH", "HR"):
            expect = value * GC_PER_DAY_PER_UMOL * np.ones(2)
        elif u in ("gcm-2y-1", "mmy-1"):
            expect = value / days
        else:
            expect = value * np.ones(2)
        np.testing.assert_allclose(got[var].to_numpy(), expect, rtol=1e-12, err_msg=name)
        assert got.attrs["columns"][var] == name
        checked += 1
    assert checked > 10


# --------------------------------------------------------------------------------------------------- layouts
def _fluxnet_hh(path: Path, n: int = 96, res: str = "HH", **extra: list) -> Path:
    rng = np.random.default_rng(1)
    cols = {
        "TA_F": list(np.round(rng.normal(10, 3, n), 3)),
        "TA_F_QC": [0] * (n - 2) + [2, 2],
        "SW_IN_F": list(np.round(rng.uniform(0, 800, n), 2)),
        "VPD_F": list(np.round(rng.uniform(1, 20, n), 3)),
        "P_F": [0.2] * n,
        "NEE_VUT_REF": list(np.round(rng.normal(-2, 4, n), 4)),
        "NEE_VUT_REF_QC": [0, 1, 2, 3] * (n // 4),
        "NEE_VUT_REF_JOINTUNC": [1.0, 2.0] * (n // 2),
        "USTAR": [0.3] * n,
        **extra,
    }
    return _write(path, res, cols, n)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("FLX_DE-Tst_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", "FLUXNET2015 FULLSET"),
        ("FLX_DE-Tst_FLUXNET2015_SUBSET_HH_2001-2001_1-4.csv", "FLUXNET2015 SUBSET"),
        ("FLX_DE-Tst_FLUXNET_FLUXMET_HH_2001-2001_v1.3_r1.csv", "ONEFlux FLUXNET FLUXMET"),
        ("AMF_DE-Tst_FLUXNET_FULLSET_HH_2001-2001_3-5.csv", "ONEFlux FLUXNET FULLSET"),
        ("ICOSETC_DE-Tst_FLUXNET_HH_L2.csv", "ICOS ETC L2 FLUXNET"),
        ("my_own_name.csv", "FLUXNET-like CSV"),
    ],
)
def test_fluxnet_family_names(tmp_path: Path, name: str, fmt: str) -> None:
    f = _fluxnet_hh(tmp_path / name)
    raw = pd.read_csv(f)
    recs = read_tower_file(f)
    assert recs.attrs["format"] == fmt
    assert recs.attrs["resolution"] == "HH"
    assert recs["site"].iloc[0] == ("DE-Tst" if name.startswith(("FLX", "AMF", "ICOS")) else "my_own_name")
    np.testing.assert_array_equal(recs["NEE"], raw["NEE_VUT_REF"])
    np.testing.assert_array_equal(recs["NEE_UNC"], raw["NEE_VUT_REF_JOINTUNC"])
    assert recs["time"].iloc[1] == pd.Timestamp("2001-01-01 00:30")
    assert recs["time_end"].iloc[1] == pd.Timestamp("2001-01-01 01:00")


def test_hourly_file(tmp_path: Path) -> None:
    f = _fluxnet_hh(tmp_path / "FLX_US-Tst_FLUXNET2015_FULLSET_HR_2001-2001_1-4.csv", n=48, res="HR")
    recs = read_tower_file(f)
    assert recs.attrs["resolution"] == "HR"
    assert (recs["time_end"] - recs["time"] == pd.Timedelta("1h")).all()


def test_weekly_file_inclusive_end(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "FLX_US-Tst_FLUXNET2015_FULLSET_WW_2001-2001_1-4.csv",
        "WW",
        {"NEE_VUT_REF": [1.0, 2.0], "NEE_VUT_REF_QC": [1.0, 0.5]},
    )
    recs = read_tower_file(f)
    assert recs.attrs["resolution"] == "WW"
    # TIMESTAMP_END 20010107 is the week's last day; the record ends at the start of 8 January.
    assert recs["time_end"].iloc[0] == pd.Timestamp("2001-01-08")
    assert qc_filter(recs)["NEE"].isna().tolist() == [False, True]


def test_qc_rules_and_weights(tmp_path: Path) -> None:
    f = _fluxnet_hh(tmp_path / "FLX_DE-Tst_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", n=8)
    raw = pd.read_csv(f)
    recs = qc_filter(read_tower_file(f))
    qc = raw["NEE_VUT_REF_QC"].to_numpy()
    assert recs["NEE"].notna().tolist() == list(qc <= 1)
    # Weight: 0.5**QC times (median JOINTUNC of the passing records / JOINTUNC)**2, 0 when rejected.
    unc = raw["NEE_VUT_REF_JOINTUNC"].to_numpy()
    med = np.median(unc[qc <= 1])
    expect = np.where(qc <= 1, 0.5**qc * np.minimum((med / unc) ** 2, 4.0), 0.0)
    np.testing.assert_allclose(recs["NEE_weight"], expect, rtol=1e-12)
    # Met QC 2 (downscaled from ERA) is kept by default and dropped with met_qc_max=1.
    assert recs["TA"].notna().all()
    strict = qc_filter(read_tower_file(f), met_qc_max=1)
    assert strict["TA"].isna().tolist() == list(raw["TA_F_QC"] > 1)
    loose = qc_filter(read_tower_file(f), qc_max=3)
    assert loose["NEE"].notna().all()


def test_ameriflux_base_with_qualifiers_and_comment_lines(tmp_path: Path) -> None:
    n = 4
    t = pd.date_range("2015-06-01", periods=n, freq="30min")
    header = [
        "TIMESTAMP_START",
        "TIMESTAMP_END",
        "FC_1_1_1",
        "FC_SSITC_TEST_1_1_1",
        "TA_1_2_1",
        "TA_1_1_1",
        "SW_IN_1_1_1",
        "VPD_PI_1",
        "P",
        "USTAR",
    ]
    lines = [
        ",".join(["# Site: US-Tst"] + [""] * (len(header) - 1)),
        ",".join(["# Version: 1-1"] + [""] * (len(header) - 1)),
        ",".join(header),
    ]
    for i, ts in enumerate(t):
        lines.append(
            ",".join(
                [
                    ts.strftime("%Y%m%d%H%M"),
                    (ts + pd.Timedelta("30min")).strftime("%Y%m%d%H%M"),
                    str(-3.0 - i),
                    str([0, 1, 2, 0][i]),
                    "15.0",
                    str(20.0 + i),
                    "500",
                    "8.5",
                    "0",
                    "-9999",
                ]
            )
        )
    f = tmp_path / "AMF_US-Tst_BASE_HH_1-1.csv"
    f.write_text("\n".join(lines) + "\n")
    recs = read_tower_file(f)
    assert recs.attrs["columns"]["NEE"] == "FC_1_1_1"
    assert recs.attrs["columns"]["TA"] == "TA_1_1_1"  # V=1, the top sensor, wins over V=2
    assert recs.attrs["columns"]["VPD"] == "VPD_PI_1"
    assert recs["NEE"].tolist() == [-3.0, -4.0, -5.0, -6.0]
    assert recs["NEE_QC"].tolist() == [0, 1, 2, 0]  # SSITC flag: 2 = reject
    assert qc_filter(recs)["NEE"].notna().tolist() == [True, True, False, True]
    assert recs["TA"].tolist() == [20.0, 21.0, 22.0, 23.0]
    assert recs["USTAR"].isna().all()


def _fluxnet_zip(tmp_path: Path) -> Path:
    hh = _fluxnet_hh(tmp_path / "FLX_DE-Tst_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv", n=96)
    dd = _write(
        tmp_path / "FLX_DE-Tst_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv",
        "DD",
        {"NEE_VUT_REF": [1.5, 2.5], "NEE_VUT_REF_QC": [1.0, 0.9]},
    )
    era = _write(tmp_path / "FLX_DE-Tst_FLUXNET2015_ERAI_HH_1989-2014_1-4.csv", "HH", {"TA_ERA": [1.0, 2.0]})
    z = tmp_path / "FLX_DE-Tst_FLUXNET2015_FULLSET_2001-2001_1-4.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in (era, dd, hh):
            zf.write(p, p.name)
    return z


def test_zip_picks_finest_or_requested_resolution(tmp_path: Path) -> None:
    z = _fluxnet_zip(tmp_path)
    assert read_tower_file(z).attrs["resolution"] == "HH"
    dd = read_tower_file(z, resolution="DD")
    assert dd["NEE"].tolist() == [1.5, 2.5]
    with pytest.raises(TowerFormatError, match="no tower data file at resolution MM"):
        read_tower_file(z, resolution="MM")


def test_erai_file_is_refused(tmp_path: Path) -> None:
    f = _write(tmp_path / "FLX_DE-Tst_FLUXNET2015_ERAI_HH_1989-2014_1-4.csv", "HH", {"TA_ERA": [1.0, 2.0]})
    with pytest.raises(TowerFormatError, match=r"ERAI.*not tower NEE"):
        read_tower_file(f)


def test_fluxdatakit_with_nee_is_adapted(tmp_path: Path) -> None:
    f = tmp_path / "FLX_XX-Fdk_FLUXDATAKIT_FULLSET_DD_2004_2004_2-3.csv"
    f.write_text(
        "TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC,TA_F_MDS\n2004-01-01,1.25,0.9,NA\n2004-01-02,NA,1,3.5\n"
    )
    with pytest.warns(UserWarning, match="FluxDataKit derivative"):
        recs = read_tower_file(f)
    # FluxDataKit daily NEE is a mean of half-hourly umol m-2 s-1: 1.25 * 12.011e-6 * 86400 gC m-2 d-1.
    assert recs["NEE"].iloc[0] == pytest.approx(1.25 * 1.0377504, rel=1e-12) and np.isnan(recs["NEE"].iloc[1])
    assert np.isnan(recs["TA"].iloc[0]) and recs["TA"].iloc[1] == 3.5
    assert recs["time"].tolist() == [pd.Timestamp("2004-01-01"), pd.Timestamp("2004-01-02")]


def test_demo_world_layout(tmp_path: Path) -> None:
    """The generated demo world: FLUXNET HH files named like FLUXNET2015 and a sites.csv."""
    from geoflux.towers import aggregate, read_sites, read_towers

    (tmp_path / "sites.csv").write_text(
        "SITE_ID,LAT,LON,IGBP,ELEV,HEIGHT_MEAS,HEIGHT_CANOPY\nXX-D01,50.0,10.0,ENF,300,30,20\n"
        "XX-D02,50.5,10.5,GRA,250,3,0.5\n"
    )
    for site in ("XX-D01", "XX-D02"):
        _fluxnet_hh(
            tmp_path / f"FLX_{site}_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
            n=96 * 4,
            WS=[2.0] * 384,
            WD=[180.0] * 384,
        )
    sites = read_sites(tmp_path / "sites.csv")
    recs = read_towers(str(tmp_path / "FLX_*.csv"), sites)
    assert set(recs["site"]) == {"XX-D01", "XX-D02"}
    out = aggregate(qc_filter(recs, qc_max=1), pd.date_range("2001-01-01", periods=4, freq="1D"))
    assert list(out.columns[:5]) == ["site", "time", "NEE", "NEE_coverage", "n_records"]
    assert set(out["site"]) == {"XX-D01", "XX-D02"}
