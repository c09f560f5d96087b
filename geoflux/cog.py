"""Cloud-Optimized GeoTIFF output (I/O edge).

Chunks are streamed into a tiled GeoTIFF as they finish (never the whole array in memory), then GDAL's COG
driver copies that file into a COG with overviews. The steps write under ``<name>.part-tiled`` and
``<name>.part``; the final name appears only when the COG is complete, so a killed run leaves nothing that
looks finished (and nothing that a ``*.tif`` glob matches).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pystac
import rasterio
import rasterio.shutil
from odc.geo.geobox import GeoBox
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.windows import Window

from geoflux.atomic import atomic_path

# Suffix of the intermediate tiled GeoTIFF of an output ``<name>``: ``<name>.part-tiled``. Like the COG's own
# ``<name>.part`` it does not end in ``.tif``, so no ``*.tif`` glob (``geoflux validate --maps
# 'maps/nee_*.tif'``) picks up an unfinished file after a kill; GDAL gets the driver explicitly.
TILED_SUFFIX = ".part-tiled"


def tiled_path(path: Path) -> Path:
    """The intermediate (uncompressed, tiled GeoTIFF) name used while ``path`` is being written."""
    return path.with_name(path.name + TILED_SUFFIX)


COG_OPTIONS = {
    "BLOCKSIZE": 256,
    "COMPRESS": "DEFLATE",
    "PREDICTOR": "YES",
    "OVERVIEWS": "IGNORE_EXISTING",
    "OVERVIEW_RESAMPLING": "AVERAGE",
    "NUM_THREADS": "ALL_CPUS",
}


@dataclass(frozen=True)
class RasterSpec:
    """What goes into one single-band output raster."""

    path: Path
    dtype: str = "float32"
    nodata: float | int | None = -9999.0
    units: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    resampling: str = "AVERAGE"  # overview resampling; NEAREST for categorical rasters


def _profile(
    geobox: GeoBox, spec: RasterSpec, block: int | None = None, compress: str | None = "deflate"
) -> dict:
    ny, nx = geobox.shape
    block = block or min(256, max(16, (min(nx, ny) // 16) * 16))
    profile = {
        "driver": "GTiff",
        "width": nx,
        "height": ny,
        "count": 1,
        "dtype": spec.dtype,
        "nodata": spec.nodata,
        "crs": geobox.crs.to_wkt(),
        "transform": geobox.affine,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "BIGTIFF": "IF_SAFER",
    }
    if compress:
        profile["compress"] = compress
    return profile


def _fill_nodata(block: np.ndarray, spec: RasterSpec) -> np.ndarray:
    """Cast to the output dtype with NaN (masked) pixels set to the declared nodata value.

    Integer outputs (e.g. the AOA mask as uint8 with nodata 255) get their nodata before the cast, since
    NaN has no integer value.
    """
    block = np.asarray(block)
    dtype = np.dtype(spec.dtype)
    has_nodata = spec.nodata is not None and not np.isnan(spec.nodata)
    if has_nodata and np.issubdtype(block.dtype, np.floating):
        nan = np.isnan(block)
        if nan.any():
            block = np.where(nan, np.asarray(spec.nodata, dtype=block.dtype), block)
    return block.astype(dtype, copy=False)


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (``2024-05-01T12:00:00Z``)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(dst: rasterio.io.DatasetWriter, spec: RasterSpec) -> None:
    # ``created`` is when these bytes were written, unless the spec says otherwise (a copy keeps its source's)
    dst.update_tags(**{"created": utc_now(), **spec.tags})
    dst.update_tags(1, units=spec.units)
    if spec.units:
        dst.units = (spec.units,)
    if spec.description:
        dst.set_band_description(1, spec.description)


def _cog_blocksize(width: int, height: int) -> int:
    """256-pixel COG tiles, 128 for rasters under 512 px a side.

    GDAL's COG driver accepts BLOCKSIZE >= 128 only (smaller values draw a warning per file); a raster
    smaller than one tile is a single tile and needs no overviews.
    """
    return 256 if min(width, height) >= 512 else 128


# GDAL's block cache defaults to 5 % of RAM; while it builds overviews for a big COG it would fill it (about
# 0.45 GB more peak RSS for an 8192² float32 map), so conversions run with a small fixed cache instead:
# measured on an 8192² map, 128 MB -> +231 MB peak, 16 MB -> +116 MB, same conversion time (the rest is
# GDAL's full-width overview buffers).
COG_CACHE_BYTES = 16 * 2**20


def _to_cog(src: Path, dst: Path, resampling: str) -> None:
    with rasterio.open(src, driver="GTiff") as ds:
        block = _cog_blocksize(ds.width, ds.height)
    opts = {**COG_OPTIONS, "OVERVIEW_RESAMPLING": resampling, "BLOCKSIZE": block}
    if resampling.upper() == "NEAREST":
        opts["PREDICTOR"] = "NO"
    with rasterio.Env(GDAL_CACHEMAX=COG_CACHE_BYTES):
        rasterio.shutil.copy(str(src), str(dst), driver="COG", **opts)


def mosaic_to_cog(src: str | os.PathLike, spec: RasterSpec, overwrite: bool = True) -> Path:
    """Copy a mosaic (e.g. a VRT of tiles) into a COG with ``spec``'s tags, units and description.

    GDAL streams the copy block by block (no whole-array buffering); written under ``.part`` names.
    """
    with atomic_path(spec.path, overwrite=overwrite) as part:
        tiled = tiled_path(spec.path)
        try:
            with rasterio.open(src) as ds:
                block = _intermediate_block(None, ds.width, ds.height)
            rasterio.shutil.copy(
                str(src),
                str(tiled),
                driver="GTiff",
                tiled=True,
                blockxsize=block,
                blockysize=block,
                BIGTIFF="IF_SAFER",
            )
            with rasterio.open(tiled, "r+", driver="GTiff") as dst:
                _describe(dst, spec)
            _to_cog(tiled, part, spec.resampling)
        finally:
            tiled.unlink(missing_ok=True)
    return spec.path


def write_cog(data: np.ndarray, geobox: GeoBox, spec: RasterSpec, overwrite: bool = True) -> Path:
    """Write a 2-D in-memory array as a COG, atomically.

    Parameters
    ----------
    data : 2-D array of the grid's shape (rows, cols).
    geobox : the grid (CRS + transform).
    spec : output path, dtype, nodata, units and tags.
    """
    if data.shape != tuple(geobox.shape):
        raise ValueError(f"{spec.path}: array shape {data.shape} != grid shape {tuple(geobox.shape)}")
    with atomic_path(spec.path, overwrite=overwrite) as part:
        tiled = tiled_path(spec.path)
        try:
            with rasterio.open(tiled, "w", **_profile(geobox, spec)) as dst:
                dst.write(_fill_nodata(data, spec), 1)
                _describe(dst, spec)
            _to_cog(tiled, part, spec.resampling)
        finally:
            tiled.unlink(missing_ok=True)
    return spec.path


class _WindowWriter:
    """``da.store`` target: writes each finished chunk into its window of an open GeoTIFF."""

    def __init__(self, dst: rasterio.io.DatasetWriter, spec: RasterSpec):
        self.dst = dst
        self.spec = spec
        self.shape = (dst.height, dst.width)

    def __setitem__(self, key: tuple[slice, slice], block: np.ndarray) -> None:
        rows, cols = key
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        self.dst.write(_fill_nodata(block, self.spec), 1, window=win)


def write_cogs(
    arrays: Sequence[da.Array],
    geobox: GeoBox,
    specs: Sequence[RasterSpec],
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Stream many lazy 2-D arrays into COGs in one dask computation.

    Each chunk is computed once and written into its window of a tiled GeoTIFF as soon as it is done
    (memory is bounded by chunks in flight, not by the array size); then each file is converted to a COG
    and renamed into place. Outputs that already exist are skipped unless ``overwrite``.

    Parameters
    ----------
    arrays : lazy 2-D arrays of the grid's shape, one per output.
    geobox : the grid.
    specs : one :class:`RasterSpec` per array.
    overwrite : redo outputs that exist.
    progress : show a progress bar on stderr.

    Returns
    -------
    The paths written (skipped ones included).
    """
    todo = [(a, s) for a, s in zip(arrays, specs, strict=True) if overwrite or not s.path.exists()]
    tiled_paths: list[Path] = []
    handles = []
    try:
        for _, spec in todo:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            tiled = tiled_path(spec.path)
            tiled_paths.append(tiled)
            dst = rasterio.open(tiled, "w", **_profile(geobox, spec))
            handles.append(dst)
            _describe(dst, spec)
        if todo:
            # One lock for all files: GDAL handles are not thread-safe, and writes are cheap next to compute.
            lock = threading.Lock()
            targets = [_WindowWriter(h, s) for h, (_, s) in zip(handles, todo, strict=True)]
            store = da.store([a for a, _ in todo], targets, lock=lock, compute=False)
            if progress:
                from geoflux.progress import progress_bar

                with progress_bar("mapping"):
                    dask.compute(store)
            else:
                dask.compute(store)
        for h in handles:
            h.close()
        handles = []
        for tiled, (_, spec) in zip(tiled_paths, todo, strict=True):
            with atomic_path(spec.path) as part:
                _to_cog(tiled, part, spec.resampling)
            tiled.unlink()
    finally:
        for h in handles:
            h.close()
        for t in tiled_paths:
            t.unlink(missing_ok=True)
    return [s.path for s in specs]


