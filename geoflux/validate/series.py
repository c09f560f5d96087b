"""Map time series from any source: GeoTIFF/COG files (one per step, single- or multi-band) or xarray
exports.

Each series is opened as a :class:`MapSeries` (times, bands, grid, units factor to gC m-2 d-1) and read window
by window, so memory is bounded by the windows asked for, not the map size.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import rasterio.windows
from odc.geo.geobox import GeoBox
from rasterio._err import CPLE_BaseError  # GDAL errors rasterio does not wrap

from geoflux.errors import GeofluxError, GridError, MapReadError

log = logging.getLogger("geoflux")

NEE_UNITS = "gC m-2 d-1"
# physical NEE units as exports spell them → factor to gC m-2 d-1 (µmol CO2 → gC: 12.011e-6 g × 86400 s)
_UNIT_FACTORS = {
    "gc m-2 d-1": 1.0,
    "g c m-2 d-1": 1.0,
    "gc m-2 day-1": 1.0,
    "g c m-2 day-1": 1.0,
    "g m-2 d-1": 1.0,
    "g m-2 day-1": 1.0,
    "gc/m2/d": 1.0,
    "gc/m2/day": 1.0,
    "g/m2/d": 1.0,
    "g/m2/day": 1.0,
    "umol m-2 s-1": 1.0377,
    "µmol m-2 s-1": 1.0377,
    "umol co2 m-2 s-1": 1.0377,
    "umolco2 m-2 s-1": 1.0377,
    "kg m-2 s-1": 86400e3,  # CMIP 'nee' (kg C m-2 s-1)
    "kg c m-2 s-1": 86400e3,
    "kgc m-2 s-1": 86400e3,
}


def _read_masked(ds: rasterio.io.DatasetReader, window=None, band: int = 1) -> np.ndarray:
    a = ds.read(band, window=window, masked=True).astype("float64")
    return a.filled(np.nan)


# --------------------------------------------------------------------------------------------------
# Map time series on any grid


@dataclass
class MapSeries:
    """A time series of NEE maps on one grid, read by window.

    Attributes
    ----------
    geobox : the maps' grid (CRS + affine + shape).
    times : start of each map's period.
    units : units of the values :meth:`read` returns (always gC m-2 d-1 after conversion).
    bands : roles available besides ``NEE``: ``lo``/``hi`` (uncertainty band bounds, gC m-2 d-1),
        ``AOA`` (1 inside the area of applicability, 0 outside).
    source : what the series was opened from (for messages and the report).
    """

    geobox: GeoBox
    times: pd.DatetimeIndex
    units: str
    bands: tuple[str, ...]
    source: str
    reader: Callable[[int, Sequence[tuple[slice, slice]]], list[dict[str, np.ndarray]]] = field(repr=False)
    interval: str = ""  # e.g. 'NEE_q05..NEE_q95'

    def read(self, i: int, windows: Sequence[tuple[slice, slice]]) -> list[dict[str, np.ndarray]]:
        """Values of time step ``i`` in each (rows, cols) window: ``{'NEE': ..., 'lo': ..., ...}``.

        Arrays are float64 with NaN for no data; NEE and band bounds in gC m-2 d-1. The step's files are
        opened once for all windows.
        """
        return self.reader(i, windows)


_DATE_PATTERNS = (
    (re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"), "%Y-%m-%d"),
    (re.compile(r"(?<!\d)(\d{8})(?!\d)"), "%Y%m%d"),
    (re.compile(r"(?<!\d)(\d{4})\.?(\d{3})(?!\d)"), "doy"),  # MODIS-style A2021001 / 2021.001
    (re.compile(r"(?<!\d)(\d{6})(?!\d)"), "%Y%m"),
)


def time_from_name(path: str | Path) -> pd.Timestamp | None:
    """The date a raster stands for, from its ``period_start``/``datetime`` tag or its name (else None)."""
    try:
        with rasterio.open(path) as ds:
            tags = ds.tags()
        for key in ("period_start", "start_datetime", "datetime", "TIFFTAG_DATETIME"):
            if key in tags:
                value = tags[key].replace(":", "-", 2) if key == "TIFFTAG_DATETIME" else tags[key]
                return pd.Timestamp(value[:10])
    except (rasterio.errors.RasterioIOError, ValueError):
        pass
    name = Path(path).name
    for rx, fmt in _DATE_PATTERNS:
        m = rx.search(name)
        if not m:
            continue
        try:
            if fmt == "doy":
                return pd.Timestamp(f"{m.group(1)}-01-01") + pd.Timedelta(days=int(m.group(2)) - 1)
            return pd.to_datetime("".join(m.groups()) if fmt != "%Y-%m-%d" else m.group(0), format=fmt)
        except ValueError:
            continue
    return None


def _role_of_description(desc: str) -> str | None:
    d = desc.strip().lower()
    if d in ("nee", "nee_mean", "nee_pred"):
        return "NEE"
    if re.fullmatch(r"nee_q\d+", d):
        return "q"
    if d == "aoa":
        return "AOA"
    return None


def _band_layout(path: Path) -> dict[str, int]:
    """Band index (1-based) of each role in a multi-band map; NEE defaults to band 1."""
    with _open_map(path) as ds:
        descs = [d or "" for d in ds.descriptions]
    roles: dict[str, int] = {}
    quant: dict[int, int] = {}
    for i, d in enumerate(descs, start=1):
        role = _role_of_description(d)
        if role == "q":
            quant[int(re.findall(r"\d+", d)[0])] = i
        elif role and role not in roles:
            roles[role] = i
    roles.setdefault("NEE", 1)
    if len(quant) >= 2:
        roles["lo"], roles["hi"] = quant[min(quant)], quant[max(quant)]
    return roles


def _sibling_files(path: Path) -> dict[str, Path]:
    """Per-band files next to ``nee_YYYYMMDD.tif``: ``nee_q05_…``/``nee_q95_…`` (band) and ``aoa_…``."""
    m = re.match(r"(?i)^(nee)_(.+)$", path.name)
    if not m:
        return {}
    out: dict[str, Path] = {}
    rest = m.group(2)
    quant = {}
    # the mapping stage writes nee-q05_<date>.tif; nee_q05_<date>.tif is accepted for other producers
    for q in path.parent.glob(f"{m.group(1)}[-_]q*_{rest}"):
        level = re.match(r"(?i)^nee[-_]q(\d+)_", q.name)
        if level:
            quant[int(level.group(1))] = q
    if len(quant) >= 2:
        out["lo"], out["hi"] = quant[min(quant)], quant[max(quant)]
    for prefix in ("aoa", "AOA"):
        a = path.parent / f"{prefix}_{rest}"
        if a.exists():
            out["AOA"] = a
            break
    return out


@contextlib.contextmanager
def _open_map(path: str | Path) -> Iterator[rasterio.io.DatasetReader]:
    """``rasterio.open`` whose failures (opening or reading) are one :class:`MapReadError` naming the file."""
    try:
        with rasterio.open(path) as ds:
            yield ds
    except (rasterio.errors.RasterioError, CPLE_BaseError) as exc:
        # GDAL's own text ("Read failed. See previous exception") often hides the cause: say what to check
        detail = str(exc).replace(str(path), "").strip(" '\".:") or type(exc).__name__
        if "previous exception" in detail:
            detail = "its pixel data cannot be decoded"
        raise MapReadError(
            f"{path}: cannot read map ({detail[:200]}; expected a complete GeoTIFF/COG; truncated or "
            "corrupt file?)"
        ) from None


def _geobox_of(ds: rasterio.io.DatasetReader, path: Path) -> GeoBox:
    if ds.crs is None:
        raise GridError(f"{path}: raster has no CRS (expected a georeferenced GeoTIFF)")
    return GeoBox((ds.height, ds.width), ds.transform, ds.crs.to_wkt())


def _scale_from_tags(
    ds: rasterio.io.DatasetReader, band: int, path: Path, default_units: str | None
) -> float:
    units = (ds.units[band - 1] if ds.units and ds.units[band - 1] else "") or ds.tags(band).get("units", "")
    units = units or (default_units or "")
    return unit_factor(units, f"{path} band {band}")


def unit_factor(units: str, where: str) -> float:
    """Factor converting NEE in ``units`` to gC m-2 d-1.

    An empty string means gC m-2 d-1 (logged). Raises naming ``where`` for units it does not know.
    """
    key = " ".join(units.replace("**", "").replace("^", "").lower().split())
    if not key:
        log.info("%s: no units given; assuming %s", where, NEE_UNITS)
        return 1.0
    if key in _UNIT_FACTORS:
        return _UNIT_FACTORS[key]
    raise GeofluxError(
        f"{where}: NEE units {units!r} not understood (expected e.g. {NEE_UNITS}, umol m-2 s-1, kg m-2 s-1)"
    )


def open_geotiff_series(
    maps: Mapping[pd.Timestamp, str | Path] | Sequence[str | Path] | str,
    units: str | None = None,
) -> MapSeries:
    """Open a GeoTIFF/COG time series (one file per time step) on any CRS.

    Parameters
    ----------
    maps : ``{period start: path}``, a list of paths, or a glob pattern. Without explicit times each file's
        date comes from its ``period_start``/``datetime`` tag or a date in its name (YYYYMMDD, YYYY-MM-DD,
        YYYYDDD, YYYYMM).
    units : NEE units of files that do not carry them (default: gC m-2 d-1).

    Multi-band files (geoflux's ``NEE``, ``NEE_q05``, ``NEE_q95``, ``DI``, ``AOA``) give the band and AOA
    roles by band description; single-band files find them in siblings ``nee_q05_<date>.tif``,
    ``nee_q95_<date>.tif``, ``aoa_<date>.tif`` when those exist.

    Raises
    ------
    GeofluxError
        naming the file when none match, a date cannot be found, or grids differ.
    """
    if isinstance(maps, str):
        paths = sorted(glob.glob(maps))
        if not paths:
            raise GeofluxError(f"{maps}: no map files match")
        maps = paths
    if isinstance(maps, Mapping):
        items = sorted((pd.Timestamp(t), Path(p)) for t, p in maps.items())
    else:
        items = []
        for p in maps:
            t = time_from_name(p)
            if t is None:
                raise GeofluxError(
                    f"{p}: cannot tell the map's date (expected a period_start tag or a date "
                    "like YYYYMMDD in the file name)"
                )
            items.append((t, Path(p)))
        items.sort()
    if not items:
        raise GeofluxError("maps: no map files given")
    times = pd.DatetimeIndex([t for t, _ in items])
    if times.has_duplicates:
        dup = times[times.duplicated()][0]
        raise GeofluxError(f"{[str(p) for t, p in items if t == dup]}: several maps for {dup:%Y-%m-%d}")
    paths = [p for _, p in items]
    for p in paths:
        if not p.exists():
            raise GeofluxError(f"{p}: map not found")
        if p.is_dir():
            raise MapReadError(f"{p}: is a folder (expected a GeoTIFF/COG map file)")
    with _open_map(paths[0]) as ds:
        geobox = _geobox_of(ds, paths[0])
    # every header is read now (cheap), so a non-raster or foreign-grid file is refused before any tower
    # data is processed; truncated pixel data can only show when it is read, and is named then
    for p in paths[1:]:
        with _open_map(p) as ds:
            if (ds.height, ds.width) != geobox.shape or ds.transform != geobox.affine:
                raise GridError(f"{p}: grid differs from {paths[0]} (expected one grid for the series)")
    layout = _band_layout(paths[0])
    siblings = _sibling_files(paths[0])
    roles = tuple(r for r in ("lo", "hi", "AOA") if r in layout or r in siblings)
    interval = ""
    if "lo" in layout:
        with _open_map(paths[0]) as ds:
            interval = f"{ds.descriptions[layout['lo'] - 1]}..{ds.descriptions[layout['hi'] - 1]}"
    elif "lo" in siblings:
        interval = f"{siblings['lo'].name}..{siblings['hi'].name}"

    def reader(i: int, windows: Sequence[tuple[slice, slice]]) -> list[dict[str, np.ndarray]]:
        path = paths[i]
        wins = [
            rasterio.windows.Window(c.start, r.start, c.stop - c.start, r.stop - r.start) for r, c in windows
        ]
        out: list[dict[str, np.ndarray]] = [{} for _ in wins]
        with _open_map(path) as ds:
            if (ds.height, ds.width) != geobox.shape or ds.transform != geobox.affine:
                raise GridError(f"{path}: grid differs from {paths[0]} (expected one grid for the series)")
            lay = _band_layout(path) if ds.count > 1 else {"NEE": 1}
            for role, band in lay.items():
                scale = 1.0 if role == "AOA" else _scale_from_tags(ds, band, path, units)
                for o, win in zip(out, wins, strict=True):
                    o[role] = _read_masked(ds, win, band) * scale
        for role, sib in _sibling_files(path).items():
            if role in out[0]:
                continue
            with _open_map(sib) as ds:
                scale = 1.0 if role == "AOA" else _scale_from_tags(ds, 1, sib, units)
                for o, win in zip(out, wins, strict=True):
                    o[role] = _read_masked(ds, win) * scale
        return out

    src = str(paths[0].parent / "*") if len(paths) > 1 else str(paths[0])
    return MapSeries(geobox, times, NEE_UNITS, roles, src, reader, interval)


_SPATIAL_DIMS = (("x", "y"), ("lon", "lat"), ("longitude", "latitude"), ("X", "Y"))


def open_xarray_series(
    data, variable: str | None = None, units: str | None = None, crs: str | None = None
) -> MapSeries:
    """Open a NetCDF (or any xarray) NEE time series on any CRS, e.g. a FLUXCOM-X export.

    Parameters
    ----------
    data : path to a NetCDF/Zarr file, an ``xarray.Dataset`` or ``DataArray`` with a ``time`` dimension and
        ``x/y`` or ``lon/lat`` (``longitude/latitude``) dimensions.
    variable : the NEE variable (default: ``NEE``/``nee`` or the only variable with time and space dims).
    units : overrides the variable's ``units`` attribute.
    crs : CRS when the file carries none (default: from ``grid_mapping``/``spatial_ref``; EPSG:4326 for
        lon/lat dimensions).

    Values are converted to gC m-2 d-1 from the variable's units. ``NEE_q*`` variables give the band and an
    ``AOA`` variable the area of applicability when present on the same grid.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    label = str(data) if isinstance(data, (str, Path)) else "<xarray>"
    if isinstance(data, (str, Path)):
        p = Path(data)
        if not p.exists():
            raise GeofluxError(f"{p}: map file not found")
        try:
            ds = (
                xr.open_zarr(p)
                if p.suffix == ".zarr" or p.is_dir()
                else xr.open_dataset(p, decode_coords="all")
            )
        except (OSError, ValueError) as exc:
            raise GeofluxError(f"{p}: cannot open as NetCDF/Zarr ({str(exc).splitlines()[0]})") from None
    elif isinstance(data, xr.DataArray):
        ds = data.to_dataset(name=data.name or "NEE")
    else:
        ds = data
    dims = next((d for d in _SPATIAL_DIMS if d[0] in ds.dims and d[1] in ds.dims), None)
    if dims is None or "time" not in ds.dims:
        raise GeofluxError(f"{label}: expected dimensions time and x/y or lon/lat, got {tuple(ds.dims)}")
    if variable is None:
        names = {str(k).lower(): str(k) for k in ds.data_vars}
        cands = [k for k, v in ds.data_vars.items() if {"time", *dims} <= set(v.dims)]
        variable = names.get("nee") or (str(cands[0]) if len(cands) == 1 else None)
        if variable is None:
            raise GeofluxError(
                f"{label}: several variables {[str(c) for c in cands]}; choose one (--variable)"
            )
    if variable not in ds.data_vars:
        raise GeofluxError(f"{label}: no variable {variable!r} (has {[str(k) for k in ds.data_vars]})")
    if dims != ("x", "y"):
        ds = ds.rename({dims[0]: "x", dims[1]: "y"})
    ds = ds.rio.set_spatial_dims(x_dim="x", y_dim="y")
    da = ds[variable]
    grid_crs = crs or (str(da.rio.crs.to_wkt()) if da.rio.crs is not None else None)
    if grid_crs is None:
        if dims[0] in ("lon", "longitude"):
            grid_crs = "EPSG:4326"
        else:
            raise GeofluxError(f"{label}: variable {variable} has no CRS (pass crs=..., --crs)")
    transform = da.rio.transform(recalc=True)
    geobox = GeoBox((da.sizes["y"], da.sizes["x"]), transform, grid_crs)
    factor = unit_factor(
        units if units is not None else str(da.attrs.get("units", "")), f"{label}:{variable}"
    )
    times = pd.DatetimeIndex(pd.to_datetime(ds["time"].to_numpy()))
    others = {str(k).lower(): k for k in ds.data_vars}
    quant = {int(re.findall(r"\d+", k)[0]): v for k, v in others.items() if re.fullmatch(r"nee_q\d+", k)}
    roles: dict[str, str] = {"NEE": variable}
    if len(quant) >= 2:
        roles["lo"], roles["hi"] = quant[min(quant)], quant[max(quant)]
    if "aoa" in others:
        roles["AOA"] = others["aoa"]
    arrays = {r: ds[v].transpose("time", "y", "x") for r, v in roles.items()}

    def reader(i: int, windows: Sequence[tuple[slice, slice]]) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = [{} for _ in windows]
        for role, arr in arrays.items():
            step = arr.isel(time=i)
            nodata = step.rio.nodata if step.rio.nodata is not None else step.attrs.get("_FillValue")
            for o, (rows, cols) in zip(out, windows, strict=True):
                v = np.asarray(step.isel(y=rows, x=cols).values, dtype="float64")
                if nodata is not None and np.isfinite(nodata):
                    v[v == nodata] = np.nan
                o[role] = v if role == "AOA" else v * factor
        return out

    interval = f"{roles['lo']}..{roles['hi']}" if "lo" in roles else ""
    return MapSeries(geobox, times, NEE_UNITS, tuple(r for r in roles if r != "NEE"), label, reader, interval)


def open_maps(
    maps: str | Path | Sequence[str | Path] | Mapping[pd.Timestamp, str | Path],
    variable: str | None = None,
    units: str | None = None,
) -> MapSeries:
    """Open NEE maps made anywhere: a glob/list of GeoTIFFs, a {time: file} mapping, or one NetCDF/Zarr."""
    if isinstance(maps, (str, Path)):
        single = Path(maps)
        if single.suffix.lower() in (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".zarr"):
            return open_xarray_series(single, variable, units)
        return open_geotiff_series(str(maps), units)
    return open_geotiff_series(maps, units)
