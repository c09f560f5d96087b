"""Gridded (Zarr / NetCDF) drivers: hourly reanalysis such as ERA5 / ERA5-Land onto any target grid.

A driver whose assets are Zarr stores or NetCDF files (Planetary Computer's ``era5-pds``: one item per month
and kind, one Zarr store per variable, hourly, 0.25 degree, longitudes 0..359.75, latitudes 90..-90; or any
CF-style lon/lat NetCDF/Zarr) is loaded as one dask task per output chunk (time period × y chunk × x chunk).
Each task, and nothing before it, opens the stores (signing hrefs then, never while the cube is built),
reads the source window its chunk needs (+2 source pixels), decodes (CF packing by xarray, then the
driver's nodata, scale/offset, named unit conversion), derives (e.g. VPD from temperature and dew point),
masks ``valid_range``, aggregates the hours of its period (mean, median, sum, min, max or daytime mean;
NaN-skipping) and reprojects that one field onto the chunk with GDAL (odc-geo ``rio_reproject``; bilinear,
average, ... per driver; exact transformer). Memory per task is bounded by
``hours in a period × source window of one chunk``, whatever the region's size.

Times are UTC (reanalysis is UTC; tz-aware item times are converted, store times are taken as UTC as CF
conventions and ERA5 give them), and model periods are UTC periods. A period the assets do not fully cover
is kept and flagged: the cube gets ``<name>_coverage`` (time; share of the period's hours present) and the
driver's ``partial_periods`` attribute lists them.

Longitudes: the source window is taken in the longitude convention of the chunk (-180..180, or 0..360 when
the chunk straddles the antimeridian; the whole circle when it holds a pole), wrapping a global source
across its seam, so 0..360 and -180..180 sources, the antimeridian and the poles need no special-casing.

Named unit conversions (:data:`CONVERTERS`) are data: a definition says ``convert: K_to_degC`` instead of
folding the conversion into ``scale``/``offset`` (which stay the item's own raster encoding and are checked
against its ``raster:bands``).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.catalog.search import ZARR_TYPES, asset_media_type, href_suffix, is_gridded
from geoflux.catalog.variables import VariableSpec, convert
from geoflux.decode import DERIVE, check_physical, data_assets
from geoflux.errors import CubeError
from geoflux.solar import spencer_declination

LAT_NAMES = ("lat", "latitude", "y")
LON_NAMES = ("lon", "longitude", "x")
PAD_PIXELS = 2  # source pixels around a chunk's footprint: bilinear needs 1, GDAL's kernel edges 1 more


def gridded_driver(items: Sequence[pystac.Item], var: VariableSpec) -> bool:
    """Whether a driver reads gridded (Zarr/NetCDF) assets; all its items must agree."""
    keys = data_assets(var)
    flags = {is_gridded(i, k) for i in items for k in keys if k in i.assets}
    if len(flags) > 1:
        raise CubeError(
            f"variable '{var.name}': some items' assets are Zarr/NetCDF and some rasters "
            "(expected one kind per driver)"
        )
    return flags == {True}


# --------------------------------------------------------------------------------------- solar geometry


def cos_zenith(times: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Cosine of the solar zenith angle, (time, lat, lon), at UTC ``times`` (degrees lat/lon).

    Declination and equation of time after Spencer (1971), as used for potential radiation in flux
    processing; accurate to ~0.5 degree, plenty to tell day from night.
    """
    t = pd.DatetimeIndex(times)
    doy = t.dayofyear.to_numpy(dtype=float)
    hour = (t.hour + t.minute / 60.0 + t.second / 3600.0).to_numpy(dtype=float)
    g = 2.0 * np.pi * (doy - 1.0 + (hour - 12.0) / 24.0) / 365.0
    decl = spencer_declination(g)
    eot_min = 229.18 * (
        0.000075
        + 0.001868 * np.cos(g)
        - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2 * g)
        - 0.040849 * np.sin(2 * g)
    )
    solar_hour = hour[:, None] + (eot_min[:, None] + 4.0 * np.asarray(lon, float)[None, :]) / 60.0  # (t, lon)
    ha = np.deg2rad(15.0 * (solar_hour - 12.0))
    phi = np.deg2rad(np.asarray(lat, float))
    return (
        np.sin(phi)[None, :, None] * np.sin(decl)[:, None, None]
        + np.cos(phi)[None, :, None] * np.cos(decl)[:, None, None] * np.cos(ha)[:, None, :]
    )


