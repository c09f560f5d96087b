"""Driver cube: STAC items → one lazy, dask-backed :class:`xarray.Dataset` on the target grid.

Reads happen inside dask tasks (odc-stac builds one read task per chunk per band). Everything after
the read is lazy too and chunk-local: decoding (nodata, scale/offset), QA/cloud masks, valid ranges,
derived variables (NDVI, NIRv, VPD), compositing to the model time step and short-gap filling, so nothing
is read until an output is computed.

Per driver (:class:`~geoflux.config.VariableSpec`): load the data asset(s) and the QA asset of the same
items with odc-stac (data resampled as configured, QA by nearest neighbour so flag values are never
blended) → physical = raw × scale + offset → QA mask → derive → valid range → composite scenes per model
period (mean/median/max/min/sum) → fill gaps of up to ``max_gap`` periods linearly in time, with a
``<name>_filled`` flag (1 = filled) in the cube.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import odc.stac
import pandas as pd
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox
from urllib3.util.retry import Retry

from geoflux.catalog import item_crs
from geoflux.config import GridSpec, RunConfig, VariableSpec
from geoflux.errors import CubeError, GridError

ZARR_TYPES = ("application/vnd+zarr", "application/vnd.zarr", "application/x-zarr")
# Magnus formula constants over water (Alduchov & Eskridge 1996): es(T) = A exp(B T / (T + C)), hPa, degC
MAGNUS_A, MAGNUS_B, MAGNUS_C = 6.1094, 17.625, 243.04


def target_grid(grid: GridSpec) -> GeoBox:
    """The target grid of a run as an odc-geo :class:`GeoBox` (CRS + affine + shape in one value)."""
    try:
        return GeoBox.from_bbox(grid.bbox, grid.crs, resolution=grid.resolution)
    except Exception as exc:  # pyproj/odc raise several types for a bad CRS
        raise GridError(f"grid: cannot build grid from crs={grid.crs!r} ({exc})") from None


# ------------------------------------------------------------------------------------- pure array kernels


def qa_mask(qa: xr.DataArray, mask: int | None, keep: Sequence[int]) -> xr.DataArray:
    """True where a QA value marks a usable pixel: ``(qa & mask) in keep`` (mask None: ``qa in keep``).

    ``qa`` may be float (odc-stac loads every band as float32; 16-bit flags are exact in float32), NaN
    meaning no QA → not usable.
    """
    finite = np.isfinite(qa)
    raw = qa.fillna(0).astype("int64")
    field = raw if mask is None else raw & int(mask)
    return finite & field.isin(list(keep))


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


def fill_runs(a: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill runs of at most ``max_gap`` NaNs along the last axis by linear interpolation.

    Only gaps with a valid value on both sides are filled (no extrapolation at the ends). Steps are
    assumed equally spaced (model periods are).

    Returns
    -------
    (filled values, uint8 flag: 1 where a value was filled)
    """
    a = np.asarray(a, dtype=np.float32)
    n = a.shape[-1]
    flag = np.zeros(a.shape, dtype=np.uint8)
    if max_gap <= 0 or n < 3:
        return a.copy(), flag
    valid = ~np.isnan(a)
    idx = np.broadcast_to(np.arange(n), a.shape)
    prev = np.maximum.accumulate(np.where(valid, idx, -1), axis=-1)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(valid, idx, n), axis=-1), axis=-1), axis=-1)
    fill = ~valid & (prev >= 0) & (nxt < n) & (nxt - prev - 1 <= max_gap)
    out = a.copy()
    if fill.any():
        p = np.clip(prev, 0, n - 1)
        q = np.clip(nxt, 0, n - 1)
        vp = np.take_along_axis(a, p, axis=-1)
        vq = np.take_along_axis(a, q, axis=-1)
        w = (idx - p) / np.maximum(q - p, 1)
        out[fill] = (vp + w * (vq - vp))[fill]
        flag[fill] = 1
    return out, flag


