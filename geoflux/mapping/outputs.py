"""Time-aware products built from the finished map COGs: one Zarr cube and one time-stacked VRT per band.

The COGs (one file per band and period) stay the primary output; users who expect one dataset (xarray,
odc-stac, FLUXCOM/X-BASE-style NetCDF/Zarr readers, the QGIS temporal controller) get:

* ``maps/nee.zarr``: every band as a variable over (time, y, x) with ``time_bnds``, units, ``_FillValue``,
  a CF ``grid_mapping`` and the maps' provenance as attributes. Zarr rather than NetCDF because it is
  written chunk by chunk, in parallel, one time step at a time (``region=`` writes), with no single big
  file to rewrite, and opens lazily with ``xr.open_zarr`` as X-BASE does. Written as Zarr format 2 with
  consolidated metadata, which GDAL, QGIS and zarr-python 2 and 3 all read.
* ``maps/<band>.vrt`` (``nee.vrt``, ``nee-q05.vrt``, ``di.vrt``, ...): one GDAL band per period, band
  descriptions the period start dates, for GIS users.

Both are derived from the COGs on disk, never from the model, so they hold exactly the COGs' bytes; the cube
records a fingerprint of the files it was made from (names, sizes, modification times) and is rebuilt
when that changes (a re-map, a retrain), else kept. Both are written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.atomic import atomic_path
from geoflux.errors import GridError
from geoflux.mapping.tiles import VRT_TYPES

CUBE = "nee.zarr"
SOURCES_ATTR = "geoflux_sources_sha256"
# Run-wide tags copied from the NEE files into the cube's global attributes.
GLOBAL_TAGS = ("model_sha256", "model_kind", "config_sha256", "catalog", "variables", "software", "period")


def sources_fingerprint(files: Mapping[str, Mapping[pd.Timestamp, Path]]) -> str:
    """sha256 of every source file's band, period, name, size and modification time.

    A COG rewritten in place (resume after a retrain, ``--overwrite``) changes its size or mtime, so a
    product made from the old files is recognised as stale without reading any pixel.
    """
    h = hashlib.sha256()
    for band in sorted(files):
        for p, path in sorted(files[band].items()):
            st = Path(path).stat()
            h.update(f"{band}|{p:%Y-%m-%d}|{Path(path).name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_meta(path: Path) -> dict:
    with rasterio.open(path) as src:
        return {
            "geobox": GeoBox(src.shape, src.transform, src.crs.to_wkt()),
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "tags": src.tags(),
            "units": src.tags(1).get("units", ""),
            "description": src.descriptions[0] or "",
        }


def _period_bounds(meta: dict, start: pd.Timestamp) -> tuple[pd.Timestamp, pd.Timestamp]:
    tags = meta["tags"]
    t0 = pd.Timestamp(tags.get("period_start", start))
    if "period_end" in tags:
        return t0, pd.Timestamp(tags["period_end"])
    return t0, t0 + pd.tseries.frequencies.to_offset(tags.get("period", "1D"))


def _template(
    files: Mapping[str, Mapping[pd.Timestamp, Path]], periods: Sequence[pd.Timestamp], chunk: int
) -> tuple[xr.Dataset, dict, GeoBox]:
    """The cube's coordinates, attributes and lazy (never computed) variables, plus their encoding."""
    import dask.array as da
    from odc.geo.xr import xr_coords

    bands = list(files)
    first = {b: _read_meta(files[b][periods[0]]) for b in bands}
    geobox = first[bands[0]]["geobox"]
    bounds = [_period_bounds(_read_meta(files[bands[0]][p]), p) for p in periods]
    ny, nx = geobox.shape
    cy, cx = min(chunk, ny), min(chunk, nx)
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    coords["x"].attrs.update(standard_name="projection_x_coordinate", axis="X")
    coords["y"].attrs.update(standard_name="projection_y_coordinate", axis="Y")
    time = xr.DataArray(
        pd.DatetimeIndex([b[0] for b in bounds]),
        dims="time",
        attrs={
            "standard_name": "time",
            "long_name": "start of the period",
            "axis": "T",
            "bounds": "time_bnds",
        },
    )
    tb = np.array([[b[0], b[1]] for b in bounds], dtype="datetime64[ns]")
    ds = xr.Dataset(coords={"time": time, **coords})
    ds["time_bnds"] = xr.DataArray(tb, dims=("time", "nv"))
    time_enc = {
        "units": "seconds since 1970-01-01 00:00:00",
        "calendar": "proleptic_gregorian",
        "dtype": "int64",
    }
    encoding: dict = {"time": dict(time_enc), "time_bnds": dict(time_enc)}
    for b in bands:
        m = first[b]
        lazy = da.zeros((len(periods), ny, nx), dtype=m["dtype"], chunks=(1, cy, cx))
        attrs = {
            "units": m["units"],
            "long_name": m["tags"].get("long_name", m["description"]),
            "quantity": m["tags"].get("quantity", ""),
            "grid_mapping": "spatial_ref",
        }
        if b == "AOA":
            attrs.update(flag_values=[0, 1], flag_meanings="outside_area_of_applicability inside")
            del attrs["units"]  # CF: flags carry no units
        ds[b] = xr.DataArray(lazy, dims=("time", "y", "x"), attrs=attrs)
        encoding[b] = {"dtype": m["dtype"], "_FillValue": m["nodata"], "chunks": (1, cy, cx)}
    tags = first[bands[0]]["tags"]
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "geoflux net ecosystem exchange maps",
        "source": tags.get("software", "geoflux"),
        "comment": "made from the COGs maps/<band>_YYYYMMDD.tif; NEE positive = CO2 source to the atmosphere",
        **{k: tags[k] for k in GLOBAL_TAGS if k in tags},
        "input_items": json.dumps(
            {f"{p:%Y-%m-%d}": _read_meta(files[bands[0]][p])["tags"].get("input_items", "") for p in periods}
        ),
    }
    return ds, encoding, geobox


