"""Parquet output (atomic), the per-site summary, site selection and UTC conversion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from geoflux.errors import OutputExistsError, TowerFormatError
from geoflux.towers import read_records, read_sites, select_sites, summarize, to_utc, write_records


def _records() -> pd.DataFrame:
    t = pd.date_range("2001-01-01", periods=48 * 10, freq="30min")
    nee = np.full(len(t), -1.0)
    nee[48 * 2 : 48 * 5] = np.nan  # a 3-day gap on days 3-5
    nee[20] = np.nan  # a half-hour gap on day 1
    qc = np.where(np.arange(len(t)) % 2 == 0, 0.0, 1.0)
    df = pd.DataFrame(
        {
            "site": "XX-Out",
            "time": t,
            "time_end": t + pd.Timedelta("30min"),
            "NEE": nee,
            "NEE_QC": qc,
            "TA": 3.0,
        }
    )
    df.attrs = {"resolution": "HH", "units": {"NEE": "umol CO2 m-2 s-1"}, "time_reference": "local"}
    return df


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    df = _records()
    out = write_records(df, tmp_path / "towers.parquet")
    assert out == tmp_path / "towers.parquet"
    assert not (tmp_path / "towers.parquet.part").exists()
    back = read_records(out)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back.attrs["resolution"] == "HH"
    assert back.attrs["units"]["NEE"] == "umol CO2 m-2 s-1"
    # Readable by any parquet reader, not only ours.
    assert pq.read_metadata(out).num_rows == len(df)


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "towers.parquet"
    write_records(_records(), target)
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_records(_records().iloc[:5], target)
    assert target.read_bytes() == before  # the old file is untouched
    assert not (tmp_path / "towers.parquet.part").exists()


def test_write_refuses_to_clobber_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "towers.parquet"
    write_records(_records(), target)
    mtime = os.stat(target).st_mtime_ns
    with pytest.raises(OutputExistsError):
        write_records(_records(), target, overwrite=False)
    assert os.stat(target).st_mtime_ns == mtime


def test_summary_counts_gaps_and_coverage() -> None:
    s = summarize(_records()).iloc[0]
    n_valid = 480 - 48 * 3 - 1
    assert s["n_records"] == 480 and s["n_nee"] == n_valid
    assert s["coverage"] == pytest.approx(n_valid / 480)
    assert s["n_gaps"] == 1  # only the 3-day stretch is >= 1 day
    assert s["longest_gap_days"] == pytest.approx(3.0)
    assert s["years"] == "2001" and s["n_years"] == 1
    assert s["first"] == pd.Timestamp("2001-01-01") and s["last"] == pd.Timestamp("2001-01-11")
    valid_qc = _records().dropna(subset=["NEE"])["NEE_QC"]
    assert s["measured"] == pytest.approx(float((valid_qc == 0).mean()))
    assert summarize(_records(), min_gap="30min").iloc[0]["n_gaps"] == 2


def test_select_sites_bbox_antimeridian_and_years(tmp_path: Path) -> None:
    p = tmp_path / "sites.csv"
    p.write_text(
        "SITE_ID,LAT,LON,IGBP,YEARS\nA,10,179,ENF,1999-2003\nB,10,-179,gra,2010\nC,10,0,ENF,2000-2001\n"
    )
    sites = read_sites(p)
    assert list(select_sites(sites, bbox=(170, 0, -170, 20)).index) == ["A", "B"]
    assert list(select_sites(sites, igbp=["GRA"]).index) == ["B"]
    assert list(select_sites(sites, years=(2002, 2011)).index) == ["A", "B"]
    assert list(select_sites(sites, years=(2000, 2000), igbp=["ENF"]).index) == ["A", "C"]
    with pytest.raises(TowerFormatError, match="lat_min > lat_max"):
        select_sites(sites, bbox=(0, 20, 10, 0))


def test_to_utc_uses_site_offset_and_leaves_records_alone(tmp_path: Path) -> None:
    p = tmp_path / "sites.csv"
    p.write_text("SITE_ID,LAT,LON,UTC_OFFSET\nXX-Out,50,10,1\n")
    recs = _records()
    utc = to_utc(recs, read_sites(p))
    assert utc.iloc[0] == pd.Timestamp("2000-12-31 23:00", tz="UTC")
    assert recs["time"].iloc[0] == pd.Timestamp("2001-01-01")  # never shifted in place
    p.write_text("SITE_ID,LAT,LON\nXX-Out,50,10\n")
    with pytest.raises(TowerFormatError, match="no UTC_OFFSET column"):
        to_utc(recs, read_sites(p))
