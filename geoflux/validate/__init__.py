"""Validation stage: maps against their truth (generated worlds) and against towers through their footprints.

Any NEE map time series can be scored, not only geoflux's own: GeoTIFF/COG files or an xarray export (e.g.
FLUXCOM-X) on any CRS.

* :mod:`.series` — map time series readers (:class:`MapSeries`).
* :mod:`.truth` — maps against the truth of a generated world, inside and outside the AOA.
* :mod:`.pairing` — footprint-weighted map values paired with towers; stratified skill tables.
* :mod:`.product` — validate any product against tower files.
"""

from geoflux.validate.pairing import (
    RI_BINS,
    RI_LABELS,
    ROLE_CV,
    ROLE_HELD_OUT,
    ROLE_INDEPENDENT,
    ROLE_TRAINING,
    Validation,
    footprint_map_values,
    footprint_values,
    stratified_tables,
    tower_summary,
    validate_maps,
    write_validation,
)
from geoflux.validate.product import (
    period_starts,
    validate_product,
)
from geoflux.validate.series import (
    MapSeries,
    open_geotiff_series,
    open_maps,
    open_xarray_series,
    time_from_name,
    unit_factor,
)
from geoflux.validate.truth import (
    aoa_truth_scores,
    check_truth_alignment,
    truth_scores,
)

__all__ = [
    "RI_BINS",
    "RI_LABELS",
    "ROLE_CV",
    "ROLE_HELD_OUT",
    "ROLE_INDEPENDENT",
    "ROLE_TRAINING",
    "MapSeries",
    "Validation",
    "aoa_truth_scores",
    "check_truth_alignment",
    "footprint_map_values",
    "footprint_values",
    "open_geotiff_series",
    "open_maps",
    "open_xarray_series",
    "period_starts",
    "stratified_tables",
    "time_from_name",
    "tower_summary",
    "truth_scores",
    "unit_factor",
    "validate_maps",
    "validate_product",
    "write_validation",
]
