"""Site-level carbon dynamics as tables: cycles, fingerprint, budgets, light and temperature responses,
VPD limitation, per-record driver classes and the across-site comparison.

All functions take the processed record table of :func:`geoflux.towers.processing.process_site` (columns
``time``, ``NEE`` measured, ``NEE_f``, ``NEE_fqc``, ``NEE_fsd``, ``GPP_NT``, ``RECO_NT``, optional ``GPP_DT``,
``RECO_DT``, gap-free drivers ``TA_f``, ``SW_IN_f``, ``VPD_f``) and return plain DataFrames.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

# umol CO2 m-2 s-1 → gC m-2 per second (molar mass of carbon 12.011 g mol-1).
UMOL_TO_GC = 12.011e-6


def gc_per_record(per_day: int) -> float:
    """Conversion factor umol CO2 m-2 s-1 → gC m-2 per record.

    Parameters
    ----------
    per_day : int
        Records per day.

    Returns
    -------
    float, gC m-2 per (umol m-2 s-1) per record
    """
    return UMOL_TO_GC * 86400.0 / per_day


def _flux_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in ("NEE_f", "GPP_NT", "RECO_NT", "GPP_DT", "RECO_DT") if c in df.columns]


def diurnal_by_month(df: pd.DataFrame) -> pd.DataFrame:
    """Mean diurnal cycle per month.

    Returns
    -------
    DataFrame
        ``month``, ``hour`` (h, record start), mean ``NEE_f``, ``GPP_*``, ``RECO_*`` (umol m-2 s-1), the
        mean of measured NEE only ``NEE_meas`` and its count ``n_meas``.
    """
    t = df["time"]
    g = df.assign(month=t.dt.month, hour=t.dt.hour + t.dt.minute / 60.0).groupby(["month", "hour"])
    out = g[_flux_cols(df)].mean()
    meas = df["NEE"].where(df["NEE_fqc"] == 0)
    out["NEE_meas"] = meas.groupby([t.dt.month, t.dt.hour + t.dt.minute / 60.0]).mean().to_numpy()
    out["n_meas"] = meas.groupby([t.dt.month, t.dt.hour + t.dt.minute / 60.0]).count().to_numpy()
    return out.reset_index()


def daily_sums(df: pd.DataFrame, per_day: int) -> pd.DataFrame:
    """Daily sums in gC m-2 d-1, the fraction of measured NEE records (``frac_meas``) and mean TA (degC)."""
    k = gc_per_record(per_day)
    day = df["time"].dt.floor("D")
    out = (df[_flux_cols(df)] * k).groupby(day).sum(min_count=1)
    out["frac_meas"] = (df["NEE_fqc"] == 0).groupby(day).mean()
    out["TA"] = df["TA_f"].groupby(day).mean()
    out["SW_IN"] = df["SW_IN_f"].groupby(day).mean()
    return out.rename_axis("date").reset_index()


def seasonal_cycle(daily: pd.DataFrame) -> pd.DataFrame:
    """Mean seasonal cycle: monthly mean of daily sums (gC m-2 d-1) over all years, with their sd."""
    cols = [c for c in _flux_cols(daily) if c in daily.columns]
    m = daily["date"].dt.month
    mean = daily[cols].groupby(m).mean().add_suffix("_mean")
    sd = daily[cols].groupby(m).std().add_suffix("_sd")
    return pd.concat([mean, sd], axis=1).rename_axis("month").reset_index()


def fingerprint(df: pd.DataFrame, column: str = "NEE_f") -> pd.DataFrame:
    """Day of year × time of day matrix of one flux (REddyProc's fingerprint), umol m-2 s-1.

    Rows are ``year``/``doy``, columns the time of day in hours (record start).
    """
    t = df["time"]
    tab = df.assign(year=t.dt.year, doy=t.dt.day_of_year, hour=t.dt.hour + t.dt.minute / 60.0)
    return tab.pivot_table(index=["year", "doy"], columns="hour", values=column, aggfunc="mean", dropna=False)


def cumulative(df: pd.DataFrame, per_day: int) -> pd.DataFrame:
    """Cumulative NEE, GPP and RECO per calendar year, gC m-2 since 1 January."""
    k = gc_per_record(per_day)
    cols = _flux_cols(df)
    out = (df[cols] * k).groupby(df["time"].dt.year).cumsum()
    out.insert(0, "time", df["time"])
    out.insert(1, "year", df["time"].dt.year)
    return out


def annual_budgets(df: pd.DataFrame, per_day: int, ustar_sums: pd.DataFrame | None = None) -> pd.DataFrame:
    """Annual NEE, GPP and RECO in gC m-2 yr-1 with uncertainty.

    The random error of the annual NEE is ``sqrt(Σ sd²)`` of the half-hourly MDS random-error estimates
    (records assumed independent, a lower bound). The u* uncertainty is half the range of the sums over the
    5th–95th percentile u* thresholds (``ustar_sums``: one row per percentile and year); the total combines
    both in quadrature.

    Returns
    -------
    DataFrame
        One row per year: ``NEE``, ``GPP_NT``, ``RECO_NT`` (``GPP_DT``, ``RECO_DT``), ``NEE_random``,
        ``NEE_ustar``, ``GPP_ustar``, ``RECO_ustar``, ``NEE_unc`` (gC m-2 yr-1), coverage fractions
        ``frac_meas`` and ``frac_filled_q1``.
    """
    k = gc_per_record(per_day)
    year = df["time"].dt.year
    cols = _flux_cols(df)
    out = (df[cols] * k).groupby(year).sum(min_count=1).rename(columns={"NEE_f": "NEE"})
    sd = df["NEE_fsd"]
    out["NEE_random"] = np.sqrt(((sd * k) ** 2).groupby(year).sum())
    for c in ("NEE", "GPP", "RECO"):
        out[f"{c}_ustar"] = np.nan
    if ustar_sums is not None and len(ustar_sums):
        spread = ustar_sums.groupby("year")[["NEE", "GPP", "RECO"]].agg(lambda s: (s.max() - s.min()) / 2)
        for c in ("NEE", "GPP", "RECO"):
            out[f"{c}_ustar"] = spread[c]
    out["NEE_unc"] = np.sqrt(out["NEE_random"] ** 2 + out["NEE_ustar"].fillna(0.0) ** 2)
    out["frac_meas"] = (df["NEE_fqc"] == 0).groupby(year).mean()
    out["frac_filled_q1"] = (df["NEE_fqc"] == 1).groupby(year).mean()
    out["n_records"] = year.groupby(year).size()
    return out.rename_axis("year").reset_index()


def _fit_hyperbola(sw: np.ndarray, nee: np.ndarray) -> tuple[float, float, float, float]:
    """Rectangular hyperbola NEE = −αβ·SW/(α·SW + β) + γ; returns α, β, γ and R²."""
    b0 = max(float(np.percentile(nee, 97) - np.percentile(nee, 3)), 1.0)

    def resid(p: np.ndarray) -> np.ndarray:
        return -p[0] * p[1] * sw / (p[0] * sw + p[1]) + p[2] - nee

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = least_squares(
            resid, [0.02, b0, 2.0], bounds=([1e-6, 0.1, -20.0], [0.5, 200.0, 30.0]), x_scale=[0.01, 10.0, 1.0]
        )
    ss = float(((nee - nee.mean()) ** 2).sum())
    r2 = 1.0 - float((r.fun**2).sum()) / ss if ss > 0 else np.nan
    return float(r.x[0]), float(r.x[1]), float(r.x[2]), r2


def light_response_monthly(df: pd.DataFrame, day_sw: float = 10.0, min_records: int = 50) -> pd.DataFrame:
    """Monthly light-response parameters from measured day-time NEE (rectangular hyperbola).

    Returns
    -------
    DataFrame
        ``year``, ``month``, ``n``, ``alpha`` (quantum efficiency, umol CO2 J-1), ``gpp_sat`` (GPP at light
        saturation β, umol m-2 s-1), ``resp_day`` (day-time respiration γ, umol m-2 s-1), ``gpp_2000`` (GPP
        at SW_IN = 1000 W m-2, umol m-2 s-1), ``nse`` (1 − SSE/SST of the fit).
    """
    meas = (df["NEE_fqc"] == 0) & (df["SW_IN"] > day_sw) & df["SW_IN"].notna()
    rows = []
    for (y, m), g in df[meas].groupby([df["time"].dt.year, df["time"].dt.month]):
        if len(g) < min_records:
            rows.append((y, m, len(g), np.nan, np.nan, np.nan, np.nan, np.nan))
            continue
        sw, nee = g["SW_IN"].to_numpy(), g["NEE"].to_numpy()
        a, b, c, r2 = _fit_hyperbola(sw, nee)
        rows.append((y, m, len(g), a, b, c, a * b * 1000.0 / (a * 1000.0 + b), r2))
    return pd.DataFrame(
        rows, columns=["year", "month", "n", "alpha", "gpp_sat", "resp_day", "gpp_1000", "nse"]
    )


def temperature_response(
    df: pd.DataFrame, e0: float, e0_se: float, rref_mean: float, day_sw: float = 10.0, bin_width: float = 2.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Temperature sensitivity of night-time NEE.

    Returns
    -------
    params : DataFrame
        One row: ``e0`` (K), ``e0_se`` (K), ``rref_mean`` (umol m-2 s-1 at 10 degC, mean of the interpolated
        R_ref), ``q10`` (between 5 and 15 degC), ``q10_20`` (between 15 and 25 degC).
    bins : DataFrame
        Measured night NEE binned by TA: ``ta`` (bin centre, degC), ``nee_mean``, ``nee_median``, ``nee_sd``
        (umol m-2 s-1), ``n``, and the fitted ``reco_model`` at the bin centre.
    """
    from geoflux.towers.processing.partition import lloyd_taylor, q10_from_e0

    params = pd.DataFrame(
        [
            {
                "e0": e0,
                "e0_se": e0_se,
                "rref_mean": rref_mean,
                "q10": q10_from_e0(e0, 10.0),
                "q10_20": q10_from_e0(e0, 20.0),
            }
        ]
    )
    night = (df["NEE_fqc"] == 0) & (df["SW_IN_f"] <= day_sw)
    ta = df.loc[night, "TA_f"]
    b = (np.floor(ta / bin_width) * bin_width + bin_width / 2).rename("ta")
    g = df.loc[night, "NEE"].groupby(b)
    bins = pd.DataFrame({"nee_mean": g.mean(), "nee_median": g.median(), "nee_sd": g.std(), "n": g.size()})
    bins = bins.reset_index()
    bins["reco_model"] = lloyd_taylor(bins["ta"].to_numpy(), rref_mean, e0)
    return params, bins


VPD_BINS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, np.inf)


