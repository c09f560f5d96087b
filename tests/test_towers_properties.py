"""Property-based tests (hypothesis) for time-stamp parsing and aggregation."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from geoflux.towers import aggregate, make_periods, qc_filter, read_tower_file
from geoflux.towers.read import _digits_to_time

GC_PER_DAY_PER_UMOL = 1.0377504  # 12.011e-6 g C per umol x 86400 s per day, by hand
HALF_HOUR = dt.timedelta(minutes=30)

starts = st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2030, 12, 31)).map(
    lambda t: t.replace(minute=30 * (t.minute // 30), second=0, microsecond=0)
)
# Strictly increasing offsets (in half-hours) = a record series with arbitrary gaps.
offsets = st.lists(st.integers(0, 200), min_size=1, max_size=60, unique=True).map(sorted)


@settings(max_examples=60, deadline=None)
@given(start=starts, steps=offsets)
def test_fluxnet_timestamps_round_trip(start: dt.datetime, steps: list[int]) -> None:
    times = [start + k * HALF_HOUR for k in steps]
    lines = ["TIMESTAMP_START,TIMESTAMP_END,NEE_VUT_REF,NEE_VUT_REF_QC"]
    lines += [f"{t:%Y%m%d%H%M},{t + HALF_HOUR:%Y%m%d%H%M},1.5,0" for t in times]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "FLX_XX-Prp_FLUXNET2015_FULLSET_HH_1990-2031_1-4.csv"
        p.write_text("\n".join(lines))
        recs = read_tower_file(p)
    assert recs["time"].tolist() == [pd.Timestamp(t) for t in times]
    assert recs["time_end"].tolist() == [pd.Timestamp(t + HALF_HOUR) for t in times]


@settings(max_examples=60, deadline=None)
@given(start=starts, steps=offsets)
def test_reddyproc_hour_is_end_of_record(start: dt.datetime, steps: list[int]) -> None:
    # The record length is inferred from the closest neighbours, so two records must be adjacent.
    steps = sorted(set(steps) | {steps[-1] + 1})
    times = [start + k * HALF_HOUR for k in steps]
    lines = ["Year\tDoY\tHour\tNEE", "-\t-\t-\tumolm-2s-1"]
    for t in times:
        end = t + HALF_HOUR
        # REddyProc writes the end of the record; midnight is hour 0 of the next day.
        lines.append(f"{end.year}\t{end.timetuple().tm_yday}\t{end.hour + end.minute / 60:g}\t0.5")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "site.txt"
        p.write_bytes("\r".join(lines).encode())  # old Mac line ends, as in the real file
        recs = read_tower_file(p, site="XX-Prp")
    assert recs["time"].tolist() == [pd.Timestamp(t) for t in times]


values = st.one_of(st.just(np.nan), st.floats(-40, 40, allow_nan=False))
qcs = st.sampled_from([0, 1, 2, 3])


@st.composite
def half_hourly_records(draw: st.DrawFn) -> pd.DataFrame:
    n_days = draw(st.integers(1, 3))
    n = 48 * n_days
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))  # rows missing from the file
    t = pd.date_range("2004-02-28", periods=n, freq="30min")[np.array(keep, bool)]
    m = len(t)
    df = pd.DataFrame(
        {
            "site": "XX-Prp",
            "time": t,
            "time_end": t + pd.Timedelta("30min"),
            "NEE": draw(st.lists(values, min_size=m, max_size=m)),
            "NEE_QC": draw(st.lists(qcs, min_size=m, max_size=m)),
            "TA": draw(st.lists(st.floats(-30, 40), min_size=m, max_size=m)),
        }
    )
    df.attrs["resolution"] = "HH"
    return df


@settings(max_examples=60, deadline=None)
@given(recs=half_hourly_records(), qc_max=st.integers(0, 3), min_cov=st.floats(0, 1))
def test_daily_aggregate_matches_plain_loop(recs: pd.DataFrame, qc_max: int, min_cov: float) -> None:
    periods = pd.date_range("2004-02-28", periods=3, freq="D")
    out = aggregate(qc_filter(recs, qc_max=qc_max), periods, min_coverage=min_cov).set_index("time")
    for day in periods:
        rows = [r for r in recs.itertuples() if day <= r.time < day + pd.Timedelta("1D")]
        good = [r for r in rows if not np.isnan(r.NEE) and r.NEE_QC <= qc_max]
        cov = len(good) / 48
        if not good or cov < min_cov:
            assert day not in out.index
            continue
        got = out.loc[day]
        assert got["n_records"] == len(good)
        assert np.isclose(got["NEE_coverage"], cov, rtol=1e-12)
        assert np.isclose(got["NEE_measured"], sum(r.NEE_QC == 0 for r in good) / 48, rtol=1e-12)
        expect = np.mean([r.NEE for r in good]) * GC_PER_DAY_PER_UMOL
        assert np.isclose(got["NEE"], expect, rtol=1e-9, atol=1e-12)
        assert np.isclose(got["TA"], np.mean([r.TA for r in rows]), rtol=1e-9, atol=1e-12)
        assert 0 <= got["NEE_measured"] <= got["NEE_coverage"] <= 1


@settings(max_examples=30, deadline=None)
@given(recs=half_hourly_records())
def test_aggregate_per_site_is_independent_of_other_sites(recs: pd.DataFrame) -> None:
    other = recs.assign(site="XX-Oth", NEE=recs["NEE"] * -3)
    other.attrs = recs.attrs
    both = pd.concat([other, recs], ignore_index=True)
    both.attrs = recs.attrs
    periods = pd.date_range("2004-02-28", periods=3, freq="D")
    alone = aggregate(qc_filter(recs), periods, min_coverage=0)
    mixed = aggregate(qc_filter(both), periods, min_coverage=0)
    mixed = mixed.loc[mixed["site"] == "XX-Prp"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, mixed, check_dtype=False)


@settings(max_examples=40, deadline=None)
@given(y0=st.integers(1995, 2030), n=st.integers(0, 3))
def test_modis_8day_periods(y0: int, n: int) -> None:
    p = make_periods(f"{y0}-01-01", f"{y0 + n}-12-31", "MODIS8D")
    assert len(p) == 46 * (n + 1)
    assert all((t.day_of_year - 1) % 8 == 0 for t in p)


stamp_digits = st.tuples(
    st.integers(1900, 2200), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61)
)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(stamp_digits, min_size=1, max_size=20), width=st.sampled_from([12, 8, 6, 4]))
def test_fast_stamp_parser_agrees_with_strptime(parts: list[tuple[int, ...]], width: int) -> None:
    """The integer stamp parser must accept and reject exactly what pandas' strptime does."""
    fmt = {12: "%Y%m%d%H%M", 8: "%Y%m%d", 6: "%Y%m", 4: "%Y"}[width]
    s = pd.Series([f"{y:04d}{mo:02d}{d:02d}{h:02d}{mi:02d}" for y, mo, d, h, mi in parts]).str[:width]
    expect = pd.to_datetime(s, format=fmt, errors="coerce")
    got = _digits_to_time(s, fmt)
    assert got.isna().tolist() == expect.isna().tolist()
    assert got.dropna().tolist() == expect.dropna().tolist()


@given(year=st.one_of(st.integers(1000, 1899), st.integers(2201, 9999)))
def test_implausible_years_are_rejected(year: int) -> None:
    assert _digits_to_time(pd.Series([f"{year}01010000"]), "%Y%m%d%H%M").isna().all()
