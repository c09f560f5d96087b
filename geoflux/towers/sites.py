"""Site metadata tables (FLUXNET site list, or the ``sites.csv`` of a generated world) and selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError

# Accepted spellings → canonical column. FLUXNET's site list uses LOCATION_LAT/LONG/ELEV.
_ALIASES = {
    "LOCATION_LAT": "LAT",
    "LOCATION_LONG": "LON",
    "LOCATION_ELEV": "ELEV",
    "LONG": "LON",
    "LATITUDE": "LAT",
    "LONGITUDE": "LON",
    "ELEVATION": "ELEV",
    "MEASUREMENT_HEIGHT": "HEIGHT_MEAS",
    "HEIGHT_MEASUREMENT": "HEIGHT_MEAS",
    "CANOPY_HEIGHT": "HEIGHT_CANOPY",
    "HEIGHTC": "HEIGHT_CANOPY",
    "YEAR_START": "FIRST_YEAR",
    "START_YEAR": "FIRST_YEAR",
    "YEAR_END": "LAST_YEAR",
    "END_YEAR": "LAST_YEAR",
    "UTC_OFFSET_HOURS": "UTC_OFFSET",
}
REQUIRED = ("SITE_ID", "LAT", "LON")
_NUMERIC = ("LAT", "LON", "ELEV", "HEIGHT_MEAS", "HEIGHT_CANOPY", "FIRST_YEAR", "LAST_YEAR", "UTC_OFFSET")


def read_sites(path: str | Path) -> pd.DataFrame:
    """Read a site table.

    Parameters
    ----------
    path : CSV with at least ``SITE_ID``, ``LAT`` (deg N), ``LON`` (deg E); optional ``IGBP``, ``ELEV``
        (m a.s.l.), ``HEIGHT_MEAS`` (measurement height above ground, m), ``HEIGHT_CANOPY`` (m),
        ``FIRST_YEAR``/``LAST_YEAR`` (or ``YEARS`` as ``1997-2014``), ``UTC_OFFSET`` (hours of local
        standard time ahead of UTC). FLUXNET's site list spellings (``LOCATION_LAT``...) are accepted.

    Returns
    -------
    DataFrame indexed by ``SITE_ID`` with canonical column names.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, na_values=["-9999", "NA", ""], keep_default_na=True, dtype={"SITE_ID": str})
    except FileNotFoundError:
        raise TowerFormatError(f"{path}: site table not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TowerFormatError(f"{path}: cannot parse site table ({str(exc).splitlines()[0]})") from None
    df = df.rename(columns={c: _ALIASES.get(c.strip().upper(), c.strip().upper()) for c in df.columns})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise TowerFormatError(f"{path}: site table lacks column(s) {missing} (expected SITE_ID, LAT, LON)")
    df["SITE_ID"] = df["SITE_ID"].astype(str).str.strip()
    if df["SITE_ID"].duplicated().any():
        dup = df.loc[df["SITE_ID"].duplicated(), "SITE_ID"].iloc[0]
        raise TowerFormatError(f"{path}: site {dup} appears more than once")
    if "YEARS" in df.columns and "FIRST_YEAR" not in df.columns:
        span = df["YEARS"].astype(str).str.extract(r"^\s*(\d{4})\s*(?:-\s*(\d{4}))?\s*$")
        df["FIRST_YEAR"] = pd.to_numeric(span[0])
        df["LAST_YEAR"] = pd.to_numeric(span[1].fillna(span[0]))
    for col in _NUMERIC:
        if col not in df.columns:
            continue
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna()
        if bad.any():
            row = df.loc[bad].iloc[0]
            raise TowerFormatError(f"{path}: site {row['SITE_ID']}: {col}={row[col]!r} is not a number")
        df[col] = num
    if "IGBP" in df.columns:
        df["IGBP"] = df["IGBP"].astype("string").str.strip().str.upper()
    for col, lo, hi in (("LAT", -90, 90), ("LON", -180, 180)):
        bad = ~df[col].between(lo, hi)
        if bad.any():
            row = df.loc[bad].iloc[0]
            raise TowerFormatError(
                f"{path}: site {row['SITE_ID']}: {col}={row[col]} outside [{lo}, {hi}] (expected degrees)"
            )
    return df.set_index("SITE_ID")


def select_sites(
    sites: pd.DataFrame,
    bbox: tuple[float, float, float, float] | None = None,
    igbp: list[str] | None = None,
    *,
    years: tuple[int, int] | None = None,
    records: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Sites inside a bounding box, of given IGBP classes and with data in given years.

    Parameters
    ----------
    sites : site table from :func:`read_sites`.
    bbox : (lon_min, lat_min, lon_max, lat_max), degrees (EPSG:4326). ``lon_min > lon_max`` means the
        box crosses the antimeridian.
    igbp : IGBP classes to keep, e.g. ``["ENF", "DBF"]`` (case-insensitive).
    years : (first, last) calendar years, inclusive; a site is kept when its data overlap them. Data
        years come from ``records`` (years with at least one non-missing NEE) when given, otherwise from
        the table's ``FIRST_YEAR``/``LAST_YEAR``.
    records : tidy records (see :func:`~geoflux.towers.read_tower_file`) to take data years from.

    Returns
    -------
    The selected rows of ``sites``.
    """
    keep = pd.Series(True, index=sites.index)
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        if y0 > y1:
            raise TowerFormatError(
                f"bbox {bbox}: lat_min > lat_max (expected lon_min, lat_min, lon_max, lat_max)"
            )
        in_lon = (sites["LON"] >= x0) | (sites["LON"] <= x1) if x0 > x1 else sites["LON"].between(x0, x1)
        keep &= in_lon & sites["LAT"].between(y0, y1)
    if igbp is not None:
        if "IGBP" not in sites.columns:
            raise TowerFormatError("site table has no IGBP column to select classes from")
        keep &= sites["IGBP"].astype("string").str.upper().isin([c.upper() for c in igbp]).fillna(False)
    if years is not None:
        y0, y1 = years
        if records is not None:
            valid = records.loc[records["NEE"].notna()]
            yrs = valid["time"].dt.year.groupby(valid["site"]).agg(["min", "max"])
            first = yrs["min"].reindex(sites.index)
            last = yrs["max"].reindex(sites.index)
        elif {"FIRST_YEAR", "LAST_YEAR"} <= set(sites.columns):
            first, last = sites["FIRST_YEAR"], sites["LAST_YEAR"]
        else:
            raise TowerFormatError(
                "cannot select by years: the site table has no FIRST_YEAR/LAST_YEAR and no records were given"
            )
        keep &= ((first <= y1) & (last >= y0)).fillna(False).astype(bool)
    return sites.loc[keep.to_numpy(dtype=bool)]


def to_utc(records: pd.DataFrame, sites: pd.DataFrame) -> pd.Series:
    """UTC time of each record's start, from the site table's ``UTC_OFFSET`` (hours).

    Tower files are written in local standard time; this is the only place geoflux moves them, and it
    returns a new tz-aware Series rather than changing ``records['time']``.
    """
    if "UTC_OFFSET" not in sites.columns:
        raise TowerFormatError(
            "site table has no UTC_OFFSET column (hours of local standard time ahead of UTC)"
        )
    offset = records["site"].map(sites["UTC_OFFSET"]).to_numpy(dtype="float64")
    if np.isnan(offset).any():
        missing = sorted(records.loc[np.isnan(offset), "site"].unique())
        raise TowerFormatError(f"no UTC_OFFSET for site(s) {missing} in the site table")
    utc = records["time"] - pd.to_timedelta(offset, unit="h")
    return utc.dt.tz_localize("UTC")
