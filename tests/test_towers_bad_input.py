"""Bad tower input: one clear error naming the file and the problem, or a warning that says what was done."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.errors import TowerFormatError
from geoflux.towers import TowerDataWarning, aggregate, read_sites, read_tower_file, read_towers

HEADER = "TIMESTAMP_START,TIMESTAMP_END,NEE_VUT_REF,NEE_VUT_REF_QC,TA_F,VPD_F"


def _rows(n: int = 48, start: str = "2001-01-01", nee: float = -2.0, vpd: float = 8.0) -> list[str]:
    t = pd.date_range(start, periods=n, freq="30min")
    ends = t + pd.Timedelta("30min")
    return [f"{a:%Y%m%d%H%M},{b:%Y%m%d%H%M},{nee},0,5.0,{vpd}" for a, b in zip(t, ends, strict=True)]


def _file(
    tmp_path: Path,
    lines: list[str],
    name: str = "FLX_DE-Bad_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
    header: str = HEADER,
) -> Path:
    p = tmp_path / name
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_truncated_last_line(tmp_path: Path) -> None:
    rows = _rows()
    p = _file(tmp_path, [*rows[:-1], rows[-1][:20]])
    with pytest.raises(TowerFormatError) as exc:
        read_tower_file(p)
    assert "line 49 has 2 fields, expected 6 (truncated file?)" in _one_line(exc, p)


def test_header_only(tmp_path: Path) -> None:
    p = _file(tmp_path, [])
    with pytest.raises(TowerFormatError, match="no data rows"):
        read_tower_file(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "FLX_DE-Bad_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv"
    p.write_bytes(b"")
    with pytest.raises(TowerFormatError, match="empty tower file"):
        read_tower_file(p)


def test_missing_nee_column(tmp_path: Path) -> None:
    rows = [r.rsplit(",", 4)[0] + ",5.0" for r in _rows()]
    p = _file(tmp_path, rows, header="TIMESTAMP_START,TIMESTAMP_END,TA_F")
    with pytest.raises(TowerFormatError) as exc:
        read_tower_file(p)
    assert "no NEE column (expected one of ['NEE_VUT_REF'" in _one_line(exc, p)


def test_missing_timestamp_end(tmp_path: Path) -> None:
    p = _file(
        tmp_path,
        [r.split(",", 1)[0] + ",1.0,0" for r in _rows()],
        header="TIMESTAMP_START,NEE_VUT_REF,NEE_VUT_REF_QC",
    )
    with pytest.raises(TowerFormatError, match="TIMESTAMP_START without TIMESTAMP_END"):
        read_tower_file(p)


def test_non_monotonic_timestamps(tmp_path: Path) -> None:
    rows = _rows()
    rows[10], rows[11] = rows[11], rows[10]
    p = _file(tmp_path, rows)
    with pytest.raises(TowerFormatError) as exc:
        read_tower_file(p)
    assert "time stamps go backwards at data row 12" in _one_line(exc, p)


def test_duplicated_timestamps_warn_and_keep_first(tmp_path: Path) -> None:
    rows = _rows()
    dup = rows[5].replace(",-2.0,", ",-7.0,")
    p = _file(tmp_path, [*rows[:6], dup, *rows[6:]])
    with pytest.warns(TowerDataWarning, match=r"1 duplicated time stamp.*differ.*kept the first"):
        recs = read_tower_file(p)
    assert len(recs) == 48
    assert (recs["NEE"] == -2.0).all()


def test_identical_duplicate_rows(tmp_path: Path) -> None:
    rows = _rows()
    p = _file(tmp_path, [*rows[:6], rows[5], *rows[6:]])
    with pytest.warns(TowerDataWarning, match="identical rows"):
        assert len(read_tower_file(p)) == 48


def test_unit_suspicious_nee(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows(nee=-2500.0))
    with pytest.raises(TowerFormatError) as exc:
        read_tower_file(p)
    assert "column NEE (NEE_VUT_REF) has 48 values beyond ±100" in _one_line(exc, p)
    assert "wrong units?" in str(exc.value)


def test_single_spike_is_masked_with_warning(tmp_path: Path) -> None:
    rows = _rows(n=480)
    rows[7] = rows[7].replace(",-2.0,", ",-900.0,")
    p = _file(tmp_path, rows)
    with pytest.warns(TowerDataWarning, match="1 value.*NEE.*set to missing"):
        recs = read_tower_file(p)
    assert np.isnan(recs["NEE"].iloc[7]) and recs["NEE"].notna().sum() == 479


def test_temperature_in_kelvin(tmp_path: Path) -> None:
    p = _file(tmp_path, [r.replace(",5.0,", ",278.15,") for r in _rows()])
    with pytest.raises(TowerFormatError, match=r"column TA \(TA_F\).*expected degC"):
        read_tower_file(p)


def test_vpd_in_kpa(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows(n=48 * 40, vpd=0.35))
    with pytest.raises(TowerFormatError, match=r"VPD stays below 0.5.*kPa"):
        read_tower_file(p)


def test_non_numeric_value(tmp_path: Path) -> None:
    rows = _rows()
    rows[3] = rows[3].replace(",-2.0,", ",abc,")
    p = _file(tmp_path, rows)
    with pytest.raises(TowerFormatError, match=r"column NEE_VUT_REF, data row 4: 'abc' is not a number"):
        read_tower_file(p)


def test_bad_timestamp(tmp_path: Path) -> None:
    rows = _rows()
    rows[2] = "200101011399" + rows[2][12:]
    p = _file(tmp_path, rows)
    with pytest.raises(TowerFormatError, match="data row 3: cannot parse TIMESTAMP_START '200101011399'"):
        read_tower_file(p)


def test_off_grid_timestamp(tmp_path: Path) -> None:
    t = pd.date_range("2001-01-01 00:10", periods=4, freq="30min")
    p = _file(tmp_path, [f"{a:%Y%m%d%H%M},{a + pd.Timedelta('30min'):%Y%m%d%H%M},1,0,5,8" for a in t])
    with pytest.raises(TowerFormatError, match="off the 30-min grid"):
        read_tower_file(p)


def test_name_and_content_disagree(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows(), name="FLX_DE-Bad_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv")
    with pytest.raises(TowerFormatError, match="file name says DD but the time stamps are HH"):
        read_tower_file(p)


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "data.csv"
    p.write_text("date;flux\n2001-01-01;3\n")
    with pytest.raises(TowerFormatError) as exc:
        read_tower_file(p)
    assert "unknown tower file format" in _one_line(exc, p)


def test_iso_dates_in_a_fluxnet_named_file(tmp_path: Path) -> None:
    p = tmp_path / "FLX_DE-Bad_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv"
    p.write_text("TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC\n2001-01-01,1,1\n")
    with pytest.raises(TowerFormatError, match="ISO dates in TIMESTAMP"):
        read_tower_file(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TowerFormatError, match="tower file not found"):
        read_tower_file(tmp_path / "nope.csv")


def test_broken_zip(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows())
    z = tmp_path / "FLX_DE-Bad_FLUXNET2015_FULLSET_2001-2001_1-4.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(p, p.name)
    z.write_bytes(z.read_bytes()[:-40])  # an interrupted download
    with pytest.raises(TowerFormatError, match="truncated download"):
        read_tower_file(z)


def test_zip_without_tower_data(tmp_path: Path) -> None:
    z = tmp_path / "stuff.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("README.txt", "hello")
    with pytest.raises(TowerFormatError, match=r"no tower data file \(members: README.txt"):
        read_tower_file(z)


def test_site_without_metadata_row(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows())
    (tmp_path / "sites.csv").write_text("SITE_ID,LAT,LON\nXX-D01,50,10\n")
    with pytest.raises(TowerFormatError) as exc:
        read_towers([p], read_sites(tmp_path / "sites.csv"))
    assert "site DE-Bad has no row in the site table" in _one_line(exc, p)


def test_mixed_resolutions(tmp_path: Path) -> None:
    a = _file(tmp_path, _rows())
    b = tmp_path / "FLX_DE-Bad_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv"
    b.write_text("TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC\n20010101,1,1\n")
    (tmp_path / "sites.csv").write_text("SITE_ID,LAT,LON\nDE-Bad,50,10\n")
    with pytest.raises(TowerFormatError, match="files mix time resolutions"):
        read_towers([a, b], read_sites(tmp_path / "sites.csv"))


def test_same_site_in_two_files_warns(tmp_path: Path) -> None:
    a = _file(tmp_path, _rows())
    b = tmp_path / "sub" / a.name
    b.parent.mkdir()
    b.write_text(a.read_text())
    (tmp_path / "sites.csv").write_text("SITE_ID,LAT,LON\nDE-Bad,50,10\n")
    with pytest.warns(TowerDataWarning, match="48 records .* more than one file; kept those of the first"):
        recs = read_towers([a, b], read_sites(tmp_path / "sites.csv"))
    assert len(recs) == 48


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("SITE_ID,LAT\nA,1\n", r"lacks column\(s\) \['LON'\]"),
        ("SITE_ID,LAT,LON\nA,1,2\nA,3,4\n", "site A appears more than once"),
        ("SITE_ID,LAT,LON\nA,95,2\n", r"site A: LAT=95 outside \[-90, 90\]"),
        ("SITE_ID,LAT,LON\nA,north,2\n", "site A: LAT='north' is not a number"),
    ],
)
def test_bad_site_tables(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "sites.csv"
    p.write_text(text)
    with pytest.raises(TowerFormatError, match=match):
        read_sites(p)


def test_reddyproc_wrong_unit_line(tmp_path: Path) -> None:
    p = tmp_path / "site.txt"
    p.write_text("Year\tDoY\tHour\tNEE\tTair\n-\t-\t-\tumolm-2s-1\tK\n1998\t1\t0.5\t1.0\t280\n")
    with pytest.raises(TowerFormatError, match=r"column Tair has unit 'K' \(expected"):
        read_tower_file(p)


def test_straddling_records_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "FLX_DE-Bad_FLUXNET2015_SUBSET_MM_2001-2001_1-4.csv"
    p.write_text("TIMESTAMP,NEE_VUT_REF,NEE_VUT_REF_QC\n200101,1,1\n200102,1,1\n")
    with pytest.raises(TowerFormatError, match="straddles a period boundary"):
        aggregate(read_tower_file(p), pd.date_range("2001-01-01", periods=8, freq="8D"))


def test_clean_file_raises_no_warning(tmp_path: Path) -> None:
    p = _file(tmp_path, _rows())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_tower_file(p)
