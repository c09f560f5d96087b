"""Chunk kernels shared by every driver path (COG via odc-stac, Zarr/NetCDF via :mod:`geoflux.reanalysis`).

Derived drivers (NDVI, NIRv, VPD), the assets a driver reads, and the per-chunk plausibility check. Pure
functions of arrays and a :class:`~geoflux.catalog.variables.VariableSpec`; no I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import xarray as xr

from geoflux.catalog.variables import VariableSpec
from geoflux.errors import CubeError

# Magnus formula constants over water (Alduchov & Eskridge 1996): es(T) = A exp(B T / (T + C)), hPa, degC
MAGNUS_A, MAGNUS_B, MAGNUS_C = 6.1094, 17.625, 243.04


def ndvi(red: xr.DataArray, nir: xr.DataArray) -> xr.DataArray:
    """Normalised difference vegetation index (nir − red) / (nir + red), from reflectances (1)."""
    den = nir + red
    return ((nir - red) / den.where(den != 0)).astype("float32")


def nirv(red: xr.DataArray, nir: xr.DataArray) -> xr.DataArray:
    """Near-infrared reflectance of vegetation, NDVI × NIR (Badgley et al. 2017), dimensionless."""
    return (ndvi(red, nir) * nir).astype("float32")


def vpd_from_dewpoint(t: xr.DataArray, td: xr.DataArray) -> xr.DataArray:
    """Vapour pressure deficit, hPa, from air temperature ``t`` and dew point ``td`` (both degC).

    es(T) − es(Td) with the Magnus formula; clipped at 0 where rounding puts the dew point above ``t``.
    """

    def es(x: xr.DataArray) -> xr.DataArray:
        return MAGNUS_A * np.exp(MAGNUS_B * x / (x + MAGNUS_C))

    return (es(t) - es(td)).clip(min=0.0).astype("float32")


DERIVE: dict[str, Callable[..., xr.DataArray]] = {"ndvi": ndvi, "nirv": nirv, "vpd": vpd_from_dewpoint}


def data_assets(var: VariableSpec) -> list[str]:
    """Asset keys holding a driver's data (a derived driver's inputs, else its one asset)."""
    return list(dict.fromkeys(var.inputs.values())) if var.derive and var.inputs else [var.asset]


def implausible(var: VariableSpec, msg: str) -> None:
    """Raise ``msg`` as a CubeError, or warn with ``on_implausible: warn``."""
    if var.on_implausible == "warn":
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise CubeError(msg)


def check_physical(
    block: np.ndarray,
    block_info: dict | None = None,
    *,
    var: VariableSpec,
    labels: Sequence[str],
) -> np.ndarray:
    """Chunk task: values outside ``var.physical_range`` raise (or warn and become NaN)."""
    lo, hi = var.physical_range  # type: ignore[misc]
    bad = (block < lo) | (block > hi)  # NaN compares False: missing is never implausible
    if not bad.any():
        return block
    k = block_info[0]["array-location"][0][0] if block_info else 0
    vals = block[bad]
    implausible(
        var,
        f"{labels[k]}: {int(bad.sum())} pixel(s) outside physical_range [{lo:g}, {hi:g}] {var.units} "
        f"(min {np.nanmin(vals):.4g}, max {np.nanmax(vals):.4g}; expected values inside: check "
        "scale/offset/nodata)",
    )
    return np.where(bad, np.float32(np.nan), block)
