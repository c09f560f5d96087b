"""Cloud-Optimized GeoTIFF output (I/O edge).

Chunks are streamed into a tiled GeoTIFF as they finish (never the whole array in memory), then GDAL's COG
driver copies that file into a COG with overviews. Both steps write under ``*.part`` names; the final name
appears only when the COG is complete, so a killed run leaves nothing that looks finished.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pystac
import rasterio
import rasterio.shutil
from odc.geo.geobox import GeoBox
from pystac.extensions.projection import ProjectionExtension
from rasterio.windows import Window

from geoflux.atomic import atomic_path, part_path

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


def _profile(geobox: GeoBox, spec: RasterSpec) -> dict:
    ny, nx = geobox.shape
    block = min(256, max(16, (min(nx, ny) // 16) * 16))
    return {
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
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _describe(dst: rasterio.io.DatasetWriter, spec: RasterSpec) -> None:
    dst.update_tags(**spec.tags)
    dst.update_tags(1, units=spec.units)
    if spec.units:
        dst.units = (spec.units,)
    if spec.description:
        dst.set_band_description(1, spec.description)


def _cog_blocksize(width: int, height: int) -> int:
    """256-pixel tiles, smaller for small rasters so that they still get tiles and overviews."""
    size = 256
    while size > 16 and min(width, height) < 2 * size:
        size //= 2
    return size


def _to_cog(src: Path, dst: Path, resampling: str) -> None:
    with rasterio.open(src) as ds:
        block = _cog_blocksize(ds.width, ds.height)
    opts = {**COG_OPTIONS, "OVERVIEW_RESAMPLING": resampling, "BLOCKSIZE": block}
    if resampling.upper() == "NEAREST":
        opts["PREDICTOR"] = "NO"
    rasterio.shutil.copy(str(src), str(dst), driver="COG", **opts)


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
        tiled = part.with_name(part.name + ".tiled.tif")
        try:
            with rasterio.open(tiled, "w", **_profile(geobox, spec)) as dst:
                dst.write(data.astype(spec.dtype), 1)
                _describe(dst, spec)
            _to_cog(tiled, part, spec.resampling)
        finally:
            tiled.unlink(missing_ok=True)
    return spec.path


class _WindowWriter:
    """``da.store`` target: writes each finished chunk into its window of an open GeoTIFF."""

    def __init__(self, dst: rasterio.io.DatasetWriter, dtype: str):
        self.dst = dst
        self.dtype = dtype
        self.shape = (dst.height, dst.width)

    def __setitem__(self, key: tuple[slice, slice], block: np.ndarray) -> None:
        rows, cols = key
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        self.dst.write(block.astype(self.dtype, copy=False), 1, window=win)


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
            tiled = part_path(spec.path).with_name(spec.path.name + ".part.tiled.tif")
            tiled_paths.append(tiled)
            dst = rasterio.open(tiled, "w", **_profile(geobox, spec))
            handles.append(dst)
            _describe(dst, spec)
        if todo:
            # One lock for all files: GDAL handles are not thread-safe, and writes are cheap next to compute.
            lock = threading.Lock()
            targets = [_WindowWriter(h, s.dtype) for h, (_, s) in zip(handles, todo, strict=True)]
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
) -> pystac.Item:
    """A STAC item (with the projection extension) describing one single-band COG.

    ``datetime`` is the period start; ``start_datetime``/``end_datetime`` bound the period.
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
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = geobox.crs.epsg
    proj.epsg = epsg
    if epsg is None:
        proj.wkt2 = geobox.crs.to_wkt()
    proj.shape = list(geobox.shape)
    proj.transform = list(geobox.affine)[:6]
    return item


def save_catalog(
    root: Path, catalog_id: str, description: str, collections: dict[str, list[pystac.Item]], geobox: GeoBox
) -> Path:
    """Write a self-contained static STAC catalog at ``root/catalog.json`` with one collection per key.

    Asset hrefs are made relative so the folder can be moved as a whole.
    """
    cat = pystac.Catalog(id=catalog_id, description=description)
    lon0, lat0, lon1, lat1 = geobox.extent.to_crs("EPSG:4326").boundingbox
    for cid, items in collections.items():
        times = [i.datetime for i in items if i.datetime is not None]
        extent = pystac.Extent(
            pystac.SpatialExtent([[lon0, lat0, lon1, lat1]]),
            pystac.TemporalExtent([[min(times), max(times)]]),
        )
        coll = pystac.Collection(id=cid, description=f"{cid} ({description})", extent=extent)
        coll.add_items(items)
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
