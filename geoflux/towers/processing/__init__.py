"""Site processing of eddy-covariance records: u* filtering, MDS gap-filling, flux partitioning, budgets and
the patterns of NEE at each site.

Public API::

    analyze_site(records, out_dir, **options) -> summary dict   (writes tables + PNGs)
    process_site(records, **options)          -> SiteResult      (no I/O)
    compare_sites(summaries, sites=None)      -> across-site table
    write_site_comparison(summaries, out_dir, sites=None) -> paths
    mds_gapfill(...), ustar_threshold(...), detect_spikes(...),
    partition_nighttime(...), partition_daytime(...), lloyd_taylor(...), fit_lloyd_taylor(...)

Methods: Papale et al. (2006) spikes and u* moving-point test; Reichstein et al. (2005) MDS gap-filling and
night-time partitioning; Lasslop et al. (2010) day-time partitioning. Fluxes in umol CO2 m-2 s-1, budgets in
gC m-2 yr-1.
"""

from geoflux.towers.processing.analyze import ProcessingOptions, SiteResult, analyze_site, process_site
from geoflux.towers.processing.compare import write_site_comparison
from geoflux.towers.processing.dynamics import compare_sites, driver_classes
from geoflux.towers.processing.mds import MDSOptions, MDSResult, mds_gapfill
from geoflux.towers.processing.partition import (
    DayOptions,
    NightOptions,
    fit_lloyd_taylor,
    light_response,
    lloyd_taylor,
    partition_daytime,
    partition_nighttime,
    q10_from_e0,
)
from geoflux.towers.processing.spikes import detect_spikes
from geoflux.towers.processing.ustar import UstarOptions, UstarResult, ustar_threshold

__all__ = [
    "DayOptions",
    "MDSOptions",
    "MDSResult",
    "NightOptions",
    "ProcessingOptions",
    "SiteResult",
    "UstarOptions",
    "UstarResult",
    "analyze_site",
    "compare_sites",
    "detect_spikes",
    "driver_classes",
    "fit_lloyd_taylor",
    "light_response",
    "lloyd_taylor",
    "mds_gapfill",
    "partition_daytime",
    "partition_nighttime",
    "process_site",
    "q10_from_e0",
    "ustar_threshold",
    "write_site_comparison",
]
