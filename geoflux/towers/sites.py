"""Site metadata tables (FLUXNET site list, a BADM/BIF file, or the ``sites.csv`` of a generated world).

Site-table columns geoflux reads (names are case-insensitive; aliases are renamed to the canonical
name; a table that holds two spellings of one column is refused):

* ``SITE_ID`` — required; text.
* ``LAT`` — required; deg N; aliases ``LOCATION_LAT``, ``LATITUDE``.
* ``LON`` — required; deg E; aliases ``LOCATION_LONG``, ``LONG``, ``LONGITUDE``.
* ``IGBP`` — optional; IGBP class. Missing: ``select_sites(igbp=...)`` refuses; reports and
  validation group the site as unknown.
* ``ELEV`` — optional; m a.s.l.; aliases ``LOCATION_ELEV``, ``ELEVATION``. Informational only.
* ``HEIGHT_MEAS`` — optional; eddy-covariance measurement height, m above ground; aliases
  ``MEASUREMENT_HEIGHT``, ``HEIGHT_MEASUREMENT``, ``MEAS_HEIGHT``, ``VAR_INFO_HEIGHT``, ``EC_HEIGHT``,
  ``ZM``, ``Z_M``. Missing: the footprint falls back to a disk of ``footprint.radius`` (no FFP).
* ``HEIGHT_CANOPY`` — optional; m; aliases ``HEIGHTC``, ``CANOPY_HEIGHT``, ``HC``, ``H_C``,
  ``VEG_HEIGHT``. Missing: zero displacement height (FFP uses z_m = HEIGHT_MEAS).
* ``UTC_OFFSET`` — optional; hours of local standard time ahead of UTC; alias ``UTC_OFFSET_HOURS``.
  Missing: :func:`to_utc` refuses.
* ``FIRST_YEAR`` / ``LAST_YEAR`` — optional; calendar years; aliases ``YEAR_START``/``START_YEAR``,
  ``YEAR_END``/``END_YEAR``, or ``YEARS`` as ``1997-2014``. Missing: ``select_sites(years=...)``
  needs records instead.

``TOWER_HEIGHT`` is **not** taken as the measurement height: the eddy-covariance system often sits below
the top of the tower. Other columns are kept unchanged (upper-cased).

Files: a wide CSV (``,``, ``;`` or tab separated, UTF-8 or Latin-1), or a FLUXNET/AmeriFlux/ICOS
BADM (BIF) file in long format ``SITE_ID, GROUP_ID, VARIABLE_GROUP, VARIABLE, DATAVALUE`` (recognised by
its header), from which: ``LAT``/``LON``/``ELEV`` = ``LOCATION_LAT``/``LOCATION_LONG``/``LOCATION_ELEV``
(latest ``LOCATION_DATE_START``), ``IGBP`` (latest ``IGBP_DATE_START``), ``UTC_OFFSET``,
``SITE_NAME``, ``HEIGHT_CANOPY`` = median of the whole-canopy ``HEIGHTC`` records (per-species
``HEIGHTC_SPP`` records only when there is no whole-canopy one), ``HEIGHT_MEAS`` = ICOS ``EC_HEIGHT``,
else the ``VAR_INFO_HEIGHT`` of the latest ``VAR_INFO`` entry of the CO2 flux (``FC``/``NEE``/``SC``),
else of the gas analyser (``CO2``/``H2O``), else of the sonic (``USTAR``/``H``/``LE``/``WS``/``TAU``).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError
from geoflux.towers.read import TowerDataWarning

# Accepted spellings → canonical column. FLUXNET's site list uses LOCATION_LAT/LONG/ELEV; BADM names
# HEIGHTC (canopy), VAR_INFO_HEIGHT / EC_HEIGHT (instrument); footprint codes write zm and hc.
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
    "MEAS_HEIGHT": "HEIGHT_MEAS",
    "VAR_INFO_HEIGHT": "HEIGHT_MEAS",
    "EC_HEIGHT": "HEIGHT_MEAS",
    "ZM": "HEIGHT_MEAS",
    "Z_M": "HEIGHT_MEAS",
    "CANOPY_HEIGHT": "HEIGHT_CANOPY",
    "HEIGHTC": "HEIGHT_CANOPY",
    "HC": "HEIGHT_CANOPY",
    "H_C": "HEIGHT_CANOPY",
    "VEG_HEIGHT": "HEIGHT_CANOPY",
    "YEAR_START": "FIRST_YEAR",
    "START_YEAR": "FIRST_YEAR",
    "YEAR_END": "LAST_YEAR",
    "END_YEAR": "LAST_YEAR",
    "UTC_OFFSET_HOURS": "UTC_OFFSET",
}
REQUIRED = ("SITE_ID", "LAT", "LON")
_NUMERIC = ("LAT", "LON", "ELEV", "HEIGHT_MEAS", "HEIGHT_CANOPY", "FIRST_YEAR", "LAST_YEAR", "UTC_OFFSET")
_NA = ["-9999", "-9999.0", "NA", "NaN", ""]
_BADM_HEADER = {"SITE_ID", "GROUP_ID", "VARIABLE", "DATAVALUE"}


def read_sites(path: str | Path) -> pd.DataFrame:
    """Read a site table (wide CSV or long BADM/BIF file; see the module docstring for the columns).

    Parameters
    ----------
    path : CSV with at least ``SITE_ID``, ``LAT`` (deg N), ``LON`` (deg E); optional ``IGBP``, ``ELEV``
        (m a.s.l.), ``HEIGHT_MEAS`` (measurement height above ground, m), ``HEIGHT_CANOPY`` (m),
        ``FIRST_YEAR``/``LAST_YEAR`` (or ``YEARS`` as ``1997-2014``), ``UTC_OFFSET`` (hours of local
        standard time ahead of UTC). FLUXNET's site list spellings (``LOCATION_LAT``...), BADM height
        names (``HEIGHTC``, ``VAR_INFO_HEIGHT``) and ``zm``/``hc`` are accepted. Or a FLUXNET BADM/BIF
        file (``SITE_ID;GROUP_ID;VARIABLE_GROUP;VARIABLE;DATAVALUE``), read into the same columns.

    Returns
    -------
    DataFrame indexed by ``SITE_ID`` with canonical column names; ``attrs['format']`` is ``'table'`` or
    ``'BADM'``.

    Raises
    ------
    TowerFormatError
        one line naming the file (and site, column) when the table cannot be read or fails a check.
    """
    path = Path(path)
    text = _read_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if not first:
        raise TowerFormatError(f"{path}: empty site table (expected a header with SITE_ID, LAT, LON)")
    sep = max((",", ";", "\t"), key=first.count)
    header = {c.strip().strip('"').upper() for c in first.split(sep)}
    badm = _BADM_HEADER <= header
    # BADM values are text until the variable says what they are; a wide table's columns are inferred.
    dtype = (
        str
        if badm
        else {n: str for n in (c.strip().strip('"') for c in first.split(sep)) if n.upper() == "SITE_ID"}
    )
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            dtype=dtype,
            na_values=_NA,
            keep_default_na=False,
            skipinitialspace=True,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TowerFormatError(f"{path}: cannot parse site table ({str(exc).splitlines()[0]})") from None
    if badm:
        df = _badm_to_table(path, df)
        fmt = "BADM"
    else:
        fmt = "table"
    df = _normalise(path, df)
    df.attrs["format"] = fmt
    return df


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TowerFormatError(f"{path}: site table not found") from None
    except IsADirectoryError:
        raise TowerFormatError(f"{path}: is a folder, not a site table") from None
    except OSError as exc:
        raise TowerFormatError(f"{path}: cannot read site table ({exc.strerror})") from None
    if data[:2] == b"PK":
        raise TowerFormatError(
            f"{path}: site table is a zip/xlsx workbook (expected CSV; save the BIF sheet as CSV)"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # BADM files from the FLUXNET/AmeriFlux portals are often Latin-1 (site names, comments).
        return data.decode("latin-1")


def _normalise(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    canonical = {c: _ALIASES.get(c.strip().upper(), c.strip().upper()) for c in df.columns}
    seen: dict[str, str] = {}
    for src, dst in canonical.items():
        if dst in seen:
            raise TowerFormatError(
                f"{path}: columns {seen[dst]} and {src} both give {dst} (expected one of them)"
            )
        seen[dst] = src
    df = df.rename(columns=canonical)
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
        df[col] = num.astype("float64")
    if "IGBP" in df.columns:
        df["IGBP"] = df["IGBP"].astype("string").str.strip().str.upper()
    for col, lo, hi in (("LAT", -90, 90), ("LON", -180, 180)):
        empty = df[col].isna()
        if empty.any():
            site = df.loc[empty, "SITE_ID"].iloc[0]
            raise TowerFormatError(f"{path}: site {site}: {col} is empty (expected degrees)")
        bad = ~df[col].between(lo, hi)
        if bad.any():
            row = df.loc[bad].iloc[0]
            raise TowerFormatError(
                f"{path}: site {row['SITE_ID']}: {col}={row[col]:g} outside [{lo}, {hi}] (expected degrees)"
            )
    for col in ("HEIGHT_MEAS", "HEIGHT_CANOPY"):
        if col in df.columns and (df[col] < 0).any():
            row = df.loc[df[col] < 0].iloc[0]
            raise TowerFormatError(
                f"{path}: site {row['SITE_ID']}: {col}={row[col]:g} is negative (expected m above ground)"
            )
    return df.set_index("SITE_ID")


# --------------------------------------------------------------------------------------------------
# BADM (BIF) long format: one row per (site, group of related values, variable).
# Preference for the measurement height, best first: CO2 flux, gas analyser, sonic anemometer.
_MEAS_RANKS = (
    ("FC", "NEE", "SC"),
    ("CO2", "H2O"),
    ("USTAR", "H", "LE", "WS", "WD", "TAU"),
)
_POSITION = re.compile(r"(?:_\d+){1,3}$|_\d+_\d+_A$|_PI$|_F$")


def _badm_to_table(path: Path, long: pd.DataFrame) -> pd.DataFrame:
    """One row per site from a long BADM table (columns SITE_ID, GROUP_ID, VARIABLE, DATAVALUE)."""
    long = long.rename(columns={c: c.strip().upper() for c in long.columns})
    long = long.dropna(subset=["SITE_ID", "VARIABLE"])
    for c in ("SITE_ID", "GROUP_ID", "VARIABLE", "DATAVALUE"):
        long[c] = long[c].astype("string").str.strip()
    long["VARIABLE"] = long["VARIABLE"].str.upper()
    rows = []
    no_location = []
    for site, g in long.groupby("SITE_ID", sort=False):
        # group id → {variable: value}; the first value wins if a variable repeats inside a group.
        groups: dict[str, dict[str, str]] = {}
        for gid, var, val in zip(g["GROUP_ID"].fillna(""), g["VARIABLE"], g["DATAVALUE"], strict=True):
            if pd.notna(val):
                groups.setdefault(str(gid), {}).setdefault(str(var), str(val))
        row: dict[str, object] = {"SITE_ID": site}
        loc = _latest(groups, "LOCATION_LAT", "LOCATION_DATE_START")
        if loc is None or "LOCATION_LONG" not in loc:
            no_location.append(str(site))
            continue
        for var, col in (("LOCATION_LAT", "LAT"), ("LOCATION_LONG", "LON")):
            row[col] = _badm_number(path, site, var, loc[var])
        elev = _latest(groups, "LOCATION_ELEV", "LOCATION_DATE_START")
        if elev is not None:
            row["ELEV"] = _badm_number(path, site, "LOCATION_ELEV", elev["LOCATION_ELEV"])
        for var, date in (
            ("IGBP", "IGBP_DATE_START"),
            ("SITE_NAME", None),
            ("UTC_OFFSET", "UTC_OFFSET_DATE_START"),
        ):
            grp = _latest(groups, var, date)
            if grp is not None:
                row[var] = grp[var]
        if "UTC_OFFSET" in row:
            row["UTC_OFFSET"] = _badm_number(path, site, "UTC_OFFSET", str(row["UTC_OFFSET"]))
        canopy = _canopy_height(path, site, groups)
        if canopy is not None:
            row["HEIGHT_CANOPY"] = canopy
        meas = _measurement_height(path, site, groups)
        if meas is not None:
            row["HEIGHT_MEAS"] = meas
        rows.append(row)
    if no_location:
        if not rows:
            raise TowerFormatError(
                f"{path}: BADM file has no LOCATION_LAT/LOCATION_LONG for any site (expected GRP_LOCATION)"
            )
        warnings.warn(
            f"{path}: site(s) {no_location} have no LOCATION_LAT/LOCATION_LONG in the BADM file; left out",
            TowerDataWarning,
            stacklevel=4,
        )
    return pd.DataFrame(rows)


def _latest(groups: dict[str, dict[str, str]], var: str, date: str | None) -> dict[str, str] | None:
    """The group holding ``var`` with the latest ``date`` (undated groups count as oldest)."""
    have = [g for g in groups.values() if var in g]
    if not have:
        return None
    if date is None:
        return have[0]
    # BADM dates are YYYY[MM[DD[HHMM]]]; right-padding with zeros makes them comparable as text.
    return max(have, key=lambda g: g.get(date, "").ljust(12, "0"))


def _badm_number(path: Path, site: object, var: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise TowerFormatError(f"{path}: site {site}: {var}={value!r} is not a number") from None


def _canopy_height(path: Path, site: object, groups: dict[str, dict[str, str]]) -> float | None:
    have = [g for g in groups.values() if "HEIGHTC" in g]
    whole = [g for g in have if "HEIGHTC_SPP" not in g]
    use = whole or have
    if not use:
        return None
    # The median over dates and statistics: one static value for a table that has one per site.
    return float(np.median([_badm_number(path, site, "HEIGHTC", g["HEIGHTC"]) for g in use]))


def _measurement_height(path: Path, site: object, groups: dict[str, dict[str, str]]) -> float | None:
    ec = _latest(groups, "EC_HEIGHT", "EC_DATE")
    if ec is not None:
        return _badm_number(path, site, "EC_HEIGHT", ec["EC_HEIGHT"])
    info = [g for g in groups.values() if "VAR_INFO_HEIGHT" in g and "VAR_INFO_VARNAME" in g]
    for names in _MEAS_RANKS:
        cands = [g for g in info if _POSITION.sub("", g["VAR_INFO_VARNAME"].upper()) in names]
        cands = [g for g in cands if _badm_number(path, site, "VAR_INFO_HEIGHT", g["VAR_INFO_HEIGHT"]) > 0]
        if cands:
            best = max(cands, key=lambda g: g.get("VAR_INFO_DATE", "").ljust(12, "0"))
            return _badm_number(path, site, "VAR_INFO_HEIGHT", best["VAR_INFO_HEIGHT"])
    return None


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
