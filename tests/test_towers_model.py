"""`geoflux towers model` and geoflux.towers.features / modelling.

Expected values are computed here independently: potential radiation against FLUXNET's own SW_IN_POT
column (ONEFlux's computation, read with the csv module), observations and site climate from the raw
CSV bytes, scores with plain numpy.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.main import cli
from geoflux.errors import ModelError, TowerFormatError
from geoflux.model import load_model
from geoflux.towers import read_sites
from geoflux.towers.features import add_features, daily_potential, monthly_potential, season_terms
from geoflux.towers.modelling import expand_files, monthly_table, relevel, scores, site_flags

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "towers"
SITES = REAL / "FluxNET_sites.csv"
MONTHLY = sorted(REAL.glob("FLX_*_FLUXNET2015_SUBSET_MM_*.csv"))
real = pytest.mark.skipif(not SITES.is_file() or not MONTHLY, reason=f"shared real data not found at {REAL}")
# Four sites, two per ecosystem type, keep the end-to-end run to a few seconds.
SUBSET = ("CH-Dav", "DE-Hai", "FI-Hyy", "US-Ha1")


def _raw(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _subset_files() -> list[Path]:
    return [p for p in MONTHLY if p.name.split("_")[1] in SUBSET]


def _num(s: str) -> float:
    v = float(s)
    return np.nan if v == -9999 else v


# --------------------------------------------------------------------------------------------------
# Features.
def test_potential_radiation_equator_and_polar_night() -> None:
    # At the equator around the equinox the sun is up 12 h and the 24-h mean is S0/pi x (Earth-Sun term).
    rpot, dl = daily_potential(0.0, np.array([80]))
    assert dl[0] == pytest.approx(12.0, abs=0.05)
    assert rpot[0] == pytest.approx(1367.0 / np.pi, rel=0.02)
    rpot, dl = daily_potential(80.0, np.array([355]))  # December at 80 N: polar night
    assert rpot[0] == 0.0 and dl[0] == 0.0
    rpot, dl = daily_potential(80.0, np.array([172]))  # June at 80 N: polar day
    assert dl[0] == pytest.approx(24.0)


@real
def test_monthly_potential_matches_fluxnet_sw_in_pot() -> None:
    sites = read_sites(SITES)
    for path in MONTHLY:
        rows = _raw(path)
        site = path.name.split("_")[1]
        t = pd.to_datetime([r["TIMESTAMP"] for r in rows], format="%Y%m")
        pot = np.array([float(r["SW_IN_POT"]) for r in rows])
        mine, dl = monthly_potential(np.full(len(t), sites.loc[site, "LAT"]), pd.Series(t))
        # ONEFlux integrates half-hourly sun positions; a 24-h daily integral agrees to ~1 %
        assert np.all(np.abs(mine - pot) <= 0.012 * pot + 1.0), site
        assert np.all((dl >= 0) & (dl <= 24))


def test_season_terms_align_hemispheres() -> None:
    north = season_terms(np.array([45.0]), pd.Series(pd.to_datetime(["2001-07-01"])))
    south = season_terms(np.array([-45.0]), pd.Series(pd.to_datetime(["2001-01-01"])))
    # 182 days shift: southern January sits within ~1 day of northern July on the unit circle
    assert np.hypot(north[0] - south[0], north[1] - south[1])[0] < 2 * np.pi * 2 / 365
    jan_n = season_terms(np.array([45.0]), pd.Series(pd.to_datetime(["2001-01-01"])))
    assert np.hypot(jan_n[0] - south[0], jan_n[1] - south[1])[0] > 1.9  # opposite phase


def test_water_balance_lags_follow_calendar_months_not_rows() -> None:
    times = pd.to_datetime(["2001-01-01", "2001-02-01", "2001-03-01", "2001-04-01", "2001-07-01"])
    monthly = pd.DataFrame(
        {"site": "XX-Aaa", "time": times, "TA": 15.0, "SW_IN": 200.0, "VPD": 5.0, "P": [1.0, 2, 3, 4, 5]}
    )
    sites = pd.DataFrame({"LAT": [45.0], "IGBP": ["GRA"]}, index=pd.Index(["XX-Aaa"], name="SITE_ID"))
    df, _ = add_features(monthly, sites)
    # Priestley–Taylor by hand at 15 degC, 0.6 x 200 W m-2
    es = 0.6108 * np.exp(17.27 * 15 / 252.3)
    s = 4098 * es / 252.3**2
    pet = 1.26 * s / (s + 0.066) * 0.6 * 200 * 0.0864 / 2.45
    assert df["pet"].to_numpy() == pytest.approx(np.full(5, pet))
    wb0 = np.array([1.0, 2, 3, 4, 5]) - pet
    assert df["wb_0"].to_numpy() == pytest.approx(wb0)
    assert np.isnan(df["wb_1"].iloc[0])
    assert df["wb_1"].iloc[1] == pytest.approx(wb0[0])
    assert df["wb_3"].iloc[3] == pytest.approx(wb0[:3].mean())
    # July follows a gap (May, June missing): its antecedent months are unknown, not April's
    assert np.isnan(df["wb_1"].iloc[4]) and np.isnan(df["wb_3"].iloc[4])


def test_site_climate_falls_back_to_site_table_without_precipitation() -> None:
    times = pd.date_range("2001-01-01", periods=24, freq="MS")
    ta = np.tile(np.arange(12.0), 2)
    monthly = pd.DataFrame({"site": "XX-Aaa", "time": times, "TA": ta, "SW_IN": 150.0, "VPD": 4.0})
    sites = pd.DataFrame(
        {"LAT": [-30.0], "IGBP": ["SAV"], "MAT": [99.0], "MAP": [432.0]},
        index=pd.Index(["XX-Aaa"], name="SITE_ID"),
    )
    df, clim = add_features(monthly, sites)
    assert clim.loc["XX-Aaa", "MAT"] == pytest.approx(5.5)  # from the records, not the table's 99
    assert clim.loc["XX-Aaa", "TA_range"] == pytest.approx(11.0)
    assert clim.loc["XX-Aaa", "MAP"] == pytest.approx(432.0)  # no P column: the table's value
    assert "MAP from site table" in clim.loc["XX-Aaa", "climate_source"]
    assert df["wb_0"].isna().all()  # no P: water balance left missing, never invented


def test_missing_latitude_is_a_one_line_error() -> None:
    monthly = pd.DataFrame({"site": "XX-Aaa", "time": pd.to_datetime(["2001-01-01"]), "TA": 1.0})
    sites = pd.DataFrame({"LAT": [np.nan], "IGBP": ["GRA"]}, index=pd.Index(["XX-Aaa"], name="SITE_ID"))
    with pytest.raises(TowerFormatError, match=r"LAT: missing for site\(s\) \['XX-Aaa'\]"):
        add_features(monthly, sites)


# --------------------------------------------------------------------------------------------------
# Scores and flags.
def test_scores_against_numpy() -> None:
    rng = np.random.default_rng(1)
    obs = rng.normal(0, 2, 200)
    pred = 0.5 * obs + rng.normal(0.3, 1, 200)
    s = scores(obs, pred)
    assert s["nse"] == pytest.approx(1 - np.sum((pred - obs) ** 2) / np.sum((obs - obs.mean()) ** 2))
    assert s["r2_pearson"] == pytest.approx(np.corrcoef(obs, pred)[0, 1] ** 2)
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean((pred - obs) ** 2)))
    assert s["bias"] == pytest.approx(np.mean(pred - obs))
    assert "r2" not in s


def _five_site_climates(igbp: list[str]) -> pd.DataFrame:
    """Four temperate sites A-D and a hot, wet, low-range outlier E."""
    return pd.DataFrame(
        {
            "MAT": [8.0, 9.0, 7.5, 8.5, 26.0],
            "MAP": [800.0, 900.0, 750.0, 850.0, 1500.0],
            "AI": [1.2, 1.3, 1.1, 1.25, 0.6],
            "TA_range": [18.0, 19.0, 17.0, 18.5, 4.0],
            "IGBP": igbp,
        },
        index=pd.Index(["A", "B", "C", "D", "E"], name="site"),
    )


def test_site_flags_climate_outlier_and_lonely_type() -> None:
    clim = _five_site_climates(["DBF", "DBF", "ENF", "ENF", "DBF"])
    nse = pd.Series({"A": 0.6, "B": 0.5, "C": 0.4, "D": 0.7, "E": -2.0})
    f = site_flags(clim, nse, min_type_sites=2).set_index("site")
    assert bool(f.loc["E", "climate_flag"]) and not f.loc[["A", "B", "C", "D"], "climate_flag"].any()
    # C and D have one other ENF site among the training sites (< 2): flagged by type
    assert f.loc["C", "type_flag"] and f.loc["D", "type_flag"] and not f.loc["A", "type_flag"]
    assert f.loc["E", "nearest_site"] in {"A", "B", "C", "D"}
    assert f.attrs["summary"]["negative_nse_flagged"] == 1


def _inner_for(sites: dict[str, tuple[float, float, float]], n: int = 24) -> pd.DataFrame:
    """Inner held-out predictions for every (outer, inner) pair: site -> (obs amplitude, error
    amplitude, bias), obs = A sin, pred = obs + e cos + b (so NSE = 1 - (e²/2 + b²) / (A²/2))."""
    k = np.arange(n)
    rows = []
    for outer in sites:
        for site, (amp, err, bias) in sites.items():
            if site == outer:
                continue
            obs = amp * np.sin(2 * np.pi * k / 12)
            pred = obs + err * np.cos(2 * np.pi * k / 12) + bias
            rows.append(pd.DataFrame({"outer": outer, "site": site, "obs": obs, "pred": pred}))
    return pd.concat(rows, ignore_index=True)


def _same_climate(ids: list[str], types: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "MAT": 8 + rng.normal(0, 0.5, len(ids)),
            "MAP": 800 + rng.normal(0, 20, len(ids)),
            "AI": 1.2 + rng.normal(0, 0.02, len(ids)),
            "TA_range": 18 + rng.normal(0, 0.5, len(ids)),
            "IGBP": types,
        },
        index=pd.Index(ids, name="site"),
    )


def test_low_signal_flag_below_expected_error_and_not_well_above() -> None:
    # Three sites with a large seasonal amplitude (inner NSE > 0), two nearly flat ones (NSE < 0); the
    # model's error is the same everywhere (e cos, e = 1).
    amp = {"A": 3.0, "B": 3.5, "C": 2.5, "Q": 0.3, "Q2": 0.4}
    inner = _inner_for({s: (a, 1.0, 0.0) for s, a in amp.items()})
    ids = list(amp)
    clim = _same_climate(ids, ["DBF"] * 5)
    # Outer predictions from drivers: the same shape as the inner ones.
    t = np.arange(24)
    wave = {s: a * np.sin(2 * np.pi * t / 12) + np.cos(2 * np.pi * t / 12) for s, a in amp.items()}
    pred = pd.concat([pd.DataFrame({"site": s, "pred": wave[s]}) for s in ids])
    nse = pd.Series({"A": 0.8, "B": 0.8, "C": 0.7, "Q": -5.0, "Q2": -4.0})
    f = site_flags(clim, nse, pred=pred, inner=inner).set_index("site")
    assert f.loc[["Q", "Q2"], "low_signal_flag"].all()
    assert not f.loc[["A", "B", "C"], "low_signal_flag"].any()
    # Independent numbers: the pooled inner RMSE of e cos is 1/sqrt 2, a site's predicted std is
    # sqrt(a² + 1)/sqrt 2, so its ratio is sqrt(a² + 1). For outer Q the inner failure is Q2 and the
    # lowest success C: the threshold is halfway between their ratios.
    r = {s: np.sqrt(a**2 + 1) for s, a in amp.items()}
    assert f.loc["Q", "expected_rmse"] == pytest.approx(1 / np.sqrt(2))
    assert f.loc["Q", "signal_ratio"] == pytest.approx(r["Q"])
    assert f.loc["Q", "signal_threshold"] == pytest.approx((r["Q2"] + r["C"]) / 2)
    # Outer C: inner successes A, B, failures Q, Q2 -> halfway between Q2 and A; C is above it.
    assert f.loc["C", "signal_threshold"] == pytest.approx((r["Q2"] + r["A"]) / 2)
    # The flags never read the held-out site's NSE: changing it changes no flag.
    f2 = site_flags(clim, -nse, pred=pred, inner=inner).set_index("site")
    flag_cols = ["type_flag", "type_skill_flag", "low_signal_flag", "climate_flag", "flagged"]
    assert f2[flag_cols].equals(f[flag_cols])
    assert f.attrs["summary"]["negative_nse_flagged"] == 2
    assert f.attrs["summary"]["low_signal_flag_hits"] == "2/2 negative, 0/3 above 0.3"


def test_type_skill_flag_from_inner_nse_of_same_type_sites() -> None:
    # E1/E2 (ENF) are predicted badly when held out in the inner loop (bias), D1/D2 (DBF) well;
    # G (GRA) has no training site of its type.
    spec = {
        "E1": (1.0, 0.5, 1.5),
        "E2": (1.0, 0.5, -1.5),
        "D1": (3.0, 0.5, 0.0),
        "D2": (3.0, 0.5, 0.2),
        "G": (1.0, 0.5, 2.0),
    }
    inner = _inner_for(spec)
    ids = list(spec)
    clim = _same_climate(ids, ["ENF", "ENF", "DBF", "DBF", "GRA"])
    f = site_flags(clim, pd.Series(0.0, index=ids), inner=inner).set_index("site")
    # E1's same-type training site is E2: NSE = 1 - (0.125 + 2.25) / 0.5
    assert f.loc["E1", "type_inner_nse"] == pytest.approx(1 - (0.125 + 2.25) / 0.5, rel=1e-6)
    assert f.loc["D1", "type_inner_nse"] == pytest.approx(1 - (0.125 + 0.04) / 4.5, rel=1e-6)
    assert f.loc["E1", "type_skill_flag"] and f.loc["E2", "type_skill_flag"]
    assert not f.loc["D1", "type_skill_flag"] and not f.loc["D2", "type_skill_flag"]
    assert np.isnan(f.loc["G", "type_inner_nse"]) and f.loc["G", "type_flag"]
    assert f.loc[["E1", "E2", "G"], "flagged"].all()


def test_climate_threshold_is_largest_di_of_inner_successes() -> None:
    clim = _five_site_climates(["DBF"] * 5)
    # Every inner site predicted with skill except D.
    spec = {s: (3.0, 0.5, 0.0) for s in "ABCE"} | {"D": (1.0, 0.5, 2.0)}
    inner = _inner_for(spec)
    f = site_flags(clim, pd.Series(0.0, index=list("ABCDE")), inner=inner).set_index("site")
    no_inner = site_flags(clim, pd.Series(0.0, index=list("ABCDE"))).set_index("site")
    # Same DI either way. With the inner loop the threshold for outer A separates D (inner failure) from
    # B, C, E (successes): halfway between D's DI and the nearest success DI on the side of the
    # fewest errors (computed independently below); without it the max over all training sites.
    x = clim[["MAT", "MAP", "AI", "TA_range"]].to_numpy().copy()
    x[:, 1:3] = np.log(x[:, 1:3])
    tr = x[1:]
    z = (tr - tr.mean(axis=0)) / tr.std(axis=0)
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(axis=2))
    dbar = d[~np.eye(4, dtype=bool)].mean()
    np.fill_diagonal(d, np.inf)
    di_train = d.min(axis=1) / dbar  # B, C, D, E
    good = di_train[[0, 1, 3]]
    d_fail = di_train[2]
    # Flag above the threshold: with D above every success, halfway between the largest success and D;
    # otherwise a flagging threshold at or below D misclassifies a success, so the best keeps D inside.
    if d_fail > good.max():
        assert f.loc["A", "climate_threshold"] == pytest.approx((good.max() + d_fail) / 2)
    else:
        assert f.loc["A", "climate_threshold"] >= d_fail
    assert no_inner.loc["A", "climate_threshold"] == pytest.approx(di_train.max())
    assert f.loc["A", "climate_di"] == pytest.approx(no_inner.loc["A", "climate_di"])


def test_relevel_swaps_predicted_mean_for_training_sites_mean() -> None:
    pred = pd.DataFrame({"site": ["A", "A", "B", "B", "C"], "pred": [1.0, 3.0, -2.0, 0.0, 5.0]})
    site_mean = pd.Series({"A": -1.0, "B": 2.0, "C": 0.5, "D": 4.0})
    out = relevel(pred, site_mean)
    # A: pred - 2 + mean(B, C, D); B: pred + 1 + mean(A, C, D); C: 0 + mean(A, B, D)
    assert out == pytest.approx([-1 + 6.5 / 3, 1 + 6.5 / 3, -1 + 3.5 / 3, 1 + 3.5 / 3, 5.0 / 3])
    ex = relevel(pred, site_mean, exclude="D")
    assert ex[:2] == pytest.approx([-1 + 1.25, 1 + 1.25])


# --------------------------------------------------------------------------------------------------
# Real files.
@real
def test_monthly_table_matches_raw_csv_and_carbon_balance() -> None:
    sites = read_sites(SITES)
    path = next(p for p in MONTHLY if "_DE-Hai_" in p.name)
    table, used = monthly_table([path], sites)
    assert used == {"DE-Hai": f"{path.name} (MM)"}
    rows = _raw(path)
    assert len(table) == len(rows)
    nee = np.array([_num(r["NEE_VUT_REF"]) for r in rows])
    qc = np.array([_num(r["NEE_VUT_REF_QC"]) for r in rows])
    gpp = np.array([_num(r["GPP_NT_VUT_REF"]) for r in rows])
    assert table["NEE"].to_numpy() == pytest.approx(nee, nan_ok=True)
    assert table["qc"].to_numpy() == pytest.approx(qc, nan_ok=True)
    assert table["GPP"].to_numpy() == pytest.approx(gpp, nan_ok=True)
    # RECO_NT - GPP_NT is not NEE_VUT_REF exactly at MM (DE-Hai: median 0.047, 90th percentile 0.26,
    # max 1.1 gC m-2 d-1, computed from the raw columns): close, which is what the carbon-balance variant
    # relies on, but not an identity
    gap = (table["RECO"] - table["GPP"] - table["NEE"]).abs()
    assert gap.median() < 0.1 and gap.quantile(0.9) < 0.35


@real
def test_unknown_site_and_no_match_are_one_line_errors(tmp_path: Path) -> None:
    table = tmp_path / "sites.csv"
    table.write_text("SITE_ID,LAT,LON,IGBP\nXX-Aaa,1,2,GRA\n")
    with pytest.raises(
        TowerFormatError, match=r"_CH-Dav_.*: site CH-Dav has no row in the site table \(expected"
    ):
        monthly_table(_subset_files()[:1], read_sites(table))
    with pytest.raises(TowerFormatError, match=r"no tower files match"):
        expand_files([str(tmp_path / "nothing_*.csv")])


@real
def test_cli_towers_model_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = [str(p) for p in _subset_files()]
    args = ["towers", "model", *files, str(SITES), "--out", str(out), "--trees", "10"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "plain_forest" in res.output and "nested selection (honest)" in res.output
    for name in (
        "report.html",
        "cv_predictions.csv",
        "skill.json",
        "site_flags.csv",
        "annual.csv",
    ):
        assert (out / name).is_file(), name
    pred = pd.read_csv(out / "cv_predictions.csv", parse_dates=["time"])
    assert set(pred["site"]) == set(SUBSET)
    # every scored month is a raw-file month with NEE and QC fraction >= 0.8, with that NEE as obs
    for path in _subset_files():
        site = path.name.split("_")[1]
        raw = {
            pd.Timestamp(r["TIMESTAMP"][:4] + "-" + r["TIMESTAMP"][4:] + "-01"): _num(r["NEE_VUT_REF"])
            for r in _raw(path)
            if _num(r["NEE_VUT_REF_QC"]) >= 0.8 and not np.isnan(_num(r["NEE_VUT_REF"]))
        }
        got = pred[pred["site"] == site].set_index("time")["obs"]
        assert set(got.index) == set(raw)
        assert got.to_numpy() == pytest.approx(np.array([raw[t] for t in got.index]))
    # reported pooled and per-site scores equal a plain numpy computation from the CV predictions
    skill = json.loads((out / "skill.json").read_text())["skill"]
    for variant in ("plain_forest", "features+qc_weights@leaf5"):
        o, p = pred["obs"].to_numpy(), pred[f"pred_{variant}"].to_numpy()
        assert np.isfinite(p).all()
        nse = 1 - np.sum((p - o) ** 2) / np.sum((o - o.mean()) ** 2)
        assert skill[variant]["monthly"]["nse"] == pytest.approx(nse)
        per_site = [
            1 - np.sum((g[f"pred_{variant}"] - g["obs"]) ** 2) / np.sum((g["obs"] - g["obs"].mean()) ** 2)
            for _, g in pred.groupby("site")
        ]
        assert skill[variant]["monthly"]["nse_site_median"] == pytest.approx(np.median(per_site))
    flags = pd.read_csv(out / "site_flags.csv")
    assert set(flags["site"]) == set(SUBSET)
    assert not flags["type_flag"].any()  # each type has one other training site
    # the nested prediction of each site is the LOSO prediction of the candidate its inner loop chose
    summary = json.loads((out / "skill.json").read_text())
    chosen = summary["selection"]["chosen_per_outer_site"]
    assert set(chosen) == set(SUBSET)
    for site, cand in chosen.items():
        g = pred[pred["site"] == site]
        assert (g["chosen"] == cand).all()
        assert g["pred_auto"].to_numpy() == pytest.approx(g[f"pred_{cand}"].to_numpy())
        inner = summary["selection"]["inner_scores"][site]
        assert inner[cand] == max(inner.values())
    o, p = pred["obs"].to_numpy(), pred["pred_auto"].to_numpy()
    assert skill["auto"]["monthly"]["nse"] == pytest.approx(
        1 - np.sum((p - o) ** 2) / np.sum((o - o.mean()) ** 2)
    )
    # the report section: HTML with relative links to figures that exist, and its tables
    page = (out / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert links and all(not Path(x).is_absolute() and (out / x).is_file() for x in links)
    assert "gC m-2 yr-1" in page and "gC m-2 d-1" in page
    for name in ("site_year_budget.csv", "driver_importance.csv", "driver_dependence.csv"):
        assert len(pd.read_csv(out / name)) > 0, name
    # the saved model is the candidate ranked first over all sites (one NEE forest, or GPP and RECO)
    final = summary["selection"]["final"]
    ranking = summary["selection"]["final_ranking_loso"]
    assert ranking[final] == max(ranking.values())
    feats = pd.read_csv(out / "features.csv", parse_dates=["time"])
    if final.startswith("carbon_balance"):
        assert not (out / "model.skops").exists()
        gpp, reco = load_model(out / "model_gpp.skops"), load_model(out / "model_reco.skops")
        x = feats[gpp.features].to_numpy(np.float32)
        nee = reco.predict(x) - gpp.predict(x)
        model = gpp
    else:
        assert (out / "model.json").is_file() and not (out / "model_gpp.skops").exists()
        model = load_model(out / "model.skops")
        nee = model.predict(feats[model.features].to_numpy(np.float32))
    assert model.provenance["setup"] == final
    assert np.isfinite(nee).all() and -15 < nee.min() and nee.max() < 15  # gC m-2 d-1

    # a non-empty output folder is refused in one line; --overwrite replaces it
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0
    assert res.output.startswith(f"error: {out}: folder is not empty")
    res = CliRunner().invoke(cli, [*args, "--overwrite", "--setup", "carbon_balance"])
    assert res.exit_code == 0, res.output
    assert (out / "model_gpp.skops").is_file() and (out / "model_reco.skops").is_file()
    assert not (out / "model.skops").exists()  # no model of the previous run next to this run's skill
    assert load_model(out / "model_gpp.skops").provenance["setup"] == "carbon_balance"


@real
def test_cli_bad_resolution_is_one_line_error(tmp_path: Path) -> None:
    files = [str(p) for p in _subset_files()[:3]]
    res = CliRunner().invoke(
        cli, ["towers", "model", *files, str(SITES), "--out", str(tmp_path / "o"), "--resolution", "DD"]
    )
    assert res.exit_code == 1
    assert res.output == "error: --resolution: DD (expected MM; other time steps are not supported yet)\n"


def test_too_few_sites_is_a_model_error(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    if not MONTHLY:
        pytest.skip("shared real data not found")
    from geoflux.towers.modelling import model_towers

    with pytest.raises(ModelError, match=r"only 2 site\(s\)"):
        model_towers(_subset_files()[:2], read_sites(SITES), trees=5)


# --------------------------------------------------------------------------------------------------
# Nested selection.
def _synthetic_labelled(n_sites: int = 4, n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n_sites):
        x1, x2 = rng.normal(size=n), rng.normal(size=n)
        nee = 2 * x1 - x2**2 + 0.5 * k + rng.normal(0, 0.3, n)
        qc = rng.choice([0.3, 0.9, 1.0], n)
        parts.append(pd.DataFrame({"site": f"S{k}", "x1": x1, "x2": x2, "NEE": nee, "qc": qc}))
    return pd.concat(parts, ignore_index=True)


def _naive_nested(df: pd.DataFrame, cands: list, trees: int, min_qc: float) -> pd.DataFrame:
    """The textbook nested loop with scikit-learn directly: for each outer site, each candidate, each
    inner site, a forest on the remaining sites; pooled NSE of the inner held-out scored months."""
    from sklearn.ensemble import RandomForestRegressor

    sites = sorted(df["site"].unique())
    out = {}
    for outer in sites:
        row = {}
        for cand in cands:
            obs, pred = [], []
            for inner in (s for s in sites if s != outer):
                tr = df[~df["site"].isin([outer, inner]) & df["NEE"].notna()]
                weighted = cand.variant.endswith("+qc_weights")
                tr = tr[tr["qc"] > 0] if weighted else tr[tr["qc"] >= min_qc]
                rf = RandomForestRegressor(n_estimators=trees, random_state=0, **cand.params)
                rf.fit(
                    tr[["x1", "x2"]].to_numpy(np.float32),
                    tr["NEE"].to_numpy(),
                    sample_weight=tr["qc"].to_numpy() if weighted else None,
                )
                te = df[(df["site"] == inner) & (df["qc"] >= min_qc)]
                obs.append(te["NEE"].to_numpy())
                pred.append(rf.predict(te[["x1", "x2"]].to_numpy(np.float32)))
            o, p = np.concatenate(obs), np.concatenate(pred)
            row[cand.name] = 1 - np.sum((p - o) ** 2) / np.sum((o - o.mean()) ** 2)
        out[outer] = row
    return pd.DataFrame.from_dict(out, orient="index")


def test_nested_selection_equals_naive_loop_and_never_sees_the_outer_site() -> None:
    from geoflux.config import ModelSpec
    from geoflux.towers.modelling import _Run, nested_selection

    df = _synthetic_labelled()
    cands = [
        _Run("features+qc_weights@sklearn", "features+qc_weights", {}),
        _Run("features@leaf5", "features", {"min_samples_leaf": 5, "max_features": 0.5}),
    ]
    spec = ModelSpec(kind="random_forest", seed=0, params={"n_estimators": 8})
    scored = (df["qc"] >= 0.8).to_numpy()
    chosen, inner, held = nested_selection(df, scored, cands, ["x1", "x2"], spec, 0.8)
    naive = _naive_nested(df, cands, 8, 0.8)
    assert inner.to_numpy() == pytest.approx(naive.loc[inner.index, inner.columns].to_numpy())
    assert chosen == naive.idxmax(axis=1).to_dict()
    # Rewriting the outer site's NEE changes nothing about its own choice or inner scores.
    changed = df.copy()
    changed.loc[changed["site"] == "S0", "NEE"] *= -5.0
    chosen2, inner2, held2 = nested_selection(changed, scored, cands, ["x1", "x2"], spec, 0.8)
    assert chosen2["S0"] == chosen["S0"]
    assert inner2.loc["S0"].to_numpy() == pytest.approx(inner.loc["S0"].to_numpy())
    assert not np.allclose(inner2.loc["S1"].to_numpy(), inner.loc["S1"].to_numpy())
    # The inner held-out predictions (what the flags are calibrated on) never include the outer site,
    # and are identical when only the outer site's NEE changes.
    assert not (held["site"] == held["outer"]).any()
    a, b = held[held["outer"] == "S0"], held2[held2["outer"] == "S0"]
    assert a["pred"].to_numpy() == pytest.approx(b["pred"].to_numpy())
    assert set(held["candidate"]) == {c.name for c in cands}


# --------------------------------------------------------------------------------------------------
# Report tables.
@real
def test_site_year_budget_matches_raw_csv() -> None:
    from geoflux.towers.report import site_year_budget

    path = next(p for p in MONTHLY if "_DE-Hai_" in p.name)
    table, _ = monthly_table([path], read_sites(SITES))
    got = site_year_budget(table).set_index("year")
    rows = _raw(path)
    by_year: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_year.setdefault(int(r["TIMESTAMP"][:4]), []).append(r)
    assert set(got.index) == {y for y, rs in by_year.items() if len(rs) == 12}
    annual = {}
    for y, rs in by_year.items():
        days = np.array([pd.Period(r["TIMESTAMP"], "M").days_in_month for r in rs], dtype=float)
        nee = np.array([_num(r["NEE_VUT_REF"]) for r in rs])
        unc = np.array([_num(r["NEE_VUT_REF_RANDUNC"]) for r in rs])
        iqr = np.array([_num(r["NEE_VUT_75"]) - _num(r["NEE_VUT_25"]) for r in rs])
        qc = np.array([_num(r["NEE_VUT_REF_QC"]) for r in rs])
        annual[y] = np.sum(nee * days)
        assert got.loc[y, "nee_gC_m2_yr"] == pytest.approx(annual[y])
        assert got.loc[y, "unc_random_gC_m2_yr"] == pytest.approx(np.sqrt(np.sum((unc * days) ** 2)))
        assert got.loc[y, "unc_ustar_gC_m2_yr"] == pytest.approx(abs(np.sum(iqr * days)) / 1.349)
        assert got.loc[y, "gapfilled_share"] == pytest.approx(1 - np.sum(qc * days) / days.sum())
    mean = np.mean(list(annual.values()))
    assert got["anomaly_gC_m2_yr"].to_numpy() == pytest.approx(
        np.array([annual[y] - mean for y in got.index])
    )


# --------------------------------------------------------------------------------------------------
# DD / HH fallback: sites without a monthly file are aggregated to calendar months.
def _write_csv(path: Path, cols: dict[str, np.ndarray | list]) -> Path:
    frame = pd.DataFrame(cols)
    frame.fillna(-9999).to_csv(path, index=False)
    return path


def test_daily_and_half_hourly_files_are_aggregated_to_months(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    sites_csv = tmp_path / "sites.csv"
    sites_csv.write_text("SITE_ID,LAT,LON,IGBP\nXX-Day,46,8,DBF\nXX-Hhr,-20,130,SAV\n")
    # Daily FLUXNET2015 file, Jan-Mar 2001: NEE gC m-2 d-1, QC fraction, P mm d-1; a few NEE gaps.
    days = pd.date_range("2001-01-01", "2001-03-31", freq="D")
    dd = pd.DataFrame(
        {
            "NEE_VUT_REF": rng.normal(1, 2, len(days)),
            "NEE_VUT_REF_QC": rng.uniform(0.2, 1.0, len(days)).round(3),
            "TA_F": rng.normal(5, 3, len(days)),
            "SW_IN_F": rng.uniform(20, 200, len(days)),
            "VPD_F": rng.uniform(0, 10, len(days)),
            "P_F": rng.exponential(2, len(days)),
        },
        index=days,
    )
    dd.iloc[[3, 40, 41, 70], 0] = np.nan
    dd_path = _write_csv(
        tmp_path / "FLX_XX-Day_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv",
        {"TIMESTAMP": days.strftime("%Y%m%d"), **{c: dd[c].to_numpy() for c in dd}},
    )
    # Half-hourly file, Jan-Feb 2001: NEE umol m-2 s-1 with QC flags 0-3, P mm per half-hour.
    start = pd.date_range("2001-01-01", "2001-02-28 23:30", freq="30min")
    hh = pd.DataFrame(
        {
            "NEE_VUT_REF": rng.normal(-1, 5, len(start)),
            "NEE_VUT_REF_QC": rng.choice([0, 1, 2, 3], len(start), p=[0.5, 0.2, 0.2, 0.1]),
            "TA_F": rng.normal(25, 4, len(start)),
            "SW_IN_F": rng.uniform(0, 900, len(start)),
            "VPD_F": rng.uniform(0, 30, len(start)),
            "P_F": rng.exponential(0.05, len(start)),
        },
        index=start,
    )
    hh_path = _write_csv(
        tmp_path / "FLX_XX-Hhr_FLUXNET2015_FULLSET_HH_2001-2001_1-4.csv",
        {
            "TIMESTAMP_START": start.strftime("%Y%m%d%H%M"),
            "TIMESTAMP_END": (start + pd.Timedelta("30min")).strftime("%Y%m%d%H%M"),
            **{c: hh[c].to_numpy() for c in hh},
        },
    )
    table, used = monthly_table([dd_path, hh_path], read_sites(sites_csv))
    assert used == {"XX-Day": f"{dd_path.name} (DD)", "XX-Hhr": f"{hh_path.name} (HH)"}

    # Daily → months with pandas: mean of the days with NEE; QC = sum of their QC fractions over the
    # days of the month; meteorology monthly means (P already mm d-1).
    g = dd.groupby(dd.index.to_period("M"))
    exp = pd.DataFrame(
        {
            "NEE": g["NEE_VUT_REF"].mean(),
            "qc": g.apply(lambda m: m.loc[m["NEE_VUT_REF"].notna(), "NEE_VUT_REF_QC"].sum() / len(m)),
            "TA": g["TA_F"].mean(),
            "SW_IN": g["SW_IN_F"].mean(),
            "VPD": g["VPD_F"].mean(),
            "P": g["P_F"].mean(),
        }
    )
    got = table[table["site"] == "XX-Day"].set_index("time")
    assert list(got.index) == list(exp.index.to_timestamp())
    for col in exp:
        assert got[col].to_numpy() == pytest.approx(exp[col].to_numpy()), col

    # Half-hourly → months: NEE of the QC 0/1 half-hours in gC m-2 d-1 (x 12.011e-6 x 86400), QC = their
    # share of the month's half-hours, P = mm summed over the month / days.
    ok = hh["NEE_VUT_REF_QC"] <= 1
    g = hh.groupby(hh.index.to_period("M"))
    exp = pd.DataFrame(
        {
            "NEE": hh["NEE_VUT_REF"].where(ok).groupby(hh.index.to_period("M")).mean() * 12.011e-6 * 86400,
            "qc": ok.groupby(hh.index.to_period("M")).sum() / g.size(),
            "TA": g["TA_F"].mean(),
            "VPD": g["VPD_F"].mean(),
            "P": g["P_F"].sum() / (g.size() / 48),
        }
    )
    got = table[table["site"] == "XX-Hhr"].set_index("time")
    assert list(got.index) == list(exp.index.to_timestamp())
    for col in exp:
        assert got[col].to_numpy() == pytest.approx(exp[col].to_numpy()), col


@real
def test_monthly_file_wins_over_daily_for_the_same_site(tmp_path: Path) -> None:
    mm = next(p for p in MONTHLY if "_DE-Hai_" in p.name)
    dd = _write_csv(
        tmp_path / "FLX_DE-Hai_FLUXNET2015_FULLSET_DD_2001-2001_1-4.csv",
        {"TIMESTAMP": ["20010101", "20010102"], "NEE_VUT_REF": [9.0, 9.0], "NEE_VUT_REF_QC": [1.0, 1.0]},
    )
    table, used = monthly_table([dd, mm], read_sites(SITES))
    assert used == {"DE-Hai": f"{mm.name} (MM)"}
    assert len(table) == len(_raw(mm))
