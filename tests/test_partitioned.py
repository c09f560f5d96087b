"""Partitioned learning (``model.target: partitioned``): towers partitioned per site and year, fluxes
aggregated with NEE, a two-headed model (NEE = RECO − GPP) that saves and loads like any other, and what it
is for: the response to warming that a single NEE model misses when drivers are collinear at the towers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from geoflux.config import ModelSpec
from geoflux.errors import ModelError
from geoflux.towers import aggregate
from geoflux.towers.processing.partition import T0_K, T_REF_K, partition_records
from geoflux.towers.read import TowerDataWarning


def _lloyd_taylor(ta: np.ndarray, rref: float, e0: float) -> np.ndarray:
    return rref * np.exp(e0 * (1.0 / (T_REF_K - T0_K) - 1.0 / (ta + 273.15 - T0_K)))


def _records(e0: dict[int, float], rref: float = 3.0, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Half-hourly records of one site over the given years: night NEE is Lloyd-Taylor respiration
    with a different E0 per year, day NEE subtracts a light-driven GPP. Returns records and true RECO."""
    rng = np.random.default_rng(seed)
    parts, truth = [], []
    for year, e in e0.items():
        t = pd.date_range(f"{year}-01-01", f"{year}-12-31 23:30", freq="30min")
        doy = t.dayofyear.to_numpy()
        hour = t.hour.to_numpy() + t.minute.to_numpy() / 60
        ta = 8 + 9 * np.sin(2 * np.pi * (doy - 110) / 365) + 5 * np.sin(2 * np.pi * (hour - 9) / 24)
        ta = ta + rng.normal(0, 1.5, len(t))
        sw = np.clip(600 * np.sin(np.pi * (hour - 6) / 12), 0, None) * (0.6 + 0.4 * np.sin(np.pi * doy / 365))
        reco = _lloyd_taylor(ta, rref, e)
        gpp = 0.02 * sw
        nee = reco - gpp + rng.normal(0, 0.3, len(t))
        qc = (rng.random(len(t)) < 0.3).astype(float)  # 30 % gap-filled: not used for the fit
        parts.append(pd.DataFrame({"site": "S1", "time": t, "NEE": nee, "NEE_QC": qc, "TA": ta, "SW_IN": sw}))
        truth.append(reco)
    records = pd.concat(parts, ignore_index=True)
    records["time_end"] = records["time"] + pd.Timedelta("30min")
    records.attrs["resolution"] = "HH"
    return records, np.concatenate(truth)


def test_partition_records_fits_each_year_on_its_own() -> None:
    records, reco = _records({2020: 180.0, 2021: 300.0})
    out = partition_records(records)
    year = out["time"].dt.year.to_numpy()
    for y in (2020, 2021):  # a single E0 over both years would be off in opposite directions
        sel = year == y
        assert abs(out["RECO"][sel].sum() / reco[sel].sum() - 1) < 0.05
    np.testing.assert_allclose(out["GPP"], out["RECO"] - out["NEE"])
    assert {"NEE", "TA", "SW_IN"} <= set(out.columns) and len(out) == len(records)
    shuffled = records.sample(frac=1.0, random_state=0)  # e.g. several files of one site, read unordered
    shuffled.attrs = records.attrs
    again = partition_records(shuffled).loc[records.index]
    np.testing.assert_allclose(again["RECO"], out["RECO"])


def test_partition_records_names_the_site_year_it_cannot_fit() -> None:
    records, _ = _records({2020: 200.0, 2021: 200.0})
    late = records["time"].dt.year == 2021
    records.loc[late, "SW_IN"] = 500.0  # no night at all in 2021
    with pytest.warns(TowerDataWarning, match="site S1 2021: not partitioned"):
        out = partition_records(records)
    assert out.loc[late, "RECO"].isna().all() and out.loc[~late, "RECO"].notna().all()
    daily = records.copy()
    daily.attrs["resolution"] = "DD"
    with pytest.raises(ValueError, match="half-hourly or hourly records"):
        partition_records(daily)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['SW_IN'\]"):
        partition_records(records.drop(columns="SW_IN"))