def vpd_limitation(df: pd.DataFrame, sw_min: float = 500.0, ta_min: float = 5.0) -> pd.DataFrame:
    """VPD limitation of day-time uptake at high light.

    Measured NEE under high light (``SW_IN >= sw_min``) in the growing season (``TA >= ta_min``), binned by
    VPD. ``uptake_rel`` is the mean uptake relative to the bin with the highest uptake, so a decline with VPD
    is the stomatal limitation seen by the tower.

    Returns
    -------
    DataFrame
        ``vpd_bin`` (hPa interval), ``vpd_mean`` (hPa), ``ta_mean`` (degC), ``sw_mean`` (W m-2),
        ``nee_mean``, ``nee_sd``, ``gpp_mean`` (umol m-2 s-1; GPP_NT on measured records), ``uptake_rel``,
        ``n``.
    """
    sel = (df["NEE_fqc"] == 0) & (df["SW_IN"] >= sw_min) & (df["TA_f"] >= ta_min)
    d = df[sel]
    cut = pd.cut(d["VPD_f"], VPD_BINS, right=False)
    g = d.groupby(cut, observed=False)
    out = pd.DataFrame(
        {
            "vpd_mean": g["VPD_f"].mean(),
            "ta_mean": g["TA_f"].mean(),
            "sw_mean": g["SW_IN"].mean(),
            "nee_mean": g["NEE"].mean(),
            "nee_sd": g["NEE"].std(),
            "gpp_mean": g["GPP_NT"].mean(),
            "n": g.size(),
        }
    )
    out = out.rename_axis("vpd_bin").reset_index()
    out["vpd_bin"] = out["vpd_bin"].astype(str)
    best = (-out["nee_mean"]).max()
    out["uptake_rel"] = -out["nee_mean"] / best if best and np.isfinite(best) else np.nan
    return out


