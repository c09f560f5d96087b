"""Driver cube: STAC items → one lazy, dask-backed :class:`xarray.Dataset` on the target grid.

Reads happen inside dask tasks (odc-stac builds one read task per chunk per band). Everything after
the read is lazy too and chunk-local: decoding (nodata, scale/offset), QA/cloud masks, valid ranges,
derived variables (NDVI, NIRv, VPD), compositing to the model time step and short-gap filling, so nothing
is read until an output is computed.

Missing stays missing. Measured with odc-stac 0.5.3 and ``dtype="float32"``: a ``nodata`` given to
odc-stac (its ``stac_cfg`` or the item's ``raster:bands``) becomes the *fill value*: pixels outside a
raster's footprint and the file's own nodata pixels come out as that number (e.g. -3000.0), not NaN,
and a file without a nodata tag keeps its fill pixels as plain values (GDAL also blends them into
neighbours when resampling). The cube therefore loads every band with fill NaN and a reader that tells
GDAL the declared nodata when the file has no tag of its own (:class:`NodataRioDriver`), and masks the
declared value exactly once more before scaling; derived drivers are NaN wherever an input is.

Checks, named by variable, item and asset: each local raster's header up front (readable, band count,
dtype, CRS, nodata fits the dtype; remote rasters at read time), the share of the region a scene leaves
missing (``missing_max``, measured once on a coarse copy of the grid read from overviews) and values
outside the driver's ``physical_range`` (inside each chunk's task, no extra pass over the data);
``on_implausible: warn`` turns these into warnings (implausible values then become missing).

Per driver (:class:`~geoflux.config.VariableSpec`): load the data asset(s) and the QA asset of the same
items with odc-stac (data resampled as configured, QA by nearest neighbour so flag values are never
blended) → physical = raw × scale + offset → QA mask → derive → valid range → composite scenes per model
period (mean/median/max/min/sum) → fill gaps of up to ``max_gap`` periods linearly in time, with a
``<name>_filled`` flag (1 = filled) in the cube.

Zarr/NetCDF drivers (hourly reanalysis such as ERA5) take another path, :mod:`geoflux.reanalysis`: one task
per output chunk reads, aggregates the period's hours on the source grid and reprojects (``<name>_coverage``
flags partial periods). Hrefs are signed inside read tasks only, so building the cube makes no request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import odc.stac
import pandas as pd
import pystac
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.loader import RioDriver, RioReader
from urllib3.util.retry import Retry

from geoflux.catalog import item_crs
from geoflux.catalog.variables import convert
from geoflux.config import GridSpec, RunConfig, VariableSpec, period_edges
from geoflux.decode import (  # noqa: F401 (ndvi, nirv, vpd_from_dewpoint: the cube's public kernels)
    DERIVE,
    check_physical,
    ndvi,
    nirv,
    vpd_from_dewpoint,
)
from geoflux.decode import data_assets as _data_assets
from geoflux.decode import implausible as _implausible
from geoflux.errors import CubeError, GridError
from geoflux.reanalysis import gridded_driver, load_gridded

ZARR_TYPES = ("application/vnd+zarr", "application/vnd.zarr", "application/x-zarr")


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


def _href(item: pystac.Item, key: str) -> str:
    asset = item.assets[key]
    return asset.get_absolute_href() or asset.href


def _local_path(href: str) -> Path:
    return Path(urllib.parse.urlparse(href).path if href.startswith("file:") else href)


def _uri_key(uri: str) -> str:
    # odc-stac hands the reader the patched href (e.g. with a SAS token appended): match without query
    return uri.split("?", 1)[0]


def _band_meta(item: pystac.Item, key: str) -> tuple[int | None, dict[str, Any]]:
    """(number of bands the item declares for the asset or None, its first raster:bands entry)."""
    bands = item.assets[key].extra_fields.get("raster:bands")
    if not bands:
        return None, {}
    return len(bands), bands[0]


def declared_nodata(item: pystac.Item, key: str, var: VariableSpec) -> list[float]:
    """Nodata values declared for a data asset: the variable's (config/definition), then the item's
    ``raster:bands`` nodata (both when they differ; the file's own tag is read by GDAL)."""
    out = [] if var.nodata is None else [float(var.nodata)]
    nd = _band_meta(item, key)[1].get("nodata")
    if nd is not None and not (isinstance(nd, str) and nd.lower() == "nan"):
        try:
            nd = float(nd)
        except (TypeError, ValueError):
            nd = None
        if nd is not None and np.isfinite(nd) and nd not in out:
            out.append(nd)
    return out


def _fits(value: float, dtype: str) -> bool:
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return float(value).is_integer() and info.min <= value <= info.max
    return True


def check_header(
    path: str | Path,
    item: pystac.Item,
    key: str,
    var: VariableSpec,
    *,
    data: bool = True,
    where: str = "",
) -> None:
    """Check one raster's header (cheap: no pixels are read) against what the driver expects.

    The file must open with rasterio, have as many bands as the item's ``raster:bands`` declare (one
    when it declares none: a driver is one band), the declared ``data_type`` if any, a CRS, and, for
    data assets, a dtype that can hold every declared nodata value and no nodata tag of its own that
    differs from a declared one (GDAL can skip only one value while resampling).

    Raises
    ------
    CubeError
        ``<where>variable '<name>': item <id>: asset '<key>': <path>: <what> (expected ...)``.
    """
    at = f"{where}variable '{var.name}': item {item.id}: asset '{key}': {path}"
    try:
        with rasterio.open(path) as ds:
            count, dtype, crs, tag = ds.count, ds.dtypes[0], ds.crs, ds.nodata
            gcps = bool(ds.gcps[0])
    except rasterio.errors.RasterioError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CubeError(f"{at}: not a readable raster ({msg}) (expected a GeoTIFF/COG)") from None
    n_decl, band = _band_meta(item, key)
    expect = n_decl or 1
    if count != expect:
        raise CubeError(
            f"{at}: has {count} bands (expected {expect}"
            f"{' as its raster:bands declare' if n_decl else ': one driver per asset'})"
        )
    if band.get("data_type") and band["data_type"] != dtype:
        raise CubeError(f"{at}: data type {dtype} (expected {band['data_type']} as raster:bands declare)")
    if crs is None and not gcps:
        raise CubeError(f"{at}: the file has no CRS (expected a georeferenced raster)")
    if data:
        for nd in declared_nodata(item, key, var):
            if not _fits(nd, dtype):
                raise CubeError(
                    f"{at}: data type {dtype} cannot hold nodata {nd:g} (expected a dtype that can)"
                )
            if tag is not None and not np.isnan(tag) and tag != nd:
                # GDAL skips one nodata value when resampling; the other would be blended into data
                raise CubeError(
                    f"{at}: the file's nodata is {tag:g} but {nd:g} is declared (expected the same value; "
                    "set the variable's nodata to the file's)"
                )


def check_loadable(items: Sequence[pystac.Item], var: VariableSpec, source: str = "") -> None:
    """Fail early, naming catalog/item/asset, on what odc-stac would only trip over later (or obscurely).

    Every asset the variable reads must exist, declare a CRS through the projection extension (we never
    guess one), not be Zarr, and, when local, exist on disk and pass :func:`check_header` (readable,
    band count, dtype, CRS, nodata fits); a remote raster's header is checked when it is read.
    """
    where = f"{source}: " if source else ""
    data_assets = _data_assets(var)
    for item in items:
        for key in _assets_of(var):
            if key not in item.assets:
                raise CubeError(f"{where}variable '{var.name}': item {item.id} has no asset '{key}'")
            asset = item.assets[key]
            if (asset.media_type or "").split(";")[0] in ZARR_TYPES:
                raise CubeError(
                    f"{where}item {item.id}: asset '{key}' is Zarr; load_variable reads raster (COG/GeoTIFF) "
                    "assets (Zarr/NetCDF drivers load through load_cube / geoflux.reanalysis.load_gridded)"
                )
            if item_crs(item, key) is None:
                raise CubeError(
                    f"{where}item {item.id}: asset '{key}' has no CRS (proj:code, proj:epsg, proj:wkt2 "
                    "or proj:projjson expected; geoflux does not guess one)"
                )
            href = _href(item, key)
            if _is_local(href):
                path = _local_path(href)
                if not path.exists():
                    raise CubeError(f"{where}item {item.id}: asset '{key}': COG not found at {path}")
                check_header(path, item, key, var, data=key in data_assets, where=where)


def _assets_of(var: VariableSpec) -> list[str]:
    data = _data_assets(var)
    return data + ([var.qa_asset] if var.qa_asset and var.qa_asset not in data else [])


@dataclasses.dataclass(frozen=True)
class _Source:
    """What the reader needs to know about one asset href (picklable: travels with the graph)."""

    nodata: float | None  # told to GDAL when the file has no nodata tag of its own
    label: str  # "variable 'x': item <id>: asset '<key>'" for messages
    var: VariableSpec
    item: dict[str, Any]  # the item as a dict: rebuilt only when a remote header is checked
    key: str
    data: bool


class NodataRioReader:
    """odc-stac's rasterio reader (wrapped, public API only), plus: the declared nodata is GDAL's source
    nodata when the file has none (so fill pixels are never resampled into data), a remote file's header is
    checked once per read (local ones were checked up front), and read errors name the variable, item and
    asset."""

    def __init__(
        self, src: Any, ctx: Any, info: _Source | None, patch_url: Callable[[str], str] | None = None
    ) -> None:
        self._src = src
        self._ctx = ctx
        self._info = info
        self._patch_url = patch_url

    def read(self, cfg: Any, dst_geobox: GeoBox, *, dst: Any = None, selection: Any = None) -> Any:
        info = self._info
        if info is not None and info.nodata is not None:
            cfg = dataclasses.replace(cfg, src_nodata_fallback=info.nodata)
        uri = self._src.uri
        src = self._src
        if self._patch_url is not None and not _is_local(uri):
            # signed here, in the read task, never while the lazy cube is built (no network then)
            src = dataclasses.replace(src, uri=self._patch_url(uri))
        if info is not None and not _is_local(uri):
            check_header(src.uri, pystac.Item.from_dict(info.item), info.key, info.var, data=info.data)
        try:
            return RioReader(src, self._ctx).read(cfg, dst_geobox, dst=dst, selection=selection)
        except rasterio.errors.RasterioError as exc:
            what = info.label if info is not None else "asset"
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CubeError(f"{what}: {_uri_key(uri)}: cannot read ({msg})") from None


class NodataRioDriver(RioDriver):
    """A :class:`RioDriver` whose readers are :class:`NodataRioReader` (see there)."""

    def __init__(self, sources: Mapping[str, _Source], patch_url: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._sources = dict(sources)
        self._patch_url = patch_url

    def open(self, src: Any, ctx: Any) -> NodataRioReader:
        return NodataRioReader(src, ctx, self._sources.get(_uri_key(src.uri)), self._patch_url)


def _sources(items: Sequence[pystac.Item], var: VariableSpec, where: str) -> dict[str, _Source]:
    data = _data_assets(var)
    out = {}
    for item in items:
        d = item.to_dict(transform_hrefs=False)
        for key in _assets_of(var):
            nds = declared_nodata(item, key, var) if key in data else []
            out[_uri_key(_href(item, key))] = _Source(
                nds[0] if nds else None,
                f"{where}variable '{var.name}': item {item.id}: asset '{key}'",
                var,
                d,
                key,
                key in data,
            )
    return out


def _step_items(times: np.ndarray, items: Sequence[pystac.Item], static: bool) -> list[list[str]]:
    """Ids of the items that make each loaded time slice (odc-stac groups by nominal time)."""
    if static:
        return [[i.id for i in items]] * len(times)

    def nominal(item: pystac.Item) -> np.datetime64:
        t = pd.Timestamp(item.datetime or item.properties.get("start_datetime"))
        t = t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t
        return np.datetime64(t, "s")

    nom = [(nominal(i), i.id) for i in items]
    out = []
    for t in times:
        ts = np.datetime64(t, "s")
        ids = [i for n, i in nom if n == ts]
        if not ids:  # grouping by solar day or similar: name the nearest instead of nothing
            ids = [min(nom, key=lambda p: abs(p[0] - ts))[1]]
        out.append(ids)
    return out


def _where_step(var: VariableSpec, t: Any, ids: Sequence[str], assets: Sequence[str], source: str) -> str:
    where = f"{source}: " if source else ""
    step = "static" if var.static else f"{pd.Timestamp(t):%Y-%m-%d %H:%M}"
    shown = ", ".join(ids[:3]) + (f" (+{len(ids) - 3} more)" if len(ids) > 3 else "")
    return (
        f"{where}variable '{var.name}': step {step}: item{'s' if len(ids) > 1 else ''} {shown}: "
        f"asset{'s' if len(assets) > 1 else ''} {', '.join(repr(a) for a in assets)}"
    )


COARSE_EDGE = 64  # pixels: the coarse grid of the coverage check (overview reads, a few KB per asset)


def check_coverage(
    items: Sequence[pystac.Item],
    var: VariableSpec,
    geobox: GeoBox,
    *,
    driver: NodataRioDriver,
    groupby: Any,
    patch_url: Callable[[str], str] | None = None,
    source: str = "",
) -> np.ndarray:
    """Share of the region each loaded time slice leaves missing, per data asset, from a coarse read.

    Loads the data assets onto the grid zoomed to at most :data:`COARSE_EDGE` pixels a side (odc-stac then
    reads the rasters' overviews), eagerly, without dask, with the same nodata handling as the cube;
    missing = nodata or outside every raster's footprint (QA masks and valid ranges are not applied: a
    cloudy scene is not a broken one). A share above ``var.missing_max`` is reported (error, or warning
    with ``on_implausible: warn``) naming variable, step, items and asset. Only local rasters are measured:
    remote ones would make building the lazy cube depend on the network (empty result then). A process
    measures the same scenes on the same grid once (a run builds its cube in several stages); the check
    itself (error or warning) is made every time.

    Returns
    -------
    (time, asset) missing shares, 0..1.
    """
    data = _data_assets(var)
    if not all(_is_local(_href(i, b)) for i in items for b in data if b in i.assets):
        # remote rasters are not read while the lazy cube is built (no network then); a remote scene's
        # header is checked, and its values range-checked, when its chunk is read
        return np.empty((0, len(data)))
    scale = max(geobox.shape) / COARSE_EDGE
    coarse = geobox.zoom_out(scale) if scale > 1 else geobox
    key = _coverage_key(items, var, coarse)
    if key is not None and key in _COVERAGE:
        times, shares = _COVERAGE[key]
    else:
        times, shares = _measure_coverage(items, var, coarse, driver=driver, groupby=groupby)
        if key is not None:
            if len(_COVERAGE) >= _COVERAGE_MAX:
                _COVERAGE.clear()
            _COVERAGE[key] = (times, shares)
    steps = _step_items(times, items, var.static)
    for k, t in enumerate(times):
        for j, b in enumerate(data):
            if shares[k, j] > var.missing_max:
                _implausible(
                    var,
                    f"{_where_step(var, t, steps[k], [b], source)}: {shares[k, j]:.0%} of the region is "
                    f"missing (nodata or outside the raster) (expected at most missing_max "
                    f"{var.missing_max:.0%})",
                )
    return shares.copy()


# Coverage shares measured in this process, by what they depend on (see _coverage_key): a run builds the
# cube several times (extract, map, validation), and the coarse read of every scene is most of the cost.
_COVERAGE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_COVERAGE_MAX = 256


def _coverage_key(items: Sequence[pystac.Item], var: VariableSpec, coarse: GeoBox) -> tuple | None:
    """What a coverage measurement depends on: the driver definition, the coarse grid, the items (their
    JSON: nodata, times, hrefs) and each local raster's identity (path, size, modification time, inode),
    so a rewritten file is measured again. None (do not cache) when a file cannot be stat'ed."""
    files = []
    try:
        for item in items:
            for b in _data_assets(var):
                if b in item.assets:
                    st = _local_path(_href(item, b)).stat()
                    files.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    except OSError:
        return None
    docs = json.dumps([i.to_dict(transform_hrefs=False) for i in items], sort_keys=True, default=str)
    return (
        var.model_dump_json(),
        coarse.crs.to_wkt(),
        tuple(coarse.affine),
        tuple(coarse.shape),
        hashlib.sha256(docs.encode()).hexdigest(),
        tuple(files),
    )


def _measure_coverage(
    items: Sequence[pystac.Item], var: VariableSpec, coarse: GeoBox, *, driver: NodataRioDriver, groupby: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(time slices, (time, asset) missing shares) of ``items`` read eagerly onto the coarse grid."""
    data = _data_assets(var)
    ds = odc.stac.load(
        items,
        bands=data,
        geobox=coarse,
        dtype="float32",
        nodata=np.nan,
        resampling="nearest",
        groupby=groupby,
        driver=driver,
    )
    nodata = _declared_set(items, var)
    shares = np.stack(
        [np.isnan(ds[b].where(~ds[b].isin(nodata.get(b, []))).to_numpy()).mean(axis=(1, 2)) for b in data],
        axis=-1,
    )
    return ds["time"].to_numpy(), shares


def _declared_set(items: Sequence[pystac.Item], var: VariableSpec) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for b in _data_assets(var):
        vals = {v for i in items if b in i.assets for v in declared_nodata(i, b, var)}
        out[b] = sorted(vals)
    return out


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
    var : driver definition (assets, decoding, QA, derivation, valid and physical range, resampling).
    geobox : target grid.
    chunk : spatial chunk edge, pixels.
    patch_url : applied to every href at read time (e.g. Planetary Computer signing).
    source : catalog name for error messages.

    Returns
    -------
    dims (time, y, x) in the order of the items' times; static drivers are mosaicked into one time step.
    Continuous drivers are resampled bilinearly unless ``var.resampling`` says otherwise, categorical
    ones by nearest neighbour (or mode); class codes are never interpolated. NaN wherever a raster is
    nodata (the file's tag, the variable's ``nodata``, the item's ``raster:bands`` nodata) or does not
    cover the grid, before scaling; a derived driver is NaN wherever one of its inputs is.

    Raises
    ------
    CubeError
        naming the catalog, item and asset (missing asset, no CRS, missing local COG, Zarr asset, bad
        raster header, too much of the region missing); at compute time, from the chunk's task, values
        outside ``physical_range`` and unreadable remote rasters. ``on_implausible: warn`` turns the
        coverage and range checks into warnings.
    """
    check_loadable(items, var, source)
    where = f"{source}: " if source else ""
    data_assets = _data_assets(var)
    bands = _assets_of(var)
    default = "nearest" if var.kind == "categorical" else "bilinear"
    resampling = {b: var.resampling or default for b in data_assets}
    if var.qa_asset:
        resampling[var.qa_asset] = "nearest"  # flags: never blend bit patterns
    # Fill NaN for every band: outside a footprint and on the file's nodata (odc-stac would otherwise
    # fill with the declared nodata number, which scaling turns into a plausible-looking value).
    # The signer goes to the reader (read time), not to odc-stac (which would sign every href, fetching
    # tokens, while building the graph).
    driver = NodataRioDriver(_sources(items, var, where), patch_url)
    # A static driver is one map: mosaic every item into one plane whatever their timestamps.
    groupby = (lambda item, parsed, idx: 0) if var.static else "time"
    try:
        ds = odc.stac.load(
            items,
            bands=bands,
            geobox=geobox,
            chunks={"time": 1, "y": chunk, "x": chunk},
            dtype="float32",
            nodata=np.nan,
            resampling=resampling,
            groupby=groupby,
            driver=driver,
        )
    except Exception as exc:  # odc-stac raises plain ValueError/KeyError/AssertionError for odd items
        raise CubeError(
            f"{where}variable '{var.name}': cannot load items ({exc or type(exc).__name__})"
        ) from None
    check_coverage(items, var, geobox, driver=driver, groupby=groupby, source=source)
    nodata = _declared_set(items, var)

    def decode(a: xr.DataArray, asset: str) -> xr.DataArray:
        # GDAL already masked the file's tag (or the declared value where the file has none, see
        # NodataRioReader); masking the declared value again is exact and cheap, and covers what the
        # header check cannot see (a remote file read where its header was not checked), before scaling.
        for nd in nodata.get(asset, []):
            a = a.where(a != np.float32(nd))
        if var.kind == "continuous" and (var.scale != 1.0 or var.offset != 0.0):
            a = a * np.float32(var.scale) + np.float32(var.offset)
        if var.kind == "continuous" and var.convert:
            a = convert(a, var.convert)  # named unit conversion (data, not code): e.g. kg C/8 d -> g C/d
        return a

    if var.derive:
        roles = {role: decode(ds[asset], asset) for role, asset in (var.inputs or {}).items()}
        arr = DERIVE[var.derive](**roles)
    else:
        arr = decode(ds[var.asset], var.asset)
    if var.qa_asset:
        arr = arr.where(qa_mask(ds[var.qa_asset], var.qa_mask, var.qa_keep or []))
    if var.valid_range is not None:
        lo, hi = var.valid_range
        arr = arr.where((arr >= lo) & (arr <= hi))
    arr = arr.astype("float32").rename(var.name)
    if var.physical_range is not None and var.kind == "continuous":
        # after valid_range: values a product marks invalid (fill codes) are already missing, so what is
        # left outside the physical range means mis-decoding (scale, offset, units, nodata)
        steps = _step_items(arr["time"].to_numpy(), items, var.static)
        labels = [
            _where_step(var, t, ids, data_assets, source)
            for t, ids in zip(arr["time"].to_numpy(), steps, strict=True)
        ]
        arr = arr.copy(data=arr.data.map_blocks(check_physical, var=var, labels=labels, dtype=np.float32))
    arr.attrs = {"units": var.units, "kind": var.kind}
    if var.derive:
        arr.attrs["derived"] = var.derive
    if var.convert:
        arr.attrs["converted"] = var.convert
    if var.qa_asset:
        arr.attrs["qa"] = f"{var.qa_asset} & {var.qa_mask} in {var.qa_keep}"
    if var.physical_range is not None:
        arr.attrs["physical_range"] = list(var.physical_range)
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
    periods, step : period starts and their step (pandas frequency or ``MODIS8D``; see
        :func:`geoflux.config.period_ends`).
    aggregation : mean, median, max, min or sum (NaN-skipping; a period with no valid value stays NaN).

    Lazy; when every period holds at most one scene this is a relabelling, not a computation.
    """
    if aggregation not in _REDUCERS:
        raise CubeError(f"aggregation '{aggregation}': expected one of {', '.join(_REDUCERS)}")
    # true period ends (a MODIS8D year's last period closes on 1 January), from the one place that knows
    edges = period_edges(periods, step)
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
        if gridded_driver(items[var.name], var):
            # Zarr/NetCDF (reanalysis): aggregated to the periods and reprojected inside one task per chunk
            arr, cov = load_gridded(
                items[var.name],
                var,
                geobox,
                chunk,
                periods,
                step,
                patch_url=(patch_urls or {}).get(var.name),
                source=(sources or {}).get(var.name, ""),
            )
            data[cov.name] = cov
            if var.max_gap > 0:
                arr, flag = fill_gaps(arr, var.max_gap)
                data[flag.name] = flag
            data[var.name] = arr
            continue
        if var.aggregation == "daytime_mean":
            raise CubeError(
                f"{(sources or {}).get(var.name, '')}: variable '{var.name}': aggregation daytime_mean is "
                "for hourly Zarr/NetCDF drivers (expected mean, median, max, min or sum for raster scenes)"
            )
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
    cfg: RunConfig,
    *,
    geobox: GeoBox | None = None,
    sas_token_url: str | None = None,
    retry: Retry | None = None,
) -> xr.Dataset:
    """Search each driver's catalog (its own or the run's) and build the lazy cube on the run's grid.

    ``geobox`` replaces the run's grid (e.g. one tile of it: the search covers only that tile's extent).

    ``sas_token_url`` overrides the Planetary Computer token endpoint for drivers with
    ``signing: planetary-computer`` (default: env ``GEOFLUX_PC_SAS_URL`` or the public endpoint);
    ``retry`` the HTTP retry policy of API searches (default :func:`geoflux.catalog.default_retry`).

    The cube's attribute ``geoflux_loaded_items`` (JSON) records, per driver, whether it is static and the
    ``[id, time]`` of every item it was loaded from (time: ISO, naive UTC, as odc-stac orders scenes).
    """
    from geoflux.catalog import check_assets, make_signer, search_items

    geobox = target_grid(cfg.grid) if geobox is None else geobox
    lonlat = geobox.extent.to_crs("EPSG:4326").boundingbox
    periods, ends = cfg.period_bounds()
    end = ends[-1] - pd.Timedelta("1s")
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