def test_tower_steps_leave_the_callers_records_as_they_were() -> None:
    """partition, QC filter and aggregation work on shallow copies (a three-year run's records are ~200 MB
    a copy): neither they nor a change to what they return may write into the records given."""
    from geoflux.towers import qc_filter
    from geoflux.towers.processing.partition import complete_partitioning

    records, _ = _records({2020: 200.0})
    records["TA_QC"] = np.where(np.arange(len(records)) % 7 == 0, 2.0, 0.0)
    before = records.copy(deep=True)
    part, n_files, n_here = complete_partitioning(records)
    assert (n_files, n_here) == (0, 1) and part["RECO"].notna().all()
    filtered = qc_filter(part, qc_max=0, met_qc_max=1)
    assert filtered["TA"].isna().sum() == (records["TA_QC"] > 1).sum() and part["TA"].notna().all()
    assert filtered["NEE"].isna().sum() == (records["NEE_QC"] > 0).sum()
    aggregate(filtered, pd.date_range("2020-01-01", "2020-12-31", freq="8D"), end="2021-01-01")
    part.loc[part.index[:10], "NEE"] = -99.0  # in place on the results
    filtered.loc[filtered.index[:10], "SW_IN"] = -99.0
    pd.testing.assert_frame_equal(records, before)
    assert (part["NEE"].iloc[10:] == before["NEE"].iloc[10:]).all()


def test_aggregate_sums_the_same_in_blocks_of_records(monkeypatch) -> None:
    """aggregate sums its per-record terms a block of records at a time; blocks that cut through sites and
    periods must give the sums of one pass."""
    import importlib

    from geoflux.towers import qc_filter
    from geoflux.towers.processing.partition import complete_partitioning

    agg_module = importlib.import_module("geoflux.towers.aggregate")  # the package's name is the function
    a, _ = _records({2020: 200.0})
    b, _ = _records({2020: 260.0}, seed=3)
    b["site"] = "S2"
    records = pd.concat([a, b.iloc[::-1]], ignore_index=True)  # one site in reverse time order
    records.attrs = dict(a.attrs)
    records = qc_filter(complete_partitioning(records)[0], qc_max=1)
    periods = pd.date_range("2020-01-01", "2020-12-31", freq="8D")
    whole = aggregate(records, periods, min_coverage=0.2, end="2021-01-01")
    monkeypatch.setattr(agg_module, "_BLOCK_RECORDS", 997)
    blocks = aggregate(records, periods, min_coverage=0.2, end="2021-01-01")
    pd.testing.assert_frame_equal(blocks, whole, check_exact=False, rtol=1e-12)
    assert (blocks["NEE_coverage"] == whole["NEE_coverage"]).all() and len(whole) == 2 * 46


def test_aggregated_fluxes_close_over_nee_records() -> None:
    records, _ = _records({2020: 200.0})
    out = partition_records(records)
    out.loc[out.index[1000:1400], "NEE"] = np.nan  # a rejected stretch: not in NEE, RECO or GPP
    periods = pd.date_range("2020-01-01", "2020-12-31", freq="8D")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TowerDataWarning)
        agg = aggregate(out, periods, min_coverage=0.5, end="2021-01-01")
    assert {"RECO", "GPP"} <= set(agg.columns)
    np.testing.assert_allclose(agg["GPP"], agg["RECO"] - agg["NEE"], atol=1e-9)  # gC m-2 d-1, as NEE
    assert agg["RECO"].gt(0).all() and agg["RECO"].median() < 10