def fill_gaps(arr: xr.DataArray, max_gap: int) -> tuple[xr.DataArray, xr.DataArray]:
    """Lazily fill short gaps along ``time`` (see :func:`fill_runs`); returns (filled, flag).

    The time axis is one chunk inside the kernel (a gap spans periods) and is chunked back to one
    period per chunk afterwards, so the graph stays O(chunks).
    """
    filled, flag = xr.apply_ufunc(
        fill_runs,
        arr.chunk({"time": -1}),
        kwargs={"max_gap": int(max_gap)},
        input_core_dims=[["time"]],
        output_core_dims=[["time"], ["time"]],
        dask="parallelized",
        output_dtypes=[np.float32, np.uint8],
    )
    dims = arr.dims
    filled = filled.transpose(*dims).chunk({"time": 1}).rename(arr.name)
    flag = flag.transpose(*dims).chunk({"time": 1}).rename(f"{arr.name}_filled")
    filled.attrs = {**arr.attrs, "gap_filled_max_steps": int(max_gap)}
    flag.attrs = {"units": "1", "description": f"1 where {arr.name} was gap-filled along time"}
    return filled, flag


# ------------------------------------------------------------------------------------------------ loading


def _is_local(href: str) -> bool:
    scheme = urllib.parse.urlparse(href).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and href[1:3] in (":\\", ":/"))  # Windows drive


def check_loadable(items: Sequence[pystac.Item], var: VariableSpec, source: str = "") -> None:
    """Fail early, naming catalog/item/asset, on what odc-stac would only trip over later (or obscurely).

    Every asset the variable reads must exist, declare a CRS through the projection extension (we never
    guess one), not be Zarr, and, when local, exist on disk (a missing remote COG surfaces at read time).
    """
    where = f"{source}: " if source else ""
    for item in items:
        for key in _assets_of(var):
            if key not in item.assets:
                raise CubeError(f"{where}variable '{var.name}': item {item.id} has no asset '{key}'")
            asset = item.assets[key]
            if (asset.media_type or "").split(";")[0] in ZARR_TYPES:
                raise CubeError(
                    f"{where}item {item.id}: asset '{key}' is Zarr; the cube reads raster (COG/GeoTIFF) "
                    "assets only"
                )
            if item_crs(item, key) is None:
                raise CubeError(
                    f"{where}item {item.id}: asset '{key}' has no CRS (proj:code, proj:epsg, proj:wkt2 "
                    "or proj:projjson expected; geoflux does not guess one)"
                )
            href = asset.get_absolute_href() or asset.href
            if _is_local(href):
                path = Path(urllib.parse.urlparse(href).path if href.startswith("file:") else href)
                if not path.exists():
                    raise CubeError(f"{where}item {item.id}: asset '{key}': COG not found at {path}")


def _assets_of(var: VariableSpec) -> list[str]:
    data = list(dict.fromkeys(var.inputs.values())) if var.derive and var.inputs else [var.asset]
    return data + ([var.qa_asset] if var.qa_asset and var.qa_asset not in data else [])


