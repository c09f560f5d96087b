"""Which source columns feed each tidy variable, in which units, and how they convert.

Two naming families are covered:

* ONEFlux / FLUXNET2015 / FLUXNET (FLUXMET) / ICOS ETC L2 "FLUXNET" files: units depend on the time
  resolution of the file (``NEE_VUT_REF`` is umolCO2 m-2 s-1 at HH/HR, gC m-2 d-1 at DD/WW/MM and
  gC m-2 y-1 at YY). :func:`fluxnet_units` encodes ONEFlux's naming rules; the tests check it against
  ONEFlux's own variable tables rather than against a list typed here.
* AmeriFlux BASE (FP-standard names such as ``FC``, ``NEE_PI``, ``TA_1_1_1``): units do not depend on
  resolution because BASE is only published half-hourly or hourly.

Tidy units (:data:`RECORD_UNITS`) are one convention for every reader: sub-daily records keep the
instantaneous flux (umolCO2 m-2 s-1) and precipitation per record (mm); daily and coarser records are
rates per day (gC m-2 d-1, mm d-1). Yearly totals are therefore divided by the days of their year.
"""

from __future__ import annotations

import re

import numpy as np

SUBDAILY = ("HH", "HR")
RESOLUTIONS = ("HH", "HR", "DD", "WW", "MM", "YY")

# 1 umol CO2 m-2 s-1 carries 12.011e-6 g C m-2 s-1 (molar mass of carbon); times 86400 s d-1.
UMOL_TO_GC_PER_DAY = 12.011e-6 * 86400.0

RECORD_UNITS: dict[str, str] = {
    "NEE": "umol CO2 m-2 s-1 (half-hourly/hourly records); gC m-2 d-1 (daily and coarser records); "
    "positive = source to the atmosphere",
    "NEE_QC": "0 measured, 1 good, 2 medium, 3 poor gap-fill (HH/HR); fraction 0-1 of measured and "
    "good-quality gap-filled data (DD and coarser)",
    "NEE_UNC": "same unit as NEE; joint (random + u* filtering) uncertainty, 1 sigma",
    "RECO": "umol CO2 m-2 s-1 (half-hourly/hourly records); gC m-2 d-1 (daily and coarser records); "
    "ecosystem respiration from ONEFlux's night-time partitioning; positive = release to the atmosphere",
    "GPP": "umol CO2 m-2 s-1 (half-hourly/hourly records); gC m-2 d-1 (daily and coarser records); "
    "gross primary production from ONEFlux's night-time partitioning; positive = uptake from the atmosphere",
    "TA": "degC",
    "SW_IN": "W m-2",
    "VPD": "hPa",
    "P": "mm per record (HH/HR); mm d-1 (DD and coarser)",
    "USTAR": "m s-1",
    "WS": "m s-1",
    "WD": "decimal degrees from true north",
    "MO_LENGTH": "m (Obukhov length; negative = unstable)",
    "V_SIGMA": "m s-1 (standard deviation of the lateral wind)",
    "<VAR>_QC": "meteorology QC: 0 measured, 1 good gap-fill, 2 downscaled from ERA (HH/HR); "
    "fraction 0-1 of measured and good gap-filled data (DD and coarser)",
}

MET_VARIABLES = ("TA", "SW_IN", "VPD", "P", "USTAR", "WS", "WD")
# Turbulence statistics some files carry (ONEFlux FULLSET does not; AmeriFlux BASE and site processing
# often do). Passed through unaggregated for flux footprints (Kljun et al. 2015 FFP).
TURBULENCE_VARIABLES = ("MO_LENGTH", "V_SIGMA")
TURBULENCE_CANDIDATES: dict[str, tuple[str, ...]] = {"MO_LENGTH": ("MO_LENGTH",), "V_SIGMA": ("V_SIGMA",)}

