"""Readers for tower files: one tidy record table from every common FLUXNET-family download.

Formats (detected from the file name *and* the header; the header decides how to parse, the name is
checked against it):

==========================  ====================================================  ==================
format                      file name                                             time stamps
==========================  ====================================================  ==================
FLUXNET2015 FULLSET/SUBSET  ``FLX_<SITE>_FLUXNET2015_<SET>_<RES>_<y1>-<y2>_<v>``  TIMESTAMP[_START]
ONEFlux FLUXNET (FLUXMET)   ``FLX|AMF|ICOSETC_<SITE>_FLUXNET_<SET>_<RES>_...``     TIMESTAMP[_START]
ICOS ETC L2                 ``ICOSETC_<SITE>_FLUXNET_<RES>_L2.csv``               TIMESTAMP[_START]
AmeriFlux BASE              ``AMF_<SITE>_BASE_<HH|HR>_<v>.csv``                   TIMESTAMP_START
REddyProc input             any name; header ``Year DoY Hour NEE ...``            Hour = end of record
FluxDataKit-like            ``FLX_<SITE>_FLUXDATAKIT|PLUMBER_<SET>_<RES>_...``    ISO dates, ``NA``
any of these, zipped        ``*.zip`` (one data file is picked, see below)
==========================  ====================================================  ==================

Time: every record keeps the stamps written in the file. ``time`` is the start of the record and
``time_end`` its (exclusive) end, tz-naive. FLUXNET, AmeriFlux and ICOS write **local standard time**
(no daylight saving); geoflux never shifts them (use :func:`geoflux.towers.to_utc` with a site table
that has ``UTC_OFFSET`` to get UTC). REddyProc's ``Hour`` is the *end* of the half-hour, so its record
starts 30 min earlier — that is the file's own convention made explicit, not a shift.

Units: FLUXNET-family daily and coarser files give NEE in gC m-2 d-1, but FluxDataKit daily files are
plain means of the half-hourly values and so keep umolCO2 m-2 s-1 (FluxDataKit's
``fdk_downsample_fluxnet``); their NEE, its uncertainty and their GPP/RECO are converted to gC m-2 d-1
(x 1.0377504).

Partitioned fluxes: FLUXNET-family files (not AmeriFlux BASE or REddyProc input) that carry ONEFlux's
night-time partitioning get ``RECO`` and ``GPP`` in NEE's units (see
:data:`~geoflux.towers.columns.PARTITIONED_CANDIDATES`); files without it get neither column.
"""

from __future__ import annotations

import glob
import io
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError
from geoflux.towers.columns import (
    BASE_CANDIDATES,
    BASE_UNITS,
    FLUXNET_CANDIDATES,
    MET_VARIABLES,
    PARTITIONED_CANDIDATES,
    RECORD_UNITS,
    RESOLUTIONS,
    SUBDAILY,
    TURBULENCE_CANDIDATES,
    TURBULENCE_VARIABLES,
    base_column,
    convert,
    fluxnet_units,
)

MISSING = -9999.0

LOCAL_STANDARD_TIME = "local standard time of the site (no daylight saving), as written in the file"


class TowerDataWarning(UserWarning):
    """A recoverable problem in a tower file was repaired; the message says what was done."""


# --------------------------------------------------------------------------------------------------
# Detection from the file name.
_SITE = r"(?P<site>[A-Z]{2}-[A-Za-z0-9]{3})"
_RES = r"(?P<res>HH|HR|DD|WW|MM|YY)"


@dataclass(frozen=True)
class _NameInfo:
    flavour: str  # fluxnet | base | fluxdatakit | auxiliary
    product: str
    site: str | None
    resolution: str | None


_NAME_RULES: tuple[tuple[re.Pattern, str, str], ...] = (
    (
        re.compile(rf"^FLX_{_SITE}_FLUXNET2015_(?P<aux>ERAI|AUXMETEO|AUXNEE)_"),
        "auxiliary",
        "FLUXNET2015 {aux}",
    ),
    (
        re.compile(rf"^FLX_{_SITE}_FLUXNET2015_(?P<set>FULLSET|SUBSET)_{_RES}_"),
        "fluxnet",
        "FLUXNET2015 {set}",
    ),
    (
        re.compile(rf"^(?:FLX|AMF|ICOSETC)_{_SITE}_FLUXNET_(?P<set>FLUXMET|FULLSET|SUBSET)_{_RES}_"),
        "fluxnet",
        "ONEFlux FLUXNET {set}",
    ),
    (re.compile(rf"^ICOSETC_{_SITE}_FLUXNET_{_RES}_L2"), "fluxnet", "ICOS ETC L2 FLUXNET"),
    (re.compile(rf"^AMF_{_SITE}_BASE_{_RES}_"), "base", "AmeriFlux BASE"),
    (re.compile(rf"^FLX_{_SITE}_FLUXDATAKIT_(?P<set>[A-Z]+)_{_RES}_"), "fluxdatakit", "FluxDataKit {set}"),
    # FluxDataKit's own down-sampling writes FLX_<SITE>_PLUMBER_FULLSET_DD_<y1>_<y2>_2-3.csv.
    (
        re.compile(rf"^FLX_{_SITE}_PLUMBER_(?P<set>[A-Z]+)_{_RES}_"),
        "fluxdatakit",
        "FluxDataKit (PLUMBER) {set}",
    ),
)
_ANY_SITE = re.compile(r"(?:FLX|AMF|ICOSETC)_([A-Z]{2}-[A-Za-z0-9]{3})_")