def load_variable(
    items: Sequence[pystac.Item],
    var: VariableSpec,
    geobox: GeoBox,
    chunk: int,
    *,
    patch_url: Callable[[str], str] | None = None,
    source: str = "",
) -> xr.DataArray:
    """Load one driver lazily onto ``geobox``, decoded to physical units (float32, NaN = missing).

    Parameters
    ----------
    items : STAC items of the driver's collection (each with every asset the driver reads).
    var : driver definition (assets, decoding, QA, derivation, valid range, resampling).
    geobox : target grid.
    chunk : spatial chunk edge, pixels.
    patch_url : applied to every href at read time (e.g. Planetary Computer signing).
    source : catalog name for error messages.

    Returns
    -------
    dims (time, y, x) in the order of the items' times; static drivers are mosaicked into one time step.
    Continuous drivers are resampled bilinearly unless ``var.resampling`` says otherwise, categorical
    ones by nearest neighbour (or mode); class codes are never interpolated.

    Raises
    ------
    CubeError
        naming the catalog, item and asset (missing asset, no CRS, missing local COG, Zarr asset).
    """
    check_loadable(items, var, source)
    data_assets = list(dict.fromkeys(var.inputs.values())) if var.derive and var.inputs else [var.asset]
    bands = _assets_of(var)
    default = "nearest" if var.kind == "categorical" else "bilinear"
    resampling = {b: var.resampling or default for b in data_assets}
    if var.qa_asset:
        resampling[var.qa_asset] = "nearest"  # flags: never blend bit patterns
    stac_cfg: dict = {"*": {"assets": {b: {} for b in bands}}}
    if var.nodata is not None:
        for b in data_assets:
            stac_cfg["*"]["assets"][b]["nodata"] = var.nodata
    # A static driver is one map: mosaic every item into one plane whatever their timestamps.
    groupby = (lambda item, parsed, idx: 0) if var.static else "time"
    try:
        ds = odc.stac.load(
            items,
            bands=bands,
            geobox=geobox,
            chunks={"time": 1, "y": chunk, "x": chunk},
            dtype="float32",
            resampling=resampling,
            stac_cfg=stac_cfg,
            groupby=groupby,
            patch_url=patch_url,
        )
    except Exception as exc:  # odc-stac raises plain ValueError/KeyError/AssertionError for odd items
        where = f"{source}: " if source else ""
        raise CubeError(
            f"{where}variable '{var.name}': cannot load items ({exc or type(exc).__name__})"
        ) from None

    def decode(a: xr.DataArray) -> xr.DataArray:
        if var.kind == "continuous" and (var.scale != 1.0 or var.offset != 0.0):
            a = a * np.float32(var.scale) + np.float32(var.offset)
        return a

    if var.derive:
        roles = {role: decode(ds[asset]) for role, asset in (var.inputs or {}).items()}
        arr = DERIVE[var.derive](**roles)
    else:
        arr = decode(ds[var.asset])
    if var.qa_asset:
        arr = arr.where(qa_mask(ds[var.qa_asset], var.qa_mask, var.qa_keep or []))
    if var.valid_range is not None:
        lo, hi = var.valid_range
        arr = arr.where((arr >= lo) & (arr <= hi))
    arr = arr.astype("float32").rename(var.name)
    arr.attrs = {"units": var.units, "kind": var.kind}
    if var.derive:
        arr.attrs["derived"] = var.derive
    if var.qa_asset:
        arr.attrs["qa"] = f"{var.qa_asset} & {var.qa_mask} in {var.qa_keep}"
    return arr


_REDUCERS: dict[str, Callable[[xr.DataArray], xr.DataArray]] = {
    "mean": lambda a: a.mean("time", skipna=True),
    "median": lambda a: a.median("time", skipna=True),
    "max": lambda a: a.max("time", skipna=True),
    "min": lambda a: a.min("time", skipna=True),
    "sum": lambda a: a.sum("time", skipna=True, min_count=1),
}


def composite(
    arr: xr.DataArray, periods: pd.DatetimeIndex, step: str, aggregation: str = "mean"
) -> xr.DataArray:
    """Combine all scenes whose time falls in each period; periods without a scene are NaN.

    Parameters
    ----------
    arr : (time, y, x) scenes.
    periods, step : period starts and their pandas frequency.
    aggregation : mean, median, max, min or sum (NaN-skipping; a period with no valid value stays NaN).

    Lazy; when every period holds at most one scene this is a relabelling, not a computation.
    """
    if aggregation not in _REDUCERS:
        raise CubeError(f"aggregation '{aggregation}': expected one of {', '.join(_REDUCERS)}")
    edges = periods.append(pd.DatetimeIndex([periods[-1] + pd.tseries.frequencies.to_offset(step)]))
    times = pd.DatetimeIndex(arr["time"].to_numpy())
    bins = np.searchsorted(edges.to_numpy(), times.to_numpy(), side="right") - 1
    keep = (bins >= 0) & (bins < len(periods))
    arr = arr.isel(time=np.flatnonzero(keep))
    bins = bins[keep]
    if len(np.unique(bins)) == len(bins):
        out = arr.assign_coords(time=periods[bins])
    else:
        reduce = _REDUCERS[aggregation]
        pieces = []
        for k in np.unique(bins):
            sub = arr.isel(time=np.flatnonzero(bins == k))
            one = sub.isel(time=0, drop=True) if sub.sizes["time"] == 1 else reduce(sub)
            pieces.append(one.expand_dims(time=[periods[k]]))
        out = xr.concat(pieces, dim="time")
        out.attrs = arr.attrs
    out = out.reindex(time=periods)
    return out.chunk({"time": 1})