# ---------------------------------------------------------------------------------------------------
# FLUXNET (ONEFlux) names. Preference order matters: the first column present in the header wins
# (by name alone, whatever its values), and the consolidated, gap-free products (_F) come before the
# MDS-only and ERA-only ones.
FLUXNET_CANDIDATES: dict[str, tuple[str, ...]] = {
    "NEE": ("NEE_VUT_REF", "NEE_CUT_REF", "NEE_VUT_USTAR50", "NEE_CUT_USTAR50", "NEE"),
    "TA": ("TA_F", "TA_F_MDS", "TA", "TA_ERA"),
    "SW_IN": ("SW_IN_F", "SW_IN_F_MDS", "SW_IN", "SW_IN_ERA"),
    "VPD": ("VPD_F", "VPD_F_MDS", "VPD", "VPD_ERA"),
    "P": ("P_F", "P", "P_ERA"),
    "USTAR": ("USTAR",),
    "WS": ("WS_F", "WS", "WS_ERA"),
    "WD": ("WD",),
}
# Partitioned fluxes that ONEFlux files carry, read only from the night-time (NT) method: geoflux's own
# partitioning (geoflux.towers.processing.partition) is night-time and the two are compared. Optional
# columns, so picked by data: the first candidate with at least one value wins, and a file where every
# candidate is absent or all missing gets no RECO/GPP column.
PARTITIONED_CANDIDATES: dict[str, tuple[str, ...]] = {
    "RECO": ("RECO_NT_VUT_REF", "RECO_NT_CUT_REF"),
    "GPP": ("GPP_NT_VUT_REF", "GPP_NT_CUT_REF"),
}

_NEE_FAMILY = re.compile(
    r"^NEE_(?:VUT|CUT)_(?:REF|USTAR50|MEAN|SE|\d\d)(?P<part>_NIGHT|_DAY)?"
    r"(?P<stat>_SD|_RANDUNC|_JOINTUNC)?(?P<qc>_QC)?$"
)
# Both partitioning methods (NT, DT), so that columns={"GPP": "GPP_DT_VUT_REF"} is read in tidy units too.
_PARTITIONED_FAMILY = re.compile(r"^(?:RECO|GPP)_(?:NT|DT)_(?:VUT|CUT)_(?:REF|USTAR50|MEAN|SE|\d\d)$")
_MET_FAMILY = re.compile(
    r"^(?P<var>TA|SW_IN|VPD|P|WS|USTAR|WD)(?P<src>_F_MDS|_ERA|_F)?(?P<part>_NIGHT|_DAY)?(?P<sd>_SD)?"
    r"(?P<qc>_QC)?$"
)
_MET_UNITS = {
    "TA": "deg C",
    "SW_IN": "W m-2",
    "VPD": "hPa",
    "WS": "m s-1",
    "USTAR": "m s-1",
    "WD": "Decimal degrees",
}
_P_UNITS = {"HH": "mm", "HR": "mm", "DD": "mm d-1", "WW": "mm d-1", "MM": "mm d-1", "YY": "mm y-1"}
_FLUX_UNITS = {
    "HH": "umolCO2 m-2 s-1",
    "HR": "umolCO2 m-2 s-1",
    "DD": "gC m-2 d-1",
    "WW": "gC m-2 d-1",
    "MM": "gC m-2 d-1",
    "YY": "gC m-2 y-1",
}


