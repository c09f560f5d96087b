"""geoflux's site processing against hesseflux 5.0 on DE-Tha 1998 (REddyProc's example year).

The reference (``reference/DETha98_hesseflux5.csv``) was made by a third party with hesseflux's MDS
gap-filling and night-time partitioning at their published defaults, without spike or u* filtering; the
same options are used here. Annual sums are computed from the reference file, not typed in.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.towers import read_tower_file
from geoflux.towers.processing import lloyd_taylor, mds_gapfill, process_site

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TOWER = REALDATA / "towers" / "Example_DETha98.txt"
REFERENCE = REALDATA / "reference" / "DETha98_hesseflux5.csv"
GC = 12.011e-6 * 1800.0  # umol m-2 s-1 over a half-hour → gC m-2

pytestmark = pytest.mark.skipif(
    not (TOWER.exists() and REFERENCE.exists()), reason=f"shared real data not found under {REALDATA}"
)


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return read_tower_file(TOWER)


@pytest.fixture(scope="module")
def reference(records: pd.DataFrame) -> pd.DataFrame:
    ref = pd.read_csv(REFERENCE)
    assert len(ref) == len(records)
    # Same row order as the input; check it through the timestamps: the reference's Hour is the END of the
    # half-hour (as in the input file), geoflux's time is the start.
    end = (
        pd.Timestamp("1998-01-01")
        + pd.to_timedelta(ref["DoY"] - 1, unit="D")
        + pd.to_timedelta(ref["Hour"], unit="h")
    )
    # Hour 0 of a day is the record ending at midnight, written with the following day's DoY... or the same
    # day's: accept either by comparing times of day and the day of the record's centre.
    centre = records["time"] + pd.Timedelta("15min")
    assert np.allclose(((end - pd.Timedelta("15min")) - centre).dt.total_seconds() % 86400, 0)
    return ref


@pytest.fixture(scope="module")
def mds(records: pd.DataFrame):
    t = records["time"]
    hour = (t.dt.hour + t.dt.minute / 60.0).to_numpy()
    return mds_gapfill(
        records["NEE"].to_numpy(),
        records["SW_IN"].to_numpy(),
        records["TA"].to_numpy(),
        records["VPD"].to_numpy(),
        hour,
        per_day=48,
    )


@pytest.fixture(scope="module")
def processed(records: pd.DataFrame):
    # hesseflux's reference: no spike or u* filtering, night-time partitioning on gap-filled NEE.
    return process_site(records, despike=False, ustar=None, daytime=False, ustar_uncertainty=False)


def test_mds_gap_records_match_hesseflux(records, reference, mds):
    gaps = records["NEE"].isna().to_numpy()
    assert gaps.sum() > 6000
    ours, ref = mds.filled[gaps], reference["NEE_f"].to_numpy()[gaps]
    assert np.isfinite(ours).all()
    r2 = np.corrcoef(ours, ref)[0, 1] ** 2
    maxdiff = np.max(np.abs(ours - ref))
    print(f"MDS gap records: n={gaps.sum()} R2={r2:.8f} max|diff|={maxdiff:.2e} umol m-2 s-1")
    assert r2 >= 0.99
    # The reference is written with 5 decimals; identical algorithms agree to that rounding.
    assert maxdiff < 1e-3


def test_mds_quality_classes_match_hesseflux(mds, reference):
    agree = np.mean(mds.qc == reference["NEE_fqc"].to_numpy())
    assert agree > 0.999


def test_annual_nee_within_one_percent(mds, reference):
    ours = np.sum(mds.filled) * GC
    ref = reference["NEE_f"].sum() * GC
    print(f"annual NEE: geoflux {ours:.1f}, hesseflux {ref:.1f} gC m-2")
    assert abs(ours - ref) <= 0.01 * abs(ref)


@pytest.mark.parametrize("flux", ["GPP", "RECO"])
def test_annual_partitioned_sums_within_five_percent(processed, reference, flux):
    ours = processed.records[f"{flux}_NT"].sum() * GC
    ref = reference[f"{flux}_NT"].sum() * GC
    print(f"annual {flux}: geoflux {ours:.1f}, hesseflux {ref:.1f} gC m-2 ({(ours / ref - 1):+.1%})")
    assert abs(ours - ref) <= 0.05 * abs(ref)


def test_nighttime_respiration_level_matches_hesseflux(processed, reference):
    # At night both implementations are anchored on the same night-time NEE, so RECO agrees closely there
    # (by day the reference's temperature response differs; see the bench/report notes).
    night = (processed.records["SW_IN_f"] <= 10).to_numpy()
    ours = processed.records["RECO_NT"].to_numpy()[night].sum()
    ref = reference["RECO_NT"].to_numpy()[night].sum()
    assert abs(ours / ref - 1) < 0.03


def test_ustar_threshold_close_to_hesseflux(records):
    text = (REALDATA / "PROVENANCE.md").read_text()
    flat = " ".join(text.split())
    m = re.search(r"u\* threshold found by its moving-point test is ([0-9.]+) m s-1", flat)
    if m is None:
        pytest.skip("PROVENANCE.md does not state hesseflux's u* threshold")
    ref = float(m.group(1))
    r = process_site(records, despike=False, daytime=False, ustar_uncertainty=False, ustar_boot=20)
    thr = r.ustar["threshold"]
    assert abs(thr - ref) <= 0.05
    lo, hi = float(r.ustar["percentiles"]["5"]), float(r.ustar["percentiles"]["95"])
    assert lo <= thr <= hi
    # Low-turbulence night records are rejected and then gap-filled.
    low = (r.records["NEE_status"] == "low_ustar").to_numpy()
    assert low.sum() > 100
    assert (r.records["NEE_fqc"].to_numpy()[low] > 0).all()
    assert (r.records["USTAR"].to_numpy()[low] < thr).all()


# ---- invariants that need no reference ---------------------------------------------------------------


def test_measured_records_never_changed(records, processed):
    out = processed.records
    meas = records["NEE"].notna().to_numpy()
    assert (out["NEE_fqc"].to_numpy()[meas] == 0).all()
    np.testing.assert_array_equal(out["NEE_f"].to_numpy()[meas], records["NEE"].to_numpy()[meas])
    assert (out["NEE_fqc"].to_numpy()[~meas] > 0).all()


def test_night_gpp_is_zero_on_average_and_daily_gpp_positive(processed):
    out = processed.records
    night = (out["SW_IN_f"] <= 10).to_numpy()
    gpp = out["GPP_NT"].to_numpy()
    day_mean = gpp[~night].mean()
    # Night GPP = RECO − NEE is noise around zero: its mean is small against the day-time mean.
    assert abs(gpp[night].mean()) < 0.1 * day_mean
    daily = out["GPP_NT"].groupby(out["time"].dt.floor("D")).mean()
    assert daily.mean() > 0
    assert (daily.rolling(7, center=True, min_periods=4).mean() > -0.5).all()


def test_reco_follows_fitted_temperature_response(processed):
    out = processed.records
    night = processed.night
    # The model itself: RECO is R_ref(t)·f(TA; E0) on every record.
    np.testing.assert_allclose(
        out["RECO_NT"], lloyd_taylor(out["TA_f"].to_numpy(), out["RREF_NT"].to_numpy(), night.e0), rtol=1e-12
    )
    # And the data: measured night-time NEE binned by temperature follows modelled RECO.
    sel = (out["NEE_fqc"] == 0) & (out["SW_IN_f"] <= 10)
    bins = np.floor(out.loc[sel, "TA_f"] / 2.0)
    obs = out.loc[sel, "NEE"].groupby(bins).median()
    mod = out.loc[sel, "RECO_NT"].groupby(bins).median()
    n = out.loc[sel, "NEE"].groupby(bins).size()
    keep = n >= 50
    assert np.corrcoef(obs[keep], mod[keep])[0, 1] > 0.9
    assert 30 <= night.e0 <= 450