def load_cube(
    items: Mapping[str, Sequence[pystac.Item]],
    variables: Sequence[VariableSpec],
    geobox: GeoBox,
    periods: pd.DatetimeIndex,
    step: str,
    chunk: int = 256,
    *,
    patch_urls: Mapping[str, Callable[[str], str] | None] | None = None,
    sources: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """Build the lazy driver cube.

    Parameters
    ----------
    items : STAC items per variable name.
    variables : driver definitions.
    geobox : target grid.
    periods, step : model time steps (period starts and their pandas frequency).
    chunk : spatial chunk edge (pixels).
    patch_urls : per variable name, an href signer applied at read time.
    sources : per variable name, the catalog it came from (for error messages).

    Returns
    -------
    Dataset with time-varying drivers as (time, y, x) and static drivers as (y, x), float32, dask-backed;
    for drivers with ``max_gap > 0`` also ``<name>_filled`` (uint8, 1 = gap-filled).
    """
    data: dict[str, xr.DataArray] = {}
    for var in variables:
        arr = load_variable(
            items[var.name],
            var,
            geobox,
            chunk,
            patch_url=(patch_urls or {}).get(var.name),
            source=(sources or {}).get(var.name, ""),
        )
        if var.static:
            arr = arr.isel(time=0, drop=True)
        else:
            arr = composite(arr, periods, step, var.aggregation)
            if var.max_gap > 0:
                arr, flag = fill_gaps(arr, var.max_gap)
                data[flag.name] = flag
        data[var.name] = arr
    cube = xr.Dataset(data)
    cube.attrs["crs"] = geobox.crs.to_wkt()
    return cube


def cube_from_config(
    cfg: RunConfig, *, sas_token_url: str | None = None, retry: Retry | None = None
) -> xr.Dataset:
    """Search each driver's catalog (its own or the run's) and build the lazy cube on the run's grid.

    ``sas_token_url`` overrides the Planetary Computer token endpoint for drivers with
    ``signing: planetary-computer`` (default: env ``GEOFLUX_PC_SAS_URL`` or the public endpoint);
    ``retry`` the HTTP retry policy of API searches (default :func:`geoflux.catalog.default_retry`).

    The cube's attribute ``geoflux_loaded_items`` (JSON) records, per driver, whether it is static and the
    ``[id, time]`` of every item it was loaded from (time: ISO, naive UTC, as odc-stac orders scenes).
    """
    from geoflux.catalog import check_assets, make_signer, search_items

    geobox = target_grid(cfg.grid)
    lonlat = geobox.extent.to_crs("EPSG:4326").boundingbox
    periods = cfg.periods()
    end = periods[-1] + pd.tseries.frequencies.to_offset(cfg.time.step) - pd.Timedelta("1s")
    items: dict[str, list[pystac.Item]] = {}
    signers: dict[str, Callable[[str], str] | None] = {}
    sources: dict[str, str] = {}
    shared: dict[str | None, Callable[[str], str] | None] = {}  # one token cache per signing scheme
    for v in cfg.variables:
        catalog = v.catalog or cfg.catalog
        catalog = catalog if "://" in catalog else str(cfg.path(catalog))
        found = search_items(
            catalog,
            v.collection,
            tuple(lonlat),
            periods[0],
            end,
            static=v.static,
            query=v.query,
            filter=v.filter,
            retry=retry,
        )
        check_assets(found, catalog, v.collection, _assets_of(v))
        items[v.name] = found
        sources[v.name] = f"{catalog}: collection '{v.collection}'"
        if v.signing not in shared:
            shared[v.signing] = make_signer(v.signing, sas_token_url)
        signers[v.name] = shared[v.signing]
    cube = load_cube(
        items,
        cfg.variables,
        geobox,
        periods,
        cfg.time.step,
        cfg.grid.chunk,
        patch_urls=signers,
        sources=sources,
    )
    # The items each driver was loaded from, so outputs can name their inputs without searching again (a
    # second search could differ: per-driver catalogs, queries, filters). JSON text: zarr/netCDF-safe attrs.
    import json

    loaded = {
        v.name: {
            "static": bool(v.static),
            "items": [[it.id, _item_time(it)] for it in items[v.name]],
        }
        for v in cfg.variables
    }
    cube.attrs[LOADED_ITEMS_ATTR] = json.dumps(loaded)
    return cube


LOADED_ITEMS_ATTR = "geoflux_loaded_items"


def _item_time(item: pystac.Item) -> str | None:
    """The item's time as odc-stac groups it (``datetime``, else ``start_datetime``); naive UTC, ISO."""
    t = item.datetime or item.common_metadata.start_datetime
    if t is None:
        return None
    ts = pd.Timestamp(t)
    return (ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo else ts).isoformat()