def fluxnet_units(column: str, resolution: str) -> str | None:
    """Unit of a FLUXNET (ONEFlux) NEE, partitioned-flux or meteorology column at a given file resolution.

    Parameters
    ----------
    column : column name as in the file header, e.g. ``NEE_VUT_REF``, ``NEE_CUT_50_NIGHT``, ``TA_F_QC``,
        ``RECO_NT_VUT_REF``, ``GPP_DT_CUT_SE``.
    resolution : ``HH``, ``HR``, ``DD``, ``WW``, ``MM`` or ``YY``.

    Returns
    -------
    The unit string in ONEFlux's spelling (ASCII ``u`` for micro), ``'adimensional'`` for QC columns,
    or ``None`` when the column is not an NEE/RECO/GPP/meteorology column geoflux reads. RECO and GPP
    (night- and day-time methods) have NEE's units: umolCO2 m-2 s-1 at HH/HR, gC m-2 d-1 at DD/WW/MM,
    gC m-2 y-1 at YY.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r} (expected one of {RESOLUTIONS})")
    m = _NEE_FAMILY.match(column)
    if m:
        if m["qc"]:
            return "adimensional"
        # Day-time/night-time NEE in DD and coarser files are mean rates, not sums (ONEFlux keeps
        # them in umol m-2 s-1 at every resolution).
        return "umolCO2 m-2 s-1" if m["part"] else _FLUX_UNITS[resolution]
    if _PARTITIONED_FAMILY.match(column):
        return _FLUX_UNITS[resolution]
    m = _MET_FAMILY.match(column)
    if m:
        if m["qc"]:
            return "adimensional"
        if m["var"] == "P":
            return _P_UNITS[resolution]
        return _MET_UNITS[m["var"]]
    return None


# ---------------------------------------------------------------------------------------------------
# AmeriFlux BASE (FP-standard) names. A column is a base name plus optional qualifiers: _PI (provided
# by the site team), _F (gap-filled), position _H_V_R / _H_V_A / _# and aggregation suffixes.
BASE_CANDIDATES: dict[str, tuple[str, ...]] = {
    # NEE_PI includes storage and the site's own processing; FC is the turbulent flux only, which
    # for short canopies is close to NEE. Gap-filled (_F) columns are never chosen by default.
    "NEE": ("NEE_PI", "NEE", "FC_PI", "FC"),
    "TA": ("TA_PI", "TA"),
    "SW_IN": ("SW_IN_PI", "SW_IN"),
    "VPD": ("VPD_PI", "VPD"),
    "P": ("P_PI", "P"),
    "USTAR": ("USTAR_PI", "USTAR"),
    "WS": ("WS_PI", "WS"),
    "WD": ("WD_PI", "WD"),
    "RH": ("RH_PI", "RH"),
}
BASE_UNITS: dict[str, str] = {
    "NEE": "umolCO2 m-2 s-1",
    "TA": "deg C",
    "SW_IN": "W m-2",
    "VPD": "hPa",
    "P": "mm",
    "USTAR": "m s-1",
    "WS": "m s-1",
    "WD": "Decimal degrees",
    "RH": "%",
}
_POSITION = re.compile(r"^(?P<base>.+?)_(?P<h>\d+)_(?P<v>\d+)_(?P<r>\d+|A)$|^(?P<base1>.+?)_(?P<layer>\d+)$")


def base_column(columns: list[str], name: str) -> list[str]:
    """Columns of an AmeriFlux BASE header that carry ``name``, best first.

    The unqualified name comes first. Position-qualified columns follow, ordered by horizontal
    position H, then vertical position V (AmeriFlux numbers V from the top, so V=1 is the highest
    sensor, i.e. the one nearest the flux measurement), then the replicate average ``A`` before
    replicates 1, 2, ...; layer-indexed ``_#`` columns come last.
    """
    out: list[tuple[tuple, str]] = []
    for c in columns:
        if c == name:
            out.append(((0,), c))
            continue
        m = _POSITION.match(c)
        if not m:
            continue
        if m["base"] == name:
            r = -1 if m["r"] == "A" else int(m["r"])
            out.append(((1, int(m["h"]), int(m["v"]), r), c))
        elif m["base1"] == name:
            out.append(((2, int(m["layer"])), c))
    return [c for _, c in sorted(out)]


def convert(values: np.ndarray, unit: str, resolution: str, record_days: np.ndarray | float) -> np.ndarray:
    """Convert ``values`` from a source ``unit`` to the tidy unit of their resolution.

    Parameters
    ----------
    values : data in ``unit``.
    unit : a unit returned by :func:`fluxnet_units` or :data:`BASE_UNITS`.
    resolution : resolution of the records (decides the target unit, see :data:`RECORD_UNITS`).
    record_days : length of each record, days (used for per-year totals).
    """
    sub = resolution in SUBDAILY
    if unit == "umolCO2 m-2 s-1":
        return values if sub else values * UMOL_TO_GC_PER_DAY
    if unit == "gC m-2 d-1":
        if sub:
            raise ValueError("a daily rate cannot be a sub-daily record")
        return values
    if unit in ("gC m-2 y-1", "mm y-1"):
        return values / record_days
    return values
