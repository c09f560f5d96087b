"""Features a tower-only NEE model needs, computed from the site table and the monthly tower table.

Every function works on the monthly table of :func:`geoflux.towers.modelling.monthly_table` (one row per
site and calendar month, ``time`` = first day of the month, meteorology as monthly means in the tidy
units of :data:`geoflux.towers.AGGREGATE_UNITS`) and a site table from :func:`geoflux.towers.read_sites`.

==================  =====================  ==========================================================
feature             units                  how
==================  =====================  ==========================================================
``season_sin/cos``  —                      day of year of the month's middle, shifted by 182 days in
                                           the southern hemisphere so that "summer" means the same
                                           phase at every site
``rpot``            W m-2                  monthly mean top-of-atmosphere (potential) shortwave
                                           radiation from latitude and date (Spencer 1971 sun
                                           position, solar constant 1367 W m-2)
``daylength``       h                      monthly mean astronomical day length (sunset hour angle)
``pet``             mm d-1                 Priestley–Taylor evaporative demand, net radiation taken
                                           as 0.6 × SW_IN (no longwave in the files; a rough proxy)
``wb_0``            mm d-1                 P − pet of the month
``wb_1..3``         mm d-1                 mean P − pet of the 1, 2, 3 preceding months (antecedent
                                           water balance; calendar months, gaps stay gaps)
``sw_ratio``        —                      SW_IN / rpot (cloudiness)
``MAT``             degC                   site mean annual air temperature
``MAP``             mm yr-1                site mean annual precipitation
``AI``              —                      aridity index MAP / (365.25 × mean pet)
``TA_range``        K                      warmest minus coldest calendar-month mean TA
``IGBP_<class>``    0/1                    one-hot ecosystem type of the site table
==================  =====================  ==========================================================

Site climate (MAT, MAP, AI, TA_range) comes from the site's own records, as the mean of its 12
calendar-month climatologies (so uneven month coverage does not bias it); MAT and MAP fall back to the
site table's ``MAT``/``MAP`` columns when the records lack TA or P.

Missing drivers are left as NaN, never filled with a guess: scikit-learn's forests and histogram
boosting route NaN explicitly in every split, so a site without precipitation (e.g. a REddyProc file)
gets NaN ``wb_*``/``MAP``/``AI`` rather than an invented water balance. ``SW_IN`` missing makes ``pet``
NaN too; the potential-radiation and season terms are never missing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError
from geoflux.solar import spencer_declination

GSC = 1367.0  # W m-2, solar constant (WMO 1981)
# Net radiation as a fraction of incoming shortwave: a typical monthly value over vegetation; the files
# carry no longwave, and the water-balance term only needs the right order of magnitude and seasonality.
RN_FRACTION = 0.6
PT_ALPHA = 1.26  # Priestley–Taylor coefficient
LAMBDA = 2.45  # MJ kg-1, latent heat of vaporization
GAMMA = 0.066  # kPa K-1, psychrometric constant near sea level

FEATURE_UNITS: dict[str, str] = {
    "TA": "degC",
    "SW_IN": "W m-2",
    "VPD": "hPa",
    "P": "mm d-1",
    "season_sin": "1",
    "season_cos": "1",
    "rpot": "W m-2",
    "daylength": "h",
    "sw_ratio": "1",
    "pet": "mm d-1",
    "wb_0": "mm d-1",
    "wb_1": "mm d-1",
    "wb_2": "mm d-1",
    "wb_3": "mm d-1",
    "MAT": "degC",
    "MAP": "mm yr-1",
    "AI": "1",
    "TA_range": "K",
}
SITE_CLIMATE = ("MAT", "MAP", "AI", "TA_range")


def daily_potential(lat_deg: float | np.ndarray, doy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Daily mean top-of-atmosphere shortwave radiation and day length.

    Parameters
    ----------
    lat_deg : latitude, degrees north (scalar or broadcastable to ``doy``).
    doy : day of year (1..366).

    Returns
    -------
    ``(rpot, daylength)``: W m-2 (24-h mean) and hours. Polar night gives 0 W m-2 and 0 h, polar day
    24 h (the sunset hour angle is clipped).
    """
    phi = np.deg2rad(np.asarray(lat_deg, dtype=float))
    # Spencer (1971) Fourier series for declination and Earth-Sun distance: the FAO-56 one-term
    # approximations put monthly means up to 14 W m-2 off FLUXNET's SW_IN_POT at high latitude in autumn.
    g = 2 * np.pi * (np.asarray(doy, dtype=float) - 1.0) / 365.0
    delta = spencer_declination(g)  # solar declination, rad
    dr = (
        1.000110
        + 0.034221 * np.cos(g)
        + 0.001280 * np.sin(g)
        + 0.000719 * np.cos(2 * g)
        + 0.000077 * np.sin(2 * g)
    )
    cos_ws = np.clip(-np.tan(phi) * np.tan(delta), -1.0, 1.0)
    ws = np.arccos(cos_ws)  # sunset hour angle, rad
    rpot = GSC / np.pi * dr * (ws * np.sin(phi) * np.sin(delta) + np.cos(phi) * np.cos(delta) * np.sin(ws))
    return np.maximum(rpot, 0.0), 24.0 / np.pi * ws


