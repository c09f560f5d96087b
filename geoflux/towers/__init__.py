"""Tower stage: FLUXNET-family files and site tables → one tidy, QC-filtered, aggregated table.

Public API (used by the pipeline, the CLI and the notebooks)::

    read_tower_file(path)           -> records of one site (tidy frame, native time step)
    read_sites(path)                -> site table
    select_sites(sites, bbox, igbp, years=...) -> subset of the site table
    read_towers(files, sites, ...)  -> records of many sites, checked against the site table
    qc_filter(records, ...)         -> failing NEE masked, per-record NEE_weight added
    aggregate(records, periods, …)  -> per-site means per model time step, with coverage
    write_records(df, path)         -> parquet, written atomically
    summarize(records)              -> per-site years, raw and QC-passing coverage, gaps

Tidy record columns: ``site``, ``time`` (start of the record) and ``time_end`` (exclusive end), both
local standard time as written in the files (tz-naive, never shifted), ``NEE``, ``NEE_QC``
(``NEE_UNC`` where the file has an uncertainty; ``RECO`` and ``GPP`` where it carries ONEFlux's night-time
partitioning) plus meteorology under FLUXNET base names (``TA``,
``SW_IN``, ``VPD``, ``P``, ``USTAR``, ``WS``, ``WD``, with ``<VAR>_QC`` where available). Units are in
:data:`RECORD_UNITS` / :data:`AGGREGATE_UNITS`.
"""

from geoflux.towers.aggregate import AGGREGATE_UNITS, aggregate, make_periods, qc_filter, qc_pass, qc_rule
from geoflux.towers.columns import RECORD_UNITS, UMOL_TO_GC_PER_DAY, fluxnet_units
from geoflux.towers.output import read_records, summarize, write_records
from geoflux.towers.read import TowerDataWarning, read_tower_file, read_towers
from geoflux.towers.sites import read_sites, select_sites, to_utc

__all__ = [
    "AGGREGATE_UNITS",
    "RECORD_UNITS",
    "UMOL_TO_GC_PER_DAY",
    "TowerDataWarning",
    "aggregate",
    "fluxnet_units",
    "make_periods",
    "qc_filter",
    "qc_pass",
    "qc_rule",
    "read_records",
    "read_sites",
    "read_tower_file",
    "read_towers",
    "select_sites",
    "summarize",
    "to_utc",
    "write_records",
]