def write_time_cube(
    files: Mapping[str, Mapping[pd.Timestamp, Path]],
    path: Path,
    chunk: int = 512,
    created: str | None = None,
) -> tuple[Path, bool]:
    """Stack finished single-band COGs into one Zarr cube, one time step at a time.

    Parameters
    ----------
    files : band (``NEE`` first) → period start → COG; every band has every period. NEE and its quantiles
        in gC m-2 d-1, DI unitless, AOA a 0/1 mask; values are copied as stored (nodata → ``_FillValue``).
    path : the ``.zarr`` folder to write.
    chunk : spatial chunk edge in pixels (time chunks are 1 step).
    created : creation time for the ``history`` attribute (default: now, UTC).

    Returns
    -------
    (path, written): ``written`` is False when the cube on disk was already made from these exact files.

    Raises
    ------
    GridError
        if the files are not all on one grid.
    """
    import dask

    from geoflux.cog import utc_now

    path = Path(path)
    periods = sorted(next(iter(files.values())))
    fingerprint = sources_fingerprint(files)
    if _cube_fingerprint(path) == fingerprint:
        return path, False
    ds, encoding, geobox = _template(files, periods, chunk)
    ds.attrs[SOURCES_ATTR] = fingerprint
    ds.attrs["history"] = f"{created or utc_now()}: written by {ds.attrs['source']} from the map COGs"
    ny, nx = geobox.shape
    cy, cx = encoding[next(iter(files))]["chunks"][1:]
    with atomic_path(path) as tmp:
        # metadata, coordinates and time bounds now; the variables' chunks below, step by step
        ds.to_zarr(tmp, mode="w", compute=False, encoding=encoding, zarr_format=2, consolidated=True)
        for t, p in enumerate(periods):
            step = {}
            for band, per in files.items():
                _check_grid(per[p], geobox)
                dtype = encoding[band]["dtype"]
                step[band] = (("time", "y", "x"), _lazy_cog(per[p], (ny, nx), (cy, cx), dtype)[None])
            region = {"time": slice(t, t + 1), "y": slice(0, ny), "x": slice(0, nx)}
            with dask.config.set(scheduler="threads"):
                xr.Dataset(step).to_zarr(tmp, region=region, zarr_format=2)
    return path, True