LIGHT_CLASSES = (
    (-np.inf, 10.0, "night"),
    (10.0, 200.0, "low"),
    (200.0, 500.0, "moderate"),
    (500.0, np.inf, "high"),
)
TEMP_CLASSES = ((-np.inf, 0.0, "freezing"), (0.0, 10.0, "cool"), (10.0, 20.0, "mild"), (20.0, np.inf, "warm"))
VPD_CLASSES = ((-np.inf, 5.0, "humid"), (5.0, 15.0, "moderate"), (15.0, np.inf, "dry"))


def _classify(x: pd.Series, classes: tuple) -> pd.Categorical:
    edges = [c[0] for c in classes] + [classes[-1][1]]
    return pd.cut(x, edges, right=False, labels=[c[2] for c in classes])


def driver_classes(df: pd.DataFrame) -> pd.DataFrame:
    """Per-record driver classes ("what drove this observation").

    Light (SW_IN, W m-2): night < 10 ≤ low < 200 ≤ moderate < 500 ≤ high. Temperature (TA, degC): freezing
    < 0 ≤ cool < 10 ≤ mild < 20 ≤ warm. Atmospheric dryness (VPD, hPa): humid < 5 ≤ moderate < 15 ≤ dry.
    Moisture regime: terciles of soil water content (``SWC``, %) when present, otherwise from the days since
    the last rain of > 1 mm d-1 (``P``, mm): wet ≤ 2 < drying ≤ 10 < dry; "unknown" without either column.

    Returns
    -------
    DataFrame
        ``time``, ``light``, ``temperature``, ``dryness``, ``moisture`` (categories), ``limiting`` (the
        most limiting class of day-time records: light, temperature or VPD; "none" at night), ``NEE_f``,
        ``NEE_fqc``.
    """
    out = pd.DataFrame({"time": df["time"]})
    out["light"] = _classify(df["SW_IN_f"], LIGHT_CLASSES)
    out["temperature"] = _classify(df["TA_f"], TEMP_CLASSES)
    out["dryness"] = _classify(df["VPD_f"], VPD_CLASSES)
    if "SWC" in df.columns and df["SWC"].notna().any():
        out["moisture"] = pd.qcut(df["SWC"], 3, labels=["dry", "intermediate", "wet"])
    elif "P" in df.columns and df["P"].notna().any():
        daily_p = df["P"].groupby(df["time"].dt.floor("D")).sum(min_count=1)
        rain = daily_p > 1.0
        last = pd.Series(np.where(rain, daily_p.index, pd.NaT), index=daily_p.index).ffill()
        since = (daily_p.index - pd.to_datetime(last)).days
        s = pd.Series(since, index=daily_p.index).reindex(df["time"].dt.floor("D")).to_numpy()
        out["moisture"] = pd.cut(
            pd.Series(s), [-1, 2, 10, np.inf], labels=["wet", "drying", "dry"]
        ).to_numpy()
    else:
        out["moisture"] = "unknown"
    # Most limiting day-time factor: low light, cold, or dry air, by the first that applies.
    lim = np.full(len(df), "none", dtype=object)
    day = (df["SW_IN_f"] >= 10.0).to_numpy()
    lim[day] = "none"
    lim[day & (df["VPD_f"] >= 15.0).to_numpy()] = "vpd"
    lim[day & (df["TA_f"] < 5.0).to_numpy()] = "temperature"
    lim[day & (df["SW_IN_f"] < 200.0).to_numpy()] = "light"
    out["limiting"] = lim
    out["NEE_f"] = df["NEE_f"].to_numpy()
    out["NEE_fqc"] = df["NEE_fqc"].to_numpy()
    return out