def _intermediate_block(chunk: int | None, width: int, height: int) -> int:
    """Tile edge of the intermediate GeoTIFF: the chunk edge when it is a multiple of 16, so every chunk
    write covers whole tiles (no read-modify-write of half-filled tiles)."""
    if chunk and chunk % 16 == 0:
        return min(chunk, 1024)
    return min(256, max(16, (min(width, height) // 16) * 16))


class COGStream:
    """Several single-band outputs on one grid, written block by block, finished as COGs.

    Opens one uncompressed tiled GeoTIFF per spec under ``<name>.part-tiled``; :meth:`write` puts a
    block of every output into its window as soon as it is computed (nothing else is buffered);
    :meth:`finish` closes them, copies each into a COG with overviews under ``<name>.part`` and renames
    it into place. Not thread-safe: one writer thread (the mapping stage writes from the thread that
    collects finished chunks).

    Parameters
    ----------
    geobox : the grid of every output.
    specs : one :class:`RasterSpec` per output band.
    chunk : chunk edge of the blocks that will be written (pixels), to align the intermediate tiles.
    """

    def __init__(self, geobox: GeoBox, specs: Sequence[RasterSpec], chunk: int | None = None):
        self.geobox = geobox
        self.specs = list(specs)
        ny, nx = geobox.shape
        block = _intermediate_block(chunk, nx, ny)
        self._tiled: list[Path] = []
        self._handles: list[rasterio.io.DatasetWriter] = []
        try:
            for spec in self.specs:
                spec.path.parent.mkdir(parents=True, exist_ok=True)
                tiled = tiled_path(spec.path)
                self._tiled.append(tiled)
                # Uncompressed: the writer thread stays cheap; compression happens once, in the COG copy.
                dst = rasterio.open(tiled, "w", **_profile(geobox, spec, block=block, compress=None))
                self._handles.append(dst)
                _describe(dst, spec)
        except BaseException:
            self.abort()
            raise

    def write(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Write one block of every output.

        Parameters
        ----------
        rows, cols : the block's pixel window in the grid.
        block : (n_outputs, rows, cols) values; NaN becomes each output's nodata.
        """
        if block.shape[0] != len(self._handles):
            raise ValueError(f"block has {block.shape[0]} bands, expected {len(self._handles)}")
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        for dst, spec, band in zip(self._handles, self.specs, block, strict=True):
            dst.write(_fill_nodata(band, spec), 1, window=win)

    def finish(self) -> list[Path]:
        """Close the intermediates, convert each to a COG and rename it into place."""
        for h in self._handles:
            h.close()
        self._handles = []
        try:
            for tiled, spec in zip(self._tiled, self.specs, strict=True):
                with atomic_path(spec.path) as part:
                    _to_cog(tiled, part, spec.resampling)
                    # gone before the rename: a finished output never has its intermediate beside it, so a
                    # run killed at any moment leaves no leftover that a resume (which skips it) would keep
                    tiled.unlink()
        finally:
            self.abort()
        return [s.path for s in self.specs]

    def abort(self) -> None:
        """Close and remove the intermediates (finished COGs stay)."""
        for h in self._handles:
            h.close()
        self._handles = []
        for t in self._tiled:
            t.unlink(missing_ok=True)

    def __enter__(self) -> COGStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def raster_band_fields(
    name: str, description: str, nodata: float | int | None, data_type: str, unit: str
) -> dict[str, Any]:
    """One band's metadata as STAC 1.1 common band fields (``name``, ``nodata``, ``data_type``, ``unit``)."""
    band: dict[str, Any] = {"name": name, "description": description, "data_type": data_type}
    if nodata is not None:
        band["nodata"] = nodata
    if unit:
        band["unit"] = unit
    return band


def describe_raster_asset(
    asset: pystac.Asset, band: Mapping[str, Any], resolution: float | None = None
) -> None:
    """Put one band's nodata, data type and unit on an asset the way STAC tools read them.

    STAC 1.1 ``bands`` (read by odc-stac and pystac) and, for tools that predate STAC 1.1 (stackstac,
    QGIS), the raster extension's ``raster:bands`` with scale 1 and offset 0 (values are physical). The
    asset must already belong to its item or collection (the extension is declared there).
    """
    asset.extra_fields["bands"] = [dict(band)]
    raster = RasterExtension.ext(asset, add_if_missing=True)
    raster.bands = [
        RasterBand.create(
            nodata=band.get("nodata"),
            data_type=DataType(band["data_type"]),
            unit=band.get("unit"),
            scale=1.0,
            offset=0.0,
            spatial_resolution=resolution,
        )
    ]


def stac_item_for_cog(
    path: Path,
    geobox: GeoBox,
    item_id: str,
    start: dt.datetime,
    end: dt.datetime,
    properties: dict | None = None,
    asset_key: str = "data",
    asset_title: str = "",
    roles: Sequence[str] = ("data",),
    band: Mapping[str, Any] | None = None,
) -> pystac.Item:
    """A STAC item (with the projection extension) describing one single-band COG.

    ``datetime`` is the period start; ``start_datetime``/``end_datetime`` bound the period. ``band``
    (see :func:`raster_band_fields`) adds the asset's nodata, data type and unit
    (:func:`describe_raster_asset`).
    """
    footprint = geobox.extent.to_crs("EPSG:4326")
    geom = footprint.json
    lon0, lat0, lon1, lat1 = footprint.boundingbox
    props = {
        "start_datetime": start.isoformat() + "Z",
        "end_datetime": end.isoformat() + "Z",
        **(properties or {}),
    }
    item = pystac.Item(
        id=item_id, geometry=geom, bbox=[lon0, lat0, lon1, lat1], datetime=start, properties=props
    )
    item.add_asset(
        asset_key,
        pystac.Asset(
            href=str(Path(path).resolve()),
            media_type=pystac.MediaType.COG,
            title=asset_title or None,
            roles=list(roles),
        ),
    )
    if band is not None:
        describe_raster_asset(item.assets[asset_key], band, resolution=abs(geobox.resolution.x))
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = geobox.crs.epsg
    proj.epsg = epsg
    if epsg is None:
        proj.wkt2 = geobox.crs.to_wkt()
    proj.shape = list(geobox.shape)
    proj.transform = list(geobox.affine)[:6]
    return item


def _item_end(item: pystac.Item) -> dt.datetime | None:
    """End of an item's period (``end_datetime``), else its ``datetime``."""
    end = item.common_metadata.end_datetime
    return end if end is not None else item.datetime


def save_catalog(
    root: Path,
    catalog_id: str,
    description: str,
    collections: dict[str, list[pystac.Item]],
    geobox: GeoBox,
    decorate: Callable[[pystac.Collection], None] | None = None,
) -> Path:
    """Write a self-contained static STAC catalog at ``root/catalog.json`` with one collection per key.

    A collection's temporal extent runs from its first item's start to its last item's ``end_datetime``
    (the end of the last period, not its start). ``decorate`` may add licence, providers, item_assets,
    summaries or collection-level assets to each collection before it is saved. Asset hrefs are made
    relative so the folder can be moved as a whole.
    """
    cat = pystac.Catalog(id=catalog_id, description=description)
    lon0, lat0, lon1, lat1 = geobox.extent.to_crs("EPSG:4326").boundingbox
    for cid, items in collections.items():
        starts = [i.common_metadata.start_datetime or i.datetime for i in items]
        ends = [_item_end(i) for i in items]
        extent = pystac.Extent(
            pystac.SpatialExtent([[lon0, lat0, lon1, lat1]]),
            pystac.TemporalExtent(
                [[min(t for t in starts if t is not None), max(t for t in ends if t is not None)]]
            ),
        )
        coll = pystac.Collection(id=cid, description=f"{cid} ({description})", extent=extent)
        coll.add_items(items)
        if decorate is not None:
            decorate(coll)
        cat.add_child(coll)
    root.mkdir(parents=True, exist_ok=True)
    cat.normalize_hrefs(str(root.resolve()))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def is_valid_cog(path: str | os.PathLike) -> tuple[bool, list[str]]:
    """Validate a COG with rio-cogeo; returns (valid, errors + warnings)."""
    from rio_cogeo.cogeo import cog_validate

    ok, errors, warnings = cog_validate(str(path), quiet=True)
    return ok, [*errors, *warnings]