def _name_info(name: str) -> _NameInfo | None:
    for rule, flavour, label in _NAME_RULES:
        m = rule.search(name)
        if m:
            groups = m.groupdict()
            return _NameInfo(flavour, label.format(**groups), groups["site"], groups.get("res"))
    return None


# --------------------------------------------------------------------------------------------------
# Public entry points.
def read_tower_file(
    path: str | Path,
    site: str | None = None,
    *,
    resolution: str | None = None,
    columns: Mapping[str, str] | None = None,
    require_nee: bool = True,
) -> pd.DataFrame:
    """Read one tower file (or a zipped download) into tidy records.

    Parameters
    ----------
    path : a FLUXNET2015 / ONEFlux FLUXNET / ICOS ETC L2 CSV at HH, HR, DD, WW, MM or YY resolution, an
        AmeriFlux BASE CSV, a REddyProc input file, or a ``.zip`` holding one of these.
    site : site ID; taken from the file name (``FLX_<SITE>_...``) when not given.
    resolution : for a zip holding several resolutions, which one to read (default: the finest).
    columns : override the source column of a tidy variable, e.g. ``{"NEE": "NEE_CUT_USTAR50"}``; any
        NEE, RECO/GPP (``{"GPP": "GPP_DT_VUT_REF"}``) or meteorology column of the ONEFlux tables is
        accepted and converted to tidy units.
    require_nee : raise when the file has no NEE column (default). ``False`` reads meteorology only
        (NEE all NaN), e.g. for FluxDataKit files that carry GPP but no NEE.

    Returns
    -------
    DataFrame with ``site``, ``time`` (record start, local standard time, tz-naive), ``time_end``
    (exclusive record end), ``NEE``, ``NEE_QC``, ``NEE_UNC`` (when the file has an uncertainty), ``RECO``
    and ``GPP`` (ONEFlux night-time partitioning, ``*_NT_VUT_REF`` else ``*_NT_CUT_REF``, only when the
    file has one of them with data) and meteorology ``TA``, ``SW_IN``, ``VPD``, ``P``, ``USTAR``, ``WS``,
    ``WD`` with ``<VAR>_QC`` where the file has one (those present); NaN for missing (-9999 / NA).
    Units: :data:`RECORD_UNITS`.
    ``attrs``: ``resolution`` (HH/HR/DD/WW/MM/YY), ``format``, ``source`` (file), ``columns``
    (tidy → source column), ``source_units`` (tidy → unit of the source column before conversion, CSV
    formats), ``units``, ``nee_qc_kind`` (``flag`` or ``fraction``), ``time_reference``.

    Raises
    ------
    TowerFormatError
        one line naming the file and the problem: unknown format, truncated file, missing column,
        unparseable / non-monotonic time stamps, unit-suspicious values.
    """
    path = Path(path)
    if resolution is not None and resolution not in RESOLUTIONS:
        raise TowerFormatError(f"{path}: unknown resolution {resolution!r} (expected one of {RESOLUTIONS})")
    if path.suffix.lower() == ".zip":
        label, name, data = _zip_member(path, resolution)
    else:
        label, name, data = str(path), path.name, _read_bytes(path)
    df = _parse(label, name, data, site=site, columns=dict(columns or {}), require_nee=require_nee)
    if resolution is not None and df.attrs["resolution"] != resolution:
        raise TowerFormatError(
            f"{label}: file holds {df.attrs['resolution']} records (expected {resolution})"
        )
    return df