# ------------------------------------------------------------------------------------------ aggregation


def aggregate_hours(values: np.ndarray, how: str, *, daytime: np.ndarray | None = None) -> np.ndarray:
    """Combine the hourly fields of one period along axis 0, NaN-skipping; all-NaN stays NaN.

    Parameters
    ----------
    values : (hours, ...) in the driver's units.
    how : mean, median, sum, min, max or daytime_mean (mean over hours where ``daytime`` is True).
    daytime : boolean mask broadcastable to ``values`` (daytime_mean only).

    Returns
    -------
    float32 array of ``values.shape[1:]`` in the same units (sum: units × hours).
    """
    v = np.asarray(values, dtype=np.float64)
    if how == "daytime_mean":
        if daytime is None:
            raise CubeError("aggregation daytime_mean needs the daytime mask")
        v = np.where(daytime, v, np.nan)
        how = "mean"
    valid = np.isfinite(v)
    n = valid.sum(axis=0)
    if v.shape[0] == 0:
        return np.full(v.shape[1:], np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "mean":
            out = np.where(valid, v, 0.0).sum(axis=0) / n
        elif how == "sum":
            out = np.where(valid, v, 0.0).sum(axis=0)
        elif how == "min":
            out = np.where(valid, v, np.inf).min(axis=0)
        elif how == "max":
            out = np.where(valid, v, -np.inf).max(axis=0)
        elif how == "median":
            out = np.nanmedian(np.where(n > 0, v, 0.0), axis=0) if v.size else v.sum(axis=0)
        else:
            raise CubeError(f"aggregation '{how}': expected mean, median, sum, min, max or daytime_mean")
    return np.where(n > 0, out, np.nan).astype(np.float32)


# ----------------------------------------------------------------------------------- assets and times


@dataclasses.dataclass(frozen=True)
class GriddedAsset:
    """One store (item × asset) a driver reads; picklable, travels with the graph."""

    href: str
    key: str
    item_id: str
    store_variable: str | None
    open_kwargs: Mapping[str, Any]
    times: np.ndarray  # datetime64[s] stamps of the store (naive UTC)
    step: np.timedelta64

    @property
    def label(self) -> str:
        return f"item {self.item_id}: asset '{self.key}'"


def _is_local(href: str) -> bool:
    scheme = urllib.parse.urlparse(href).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and href[1:3] in (":\\", ":/"))


def _local_path(href: str) -> str:
    return urllib.parse.urlparse(href).path if href.startswith("file:") else href


def _naive_utc(t: Any) -> np.datetime64:
    ts = pd.Timestamp(t)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return np.datetime64(ts, "s")


def _cube_time(item: pystac.Item, key: str) -> tuple[np.ndarray, np.timedelta64] | None:
    """Stamps from the datacube extension (asset's, else item's ``cube:dimensions``), if declared."""
    for fields in (item.assets[key].extra_fields, item.properties):
        dims = fields.get("cube:dimensions") or {}
        for d in dims.values():
            if d.get("type") == "temporal" and d.get("extent") and d.get("step"):
                start, end = (_naive_utc(e) for e in d["extent"])
                step = np.timedelta64(pd.Timedelta(d["step"]).to_timedelta64(), "s")
                return np.arange(start, end + step, step), step
    return None


def _open_local_times(href: str, engine: str, label: str) -> tuple[np.ndarray, np.timedelta64]:
    ds = _open(href, engine, {}, label)
    tname = _time_dim(ds, label)
    times = ds[tname].to_numpy().astype("datetime64[s]")
    ds.close()
    if len(times) < 2:
        raise CubeError(f"{label}: {href}: fewer than 2 time stamps (expected an hourly or daily series)")
    return times, np.timedelta64(int(np.median(np.diff(times).astype("int64"))), "s")


