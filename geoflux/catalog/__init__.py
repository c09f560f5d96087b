"""Catalogs: STAC search (static catalogs, GeoParquet, STAC APIs) and the definitions that say which asset is
which variable.

* :mod:`.search` — search any STAC source, bounded, with retries and signing.
* :mod:`.definitions` — catalog definitions (``catalogs/*.yaml``) and their variables.
* :mod:`.variables` — :class:`VariableSpec` and unit converters (what config and definitions share).
"""

from geoflux.catalog.search import (
    GRIDDED_SUFFIXES,
    MAX_ITEMS,
    NETCDF_TYPES,
    PAGE_LIMIT,
    PC_PUBLIC_ACCOUNTS,
    PC_SAS_URL,
    STATIC_KINDS,
    TIMEOUT,
    ZARR_TYPES,
    BBox,
    PlanetaryComputerSigner,
    asset_media_type,
    check_assets,
    default_retry,
    href_suffix,
    is_geoparquet,
    is_gridded,
    item_crs,
    make_signer,
    open_api,
    open_item_collection,
    open_static,
    search_api,
    search_geoparquet,
    search_items,
    search_static,
)

__all__ = [
    "GRIDDED_SUFFIXES",
    "MAX_ITEMS",
    "NETCDF_TYPES",
    "PAGE_LIMIT",
    "PC_PUBLIC_ACCOUNTS",
    "PC_SAS_URL",
    "STATIC_KINDS",
    "TIMEOUT",
    "ZARR_TYPES",
    "BBox",
    "PlanetaryComputerSigner",
    "asset_media_type",
    "check_assets",
    "default_retry",
    "href_suffix",
    "is_geoparquet",
    "is_gridded",
    "item_crs",
    "make_signer",
    "open_api",
    "open_item_collection",
    "open_static",
    "search_api",
    "search_geoparquet",
    "search_items",
    "search_static",
]
