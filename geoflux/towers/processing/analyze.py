"""The site-processing chain and its one public entry point :func:`analyze_site`.

``process_site`` (pure: frame in, frames out) runs checks → spike detection → u* threshold and filter → MDS
gap-filling → night-time and day-time partitioning → u*-percentile reruns for the budget uncertainty.
``analyze_site`` adds the dynamics tables and plots and writes them to a directory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError
from geoflux.towers.processing import dynamics as dyn
from geoflux.towers.processing.checks import check_records, site_name, warn
from geoflux.towers.processing.mds import MDSOptions, mds_gapfill
from geoflux.towers.processing.partition import (
    DayOptions,
    NightOptions,
    partition_daytime,
    partition_nighttime,
    q10_from_e0,
)
from geoflux.towers.processing.spikes import detect_spikes
from geoflux.towers.processing.ustar import UstarOptions, ustar_threshold


@dataclass(frozen=True)
class ProcessingOptions:
    """All options of the chain (flat, so they map one-to-one onto keyword arguments and CLI flags).

    Attributes
    ----------
    sw_dev, ta_dev, vpd_dev, longgap
        MDS tolerances (W m-2, degC, hPa) and longest gap filled (days); see :class:`MDSOptions`.
    despike : bool
        Reject spikes (Papale et al. 2006) before gap-filling.
    spike_z : float
        Spike threshold in robust standard deviations.
    ustar : "auto", float or None
        "auto": moving-point-test threshold; a number: that threshold (m s-1); None: no u* filtering.
    ustar_default : float or None, m s-1
        Fallback threshold when "auto" finds none (documented in the warnings); None raises instead.
    ustar_boot : int
        Bootstrap samples of the u* threshold.
    ustar_uncertainty : bool
        Rerun gap-filling and partitioning at the 5th and 95th percentile thresholds for the budget spread.
    train_on : {"measured", "filled"}
        Fit the respiration and light-response models on measured NEE only (default) or on gap-filled NEE
        with quality class ≤ ``fit_max_qc``.
    fit_max_qc : int
        Worst MDS quality class used for fitting when ``train_on="filled"``.
    daytime : bool
        Also run the day-time partitioning (Lasslop et al. 2010).
    day_sw : float, W m-2
        Day/night split for partitioning.
    rref_loss : {"l1", "l2"}
        Loss of the night-time respiration fits.
    max_missing : float
        Largest fraction of missing NEE per year.
    """

    sw_dev: float = 50.0
    ta_dev: float = 2.5
    vpd_dev: float = 5.0
    longgap: float = 60.0
    despike: bool = True
    spike_z: float = 7.0
    ustar: Any = "auto"
    ustar_default: float | None = None
    ustar_boot: int = 100
    ustar_uncertainty: bool = True
    train_on: str = "measured"
    fit_max_qc: int = 1
    daytime: bool = True
    day_sw: float = 10.0
    rref_loss: str = "l1"
    max_missing: float = 0.5

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ProcessingOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r} (expected one of {', '.join(sorted(names))})")
        opts = cls(**kwargs)
        if opts.train_on not in ("measured", "filled"):
            raise ValueError(f"train_on={opts.train_on!r} (expected 'measured' or 'filled')")
        if opts.rref_loss not in ("l1", "l2"):
            raise ValueError(f"rref_loss={opts.rref_loss!r} (expected 'l1' or 'l2')")
        return opts


@dataclass
class SiteResult:
    """Output of :func:`process_site`.

    Attributes
    ----------
    records : DataFrame
        One row per record: inputs, ``NEE_status`` (measured, missing, spike, low_ustar), ``NEE_f``,
        ``NEE_fqc`` (0 measured, 1–3 MDS quality, -1 unfilled), ``NEE_fsd``, ``NEE_fmethod``, gap-free drivers
        ``TA_f``/``SW_IN_f``/``VPD_f``, ``GPP_NT``, ``RECO_NT``, ``RREF_NT`` (and ``GPP_DT``, ``RECO_DT``).
    per_day : int
    site : str
    ustar : dict
    night : NightPartition
    day : DayPartition or None
    ustar_sums : DataFrame
        Annual sums at the u* percentile thresholds.
    warnings : list of str
    """

    records: pd.DataFrame
    per_day: int
    site: str
    ustar: dict
    night: Any
    day: Any
    ustar_sums: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def _hour(t: pd.Series) -> np.ndarray:
    return (t.dt.hour + t.dt.minute / 60.0).to_numpy(dtype=float)


def _fill_drivers(df: pd.DataFrame, per_day: int) -> dict[str, np.ndarray]:
    """Gap-free drivers for partitioning: MDS with radiation as the only similarity (REddyProc's choice for
    meteorology) for TA and VPD, the mean diurnal course for SW_IN."""
    hour = _hour(df["time"])
    zero = np.zeros(len(df))
    sw = df["SW_IN"].to_numpy(float)
    out = {"SW_IN_f": mds_gapfill(sw, sw, zero, zero, hour, per_day, error_for_measured=False).filled}
    for col in ("TA", "VPD"):
        v = df[col].to_numpy(float)
        res = mds_gapfill(v, sw, zero, zero, hour, per_day, error_for_measured=False)
        out[f"{col}_f"] = res.filled
    for k, v in out.items():
        if np.isnan(v).any():
            # Long driver gaps left by MDS: linear interpolation in time, then the nearest value at the edges.
            out[k] = pd.Series(v).interpolate(limit_direction="both").to_numpy()
    return out


def _gapfill_and_partition(
    df: pd.DataFrame,
    nee: np.ndarray,
    drv: dict[str, np.ndarray],
    per_day: int,
    o: ProcessingOptions,
    with_error: bool,
    daytime: bool,
) -> dict[str, Any]:
    mo = MDSOptions(sw_dev=o.sw_dev, ta_dev=o.ta_dev, vpd_dev=o.vpd_dev, longgap=o.longgap)
    hour = _hour(df["time"])
    res = mds_gapfill(
        nee,
        df["SW_IN"].to_numpy(float),
        df["TA"].to_numpy(float),
        df["VPD"].to_numpy(float),
        hour,
        per_day,
        mo,
        error_for_measured=with_error,
    )
    if o.train_on == "measured":
        fit = np.where(res.qc == 0, res.filled, np.nan)
    else:
        fit = np.where((res.qc >= 0) & (res.qc <= o.fit_max_qc), res.filled, np.nan)
    try:
        night = partition_nighttime(
            df["time"],
            res.filled,
            drv["TA_f"],
            drv["SW_IN_f"],
            nee_fit=fit,
            options=NightOptions(day_sw=o.day_sw, loss=o.rref_loss),
        )
    except ValueError as exc:
        raise TowerFormatError(
            f"site {site_name(df)}: column NEE: night-time partitioning failed: {exc}"
        ) from None
    day = None
    if daytime:
        try:
            day = partition_daytime(
                df["time"],
                fit,
                drv["TA_f"],
                drv["SW_IN_f"],
                drv["VPD_f"],
                night.e0,
                DayOptions(day_sw=o.day_sw),
            )
        except ValueError as exc:
            day = exc
    return {"mds": res, "night": night, "day": day}


def process_site(records: pd.DataFrame, **options: Any) -> SiteResult:
    """Run the site-processing chain on one site's half-hourly or hourly records.

    Parameters
    ----------
    records : DataFrame
        Tidy records of one site (``site``, ``time`` record start, ``NEE`` umol m-2 s-1, ``TA`` degC,
        ``SW_IN`` W m-2, ``VPD`` hPa, ``USTAR`` m s-1 for u* filtering; optional ``SWC``, ``P``), not
        gap-filled.
    **options
        Fields of :class:`ProcessingOptions`.

    Returns
    -------
    SiteResult

    Raises
    ------
    TowerFormatError
        Bad input (see :func:`geoflux.towers.processing.checks.check_records`) or no u* threshold without a
        fallback.
    """
    o = ProcessingOptions.from_kwargs(**options)
    msgs: list[str] = []
    df, per_day = check_records(records, max_missing=o.max_missing, msgs=msgs)
    site = site_name(df)
    nee_in = df["NEE"].to_numpy(float)
    sw = df["SW_IN"].to_numpy(float)
    status = np.where(np.isfinite(nee_in), "measured", "missing").astype(object)
    nee = nee_in.copy()

    if o.despike:
        is_day = np.nan_to_num(sw, nan=0.0) > o.day_sw
        spk = detect_spikes(nee, is_day, per_day, z=o.spike_z)
        status[spk] = "spike"
        nee[spk] = np.nan

    drv = _fill_drivers(df, per_day)
    ust: dict[str, Any] = {"method": "none", "threshold": None, "percentiles": {}, "seasonal": []}
    ustar_col = df["USTAR"].to_numpy(float) if "USTAR" in df.columns else None
    thresholds: dict[str, float] = {}
    if o.ustar is not None and o.ustar is not False:
        if ustar_col is None or not np.isfinite(ustar_col).any():
            warn(msgs, f"site {site}: column USTAR: missing; no u* filtering applied")
        elif o.ustar == "auto":
            u = ustar_threshold(
                df["time"],
                nee,
                df["TA"].to_numpy(float),
                ustar_col,
                sw,
                UstarOptions(night_sw=o.day_sw, n_boot=o.ustar_boot),
            )
            for m in u.warnings:
                warn(msgs, f"site {site}: column USTAR: {m}")
            thr = u.threshold
            ust.update(
                method="moving-point test",
                seasonal=u.seasonal.to_dict("records"),
                percentiles={str(k): v for k, v in u.percentiles.items()},
            )
            if not np.isfinite(thr):
                if o.ustar_default is None:
                    raise TowerFormatError(
                        f"site {site}: column USTAR: too few night-time records in every "
                        "season for a u* threshold (give ustar=<m s-1> or ustar_default)"
                    )
                thr = float(o.ustar_default)
                ust["method"] = "default"
                warn(msgs, f"site {site}: column USTAR: no u* threshold found; used the default {thr} m s-1")
            ust["threshold"] = float(thr)
            thresholds = {"median": float(thr)}
            if o.ustar_uncertainty and all(np.isfinite(u.percentiles[p]) for p in (5, 95)):
                thresholds.update({"U05": u.percentiles[5], "U95": u.percentiles[95]})
        else:
            ust.update(method="given", threshold=float(o.ustar))
            thresholds = {"median": float(o.ustar)}

    def apply_ustar(thr: float | None) -> np.ndarray:
        if thr is None or ustar_col is None:
            return np.zeros(len(df), dtype=bool)
        # Only night-time records are filtered: by day convective turbulence keeps the flux measurable.
        night = np.nan_to_num(drv["SW_IN_f"], nan=0.0) <= o.day_sw
        return night & np.isfinite(nee) & (np.nan_to_num(ustar_col, nan=np.inf) < thr)

    low = apply_ustar(thresholds.get("median"))
    status[low] = "low_ustar"
    nee_main = np.where(low, np.nan, nee)
    main = _gapfill_and_partition(df, nee_main, drv, per_day, o, with_error=True, daytime=o.daytime)
    res, night, day = main["mds"], main["night"], main["day"]
    for m in night.warnings:
        warn(msgs, f"site {site}: column NEE: {m}")

    out = df.copy()
    out["NEE_status"] = pd.Categorical(status, categories=["measured", "missing", "spike", "low_ustar"])
    out["NEE_f"] = res.filled
    out["NEE_fqc"] = res.qc
    out["NEE_fsd"] = res.sd
    out["NEE_fmethod"] = res.method
    for k, v in drv.items():
        out[k] = v
    out["GPP_NT"] = night.gpp
    out["RECO_NT"] = night.reco
    out["RREF_NT"] = night.rref
    if isinstance(day, Exception):
        warn(msgs, f"site {site}: column NEE: day-time partitioning skipped: {day}")
        day = None
    if day is not None:
        out["GPP_DT"] = day.gpp
        out["RECO_DT"] = day.reco
        for m in day.warnings:
            warn(msgs, f"site {site}: column NEE: {m}")
    if (res.qc < 0).any():
        warn(
            msgs,
            f"site {site}: column NEE: {(res.qc < 0).sum()} records left unfilled (gaps longer than "
            f"{o.longgap} days); annual sums of those years are incomplete",
        )

    # Budget spread over the u* threshold percentiles: rerun gap-filling and night-time partitioning.
    k = dyn.gc_per_record(per_day)
    rows = []
    year = out["time"].dt.year.to_numpy()
    for name, thr in thresholds.items():
        if name == "median":
            r_ = {"mds": res, "night": night}
        else:
            r_ = _gapfill_and_partition(
                df, np.where(apply_ustar(thr), np.nan, nee), drv, per_day, o, with_error=False, daytime=False
            )
        sums = (
            pd.DataFrame(
                {
                    "year": year,
                    "NEE": r_["mds"].filled * k,
                    "GPP": r_["night"].gpp * k,
                    "RECO": r_["night"].reco * k,
                }
            )
            .groupby("year")
            .sum(min_count=1)
            .reset_index()
        )
        sums.insert(0, "ustar_threshold", thr)
        sums.insert(0, "scenario", name)
        rows.append(sums)
    ustar_sums = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if len(thresholds) < 3:
        ustar_sums = ustar_sums.iloc[0:0]
    return SiteResult(
        records=out,
        per_day=per_day,
        site=site,
        ustar=ust,
        night=night,
        day=day,
        ustar_sums=ustar_sums,
        warnings=msgs,
    )


def _write_table(df: pd.DataFrame, path: Path, fmt: str) -> Path:
    """Write a table atomically (temporary name, then rename) as CSV or parquet."""
    target = path.with_suffix("." + fmt)
    tmp = target.with_name(target.name + ".part")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, target)
    return target


def _clean(v: Any) -> Any:
    """JSON-safe scalars: NaN → None, numpy → Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (pd.Timestamp,)):
        return v.isoformat()
    return v