def read_towers(
    files: str | Path | Sequence[str | Path],
    sites: pd.DataFrame,
    *,
    resolution: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Read many tower files and check each site against the site table.

    Parameters
    ----------
    files : a glob pattern, a folder (every file in it), or a list of paths.
    sites : site table from :func:`~geoflux.towers.read_sites` (indexed by SITE_ID).
    resolution, columns : passed to :func:`read_tower_file`.

    Returns
    -------
    Concatenated tidy records sorted by site and time; ``attrs['resolution']`` common to all files.
    Records of one site that appear in two files are kept once (first file wins) with a warning.
    """
    if isinstance(files, (str, Path)):
        p = Path(files)
        if p.is_dir():
            paths = sorted(str(q) for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        else:
            paths = sorted(glob.glob(str(files)))
    else:
        paths = [str(p) for p in files]
    if not paths:
        raise TowerFormatError(f"{files}: no tower files match")
    frames = []
    resolutions: dict[str, str] = {}
    qc_kinds = set()
    for p in paths:
        df = read_tower_file(p, resolution=resolution, columns=columns)
        site = str(df["site"].iloc[0]) if len(df) else Path(p).stem
        if site not in sites.index:
            raise TowerFormatError(
                f"{p}: site {site} has no row in the site table (expected a SITE_ID row with LAT, LON)"
            )
        resolutions[p] = df.attrs["resolution"]
        qc_kinds.add(df.attrs["nee_qc_kind"])
        frames.append(df)
    if len(set(resolutions.values())) > 1:
        detail = ", ".join(f"{Path(k).name}: {v}" for k, v in resolutions.items())
        raise TowerFormatError(f"{files}: files mix time resolutions ({detail}); pass resolution=...")
    out = pd.concat(frames, ignore_index=True)
    dup = out.duplicated(["site", "time"], keep="first")
    if dup.any():
        warnings.warn(
            f"{files}: {int(dup.sum())} records of sites {sorted(out.loc[dup, 'site'].unique())} appear in "
            "more than one file; kept those of the first file",
            TowerDataWarning,
            stacklevel=2,
        )
        out = out.loc[~dup]
    out = out.sort_values(["site", "time"], kind="stable").reset_index(drop=True)
    out.attrs = {
        "resolution": next(iter(resolutions.values())),
        "nee_qc_kind": qc_kinds.pop() if len(qc_kinds) == 1 else "mixed",
        "units": {k: v for k, v in RECORD_UNITS.items() if k in out.columns},
        "time_reference": LOCAL_STANDARD_TIME,
        "sources": [f.attrs["source"] for f in frames],
    }
    return out


# --------------------------------------------------------------------------------------------------
# Bytes in.
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TowerFormatError(f"{path}: tower file not found") from None
    except IsADirectoryError:
        raise TowerFormatError(f"{path}: is a folder, not a tower file") from None
    except OSError as exc:
        raise TowerFormatError(f"{path}: cannot read tower file ({exc.strerror})") from None


def _zip_member(path: Path, resolution: str | None) -> tuple[str, str, bytes]:
    """Pick the data file of a zipped download: the requested (or finest) resolution."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise TowerFormatError(f"{path}: tower file not found") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise TowerFormatError(f"{path}: not a readable zip archive ({exc}; truncated download?)") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and n.lower().endswith((".csv", ".txt"))]
        found: list[tuple[int, int, str]] = []
        for n in names:
            info = _name_info(Path(n).name)
            if info is None or info.flavour == "auxiliary" or info.resolution is None:
                continue
            # FULLSET before SUBSET/FLUXMET: more columns, same records.
            found.append((RESOLUTIONS.index(info.resolution), 0 if "FULLSET" in n else 1, n))
        if resolution is not None:
            found = [f for f in found if RESOLUTIONS[f[0]] == resolution]
        if not found:
            want = f" at resolution {resolution}" if resolution else ""
            raise TowerFormatError(
                f"{path}: zip holds no tower data file{want} (members: {', '.join(names) or 'none'}; "
                "expected FLX_/AMF_/ICOSETC_ files named as downloaded)"
            )
        member = min(found)[2]
        try:
            data = zf.read(member)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise TowerFormatError(f"{path}!{member}: cannot extract ({exc}; truncated download?)") from None
    return f"{path}!{member}", Path(member).name, data


def _parse(
    label: str, name: str, data: bytes, *, site: str | None, columns: dict[str, str], require_nee: bool
) -> pd.DataFrame:
    if not data.strip():
        raise TowerFormatError(f"{label}: empty tower file")
    # Old Mac files end lines with CR only, Windows ones with CRLF; make every line end with LF.
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    info = _name_info(name)
    if info is not None and info.flavour == "auxiliary":
        raise TowerFormatError(
            f"{label}: {info.product} file holds reanalysis/auxiliary data, not tower NEE "
            "(expected the FULLSET or SUBSET file of the same download)"
        )
    header_start = _skip_comments(data)
    eol = data.find(b"\n", header_start)
    header = data[header_start : eol if eol >= 0 else len(data)].decode("utf-8", "replace")
    site = site or (info.site if info else None) or _site_from_name(name) or Path(name).stem
    if header.split("\t")[:3] == ["Year", "DoY", "Hour"]:
        df = _read_reddyproc(label, data[header_start:])
    elif "," in header and ("TIMESTAMP_START" in header or header.split(",")[0].strip('" ') == "TIMESTAMP"):
        df = _read_csv(label, data[header_start:], info, columns, require_nee)
    else:
        raise TowerFormatError(
            f"{label}: unknown tower file format (expected a FLUXNET/AmeriFlux/ICOS CSV with TIMESTAMP_START "
            f"or TIMESTAMP, or a REddyProc file starting 'Year DoY Hour'; header starts {header[:40]!r})"
        )
    if info is not None and info.resolution is not None and info.resolution != df.attrs["resolution"]:
        raise TowerFormatError(
            f"{label}: file name says {info.resolution} but the time stamps are {df.attrs['resolution']} "
            "(renamed file?)"
        )
    df.insert(0, "site", site)
    df = _check_times(label, df)
    _check_values(label, df)
    df.attrs["source"] = label
    df.attrs["time_reference"] = LOCAL_STANDARD_TIME
    df.attrs["units"] = {k: v for k, v in RECORD_UNITS.items() if k in df.columns}
    return df


def _site_from_name(name: str) -> str | None:
    m = _ANY_SITE.search(name)
    return m.group(1) if m else None


def _skip_comments(data: bytes) -> int:
    """Offset of the header line: after blank lines and ``#`` comment lines (AmeriFlux BASE)."""
    pos = 0
    while pos < len(data):
        eol = data.find(b"\n", pos)
        eol = len(data) if eol < 0 else eol
        line = data[pos:eol].strip()
        if line and not line.startswith(b"#"):
            return pos
        pos = eol + 1
    return pos


def _field_counts(body: bytes, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Separator count of each non-empty line after the header, and the line's 1-based row number."""
    buf = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(ends) == 0 or ends[-1] != len(buf) - 1:
        ends = np.append(ends, len(buf))
    starts = np.concatenate(([0], ends[:-1] + 1))
    seps = np.flatnonzero(buf == sep)
    counts = np.searchsorted(seps, ends) - np.searchsorted(seps, starts)
    nonempty = ends > starts
    rows = np.arange(1, len(ends) + 1)
    return counts[nonempty][1:], rows[nonempty][1:]


def _check_fields(label: str, body: bytes, n_names: int, sep: str) -> None:
    counts, rows = _field_counts(body, ord(sep))
    if len(counts) == 0:
        raise TowerFormatError(f"{label}: header but no data rows (truncated file?)")
    bad = np.flatnonzero(counts != n_names - 1)
    if len(bad):
        i = bad[0]
        n = int(counts[i]) + 1
        hint = " (truncated file?)" if i == len(counts) - 1 and n < n_names else ""
        raise TowerFormatError(f"{label}: line {rows[i]} has {n} fields, expected {n_names}{hint}")


# --------------------------------------------------------------------------------------------------
# CSV formats (FLUXNET, ICOS, AmeriFlux BASE, FluxDataKit).
def _read_csv(
    label: str, body: bytes, info: _NameInfo | None, columns: dict[str, str], require_nee: bool
) -> pd.DataFrame:
    names = [c.strip().strip('"') for c in body[: body.find(b"\n")].decode("utf-8", "replace").split(",")]
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise TowerFormatError(f"{label}: column(s) {dup} appear more than once in the header")
    _check_fields(label, body, len(names), ",")
    flavour = _flavour(info, names)
    stamp_cols = [c for c in ("TIMESTAMP_START", "TIMESTAMP_END", "TIMESTAMP") if c in names]
    # Only the needed columns are parsed: FULLSET HH files have ~250 of them.
    pick = _pick_columns(label, flavour, names, columns)
    partitioned = _partitioned_candidates(flavour, names, columns)
    nee_alts = _nee_alternatives(flavour, names, pick, columns)
    usecols = [c for c in pick.values() if c in names] + [c for cs in partitioned.values() for c in cs]
    usecols = list(dict.fromkeys(stamp_cols + usecols))
    try:
        raw = pd.read_csv(
            io.BytesIO(body),
            usecols=usecols,
            dtype={c: str for c in stamp_cols},
            na_values=["NA", "NaN", "nan"],
            keep_default_na=False,
            engine="c",
        )
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise TowerFormatError(f"{label}: malformed CSV ({str(exc).splitlines()[0]})") from None
    time, end, resolution = _csv_times(label, raw, flavour)
    raw = _nee_with_data(label, body, raw, pick, nee_alts, names)
    out = pd.DataFrame({"time": time, "time_end": end})
    record_days = ((end - time) / pd.Timedelta("1D")).to_numpy()
    used: dict[str, str] = {}
    source_units: dict[str, str] = {}
    for var, src in pick.items():
        if src not in raw.columns:
            continue
        values = _numeric(label, raw[src], src)
        unit = _source_unit(flavour, var, src, resolution)
        if unit is not None and not var.endswith("_QC"):
            values = convert(values, unit, resolution, record_days)
            source_units[var] = unit
        out[var] = values
        used[var] = src
    for var, cands in partitioned.items():
        for src in cands:
            values = _numeric(label, raw[src], src)
            if np.isnan(values).all():
                continue  # present but empty (all -9999): the next candidate
            unit = _source_unit(flavour, var, src, resolution)
            out[var] = convert(values, unit, resolution, record_days)
            source_units[var] = unit
            used[var] = src
            break
    nee_qc_kind = "flag" if resolution in SUBDAILY else "fraction"
    if "NEE" not in out.columns:
        if require_nee:
            raise TowerFormatError(_no_nee_message(label, flavour, names))
        out["NEE"] = np.nan
        out["NEE_QC"] = np.nan
    elif flavour == "base":
        if "NEE_QC" not in out.columns:
            # BASE holds no gap-filled NEE unless the column says _F: every value is a measurement.
            out["NEE_QC"] = np.where(out["NEE"].notna(), 0.0, np.nan)
    elif "NEE_QC" not in out.columns:
        warnings.warn(
            f"{label}: no {used['NEE']}_QC column; NEE_QC is missing and qc_filter will reject every NEE "
            "record (pass a QC column through columns={'NEE_QC': ...})",
            TowerDataWarning,
            stacklevel=4,
        )
        out["NEE_QC"] = np.nan
    elif resolution in SUBDAILY and used["NEE"].endswith("_MEAN"):
        # ONEFlux's *_MEAN_QC is a 0-1 fraction even at HH.
        nee_qc_kind = "fraction"
    if flavour == "base" and "VPD" not in out.columns and {"TA", "RH"} <= set(out.columns):
        out["VPD"] = _vpd_from_ta_rh(out["TA"].to_numpy(), out["RH"].to_numpy())
        used["VPD"] = f"derived from {used['TA']}, {used['RH']} (Magnus formula)"
    if "RH" in out.columns:
        out = out.drop(columns="RH")
        used.pop("RH")
    order = ["time", "time_end", "NEE", "NEE_QC", "NEE_UNC", *PARTITIONED_CANDIDATES]
    for v in MET_VARIABLES:
        order += [v, f"{v}_QC"]
    order += list(TURBULENCE_VARIABLES)
    out = out[[c for c in order if c in out.columns]]
    out.attrs.update(
        resolution=resolution,
        format=_product(info, flavour),
        columns=used,
        source_units=source_units,
        nee_qc_kind=nee_qc_kind,
    )
    if flavour == "fluxdatakit":
        fluxes = ", ".join(v for v in ("NEE", *PARTITIONED_CANDIDATES) if v in used) or "NEE"
        carbon = (
            f"{fluxes} taken as the mean of half-hourly umol m-2 s-1 (FluxDataKit averages half-hours) and "
            "converted to gC m-2 d-1"
            if resolution not in SUBDAILY
            else f"{fluxes} in umol m-2 s-1"
        )
        warnings.warn(
            f"{label}: read as a FluxDataKit derivative (ISO dates, NA for missing), not a FLUXNET release; "
            f"{carbon}; meteorology units as in FLUXNET2015 files of the same resolution",
            TowerDataWarning,
            stacklevel=4,
        )
    return out


def _flavour(info: _NameInfo | None, names: list[str]) -> str:
    if info is not None:
        return info.flavour
    # Names only ONEFlux writes (processing-chain suffixes); plain SW_IN or TA occur in BASE files too.
    consolidated = {"TA_F", "SW_IN_F", "VPD_F", "P_F", "WS_F"}
    oneflux = any(
        c.startswith(("NEE_VUT_", "NEE_CUT_")) or c.endswith(("_F_MDS", "_ERA")) or c in consolidated
        for c in names
    )
    base_like = {"FC", "NEE_PI"} & set(names) or base_column(names, "FC")
    if "TIMESTAMP_START" in names and not oneflux and base_like:
        return "base"
    return "fluxnet"


def _product(info: _NameInfo | None, flavour: str) -> str:
    if info is not None:
        return info.product
    return {"base": "AmeriFlux BASE-like CSV", "fluxnet": "FLUXNET-like CSV"}[flavour]


def _pick_columns(label: str, flavour: str, names: list[str], override: dict[str, str]) -> dict[str, str]:
    """Tidy variable → source column, for the variables this file has."""
    for var, src in override.items():
        if src not in names:
            raise TowerFormatError(f"{label}: column {src} (asked for {var}) is not in the file")
    pick: dict[str, str] = {}
    if flavour == "base":
        for var, bases in {**BASE_CANDIDATES, **TURBULENCE_CANDIDATES}.items():
            cands = [c for b in bases for c in base_column(names, b)]
            if cands:
                pick[var] = cands[0]
        pick.update(override)
        nee = pick.get("NEE")
        if nee is not None and "NEE_QC" not in override:
            qc = _base_qc_name(nee)
            if qc in names:
                pick["NEE_QC"] = qc
        return pick
    for var, cands in {**FLUXNET_CANDIDATES, **TURBULENCE_CANDIDATES}.items():
        src = override.get(var) or next((c for c in cands if c in names), None)
        if src is None:
            continue
        pick[var] = src
        if var == "NEE":
            pick.update(_nee_companions(src, names))
        elif f"{src}_QC" in names:
            pick[f"{var}_QC"] = f"{src}_QC"
    pick.update(override)
    return pick


def _nee_companions(src: str, names: list[str]) -> dict[str, str]:
    """NEE_QC / NEE_UNC source columns that go with the NEE column ``src``."""
    out: dict[str, str] = {}
    for suffix, tidy in (("_QC", "NEE_QC"), ("_JOINTUNC", "NEE_UNC"), ("_RANDUNC", "NEE_UNC")):
        if tidy not in out and f"{src}{suffix}" in names:
            out[tidy] = f"{src}{suffix}"
    return out


def _nee_alternatives(
    flavour: str, names: list[str], pick: dict[str, str], override: dict[str, str]
) -> list[str]:
    """The file's other NEE candidates after the one picked by name, to fall back on when it is empty.

    None when the caller chose NEE or one of its companions (``columns=``): that choice is kept as given.
    """
    if flavour == "base" or {"NEE", "NEE_QC", "NEE_UNC"} & set(override) or "NEE" not in pick:
        return []
    cands = [c for c in FLUXNET_CANDIDATES["NEE"] if c in names]
    return cands[cands.index(pick["NEE"]) + 1 :] if pick["NEE"] in cands else []


def _nee_with_data(
    label: str, body: bytes, raw: pd.DataFrame, pick: dict[str, str], alts: list[str], names: list[str]
) -> pd.DataFrame:
    """``raw``, with ``pick``'s NEE (and its QC/uncertainty) moved to the first candidate holding data if the
    one picked by name holds none.

    ONEFlux writes every NEE variant's column even when one could not be computed (all -9999); picking by
    name alone dropped such a site for want of NEE. The other candidates are parsed only then, so ordinary
    files cost no more to read.
    """
    first = pick.get("NEE")
    if not alts or first not in raw.columns or np.isfinite(_numeric(label, raw[first], first)).any():
        return raw
    cols = [c for a in alts for c in (a, *_nee_companions(a, names).values())]
    more = pd.read_csv(io.BytesIO(body), usecols=cols, na_values=["NA", "NaN", "nan"], keep_default_na=False)
    for alt in alts:
        if np.isfinite(_numeric(label, more[alt], alt)).any():
            for tidy in ("NEE_QC", "NEE_UNC"):
                pick.pop(tidy, None)
            pick["NEE"] = alt
            pick.update(_nee_companions(alt, names))
            warnings.warn(
                f"{label}: {first} holds no value (all -9999); NEE is read from {alt}",
                TowerDataWarning,
                stacklevel=5,
            )
            return pd.concat([raw, more[[c for c in more.columns if c not in raw.columns]]], axis=1)
    return raw


def _partitioned_candidates(flavour: str, names: list[str], override: dict[str, str]) -> dict[str, list[str]]:
    """Tidy RECO/GPP → the file's candidate source columns, best first (the caller takes the first with data).

    Only FLUXNET-family files: BASE names its partitioned fluxes differently (``GPP_PI``, ``RECO_PI``), and a
    variable given in ``override`` is read through :func:`_pick_columns` instead.
    """
    if flavour == "base":
        return {}
    out = {}
    for var, cands in PARTITIONED_CANDIDATES.items():
        present = [c for c in cands if c in names]
        if present and var not in override:
            out[var] = present
    return out


def _base_qc_name(col: str) -> str:
    m = re.match(r"^(.*?)((?:_\d+){1,3}|_\d+_\d+_A)?$", col)
    stem, pos = (m.group(1), m.group(2) or "") if m else (col, "")
    return f"{stem}_SSITC_TEST{pos}"


def _source_unit(flavour: str, var: str, src: str, resolution: str) -> str | None:
    if flavour == "base":
        return BASE_UNITS.get(var.removesuffix("_UNC"))
    if flavour == "fluxdatakit" and var in ("NEE", "NEE_UNC", *PARTITIONED_CANDIDATES):
        # FluxDataKit down-samples by averaging the half-hours, so its daily carbon fluxes (GPP too, in
        # fdk_downsample_fluxnet) stay in umol m-2 s-1 (ONEFlux's DD files hold gC m-2 d-1; reading FDK
        # as those is 3.6 % low).
        return "umolCO2 m-2 s-1"
    unit = fluxnet_units(src, resolution)
    if unit is None and var in ("NEE", "NEE_UNC"):
        # A plain 'NEE' column in a FLUXNET-like file: assume the FLUXNET unit of its resolution.
        unit = fluxnet_units("NEE_VUT_REF", resolution)
    elif unit is None and var == "P":
        unit = fluxnet_units("P_F", resolution)
    return unit


def _no_nee_message(label: str, flavour: str, names: list[str]) -> str:
    have = [c for c in names if c.startswith(("GPP_", "RECO_", "LE_", "H_"))][:4]
    if flavour == "fluxdatakit":
        return (
            f"{label}: FluxDataKit-style file has no NEE column "
            f"(it carries {', '.join(have) or 'meteorology'}); "
            "geoflux needs NEE_VUT_REF or NEE_CUT_REF (use the FLUXNET FULLSET/SUBSET download, or "
            "require_nee=False for meteorology only)"
        )
    cands = BASE_CANDIDATES["NEE"] if flavour == "base" else FLUXNET_CANDIDATES["NEE"]
    return f"{label}: no NEE column (expected one of {list(cands)})"


def _numeric(label: str, col: pd.Series, name: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col.dtype):
        values = col.to_numpy(dtype="float64", na_value=np.nan, copy=True)
    else:
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64", na_value=np.nan, copy=True)
        bad = np.isnan(values) & col.notna().to_numpy() & (col.astype(str).str.strip() != "").to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TowerFormatError(
                f"{label}: column {name}, data row {i + 1}: {col.iloc[i]!r} is not a number"
            )
    values[values == MISSING] = np.nan
    return values


def _csv_times(label: str, raw: pd.DataFrame, flavour: str) -> tuple[pd.Series, pd.Series, str]:
    """Record start, exclusive end and resolution from the time-stamp columns."""
    if "TIMESTAMP_START" in raw.columns:
        start_s = raw["TIMESTAMP_START"].str.strip()
        n = _stamp_length(label, start_s, "TIMESTAMP_START")
        fmt = {12: "%Y%m%d%H%M", 8: "%Y%m%d"}.get(n)
        if fmt is None:
            raise TowerFormatError(
                f"{label}: TIMESTAMP_START {start_s.iloc[0]!r} is not YYYYMMDDHHMM or YYYYMMDD"
            )
        start = _to_time(label, start_s, fmt, "TIMESTAMP_START")
        if "TIMESTAMP_END" not in raw.columns:
            raise TowerFormatError(f"{label}: TIMESTAMP_START without TIMESTAMP_END")
        end_s = raw["TIMESTAMP_END"].str.strip()
        end = _to_time(label, end_s, fmt, "TIMESTAMP_END")
        length = end - start
        if n == 8:
            # Weekly files: ONEFlux writes the first and the last day of the week (inclusive).
            if (length.dt.days.median() or 0) < 7:
                end = end + pd.Timedelta("1D")
                length = end - start
            return start, end, "WW" if length.median() >= pd.Timedelta("6D") else "DD"
        step = length.mode().iloc[0]
        resolution = {pd.Timedelta("30min"): "HH", pd.Timedelta("1h"): "HR"}.get(step)
        if resolution is None:
            raise TowerFormatError(
                f"{label}: records last {step} (TIMESTAMP_END - TIMESTAMP_START; expected 30 min or 1 h)"
            )
        bad = (length != step).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TowerFormatError(
                f"{label}: data row {i + 1}: TIMESTAMP_END {end_s.iloc[i]} is not {step} after "
                f"TIMESTAMP_START {start_s.iloc[i]}"
            )
        minutes = start.dt.minute.to_numpy()
        grid = 30 if resolution == "HH" else 60
        off = minutes % grid != 0
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise TowerFormatError(
                f"{label}: data row {i + 1}: TIMESTAMP_START {start_s.iloc[i]} is off the {grid}-min grid"
            )
        return start, end, resolution
    if "TIMESTAMP" not in raw.columns:
        raise TowerFormatError(f"{label}: no TIMESTAMP or TIMESTAMP_START column")
    stamp = raw["TIMESTAMP"].str.strip()
    n = _stamp_length(label, stamp, "TIMESTAMP")
    iso = n == 10 and stamp.iloc[0][4:5] == "-"
    fmt = "%Y-%m-%d" if iso else {8: "%Y%m%d", 6: "%Y%m", 4: "%Y"}.get(n)
    if fmt is None:
        raise TowerFormatError(f"{label}: TIMESTAMP {stamp.iloc[0]!r} is not YYYYMMDD, YYYYMM or YYYY")
    if iso and flavour != "fluxdatakit":
        raise TowerFormatError(
            f"{label}: ISO dates in TIMESTAMP ({stamp.iloc[0]}); FLUXNET files write YYYYMMDD "
            "(a derived product? FluxDataKit files are read when named FLX_<SITE>_FLUXDATAKIT_...)"
        )
    start = _to_time(label, stamp, fmt, "TIMESTAMP")
    resolution = {"%Y%m": "MM", "%Y": "YY"}.get(fmt, "DD")
    offset = {"DD": pd.DateOffset(days=1), "MM": pd.DateOffset(months=1), "YY": pd.DateOffset(years=1)}
    end = start + offset[resolution]
    return start, end, resolution


def _stamp_length(label: str, s: pd.Series, name: str) -> int:
    lengths = s.str.len()
    n = int(lengths.mode().iloc[0])
    bad = (lengths != n).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TowerFormatError(
            f"{label}: data row {i + 1}: {name} {s.iloc[i]!r} differs in length from {s.iloc[0]!r}"
        )
    return n


def _to_time(label: str, s: pd.Series, fmt: str, name: str) -> pd.Series:
    if fmt in _DIGIT_FORMATS:
        t = _digits_to_time(s, fmt)
    else:
        t = pd.to_datetime(s, format=fmt, errors="coerce")
    bad = t.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TowerFormatError(f"{label}: data row {i + 1}: cannot parse {name} {s.iloc[i]!r}")
    return t.astype("datetime64[ns]")


_DIGIT_FORMATS = {"%Y%m%d%H%M": 12, "%Y%m%d": 8, "%Y%m": 6, "%Y": 4}


def _digits_to_time(s: pd.Series, fmt: str) -> pd.Series:
    """Parse YYYY[MM[DD[HHMM]]] stamps with integer arithmetic; invalid ones become NaT.

    strptime costs ~3 us per stamp; a site-year of half-hours has 35,040 of them, which alone would
    take a tenth of a second.
    """
    n = _DIGIT_FORMATS[fmt]
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64")
    ok = np.isfinite(v) & (v >= 0) & (v == np.floor(v))
    x = np.where(ok, v, 0).astype("int64") * 10 ** (12 - n)  # pad to YYYYMMDDHHMM
    if n == 6:
        x += 10**4  # day 01
    elif n == 4:
        x += 10**6 + 10**4  # month 01, day 01
    year, month, day = x // 10**8, x // 10**6 % 100, x // 10**4 % 100
    hour, minute = x // 100 % 100, x % 100
    # Years outside 1900-2200 are typos here (and would overflow nanosecond time stamps).
    ok &= (year >= 1900) & (year <= 2200) & (month >= 1) & (month <= 12) & (day >= 1)
    ok &= (hour <= 23) & (minute <= 59)
    month_start = (np.where(ok, year, 1970) - 1970).astype("datetime64[Y]").astype("datetime64[M]") + (
        np.where(ok, month, 1) - 1
    ).astype("timedelta64[M]")
    month_days = (
        (month_start + np.timedelta64(1, "M")).astype("datetime64[D]") - month_start.astype("datetime64[D]")
    ).astype("int64")
    ok &= day <= month_days
    t = (
        month_start.astype("datetime64[ns]")
        + (np.where(ok, day, 1) - 1).astype("timedelta64[D]")
        + (hour * 60 + minute).astype("timedelta64[m]")
    )
    t[~ok] = np.datetime64("NaT")
    return pd.Series(t, index=s.index)


def _vpd_from_ta_rh(ta: np.ndarray, rh: np.ndarray) -> np.ndarray:
    """VPD, hPa, from air temperature (degC) and relative humidity (%), Magnus formula over water."""
    es = 6.1078 * np.exp(17.27 * ta / (ta + 237.3))
    return es * (1.0 - np.clip(rh, 0.0, 100.0) / 100.0)


# --------------------------------------------------------------------------------------------------
# REddyProc input: tab-separated, header of names, a line of units, Hour at the END of the record.
_REDDYPROC = {"NEE": "NEE", "Tair": "TA", "Rg": "SW_IN", "VPD": "VPD", "Ustar": "USTAR"}
_REDDYPROC_UNITS = {
    "NEE": {"umolm-2s-1", "µmolm-2s-1", "umolco2m-2s-1", "µmolco2m-2s-1", "umol/m2/s"},
    "Tair": {"degc", "°c", "c"},
    "Rg": {"wm-2", "w/m2"},
    "VPD": {"hpa"},
    "Ustar": {"ms-1", "m/s"},
}


def _read_reddyproc(label: str, body: bytes) -> pd.DataFrame:
    lines = body.split(b"\n", 2)
    names = lines[0].decode("utf-8", "replace").strip().split("\t")
    units = lines[1].decode("utf-8", "replace").strip().split("\t") if len(lines) > 1 else []
    for name, unit in zip(names, units, strict=False):  # a short units line is checked no further
        ok = _REDDYPROC_UNITS.get(name)
        if ok is not None and unit.strip().lower().replace(" ", "") not in ok:
            raise TowerFormatError(
                f"{label}: column {name} has unit {unit!r} (expected {min(ok)}; wrong units?)"
            )
    if len(lines) < 3 or not lines[2].strip():
        raise TowerFormatError(f"{label}: header but no data rows (truncated file?)")
    _check_fields(label, lines[0] + b"\n" + lines[2], len(names), "\t")
    try:
        raw = pd.read_csv(io.BytesIO(lines[2]), sep="\t", header=None, names=names, engine="c")
    except (pd.errors.ParserError, ValueError) as exc:
        raise TowerFormatError(f"{label}: malformed REddyProc data ({str(exc).splitlines()[0]})") from None
    for c in ("Year", "DoY", "Hour"):
        if not pd.api.types.is_numeric_dtype(raw[c]):
            raise TowerFormatError(f"{label}: column {c} is not numeric")
    # Whole minutes: Hour is decimal (0.5 = 00:30) and float noise must not create 00:29:59.99.
    minutes = np.rint(raw["Hour"].to_numpy() * 60).astype("int64")
    year = raw["Year"].to_numpy().astype("int64")
    doy = raw["DoY"].to_numpy().astype("int64")
    jan1 = pd.to_datetime(pd.Series(year).astype(str), format="%Y").to_numpy()
    end = jan1 + (doy - 1).astype("timedelta64[D]") + minutes.astype("timedelta64[m]")
    end = pd.Series(end.astype("datetime64[ns]"))
    # REddyProc needs a complete series, so the smallest step between records is the record length.
    diffs = end.diff().dropna()
    step = diffs[diffs > pd.Timedelta(0)].min() if len(diffs) else pd.Timedelta("30min")
    resolution = {pd.Timedelta("30min"): "HH", pd.Timedelta("1h"): "HR"}.get(step)
    if resolution is None:
        raise TowerFormatError(f"{label}: records are {step} apart (expected 30 min or 1 h)")
    out = pd.DataFrame({"time": end - step, "time_end": end})
    used = {}
    for src, dst in _REDDYPROC.items():
        if src in raw.columns:
            out[dst] = _numeric(label, raw[src], src)
            used[dst] = src
    if "NEE" not in out.columns:
        raise TowerFormatError(f"{label}: REddyProc file has no NEE column")
    # REddyProc input is measured, not gap-filled (gap-filling is what REddyProc does to it).
    out.insert(3, "NEE_QC", np.where(out["NEE"].notna(), 0.0, np.nan))
    out.attrs.update(resolution=resolution, format="REddyProc input", columns=used, nee_qc_kind="flag")
    return out


# --------------------------------------------------------------------------------------------------
# Checks common to every format.
# Absolute values beyond these are implausible in the tidy unit (unit-suspicious column when many).
# RECO and GPP get NEE's bounds: large enough for peak crop GPP, far below a unit mix-up (x 86400 etc.).
_PLAUSIBLE_SUBDAILY = {
    "NEE": 100.0,
    "RECO": 100.0,
    "GPP": 100.0,
    "TA": 70.0,
    "SW_IN": 1500.0,
    "VPD": 150.0,
    "USTAR": 10.0,
    "WS": 75.0,
    "P": 300.0,
}
_PLAUSIBLE_DAILY = {
    "NEE": 60.0,
    "RECO": 60.0,
    "GPP": 60.0,
    "TA": 70.0,
    "SW_IN": 1500.0,
    "VPD": 150.0,
    "USTAR": 10.0,
    "WS": 75.0,
    "P": 1000.0,
}
# A few wild values are spikes, many are a unit problem.
_MAX_SPIKE_FRACTION = 0.01


def _check_times(label: str, df: pd.DataFrame) -> pd.DataFrame:
    t = df["time"].to_numpy()
    back = np.flatnonzero(t[1:] < t[:-1])
    if len(back):
        i = int(back[0]) + 1
        raise TowerFormatError(
            f"{label}: time stamps go backwards at data row {i + 1} ({df['time'].iloc[i - 1]} then "
            f"{df['time'].iloc[i]}; expected increasing)"
        )
    dup = np.flatnonzero(t[1:] == t[:-1]) + 1
    if len(dup):
        values = df.drop(columns=["site"])
        same = values.iloc[dup].reset_index(drop=True).equals(values.iloc[dup - 1].reset_index(drop=True))
        what = "identical rows" if same else "rows that differ"
        warnings.warn(
            f"{label}: {len(dup)} duplicated time stamp(s), first {df['time'].iloc[dup[0]]} ({what}); "
            "kept the first occurrence of each",
            TowerDataWarning,
            stacklevel=4,
        )
        keep = np.ones(len(df), bool)
        keep[dup] = False
        attrs = df.attrs
        df = df.loc[keep].reset_index(drop=True)
        df.attrs = attrs
    return df


def _check_values(label: str, df: pd.DataFrame) -> None:
    sub = df.attrs["resolution"] in SUBDAILY
    limits = _PLAUSIBLE_SUBDAILY if sub else _PLAUSIBLE_DAILY
    for col, limit in limits.items():
        if col not in df.columns:
            continue
        v = df[col].to_numpy()
        valid = ~np.isnan(v)
        wild = valid & (np.abs(v) > limit)
        n_wild = int(wild.sum())
        if not n_wild:
            continue
        unit = RECORD_UNITS[col]
        if n_wild > _MAX_SPIKE_FRACTION * max(int(valid.sum()), 1):
            raise TowerFormatError(
                f"{label}: column {col} ({df.attrs.get('columns', {}).get(col, col)}) has {n_wild} values "
                f"beyond "
                f"±{limit:g}, up to {np.nanmax(np.abs(v)):g} (expected {unit}; wrong units?)"
            )
        warnings.warn(
            f"{label}: {n_wild} value(s) of {col} beyond ±{limit:g} ({unit}); set to missing",
            TowerDataWarning,
            stacklevel=4,
        )
        df.loc[wild, col] = np.nan
    # VPD in kPa instead of hPa: a month or more of data whose 99th percentile stays below 0.5 hPa.
    if "VPD" in df.columns and len(df):
        span = df["time_end"].iloc[-1] - df["time"].iloc[0]
        vpd = df["VPD"].to_numpy()
        if span >= pd.Timedelta("30D") and np.isfinite(vpd).sum() >= 28 and np.nanpercentile(vpd, 99) < 0.5:
            raise TowerFormatError(
                f"{label}: column VPD stays below 0.5 (99th percentile {np.nanpercentile(vpd, 99):.3g}) over "
                f"{span.days} days (expected hPa; kPa?)"
            )