def _engine(item: pystac.Item, key: str) -> str:
    asset = item.assets[key]
    kw = asset.extra_fields.get("xarray:open_kwargs") or {}
    if kw.get("engine"):
        return str(kw["engine"])
    media = asset_media_type(asset)
    return "zarr" if media in ZARR_TYPES or href_suffix(asset.href) == ".zarr" else "h5netcdf"


def gridded_assets(item: pystac.Item, key: str, var: VariableSpec, where: str = "") -> GriddedAsset:
    """Describe one item's store from its metadata (no network: remote stores must declare their time axis
    with the datacube extension; local ones are opened for their time coordinate)."""
    asset = item.assets[key]
    href = asset.get_absolute_href() or asset.href
    label = f"{where}variable '{var.name}': item {item.id}: asset '{key}'"
    engine = _engine(item, key)
    declared = _cube_time(item, key)
    if declared is None:
        if not _is_local(href):
            raise CubeError(
                f"{label}: {href}: no time axis in cube:dimensions (expected the datacube extension on "
                "the item or asset: remote stores are not opened while the cube is built)"
            )
        if not Path(_local_path(href)).exists():
            raise CubeError(f"{label}: store not found at {_local_path(href)}")
        declared = _open_local_times(href, engine, label)
    times, step = declared
    kw = dict(asset.extra_fields.get("xarray:open_kwargs") or {})
    kw["engine"] = engine
    return GriddedAsset(href, key, item.id, var.store_variable, kw, times, step)


# ------------------------------------------------------------------------------------------ store access


def _open(href: str, engine: str, open_kwargs: Mapping[str, Any], label: str) -> xr.Dataset:
    kw = {k: v for k, v in open_kwargs.items() if k not in ("engine", "chunks")}
    target = _local_path(href) if _is_local(href) else href
    try:
        # chunks=None: xarray's lazy backend arrays; only the indexed window is read
        return xr.open_dataset(target, engine=engine, chunks=None, **kw)
    except ImportError as exc:
        raise CubeError(
            f"{label}: {href}: cannot open ({exc}) (expected the package it names installed)"
        ) from None
    except Exception as exc:  # backends raise many types (FileNotFoundError, KeyError, ValueError, ...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CubeError(f"{label}: {href}: cannot open ({msg}) (expected a readable Zarr/NetCDF)") from None


def _signed(a: GriddedAsset, patch_url: Callable[[str], str] | None) -> tuple[str, dict[str, Any]]:
    """(href, open kwargs) signed for reading; called inside tasks only."""
    kw = dict(a.open_kwargs)
    if patch_url is None:
        return a.href, kw
    sign_options = getattr(patch_url, "sign_storage_options", None)
    if sign_options is not None and "storage_options" in kw:
        kw["storage_options"] = sign_options(a.href, dict(kw["storage_options"]))
        return a.href, kw
    return patch_url(a.href), kw


def _time_dim(ds: xr.Dataset, label: str) -> str:
    for name in ds.dims:
        if name in ds.coords and np.issubdtype(ds[name].dtype, np.datetime64):
            return str(name)
    raise CubeError(f"{label}: no datetime coordinate (expected a CF time axis)")


def _coord(ds: xr.Dataset, names: Sequence[str], label: str) -> str:
    for n in names:
        if n in ds.coords or n in ds.dims:
            return n
    raise CubeError(f"{label}: no {names[0]} coordinate (expected one of {', '.join(names)})")


def _data_var(ds: xr.Dataset, a: GriddedAsset, label: str) -> str:
    if a.store_variable:
        if a.store_variable not in ds.data_vars:
            have = ", ".join(map(str, ds.data_vars))
            raise CubeError(f"{label}: no variable '{a.store_variable}' in the store (has {have})")
        return a.store_variable
    if a.key in ds.data_vars:
        return a.key
    names = [str(n) for n in ds.data_vars if ds[n].ndim == 3]
    if len(names) == 1:
        return names[0]
    raise CubeError(
        f"{label}: cannot tell which variable to read (has {', '.join(names)}; set store_variable)"
    )