def monthly_potential(lat_deg: np.ndarray, month_start: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Mean over every day of each month of :func:`daily_potential` (W m-2, h), row by row."""
    t = pd.DatetimeIndex(month_start)
    lat = np.asarray(lat_deg, dtype=float)
    doy0 = t.day_of_year.to_numpy()
    ndays = t.days_in_month.to_numpy()
    rpot = np.zeros(len(t))
    dl = np.zeros(len(t))
    for k in range(31):  # vectorized over rows, looping over the day within the month
        use = k < ndays
        r, d = daily_potential(lat, doy0 + k)
        rpot += np.where(use, r, 0.0)
        dl += np.where(use, d, 0.0)
    return rpot / ndays, dl / ndays


def season_terms(lat_deg: np.ndarray, month_start: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Sine and cosine of the hemisphere-aligned day of year of each month's middle.

    The southern hemisphere is shifted by 182 days so that a January value there matches a July value
    in the north: a season term that means the same thing at every site.
    """
    t = pd.DatetimeIndex(month_start)
    mid = t.day_of_year.to_numpy() + (t.days_in_month.to_numpy() - 1) / 2.0
    doy = mid + np.where(np.asarray(lat_deg, dtype=float) < 0, 182.0, 0.0)
    ang = 2 * np.pi * doy / 365.25
    return np.sin(ang), np.cos(ang)


def priestley_taylor(ta: np.ndarray, sw_in: np.ndarray) -> np.ndarray:
    """Evaporative demand, mm d-1, from air temperature (degC) and incoming shortwave (W m-2).

    Priestley–Taylor (alpha 1.26) with net radiation ``RN_FRACTION`` × SW_IN and no ground heat flux;
    negative values (cold, dark months) are set to 0.
    """
    ta = np.asarray(ta, dtype=float)
    es = 0.6108 * np.exp(17.27 * ta / (ta + 237.3))
    s = 4098.0 * es / (ta + 237.3) ** 2  # kPa K-1, slope of the saturation vapour pressure curve
    rn_mj = RN_FRACTION * np.asarray(sw_in, dtype=float) * 0.0864  # W m-2 -> MJ m-2 d-1
    return np.maximum(PT_ALPHA * s / (s + GAMMA) * rn_mj / LAMBDA, 0.0)


def _climatology_mean(df: pd.DataFrame, col: str) -> pd.Series:
    """Per site: the mean of the 12 calendar-month means of ``col`` (NaN unless all 12 months exist)."""
    m = df.groupby(["site", df["time"].dt.month])[col].mean().unstack()
    return m.mean(axis=1).where(m.notna().sum(axis=1) == 12)


def site_climate(monthly: pd.DataFrame, sites: pd.DataFrame) -> pd.DataFrame:
    """Per-site climate: MAT (degC), MAP (mm yr-1), AI (—), TA_range (K), and where each came from.

    Parameters
    ----------
    monthly : table with ``site``, ``time`` and ``TA``, ``P`` (mm d-1), ``pet`` (mm d-1) where present.
    sites : site table indexed by SITE_ID; its ``MAT``/``MAP`` columns are the fallback.

    Returns
    -------
    DataFrame indexed by site with the four climate columns, ``IGBP`` and ``climate_source``.
    """
    ids = sorted(monthly["site"].astype(str).unique())
    out = pd.DataFrame(index=pd.Index(ids, name="site"))
    df = monthly.assign(site=monthly["site"].astype(str))
    nan = pd.Series(np.nan, index=out.index)
    mat = _climatology_mean(df, "TA") if "TA" in df else nan
    map_ = _climatology_mean(df, "P") * 365.25 if "P" in df else nan
    pet = _climatology_mean(df, "pet") * 365.25 if "pet" in df else nan
    out["MAT"] = mat.reindex(out.index)
    out["MAP"] = map_.reindex(out.index)
    source = pd.Series("records", index=out.index)
    for col in ("MAT", "MAP"):
        if col in sites.columns:
            table = pd.to_numeric(sites[col], errors="coerce").reindex(out.index)
            fill = out[col].isna() & table.notna()
            out.loc[fill, col] = table[fill]
            source[fill] = source[fill] + f"; {col} from site table"
    out["AI"] = out["MAP"] / pet.reindex(out.index)
    if "TA" in df:
        clim = df.groupby(["site", df["time"].dt.month])["TA"].mean().unstack()
        out["TA_range"] = (clim.max(axis=1) - clim.min(axis=1)).reindex(out.index)
    else:
        out["TA_range"] = np.nan
    igbp = sites["IGBP"] if "IGBP" in sites.columns else pd.Series(dtype=object)
    out["IGBP"] = igbp.reindex(out.index).fillna("unknown").astype(str).to_numpy()
    out["climate_source"] = source
    return out


def add_features(monthly: pd.DataFrame, sites: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the time, radiation, water-balance, site-climate and IGBP features to a monthly table.

    Parameters
    ----------
    monthly : one row per site and month: ``site``, ``time`` (month start) and the meteorology present
        (``TA`` degC, ``SW_IN`` W m-2, ``VPD`` hPa, ``P`` mm d-1). Months without NEE should be kept:
        they carry the antecedent water balance of the following months.
    sites : site table indexed by SITE_ID with ``LAT`` (deg N), ``IGBP``, optionally ``MAT``, ``MAP``.

    Returns
    -------
    The table with the feature columns of the module docstring added (and ``IGBP``), and the per-site
    climate table of :func:`site_climate`.

    Raises
    ------
    TowerFormatError
        when a site has no ``LAT`` in the site table.
    """
    df = monthly.copy()
    df["site"] = df["site"].astype(str)
    lat_by_site = pd.to_numeric(sites["LAT"], errors="coerce")
    lat_by_site.index = lat_by_site.index.map(str)
    lat = df["site"].map(lat_by_site)
    if lat.isna().any():
        bad = sorted(df.loc[lat.isna(), "site"].unique())
        raise TowerFormatError(f"site table: LAT: missing for site(s) {bad[:3]} (expected degrees north)")
    lat = lat.to_numpy(dtype=float)
    df["season_sin"], df["season_cos"] = season_terms(lat, df["time"])
    df["rpot"], df["daylength"] = monthly_potential(lat, df["time"])
    for col in ("TA", "SW_IN", "VPD", "P"):
        if col not in df.columns:
            df[col] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        df["sw_ratio"] = np.where(df["rpot"] > 1.0, df["SW_IN"] / df["rpot"], np.nan)
    df["pet"] = priestley_taylor(df["TA"], df["SW_IN"])
    df.loc[df["TA"].isna() | df["SW_IN"].isna(), "pet"] = np.nan
    df["wb_0"] = df["P"] - df["pet"]
    # Lags on a complete calendar-month index per site, so "previous month" is never a month two years
    # earlier across a data gap.
    parts = []
    for _, g in df.groupby("site", sort=False):
        full = pd.date_range(g["time"].min(), g["time"].max(), freq="MS")
        wb = g.set_index("time")["wb_0"].reindex(full)
        lagged = {f"wb_{k}": wb.shift(1).rolling(k, min_periods=k).mean() for k in (1, 2, 3)}
        parts.append(pd.DataFrame(lagged).reindex(g["time"]).set_axis(g.index))
    df = df.join(pd.concat(parts))
    clim = site_climate(df, sites)
    for col in (*SITE_CLIMATE, "IGBP"):
        df[col] = df["site"].map(clim[col])
    return df, clim


def igbp_onehot(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """0/1 columns ``IGBP_<class>`` for the given classes (a class unseen in ``classes`` is all zero)."""
    return pd.DataFrame({f"IGBP_{c}": (df["IGBP"] == c).astype(np.float32) for c in classes}, index=df.index)