def compare_sites(summaries: list[dict], sites: pd.DataFrame | None = None) -> pd.DataFrame:
    """Across-site table of budgets and response parameters.

    Parameters
    ----------
    summaries : list of dict
        Summaries returned by :func:`geoflux.towers.processing.analyze_site`.
    sites : DataFrame, optional
        Site table with ``site`` (or ``SITE_ID``), ``IGBP``, ``MAT`` (degC), ``MAP`` (mm yr-1); joined when
        given.

    Returns
    -------
    DataFrame
        One row per site: ``site``, ``years``, ``NEE``, ``NEE_unc``, ``GPP``, ``RECO`` (gC m-2 yr-1, mean over
        years), ``e0`` (K), ``q10``, ``alpha_max`` (umol J-1, largest monthly α), ``gpp_sat_max``
        (umol m-2 s-1), ``seasonal_amplitude`` (gC m-2 d-1, max − min of the mean monthly NEE),
        ``ustar_threshold`` (m s-1), plus ``IGBP``, ``MAT``, ``MAP`` when a site table is given.
    """
    rows = []
    for s in summaries:
        b = pd.DataFrame(s.get("budgets", []))
        rows.append(
            {
                "site": s.get("site"),
                "years": len(b),
                "NEE": b["NEE"].mean() if len(b) else np.nan,
                "NEE_unc": b["NEE_unc"].mean() if len(b) else np.nan,
                "GPP": b["GPP_NT"].mean() if len(b) else np.nan,
                "RECO": b["RECO_NT"].mean() if len(b) else np.nan,
                "e0": s.get("e0"),
                "q10": s.get("q10"),
                "alpha_max": s.get("alpha_max"),
                "gpp_sat_max": s.get("gpp_sat_max"),
                "seasonal_amplitude": s.get("seasonal_amplitude"),
                "ustar_threshold": s.get("ustar_threshold"),
            }
        )
    out = pd.DataFrame(rows)
    if sites is not None and len(out):
        st = sites.rename(columns={"SITE_ID": "site"})
        keep = [c for c in ("site", "IGBP", "MAT", "MAP", "LOCATION_LAT", "LOCATION_LONG") if c in st.columns]
        out = out.merge(st[keep], on="site", how="left")
    return out