# ------------------------------------------------------------------------------------- spatial windows


def _dst_lonlat(dst: GeoBox) -> tuple[float, float, float, float, float]:
    """(lon_lo, lon_hi, lat_lo, lat_hi, base) of a chunk's footprint; longitudes in [base, base + 360)."""
    from pyproj import Transformer

    ny, nx = dst.shape
    n = 17
    cc, rr = np.meshgrid(np.linspace(0, nx, n), np.linspace(0, ny, n))
    x, y = dst.affine * (cc.ravel(), rr.ravel())
    crs = dst.crs.to_wkt()
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(np.asarray(x), np.asarray(y))
    ok = np.isfinite(lon) & np.isfinite(lat)
    lon, lat = lon[ok], lat[ok]
    if lon.size == 0:
        raise CubeError(f"grid chunk {dst.extent.boundingbox} does not map to longitude/latitude")
    lat_lo, lat_hi = float(lat.min()), float(lat.max())
    to_dst = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x0, y0, x1, y1 = dst.extent.boundingbox
    full = False
    for plat in (90.0, -90.0):
        px, py = to_dst.transform(0.0, plat)
        if np.isfinite(px) and np.isfinite(py) and x0 <= px <= x1 and min(y0, y1) <= py <= max(y0, y1):
            full = True
            lat_lo, lat_hi = (lat_lo, 90.0) if plat > 0 else (-90.0, lat_hi)
    lon = ((lon + 180.0) % 360.0) - 180.0
    if not full and np.ptp(lon) <= 180.0:
        return float(lon.min()), float(lon.max()), lat_lo, lat_hi, -180.0
    lon360 = lon % 360.0
    if not full and np.ptp(lon360) <= 180.0:
        return float(lon360.min()), float(lon360.max()), lat_lo, lat_hi, 0.0  # straddles the antimeridian
    return -180.0, 180.0, lat_lo, lat_hi, -180.0  # a pole inside: the whole circle


def _step(coord: np.ndarray) -> float:
    return float(np.median(np.abs(np.diff(coord)))) if coord.size > 1 else 1.0


def source_window(
    lat: np.ndarray, lon: np.ndarray, dst: GeoBox
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str] | None:
    """Source pixels one chunk needs: (lat indices north→south, their lats, lon indices, continuous lons,
    source CRS); None when the chunk lies outside the source. Global sources wrap across their seam."""
    lon_lo, lon_hi, lat_lo, lat_hi, base = _dst_lonlat(dst)
    dlat, dlon = _step(lat), _step(lon)
    pad_lat, pad_lon = PAD_PIXELS * dlat, PAD_PIXELS * dlon
    li = np.flatnonzero((lat >= lat_lo - pad_lat) & (lat <= lat_hi + pad_lat))
    li = li[np.argsort(-lat[li])]
    lc = ((lon - base) % 360.0) + base
    is_global = lon.size * dlon >= 360.0 - 1e-6
    shifts = (-360.0, 0.0, 360.0) if is_global else (0.0,)
    vals = np.concatenate([lc + s for s in shifts])
    idx = np.tile(np.arange(lon.size), len(shifts))
    keep = (vals >= lon_lo - pad_lon) & (vals <= lon_hi + pad_lon)
    order = np.argsort(vals[keep], kind="stable")
    lon_idx, lon_vals = idx[keep][order], vals[keep][order]
    if li.size == 0 or lon_idx.size == 0:
        return None
    if lon_vals.size > 1 and not np.allclose(np.diff(lon_vals), dlon, atol=dlon * 1e-3):
        raise CubeError("source longitudes are not evenly spaced across the window (expected a regular grid)")
    if li.size > 1 and not np.allclose(-np.diff(lat[li]), dlat, atol=dlat * 1e-3):
        raise CubeError("source latitudes are not evenly spaced across the window (expected a regular grid)")
    # a window in 0..360 (antimeridian) needs a CRS whose longitudes wrap there, so GDAL maps the chunk's
    # points into the window's own longitude range
    crs = "EPSG:4326" if base < 0 else "+proj=longlat +datum=WGS84 +lon_wrap=180 +no_defs +type=crs"
    return li, lat[li], lon_idx, lon_vals, crs