def analyze_site(
    records: pd.DataFrame,
    out_dir: str | Path,
    *,
    table_format: str = "parquet",
    plots: bool = True,
    **options: Any,
) -> dict:
    """Process one site and write its dynamics tables and plots.

    Parameters
    ----------
    records : DataFrame
        Tidy half-hourly/hourly records of one site (see :func:`process_site`).
    out_dir : path
        Directory for the outputs (created; existing files of the same names are replaced).
    table_format : {"parquet", "csv"}
        Format of the tables. The small tables are always also written as CSV for a quick look.
    plots : bool
        Write the PNG plots.
    **options
        Fields of :class:`ProcessingOptions` (MDS tolerances ``sw_dev``/``ta_dev``/``vpd_dev``/``longgap``,
        ``ustar``, ``train_on``, …).

    Returns
    -------
    dict
        JSON-serialisable summary: ``site``, ``years``, ``budgets`` (list of per-year rows, gC m-2 yr-1),
        ``ustar_threshold`` (m s-1) and ``ustar_percentiles``, ``e0`` (K), ``e0_se``, ``q10``, ``rref_mean``
        (umol m-2 s-1), ``alpha_max``/``alpha_mean`` (umol J-1), ``gpp_sat_max`` (umol m-2 s-1),
        ``seasonal_amplitude`` (gC m-2 d-1), ``n_records``, ``fraction_measured``, ``warnings``, ``options``,
        ``files`` (written paths). The same summary is written to ``summary.json``.
    """
    if table_format not in ("parquet", "csv"):
        raise ValueError(f"table_format={table_format!r} (expected 'parquet' or 'csv')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = process_site(records, **options)
    o = ProcessingOptions.from_kwargs(**options)
    df, per_day = r.records, r.per_day

    daily = dyn.daily_sums(df, per_day)
    tables: dict[str, pd.DataFrame] = {
        "diurnal_by_month": dyn.diurnal_by_month(df),
        "daily": daily,
        "seasonal_cycle": dyn.seasonal_cycle(daily),
        "cumulative": dyn.cumulative(df, per_day),
        "budgets": dyn.annual_budgets(df, per_day, r.ustar_sums),
        "light_response": dyn.light_response_monthly(df, day_sw=o.day_sw),
        "vpd_limitation": dyn.vpd_limitation(df),
        "e0_windows": r.night.e0_windows,
        "rref_windows": r.night.rref_windows,
    }
    rref_mean = float(np.nanmean(r.night.rref))
    tparams, tbins = dyn.temperature_response(df, r.night.e0, r.night.e0_se, rref_mean, day_sw=o.day_sw)
    tables["temperature_response"] = tparams
    tables["temperature_bins"] = tbins
    if r.day is not None:
        tables["daytime_params"] = r.day.params
    if len(r.ustar_sums):
        tables["ustar_scenarios"] = r.ustar_sums
    if r.ustar.get("seasonal"):
        tables["ustar_seasons"] = pd.DataFrame(r.ustar["seasonal"])
    fp = dyn.fingerprint(df)
    fp_long = fp.stack(future_stack=True).rename("NEE_f").reset_index() if hasattr(fp, "stack") else fp

    files: list[str] = []
    files.append(
        str(
            _write_table(
                df.assign(NEE_status=df["NEE_status"].astype(str)), out_dir / "records", table_format
            )
        )
    )
    files.append(
        str(
            _write_table(
                dyn.driver_classes(df).astype(
                    {c: str for c in ("light", "temperature", "dryness", "moisture")}
                ),
                out_dir / "driver_classes",
                table_format,
            )
        )
    )
    files.append(str(_write_table(fp_long, out_dir / "fingerprint", table_format)))
    for name, t in tables.items():
        files.append(str(_write_table(t, out_dir / name, "csv")))

    lr = tables["light_response"]
    monthly_nee = tables["seasonal_cycle"]["NEE_f_mean"]
    summary = {
        "site": r.site,
        "years": sorted(int(y) for y in df["time"].dt.year.unique()),
        "n_records": len(df),
        "resolution": "HH" if per_day == 48 else "HR",
        "fraction_measured": float((df["NEE_fqc"] == 0).mean()),
        "status_counts": {k: int(v) for k, v in df["NEE_status"].value_counts().items()},
        "qc_counts": {str(k): int(v) for k, v in df["NEE_fqc"].value_counts().sort_index().items()},
        "budgets": tables["budgets"].to_dict("records"),
        "ustar_method": r.ustar["method"],
        "ustar_threshold": r.ustar["threshold"],
        "ustar_percentiles": r.ustar["percentiles"],
        "e0": r.night.e0,
        "e0_se": r.night.e0_se,
        "q10": q10_from_e0(r.night.e0),
        "rref_mean": rref_mean,
        "alpha_max": float(lr["alpha"].max()) if lr["alpha"].notna().any() else None,
        "alpha_mean": float(lr["alpha"].mean()) if lr["alpha"].notna().any() else None,
        "gpp_sat_max": float(lr["gpp_sat"].max()) if lr["gpp_sat"].notna().any() else None,
        "seasonal_amplitude": float(monthly_nee.max() - monthly_nee.min()),
        "warnings": r.warnings,
        "options": asdict(o) | {"table_format": table_format},
        "units": {
            "budgets": "gC m-2 yr-1",
            "ustar_threshold": "m s-1",
            "e0": "K",
            "rref_mean": "umol CO2 m-2 s-1 at 10 degC",
            "alpha": "umol CO2 J-1",
            "gpp_sat": "umol CO2 m-2 s-1",
            "seasonal_amplitude": "gC m-2 d-1",
            "fluxes in records": "umol CO2 m-2 s-1",
        },
    }
    if plots:
        from geoflux.towers.processing import plots as pl

        files.extend(str(p) for p in pl.site_plots(r, tables, fp, out_dir))
    summary["files"] = [*files, str(out_dir / "summary.json")]
    summary = _clean(summary)
    tmp = out_dir / "summary.json.part"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    return summary
