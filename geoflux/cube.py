"""Driver cube: STAC items → one lazy, dask-backed :class:`xarray.Dataset` on the target grid.

Reads happen inside dask tasks (odc-stac builds one read task per chunk per band); decoding (nodata,
scale/offset) and compositing to the model time step are lazy too, so nothing is read until an output
is computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import odc.stac
import pandas as pd
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.config import GridSpec, RunConfig, VariableSpec
from geoflux.errors import CubeError, GridError


def target_grid(grid: GridSpec) -> GeoBox:
    """The target grid of a run as an odc-geo :class:`GeoBox` (CRS + affine + shape in one value)."""
    try:
        return GeoBox.from_bbox(grid.bbox, grid.crs, resolution=grid.resolution)
    except Exception as exc:  # pyproj/odc raise several types for a bad CRS
        raise GridError(f"grid: cannot build grid from crs={grid.crs!r} ({exc})") from None


def load_variable(
    items: Sequence[pystac.Item],
    var: VariableSpec,
    geobox: GeoBox,
    chunk: int,
) -> xr.DataArray:
    """Load one driver lazily onto ``geobox``, decoded to physical units (float32, NaN = missing).

    Continuous drivers are resampled bilinearly, categorical ones by nearest neighbour (never
    interpolated). Returns dims (time, y, x) in the order of the items' times.
    """
    missing = [i.id for i in items if var.asset not in i.assets]
    if missing:
        raise CubeError(f"variable '{var.name}': item {missing[0]} has no asset '{var.asset}'")
    stac_cfg: dict = {"*": {"assets": {var.asset: {}}}}
    if var.nodata is not None:
        stac_cfg["*"]["assets"][var.asset]["nodata"] = var.nodata
    try:
        ds = odc.stac.load(
            items,
            bands=[var.asset],
            geobox=geobox,
            chunks={"time": 1, "y": chunk, "x": chunk},
            dtype="float32",
            resampling="nearest" if var.kind == "categorical" else "bilinear",
            stac_cfg=stac_cfg,
            groupby="time",
        )
    except Exception as exc:  # odc-stac raises plain ValueError/KeyError for CRS-less or odd items
        raise CubeError(f"variable '{var.name}': cannot load items ({exc})") from None
    arr = ds[var.asset]
    if var.kind == "continuous" and (var.scale != 1.0 or var.offset != 0.0):
        arr = arr * np.float32(var.scale) + np.float32(var.offset)
    arr = arr.astype("float32").rename(var.name)
    arr.attrs = {"units": var.units, "kind": var.kind}
    return arr


def composite(arr: xr.DataArray, periods: pd.DatetimeIndex, step: str) -> xr.DataArray:
    """Mean of all scenes whose time falls in each period; periods without a scene are NaN.

    Lazy; when every period holds exactly one scene this is a relabelling, not a computation.
    """
    edges = periods.append(pd.DatetimeIndex([periods[-1] + pd.tseries.frequencies.to_offset(step)]))
    times = pd.DatetimeIndex(arr["time"].to_numpy())
    bins = np.searchsorted(edges.to_numpy(), times.to_numpy(), side="right") - 1
    keep = (bins >= 0) & (bins < len(periods))
    arr = arr.isel(time=np.flatnonzero(keep))
    bins = bins[keep]
    if len(np.unique(bins)) == len(bins):
        out = arr.assign_coords(time=periods[bins])
    else:
        out = arr.assign_coords(period=("time", periods[bins])).groupby("period").mean("time")
        out = out.rename(period="time")
    out = out.reindex(time=periods)
    return out.chunk({"time": 1})


def load_cube(
    items: Mapping[str, Sequence[pystac.Item]],
    variables: Sequence[VariableSpec],
    geobox: GeoBox,
    periods: pd.DatetimeIndex,
    step: str,
    chunk: int = 256,
) -> xr.Dataset:
    """Build the lazy driver cube.

    Parameters
    ----------
    items : STAC items per variable name.
    variables : driver definitions.
    geobox : target grid.
    periods, step : model time steps (period starts and their pandas frequency).
    chunk : spatial chunk edge (pixels).

    Returns
    -------
    Dataset with time-varying drivers as (time, y, x) and static drivers as (y, x), float32, dask-backed.
    """
    data = {}
    for var in variables:
        arr = load_variable(items[var.name], var, geobox, chunk)
        if var.static:
            arr = arr.isel(time=0, drop=True)
        else:
            arr = composite(arr, periods, step)
        data[var.name] = arr
    cube = xr.Dataset(data)
    cube.attrs["crs"] = geobox.crs.to_wkt()
    return cube


def cube_from_config(cfg: RunConfig) -> xr.Dataset:
    """Search the configured catalog for every variable and build the lazy cube on the run's grid."""
    from geoflux.catalog import search_items

    geobox = target_grid(cfg.grid)
    lonlat = geobox.extent.to_crs("EPSG:4326").boundingbox
    periods = cfg.periods()
    end = periods[-1] + pd.tseries.frequencies.to_offset(cfg.time.step) - pd.Timedelta("1s")
    catalog = cfg.catalog if "://" in cfg.catalog else str(cfg.path(cfg.catalog))
    items = {
        v.name: search_items(catalog, v.collection, tuple(lonlat), periods[0], end, static=v.static)
        for v in cfg.variables
    }
    return load_cube(items, cfg.variables, geobox, periods, cfg.time.step, cfg.grid.chunk)