def reproject_window(
    field: np.ndarray,
    lat_vals: np.ndarray,
    lon_vals: np.ndarray,
    crs: str,
    dst: GeoBox,
    resampling: str,
    dlat: float,
    dlon: float,
) -> np.ndarray:
    """Reproject a (lat north→south, lon west→east) field of pixel centres onto ``dst`` (NaN = missing)."""
    from affine import Affine
    from odc.geo.warp import rio_reproject

    src_gbox = GeoBox(
        field.shape, Affine(dlon, 0.0, lon_vals[0] - dlon / 2, 0.0, -dlat, lat_vals[0] + dlat / 2), crs
    )
    out = np.full(dst.shape, np.nan, dtype=np.float32)
    # tolerance=0: GDAL's exact transformer (its default approximates to 1/8 source pixel)
    rio_reproject(
        np.ascontiguousarray(field, dtype=np.float32),
        out,
        src_gbox,
        dst,
        resampling,
        src_nodata=np.nan,
        dst_nodata=np.nan,
        tolerance=0.0,
    )
    return out


# ------------------------------------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True)
class _Plan:
    var: VariableSpec
    geobox: GeoBox
    edges: np.ndarray  # datetime64[s], len(periods) + 1
    roles: tuple[tuple[str, tuple[tuple[GriddedAsset, ...], ...]], ...]  # role -> per period -> assets
    patch_url: Callable[[str], str] | None
    resampling: str
    labels: tuple[str, ...]


def _read_role(
    assets: Sequence[GriddedAsset], t0: np.datetime64, t1: np.datetime64, dst: GeoBox, plan: _Plan
) -> tuple[np.ndarray, np.ndarray, tuple] | None:
    """Hourly values (hours, lat, lon) of one input over [t0, t1), their bin times, and the window."""
    var = plan.var
    pieces, stamps, window = [], [], None
    for a in assets:
        shift = a.step if var.timestamp == "end" else np.timedelta64(0, "s")
        href, kw = _signed(a, plan.patch_url)
        label = a.label
        ds = _open(href, str(kw.pop("engine")), kw, label)
        try:
            tname = _time_dim(ds, label)
            latn, lonn = _coord(ds, LAT_NAMES, label), _coord(ds, LON_NAMES, label)
            name = _data_var(ds, a, label)
            times = ds[tname].to_numpy().astype("datetime64[s]")
            bins = times - shift
            ti = np.flatnonzero((bins >= t0) & (bins < t1))
            if ti.size == 0:
                continue
            lat, lon = ds[latn].to_numpy().astype(float), ds[lonn].to_numpy().astype(float)
            if window is None:
                window = source_window(lat, lon, dst)
                if window is None:
                    return None
                window = (*window, _step(lat), _step(lon))
            li, _, lo_i, _, _, _, _ = window
            da = ds[name].transpose(tname, latn, lonn)
            try:
                vals = da.isel({tname: ti, latn: li, lonn: lo_i}).to_numpy()
            except Exception as exc:  # network/decoding errors surface here, inside the task
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CubeError(f"{label}: {a.href}: cannot read ({msg})") from None
            pieces.append(vals.astype(np.float32))
            stamps.append(bins[ti])
        finally:
            ds.close()
    if not pieces:
        return None
    return np.concatenate(pieces, axis=0), np.concatenate(stamps), window


def _decode(values: np.ndarray, var: VariableSpec) -> np.ndarray:
    v = values
    if var.nodata is not None:
        v = np.where(v == np.float32(var.nodata), np.float32(np.nan), v)
    if var.scale != 1.0 or var.offset != 0.0:
        v = v * np.float32(var.scale) + np.float32(var.offset)
    return convert(v, var.convert)