def _table(n_sites: int = 6, n_steps: int = 40, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        for t in range(n_steps):
            ta, sw = rng.normal(12, 6), rng.uniform(50, 300)
            reco, gpp = 1.5 * 2 ** ((ta - 10) / 10), 0.02 * sw
            rows.append({"site": f"S{s}", "time": t, "ta": ta, "sw": sw, "RECO": reco, "NEE": reco - gpp})
    return pd.DataFrame(rows)


def test_partitioned_model_saves_and_loads(tmp_path) -> None:
    from geoflux.model import PartitionedRegressor, load_model, save_model, train

    table = _table()
    spec = ModelSpec(target="partitioned", training="averaged", cv_folds=3, params={"max_iter": 50})
    model, cv_pred, _ = train(table, ["ta", "sw"], {"ta": "degC", "sw": "W m-2"}, spec)
    assert isinstance(model.estimator, PartitionedRegressor)
    x = table[["ta", "sw"]].to_numpy(np.float32)
    np.testing.assert_allclose(
        model.predict(x), model.estimator.reco.predict(x) - model.estimator.gpp.predict(x)
    )
    path = save_model(model, tmp_path / "model.skops")
    back = load_model(path)
    assert isinstance(back.estimator, PartitionedRegressor) and back.provenance["target"] == "partitioned"
    np.testing.assert_array_equal(back.predict_bands(x), model.predict_bands(x))
    assert np.corrcoef(cv_pred["obs"], cv_pred["pred"])[0, 1] > 0.8


def test_partitioned_target_needs_reco() -> None:
    from geoflux.model import train

    spec = ModelSpec(target="partitioned", training="averaged", cv_folds=3)
    with pytest.raises(ModelError, match="no RECO column"):
        train(_table().drop(columns="RECO"), ["ta", "sw"], {}, spec)


def test_monotonic_signs_turn_for_the_gpp_head() -> None:
    from geoflux.model import _head_spec

    spec = ModelSpec(target="partitioned", monotonic={"sw": -1, "vpd": 1})
    assert _head_spec(spec, "gpp").monotonic == {"sw": 1, "vpd": -1}
    assert _head_spec(spec, "reco").monotonic == {} and _head_spec(spec, "gpp").target == "nee"


@pytest.fixture(scope="module")
def multiyear_fields():
    from geoflux.demo import WORLD_SIZES, generate_fields

    spec = WORLD_SIZES["tiny-multiyear"]
    return spec, generate_fields(spec)


def test_generated_tower_partitioned_against_the_generators_respiration(multiyear_fields, tmp_path) -> None:
    """A generated tower file (noise, gaps, gap-fill, diurnal cycles, three years) partitioned by geoflux:
    the 8-day RECO against the generator's own footprint-weighted RECO (a different code path)."""
    from geoflux.demo import place_towers, synthesize_tower, write_fluxnet_csv
    from geoflux.towers import qc_filter, read_tower_file

    spec, fields = multiyear_fields
    site = place_towers(spec, fields).iloc[2]
    df, truth = synthesize_tower(site, fields, spec, np.random.default_rng(3), footprints=False)
    path = tmp_path / f"FLX_{site.name}_FLUXNET2015_FULLSET_HH_2021-2023_1-4.csv"
    write_fluxnet_csv(df, path)
    records = partition_records(read_tower_file(path))
    agg = aggregate(qc_filter(records), spec.periods, min_coverage=0.5, end="2024-01-01")
    true_reco = pd.Series(truth["reco"], index=spec.periods).reindex(agg["time"]).to_numpy()
    est = agg["RECO"].to_numpy()
    assert np.corrcoef(est, true_reco)[0, 1] > 0.9
    assert abs(est.sum() / true_reco.sum() - 1) < 0.15  # the generator's 0.15 GPP share of RECO is not
    # night-time respiration, and its moisture limitation is not in a temperature-only fit


def test_two_heads_respond_to_warming_where_one_nee_model_does_not(multiyear_fields) -> None:
    """The generator's world (collinear drivers, three years), twelve tower pixels with their true fluxes:
    the +2 K change of the region's mean NEE (air and surface temperature +2 K, VPD at constant relative
    humidity) predicted by one NEE model and by RECO and GPP heads, against the generator's truth function
    under the same change. Averaged over three tower draws (one draw varies by about ±0.07)."""
    from geoflux.demo import _esat, true_fluxes

    spec, f = multiyear_fields
    nt, ny, nx = f.ta.shape
    lc = f.landcover

    def grid(ta, vpd, lst):
        cols = [f.sw, ta, vpd, f.sm, f.ndvi, lst, np.broadcast_to(f.elevation, ta.shape)]
        cols += [np.broadcast_to((lc == k).astype(np.float32), ta.shape) for k in (1, 2, 3, 4)]
        return np.stack([np.asarray(c, np.float32).ravel() for c in cols], 1)

    factor = _esat(f.ta + 2.0) / _esat(f.ta)
    x, x2 = grid(f.ta, f.vpd, f.lst), grid(f.ta + 2.0, f.vpd * factor, f.lst + 2.0)
    g2, r2 = true_fluxes(lc[None], f.sw, f.ta + 2.0, f.vpd * factor, f.sm, f.ndvi)
    w = np.broadcast_to(spec.period_days[:, None, None], f.ta.shape).ravel()
    true_change = np.average((r2 - g2).ravel() - f.nee.ravel(), weights=w)
    rng = np.random.default_rng(11)
    sample = rng.choice(len(x), 30_000, replace=False)  # the region's change, from a sample of pixel-steps
    x, x2, w = x[sample], x2[sample], w[sample]
    true_change_sample = np.average(((r2 - g2).ravel() - f.nee.ravel())[sample], weights=w)
    assert abs(true_change_sample / true_change - 1) < 0.03
    ratios: dict[str, list[float]] = {"nee": [], "partitioned": []}
    for _ in range(3):
        _warming_draw(rng, grid, f, ny, nx, nt, x, x2, w, true_change_sample, ratios)
    nee, part = np.mean(ratios["nee"]), np.mean(ratios["partitioned"])
    assert 0.75 <= part <= 1.25, ratios
    assert abs(part - 1) < abs(nee - 1), ratios


@threadpool_limits.wrap(limits=1, user_api="openmp")  # small fits: OpenMP threads only spin-wait
def _warming_draw(rng, grid, f, ny, nx, nt, x, x2, w, true_change, ratios) -> None:
    """One draw of twelve tower pixels: each model's +2 K change over its truth's, into ``ratios``."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from geoflux.model import BOOSTING_DEFAULTS, PartitionedRegressor

    def boost():
        return HistGradientBoostingRegressor(**BOOSTING_DEFAULTS, random_state=0)

    pix = rng.choice(ny * nx, 12, replace=False)
    rows = (np.arange(nt)[:, None] * ny * nx + pix[None]).ravel()
    xt = grid(f.ta, f.vpd, f.lst)[rows]
    one = boost().fit(xt, f.nee.ravel()[rows])
    two = PartitionedRegressor(boost(), boost()).fit(xt, np.c_[f.reco.ravel()[rows], f.gpp.ravel()[rows]])
    for name, est in (("nee", one), ("partitioned", two)):
        change = np.average(est.predict(x2) - est.predict(x), weights=w)
        ratios[name].append(change / true_change)


def test_report_says_what_the_model_learns() -> None:
    from types import SimpleNamespace

    from geoflux.report import _target_note

    two = _target_note(SimpleNamespace(card={"provenance": {"target": "partitioned"}}))
    one = _target_note(SimpleNamespace(card={"provenance": {"kind": "random_forest"}}))  # older card
    assert "RECO and GPP apart" in two and "not its split between drivers" in two
    assert "NEE alone" in one and "partitioned came much closer" in one


def _partitioned_config(root):
    from geoflux.config import dump_config, load_config

    cfg = load_config(root / "config.yaml")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"target": "partitioned"})})
    dump_config(cfg, root / "config.yaml")
    return load_config(root / "config.yaml")


def test_towers_stage_takes_the_files_partitioning_and_partitions_the_rest(tiny_world) -> None:
    """One tower file carries ONEFlux's night-time RECO/GPP (a constant here, to be recognised): the
    towers stage keeps it for that site and partitions the others itself."""
    from geoflux import pipeline
    from geoflux.towers import UMOL_TO_GC_PER_DAY

    files = sorted((tiny_world / "world" / "towers").glob("*.csv"))
    df = pd.read_csv(files[0])
    df["RECO_NT_VUT_REF"] = 2.5  # umol m-2 s-1
    df["GPP_NT_VUT_REF"] = 2.5 - df["NEE_VUT_REF"]
    df.to_csv(files[0], index=False)
    said: list[str] = []
    obs = pipeline.stage_towers(_partitioned_config(tiny_world), echo=said.append)
    first = files[0].name.split("_")[1]
    mine = obs.loc[obs["site"] == first, "RECO"]
    np.testing.assert_allclose(mine, 2.5 * UMOL_TO_GC_PER_DAY)
    others = obs.loc[obs["site"] != first]
    assert others["RECO"].notna().all() and others["RECO"].std() > 0.1  # partitioned: varies with TA
    n = obs["site"].nunique()
    line = f"partitioned fluxes: 1 site(s) from their files (ONEFlux night-time), {n - 1} partitioned here"
    assert any(x.startswith(line) for x in said), said
    np.testing.assert_allclose(obs["GPP"], obs["RECO"] - obs["NEE"], atol=1e-9)


def test_daily_files_without_partitioning_stop_the_towers_stage(tiny_world) -> None:
    from geoflux import pipeline
    from geoflux.errors import GeofluxError
    from geoflux.towers import UMOL_TO_GC_PER_DAY

    towers = tiny_world / "world" / "towers"
    sites = []
    for hh in sorted(towers.glob("*.csv")):  # every file daily: a run's files share one resolution
        df = pd.read_csv(hh, na_values=[-9999])
        day = (df["TIMESTAMP_START"] // 10000).astype(int)
        dd = df.groupby(day).agg({"NEE_VUT_REF": "mean", "TA_F": "mean", "SW_IN_F": "mean", "VPD_F": "mean"})
        dd["NEE_VUT_REF"] *= UMOL_TO_GC_PER_DAY
        dd["NEE_VUT_REF_QC"] = 1.0
        dd.index.name = "TIMESTAMP"
        dd.reset_index().to_csv(towers / hh.name.replace("_HH_", "_DD_"), index=False)
        hh.unlink()
        sites.append(hh.name.split("_")[1])
    named = rf"site\(s\) {sites[0]}, .*{sites[4]} and {len(sites) - 5} more have no RECO .*half-hourly"
    with pytest.raises(GeofluxError, match=named):
        pipeline.stage_towers(_partitioned_config(tiny_world))
    assert not (tiny_world / "towers").exists()  # nothing written