def _check_grid(path: Path, geobox: GeoBox) -> None:
    with rasterio.open(path) as src:
        if src.shape != tuple(geobox.shape) or src.transform != geobox.affine:
            raise GridError(f"{path}: grid {src.shape} {tuple(src.transform)[:6]} differs from the cube's")


def _read_window(block: np.ndarray, path: str, dtype: str, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    with rasterio.open(path) as src:
        return src.read(1, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)).astype(dtype, copy=False)


def _lazy_cog(path: Path, shape: tuple[int, int], chunks: tuple[int, int], dtype: str):
    """A COG as a dask array of raw stored values (nodata included), one window read per chunk."""
    import dask.array as da

    base = da.empty(shape, chunks=chunks, dtype=dtype)
    return base.map_blocks(_read_window, str(path), dtype, dtype=dtype, meta=np.empty((0, 0), dtype))


def _cube_fingerprint(path: Path) -> str | None:
    """The source fingerprint recorded in an existing cube, None if there is none or it is unreadable."""
    if not path.exists():
        return None
    try:
        with xr.open_zarr(path, consolidated=True) as ds:
            return ds.attrs.get(SOURCES_ATTR)
    except Exception:  # an unreadable store is rebuilt, whatever broke it
        return None


def write_band_vrt(
    path: Path,
    per_period: Mapping[pd.Timestamp, Path],
    geobox: GeoBox,
    dtype: str,
    nodata: float | int | None,
    units: str,
    description: str,
) -> Path:
    """A GDAL VRT with one band per period (band description = period start date), atomically.

    Parameters
    ----------
    path : the ``.vrt`` to write; sources are stored relative to its folder.
    per_period : period start → single-band COG on ``geobox``.
    geobox : the grid of every source.
    dtype, nodata, units : of the sources (NEE: float32, -9999, gC m-2 d-1).
    description : what the band is, stored as each band's ``long_name`` metadata item.
    """
    path = Path(path)
    ny, nx = geobox.shape
    a = geobox.affine
    gt = ", ".join(repr(float(v)) for v in (a.c, a.a, a.b, a.f, a.d, a.e))
    lines = [
        f'<VRTDataset rasterXSize="{nx}" rasterYSize="{ny}">',
        f"  <SRS>{escape(geobox.crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{gt}</GeoTransform>",
    ]
    for i, (p, src) in enumerate(sorted(per_period.items()), start=1):
        rel = Path(src).resolve().relative_to(path.parent.resolve()).as_posix()
        lines += [
            f'  <VRTRasterBand dataType="{VRT_TYPES[dtype]}" band="{i}">',
            f"    <Description>{p:%Y-%m-%d}</Description>",
            f"    <NoDataValue>{nodata!r}</NoDataValue>" if nodata is not None else None,
            f"    <UnitType>{escape(units)}</UnitType>" if units else None,
            '    <Metadata><MDI key="period_start">'
            f'{p:%Y-%m-%d}</MDI><MDI key="long_name">{escape(description)}</MDI></Metadata>',
            "    <SimpleSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" xSize="{nx}" ySize="{ny}" />',
            f'      <DstRect xOff="0" yOff="0" xSize="{nx}" ySize="{ny}" />',
            "    </SimpleSource>",
            "  </VRTRasterBand>",
        ]
    lines += ["</VRTDataset>", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(x for x in lines if x is not None))
    return path