def _block(block_info: dict | None = None, *, plan: _Plan) -> np.ndarray:
    """One output chunk: read, decode, derive, aggregate the period's hours, reproject."""
    loc = block_info[None]["array-location"]  # type: ignore[index]
    k = loc[0][0]
    (y0, y1), (x0, x1) = loc[1], loc[2]
    dst = plan.geobox[y0:y1, x0:x1]
    empty = np.full((1, y1 - y0, x1 - x0), np.nan, dtype=np.float32)
    var = plan.var
    t0, t1 = plan.edges[k], plan.edges[k + 1]
    fields: dict[str, np.ndarray] = {}
    stamps = window = None
    for role, per_period in plan.roles:
        got = _read_role(per_period[k], t0, t1, dst, plan)
        if got is None:
            return empty
        vals, st, win = got
        if stamps is not None and not np.array_equal(st, stamps):
            # inputs of one derived driver must share time stamps (e.g. t and td of one ERA5 item)
            common, ia, ib = np.intersect1d(stamps, st, return_indices=True)
            fields = {r: f[ia] for r, f in fields.items()}
            vals, st = vals[ib], common
        fields[role] = _decode(vals, var)
        stamps, window = st, win
    assert window is not None and stamps is not None
    if var.derive:
        hourly = np.asarray(DERIVE[var.derive](**{r: xr.DataArray(f) for r, f in fields.items()}))
    else:
        hourly = fields["value"]
    if var.valid_range is not None:
        lo, hi = var.valid_range
        hourly = np.where((hourly >= lo) & (hourly <= hi), hourly, np.float32(np.nan))
    _, lat_vals, _, lon_vals, crs, dlat, dlon = window
    daytime = None
    if var.aggregation == "daytime_mean":
        step = plan.roles[0][1][k][0].step
        # the sun's position at the middle of each hour's interval decides day or night
        daytime = cos_zenith(stamps + step // 2, lat_vals, lon_vals) > 0.0
    field = aggregate_hours(hourly, var.aggregation, daytime=daytime)
    out = reproject_window(field, lat_vals, lon_vals, crs, dst, plan.resampling, dlat, dlon)[None]
    if var.physical_range is not None:
        out = check_physical(out, None, var=var, labels=[plan.labels[k]])
    return out


def load_gridded(
    items: Sequence[pystac.Item],
    var: VariableSpec,
    geobox: GeoBox,
    chunk: int,
    periods: pd.DatetimeIndex,
    step: str,
    *,
    patch_url: Callable[[str], str] | None = None,
    source: str = "",
) -> tuple[xr.DataArray, xr.DataArray]:
    """Load one gridded (Zarr/NetCDF, hourly or daily) driver lazily onto ``geobox``, per model period.

    Parameters
    ----------
    items : STAC items of the driver (e.g. one per month), each with the store asset(s) it reads.
    var : driver definition (asset or derived inputs, decoding, ``convert``, aggregation, resampling).
    geobox : target grid (any CRS).
    chunk : spatial chunk edge, pixels.
    periods, step : model period starts (UTC) and their pandas frequency.
    patch_url : href signer, called inside the read tasks only (never while building).
    source : catalog name for messages.

    Returns
    -------
    (driver, coverage): the driver as float32 (time, y, x) in ``var.units``, one dask task per
    (period, y chunk, x chunk), NaN where the source is missing; coverage as float32 (time,): the share of
    each period's source time stamps present (< 1: a partial period, listed in the driver's
    ``partial_periods`` attribute).

    Raises
    ------
    CubeError
        naming catalog, variable, item and asset: missing asset, remote store without cube:dimensions,
        missing local store, daytime_mean without hourly data; inside tasks: unreadable stores, values
        outside ``physical_range``.
    """
    import dask.array as dsa
    from odc.geo.xr import xr_coords

    where = f"{source}: " if source else ""
    roles_assets = dict(var.inputs) if var.derive and var.inputs else {"value": var.asset}
    for item in items:
        for key in data_assets(var):
            if key not in item.assets:
                raise CubeError(f"{where}variable '{var.name}': item {item.id} has no asset '{key}'")
    if var.qa_asset:
        raise CubeError(f"{where}variable '{var.name}': a QA asset is not supported for Zarr/NetCDF drivers")
    if var.static:
        raise CubeError(f"{where}variable '{var.name}': static Zarr/NetCDF drivers are not supported")
    offset = pd.tseries.frequencies.to_offset(step)
    edges = np.array([np.datetime64(t, "s") for t in [*periods, periods[-1] + offset]], dtype="datetime64[s]")
    described = {
        role: [gridded_assets(item, key, var, where) for item in items] for role, key in roles_assets.items()
    }
    roles: list[tuple[str, tuple[tuple[GriddedAsset, ...], ...]]] = []
    coverage = np.ones(len(periods), dtype=np.float64)
    for role, assets in described.items():
        per_period = []
        for k in range(len(periods)):
            t0, t1 = edges[k], edges[k + 1]
            hit, stamps = [], set()
            for a in assets:
                shift = a.step if var.timestamp == "end" else np.timedelta64(0, "s")
                b = a.times - shift
                inside = b[(b >= t0) & (b < t1)]
                if inside.size:
                    hit.append(a)
                    stamps.update(inside.tolist())
            step_s = min((a.step for a in assets), default=np.timedelta64(3600, "s"))
            expected = max(1, int((t1 - t0) // step_s))
            coverage[k] = min(coverage[k], min(1.0, len(stamps) / expected))
            per_period.append(tuple(hit))
        roles.append((role, tuple(per_period)))
    if var.aggregation == "daytime_mean":
        steps = {a.step for assets in described.values() for a in assets}
        if any(s > np.timedelta64(3 * 3600, "s") for s in steps):
            raise CubeError(
                f"{where}variable '{var.name}': daytime_mean needs sub-daily data (expected hourly stamps)"
            )
    labels = tuple(
        f"{where}variable '{var.name}': step {pd.Timestamp(t):%Y-%m-%d %H:%M}: items "
        + (", ".join(a.item_id for a in roles[0][1][k]) or "none")
        for k, t in enumerate(periods)
    )
    default = "nearest" if var.kind == "categorical" else "bilinear"
    plan = _Plan(var, geobox, edges, tuple(roles), patch_url, var.resampling or default, labels)
    ny, nx = geobox.shape
    chunks = ((1,) * len(periods), _split(ny, chunk), _split(nx, chunk))
    data = dsa.map_blocks(
        _block,
        plan=plan,
        chunks=chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"gridded-{var.name}-{dsa.core.tokenize(plan, chunks)}",
    )
    coords = {"time": pd.DatetimeIndex(periods), **xr_coords(geobox, dims=("y", "x"))}
    arr = xr.DataArray(data, dims=("time", "y", "x"), coords=coords, name=var.name)
    partial = [f"{pd.Timestamp(t):%Y-%m-%dT%H:%M}" for t, c in zip(periods, coverage, strict=True) if c < 1.0]
    arr.attrs = {
        "units": var.units,
        "kind": var.kind,
        "aggregation": var.aggregation,
        "time_standard": "UTC",
        "partial_periods": partial,
    }
    if var.derive:
        arr.attrs["derived"] = var.derive
    if var.convert:
        arr.attrs["converted"] = var.convert
    if var.physical_range is not None:
        arr.attrs["physical_range"] = list(var.physical_range)
    cov = xr.DataArray(
        coverage.astype(np.float32),
        dims=("time",),
        coords={"time": pd.DatetimeIndex(periods)},
        name=f"{var.name}_coverage",
        attrs={
            "units": "1",
            "description": f"share of each period's source time stamps present for {var.name}",
        },
    )
    return arr, cov


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - i) for i in range(0, n, chunk))
