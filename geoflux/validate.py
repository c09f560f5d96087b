"""Validation stage: maps against the truth (generated worlds) and against towers through their footprints.

Any NEE map time series can be scored, not only geoflux's own: a set of GeoTIFF/COG files (one per time step,
single- or multi-band) or a NetCDF/xarray export (e.g. FLUXCOM-X) on any CRS. Footprints are put on the map's
*own* grid (its CRS and affine), either by re-projecting footprint weights computed on another grid or by
laying a geodesic disk around each tower; map values are then read window by window, so memory is bounded by
the footprint windows, not the map size.

For each site and time step the footprint-weighted map value is Σw·M / Σw over the footprint's valid
(non-nodata) pixels, and Σw (the footprint fraction the value stands for) is reported as ``fp_valid``. Pairs
with the QC-filtered, aggregated tower observation are scored (bias, RMSE, NSE, r² (Pearson), RMA slope;
:func:`geoflux.metrics.skill`) overall, per land-cover class, per representativeness class and inside/outside
the area of applicability, always separating sites the model was trained on from held-out sites.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import rasterio.windows
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import CRS, Transformer
from rasterio._err import CPLE_BaseError  # GDAL errors rasterio does not wrap

from geoflux.config import RunConfig
from geoflux.errors import GeofluxError, GridError, MapReadError
from geoflux.footprint import FootprintWeights
from geoflux.metrics import grouped_skill, summary

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
ROLE_TRAINING = "training"
ROLE_HELD_OUT = "held-out"
ROLE_INDEPENDENT = "independent"  # a product whose training sites are unknown
ROLE_CV = "held-out (CV)"
RI_BINS = (0.5, 1.0)  # representativeness index class edges, in units of the context's spatial std
RI_LABELS = ("representative (RI<0.5)", "moderate (0.5-1)", "atypical (RI>1)")


def _read_masked(ds: rasterio.io.DatasetReader, window=None, band: int = 1) -> np.ndarray:
    a = ds.read(band, window=window, masked=True).astype("float64")
    return a.filled(np.nan)


# --------------------------------------------------------------------------------------------------
# Truth


def truth_scores(maps: Sequence[Path], truths: Sequence[Path]) -> dict[str, float]:
    """Pixel-wise ``nse`` (1 − SSE/SST), ``rmse`` and ``bias`` (pred − obs, map units: gC m-2 d-1) and ``n``
    (pixel-steps) of maps against true fields, pooled over all time steps.

    Streams block windows and accumulates sums (float64), so memory does not grow with the map size.
    """
    if len(maps) != len(truths):
        raise GeofluxError(f"truth: {len(maps)} maps but {len(truths)} truth rasters")
    n = so = soo = sp = see = 0.0
    for mp, tp in zip(maps, truths, strict=True):
        with rasterio.open(mp) as m, rasterio.open(tp) as t:
            if (m.width, m.height) != (t.width, t.height) or m.transform != t.transform:
                raise GeofluxError(f"{mp}: grid differs from truth raster {tp}")
            for _, win in m.block_windows(1):
                p = _read_masked(m, win)
                o = _read_masked(t, win)
                ok = ~(np.isnan(p) | np.isnan(o))
                p, o = p[ok], o[ok]
                n += o.size
                so += o.sum()
                soo += (o * o).sum()
                sp += p.sum()
                see += ((p - o) ** 2).sum()
    if n < 2:
        return {"nse": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": int(n)}
    sst = soo - so * so / n
    return {"nse": 1 - see / sst, "rmse": float(np.sqrt(see / n)), "bias": (sp - so) / n, "n": int(n)}


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


# --------------------------------------------------------------------------------------------------
# Footprints on the map's grid


def _local_crs(lon: float, lat: float) -> CRS:
    # azimuthal equidistant centred on the tower: distances from the centre are geodesic metres
    return CRS.from_proj4(f"+proj=aeqd +lat_0={lat:.10f} +lon_0={lon:.10f} +datum=WGS84 +units=m +no_defs")


def _apply(aff: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``aff`` applied to coordinate arrays (written out: affine's ``*`` on arrays is deprecated)."""
    x, y = np.asarray(x, dtype="float64"), np.asarray(y, dtype="float64")
    return aff.a * x + aff.b * y + aff.c, aff.d * x + aff.e * y + aff.f


def _pixel_size_m(geobox: GeoBox, lon: float, lat: float) -> float:
    """Smaller edge (m on the ground) of the map pixel under the tower."""
    to_map = Transformer.from_crs("EPSG:4326", geobox.crs.to_wkt(), always_xy=True)
    x, y = to_map.transform(lon, lat)
    c, r = _apply(~geobox.affine, x, y)
    c, r = np.floor(c), np.floor(r)
    xs, ys = _apply(geobox.affine, np.array([c, c + 1, c]), np.array([r, r, r + 1]))
    to_local = Transformer.from_crs(geobox.crs.to_wkt(), _local_crs(lon, lat), always_xy=True)
    e, n = to_local.transform(xs, ys)
    edges = np.hypot(np.diff(e[[0, 1]]), np.diff(n[[0, 1]])), np.hypot(np.diff(e[[0, 2]]), np.diff(n[[0, 2]]))
    size = float(min(edges[0][0], edges[1][0]))
    return size if np.isfinite(size) and size > 0 else 1.0


def points_to_grid(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, geobox: GeoBox, method: str
) -> FootprintWeights | None:
    """Bin weighted points (grid CRS coordinates) into the pixels of ``geobox``.

    Any affine works (rotated, south-up): points go through the inverse affine to fractional pixel indices.
    Weight falling outside the grid is lost, so ``coverage`` is the footprint fraction inside. Returns None
    when no point falls inside the grid.
    """
    col, row = _apply(~geobox.affine, np.asarray(x), np.asarray(y))
    ok = np.isfinite(col) & np.isfinite(row)
    col, row = np.floor(col[ok]).astype(np.int64), np.floor(row[ok]).astype(np.int64)
    w = np.asarray(w, dtype="float64")[ok]
    ny, nx = geobox.shape
    inside = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
    if not inside.any():
        return None
    col, row, w = col[inside], row[inside], w[inside]
    r0, c0 = int(row.min()), int(col.min())
    out = np.zeros((int(row.max()) - r0 + 1, int(col.max()) - c0 + 1))
    np.add.at(out, (row - r0, col - c0), w)
    return FootprintWeights(r0, c0, out, float(out.sum()), method)


def disk_on_grid(
    geobox: GeoBox, lon: float, lat: float, radius: float, method: str = "disk", min_points: int = 20
) -> FootprintWeights | None:
    """A uniform geodesic disk of ``radius`` (m) around a tower on any grid.

    The disk is sampled on a regular grid in the tower's azimuthal-equidistant frame, fine enough that each
    map pixel holds at least ``min_points``² samples (or the disk at least 40² samples), then the samples are
    projected to the map CRS and binned (:func:`points_to_grid`). Returns None when the disk misses the grid.
    """
    px = _pixel_size_m(geobox, lon, lat)
    spacing = min(radius / 20.0, px / min_points)
    spacing = max(spacing, radius / 400.0)  # at most ~500k samples in the disk
    k = np.arange(-radius + spacing / 2, radius, spacing)
    e, n = np.meshgrid(k, k)
    inside = e * e + n * n <= radius * radius
    e, n = e[inside], n[inside]
    tr = Transformer.from_crs(_local_crs(lon, lat), geobox.crs.to_wkt(), always_xy=True)
    x, y = tr.transform(e, n)
    return points_to_grid(np.asarray(x), np.asarray(y), np.full(e.size, 1.0 / e.size), geobox, method)


def reproject_weights(
    fw: FootprintWeights, source: GeoBox, target: GeoBox, supersample: int | None = None
) -> FootprintWeights | None:
    """Move footprint weights from the grid they were computed on to another grid (any CRS/affine).

    Each source pixel is split into ``supersample``² sub-pixels carrying an equal share of its weight; their
    centres are projected to the target CRS and binned. Weight is conserved except for what falls outside the
    target grid. Default ``supersample``: enough that a sub-pixel is at most a quarter of a target pixel.
    """
    if source.crs == target.crs and source.affine == target.affine:
        return fw
    rows, cols = np.nonzero(fw.weights > 0)
    if rows.size == 0:
        return None
    if supersample is None:
        # compare pixel areas in a common unit via the target's inverse affine of source pixel corners
        tr = Transformer.from_crs(source.crs.to_wkt(), target.crs.to_wkt(), always_xy=True)
        r, c = rows[0] + fw.row_off, cols[0] + fw.col_off
        xs, ys = _apply(source.affine, np.array([c, c + 1, c]), np.array([r, r, r + 1]))
        tx, ty = tr.transform(xs, ys)
        tc, trow = _apply(~target.affine, np.asarray(tx), np.asarray(ty))
        edge = max(np.hypot(tc[1] - tc[0], trow[1] - trow[0]), np.hypot(tc[2] - tc[0], trow[2] - trow[0]))
        supersample = int(np.clip(np.ceil(4 * edge), 1, 32)) if np.isfinite(edge) else 4
    s = (np.arange(supersample) + 0.5) / supersample
    sc = (cols[:, None, None] + fw.col_off + s[None, None, :]).repeat(supersample, axis=1).ravel()
    sr = (rows[:, None, None] + fw.row_off + s[None, :, None]).repeat(supersample, axis=2).ravel()
    sw = np.repeat(fw.weights[rows, cols] / supersample**2, supersample**2)
    xs, ys = _apply(source.affine, sc, sr)
    tr = Transformer.from_crs(source.crs.to_wkt(), target.crs.to_wkt(), always_xy=True)
    tx, ty = tr.transform(xs, ys)
    return points_to_grid(np.asarray(tx), np.asarray(ty), sw, target, fw.method)


def footprints_on_grid(
    sites: pd.DataFrame,
    geobox: GeoBox,
    radius: float = 300.0,
    footprints: Mapping[str, FootprintWeights] | None = None,
    footprint_geobox: GeoBox | None = None,
) -> dict[str, FootprintWeights]:
    """Footprint weights of every site on a map's grid.

    Parameters
    ----------
    sites : site table indexed by SITE_ID with LAT/LON (degrees, EPSG:4326).
    geobox : the map grid.
    radius : m; radius of the disk used for sites without given footprints.
    footprints, footprint_geobox : footprints computed elsewhere (e.g. the run's FFP climatologies) and the
        grid they are on; re-projected to ``geobox`` unless it is the same grid.

    Sites whose footprint misses the map are left out (logged), so a regional product can be scored on the
    towers it covers.
    """
    out: dict[str, FootprintWeights] = {}
    for site, row in sites.iterrows():
        site = str(site)
        if footprints is not None and site in footprints:
            if footprint_geobox is None:
                raise GridError(f"site {site}: footprints given without the grid they are on")
            fw = reproject_weights(footprints[site], footprint_geobox, geobox)
        else:
            fw = disk_on_grid(geobox, float(row["LON"]), float(row["LAT"]), radius)
        if fw is None or fw.coverage <= 0:
            log.info("site %s: footprint lies outside the map grid; skipped", site)
            continue
        out[site] = fw
    return out


# --------------------------------------------------------------------------------------------------
# Footprint-weighted map values


def _context(fw: FootprintWeights, factor: float = 3.0) -> tuple[slice, slice]:
    """A window ``factor`` times the footprint window's extent around its centre (for representativeness)."""
    rs, cs = fw.window
    h, w = rs.stop - rs.start, cs.stop - cs.start
    pr, pc = int(np.ceil(h * (factor - 1) / 2)), int(np.ceil(w * (factor - 1) / 2))
    return slice(rs.start - pr, rs.stop + pr), slice(cs.start - pc, cs.stop + pc)


def _clip(win: tuple[slice, slice], shape: tuple[int, int]) -> tuple[slice, slice]:
    rs, cs = win
    return slice(max(rs.start, 0), min(rs.stop, shape[0])), slice(max(cs.start, 0), min(cs.stop, shape[1]))


def footprint_values(series: MapSeries, footprints: Mapping[str, FootprintWeights]) -> pd.DataFrame:
    """Footprint-weighted map value per site and time step, with band and AOA when the maps have them.

    Returns
    -------
    DataFrame with ``site``, ``time``, ``map`` (Σw·M/Σw over valid pixels, gC m-2 d-1), ``fp_valid`` (Σw
    over valid pixels: the footprint fraction the value stands for), ``fp_coverage`` (Σw inside the map),
    and when available ``lo``/``hi`` (footprint-weighted band bounds, gC m-2 d-1) and ``aoa`` (footprint
    fraction inside the area of applicability, 0-1). ``attrs['ri']`` holds each site's representativeness
    index: the distance of the footprint's time-mean value from the mean of a 3× larger context window in
    units of the context's spatial standard deviation (after Chu et al. 2021, AFM 301:108350, applied to
    the map itself).
    """
    shape = series.geobox.shape
    plans = {}
    for site, fw in footprints.items():
        ctx = _clip(_context(fw), shape)
        fwin = _clip(fw.window, shape)
        # footprint weights inside the context window (the footprint window is clipped to the grid already)
        w = np.zeros((ctx[0].stop - ctx[0].start, ctx[1].stop - ctx[1].start))
        r0, c0 = fwin[0].start - fw.row_off, fwin[1].start - fw.col_off
        sub = fw.weights[r0 : r0 + fwin[0].stop - fwin[0].start, c0 : c0 + fwin[1].stop - fwin[1].start]
        dr, dc = fwin[0].start - ctx[0].start, fwin[1].start - ctx[1].start
        w[dr : dr + sub.shape[0], dc : dc + sub.shape[1]] = sub
        plans[site] = (ctx, w, fw.coverage)
    rows = []
    sums = {s: np.zeros(p[1].shape) for s, p in plans.items()}
    counts = {s: np.zeros(p[1].shape) for s, p in plans.items()}
    names = list(plans)
    for i, time in enumerate(series.times):
        step = series.read(i, [plans[s][0] for s in names])
        for site, vals in zip(names, step, strict=True):
            _, w, cov = plans[site]
            m = vals["NEE"]
            ok = np.isfinite(m)
            sums[site] += np.where(ok, m, 0.0)
            counts[site] += ok
            wv = np.where(ok, w, 0.0)
            wsum = float(wv.sum())
            row = {"site": site, "time": time, "fp_coverage": cov, "fp_valid": wsum}
            row["map"] = float((wv * np.where(ok, m, 0.0)).sum() / wsum) if wsum > 0 else np.nan
            for role in ("lo", "hi"):
                if role in vals:
                    b = vals[role]
                    okb = ok & np.isfinite(b)
                    wb = np.where(okb, w, 0.0)
                    row[role] = (
                        float((wb * np.where(okb, b, 0.0)).sum() / wb.sum()) if wb.sum() > 0 else np.nan
                    )
            if "AOA" in vals:
                a = vals["AOA"]
                oka = ok & np.isfinite(a)
                wa = np.where(oka, w, 0.0)
                row["aoa"] = float((wa * (a > 0.5)).sum() / wa.sum()) if wa.sum() > 0 else np.nan
            rows.append(row)
    df = pd.DataFrame(rows)
    ri = {}
    for site, (_, w, _) in plans.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts[site] > 0, sums[site] / counts[site], np.nan)
        ri[site] = _representativeness(mean, w)
    df.attrs["ri"] = ri
    return df


def _representativeness(mean_map: np.ndarray, w: np.ndarray) -> float:
    ok = np.isfinite(mean_map)
    if not ok.any() or (w * ok).sum() <= 0:
        return float("nan")
    fp = float((w * np.where(ok, mean_map, 0)).sum() / (w * ok).sum())
    ctx_mean, ctx_std = float(np.nanmean(mean_map)), float(np.nanstd(mean_map))
    tol = 1e-9 * max(abs(ctx_mean), 1.0)
    if ctx_std <= tol:  # uniform surroundings (e.g. one coarse pixel): the footprint sees what they are
        return 0.0
    return abs(fp - ctx_mean) / ctx_std


def footprint_map_values(
    maps: Mapping[pd.Timestamp, Path], footprints: Mapping[str, FootprintWeights]
) -> pd.DataFrame:
    """Footprint-weighted map value Σw·M / Σw (valid pixels only) per site and time.

    ``footprints`` must be on the maps' grid (see :func:`footprints_on_grid` for any other grid).

    Returns
    -------
    DataFrame with ``site``, ``time``, ``map`` (map units) and ``fp_valid`` (Σw over valid pixels: the
    footprint fraction the value stands for), plus the columns of :func:`footprint_values`.
    """
    return footprint_values(open_geotiff_series(dict(maps)), footprints)


# --------------------------------------------------------------------------------------------------
# Stratified validation


@dataclass
class Validation:
    """Result of :func:`validate_maps`.

    Attributes
    ----------
    pairs : one row per source, site and time step: ``source`` ('map' or 'cv'), ``role`` ('training',
        'held-out', 'independent', 'held-out (CV)'), ``site``, ``time``, ``obs``/``pred`` (gC m-2 d-1),
        ``fp_valid``, ``igbp``, ``ri``, ``ri_class``, and ``aoa``/``aoa_class``, ``lo``/``hi`` when known.
    tables : skill tables by stratum (``overall``, ``igbp``, ``representativeness``, ``aoa``, ``site``), each
        grouped by ``source`` and ``role`` first so training and held-out sites never pool.
    info : what was compared (map source, units, footprints, thresholds).
    """

    pairs: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    info: dict

    def to_dict(self) -> dict:
        """JSON-ready form for metrics.json: info plus every table as a list of records."""

        def records(df: pd.DataFrame) -> list[dict]:
            return [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in df.to_dict(orient="records")
            ]

        return {**self.info, "tables": {k: records(v) for k, v in self.tables.items()}}

    def summary_text(self) -> str:
        """The overall table as aligned text."""
        cols = ["source", "role", "n_sites", "n", "bias", "rmse", "nse", "r2_pearson", "rma_slope"]
        t = self.tables["overall"]
        return t[[c for c in cols if c in t.columns]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        )


def _ri_class(ri: pd.Series) -> pd.Series:
    bins = [-np.inf, *RI_BINS, np.inf]
    return pd.cut(ri, bins, labels=list(RI_LABELS), right=False).astype("string").fillna("unknown")


def _interval_coverage(g: pd.DataFrame) -> float:
    ok = g[["obs", "lo", "hi"]].notna().all(axis=1)
    if not ok.any():
        return float("nan")
    inside = (g.loc[ok, "obs"] >= g.loc[ok, "lo"]) & (g.loc[ok, "obs"] <= g.loc[ok, "hi"])
    return float(inside.mean())


def stratified_tables(pairs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Skill tables of a paired table, grouped by ``source`` and ``role`` and then by each stratum."""
    base = ["source", "role"]
    strata = {"overall": [], "igbp": ["igbp"], "representativeness": ["ri_class"], "site": ["site"]}
    if "aoa_class" in pairs.columns and pairs["aoa_class"].notna().any():
        strata["aoa"] = ["aoa_class"]
    tables = {}
    for name, extra in strata.items():
        sub = pairs.dropna(subset=extra) if extra else pairs
        if sub.empty:
            continue
        t = grouped_skill(sub, base + extra)
        if {"lo", "hi"} <= set(sub.columns):
            cov = sub.groupby(base + extra, sort=True, dropna=False, observed=True).apply(
                _interval_coverage, include_groups=False
            )
            t["interval_coverage"] = cov.to_numpy()
        tables[name] = t
    return tables


def _site_attrs(sites: pd.DataFrame) -> pd.DataFrame:
    igbp = sites["IGBP"] if "IGBP" in sites.columns else pd.Series("unknown", index=sites.index)
    out = pd.DataFrame({"igbp": igbp.astype("string").fillna("unknown")}, index=sites.index.astype(str))
    for col in ("REPRESENTATIVENESS", "RI"):
        if col in sites.columns:
            out["ri_table"] = pd.to_numeric(sites[col], errors="coerce").to_numpy()
            break
    out.index.name = "site"
    return out


def validate_maps(
    series: MapSeries,
    sites: pd.DataFrame,
    observations: pd.DataFrame,
    *,
    footprints: Mapping[str, FootprintWeights] | None = None,
    footprint_geobox: GeoBox | None = None,
    radius: float = 300.0,
    training_sites: Collection[str] | None = None,
    cv_predictions: pd.DataFrame | None = None,
    min_footprint_valid: float = 0.5,
) -> Validation:
    """Score a map time series against towers through their footprints, stratified.

    Parameters
    ----------
    series : the maps (:func:`open_maps`).
    sites : site table indexed by SITE_ID with LAT, LON (degrees) and IGBP; an optional ``REPRESENTATIVENESS``
        (or ``RI``) column overrides the map-based representativeness index.
    observations : aggregated QC-filtered tower NEE (``site``, ``time`` = period start, ``NEE`` in
        gC m-2 d-1), e.g. from :func:`geoflux.towers.aggregate` on the maps' periods.
    footprints, footprint_geobox : footprints and their grid (re-projected to the maps' grid); sites without
        one get a disk of ``radius`` m.
    training_sites : sites the map's model was trained on (model card ``provenance.sites``); None when
        unknown (an external product: every site is 'independent').
    cv_predictions : held-out predictions of the grouped CV (``site``, ``time``, ``obs``, ``pred``,
        optionally ``AOA``, ``lo``, ``hi``): scored as source 'cv', role 'held-out (CV)'.
    min_footprint_valid : drop site-steps whose valid footprint fraction Σw is below this (0-1).
    """
    fps = footprints_on_grid(sites, series.geobox, radius, footprints, footprint_geobox)
    if not fps:
        raise GridError(f"{series.source}: no tower footprint overlaps the map grid")
    vals = footprint_values(series, fps)
    obs = observations[["site", "time", "NEE"]].rename(columns={"NEE": "obs"})
    obs = obs.assign(site=obs["site"].astype(str), time=pd.to_datetime(obs["time"]))
    pairs = vals.merge(obs, on=["site", "time"], how="inner").rename(columns={"map": "pred"})
    n_low = int((pairs["fp_valid"] < min_footprint_valid).sum())
    pairs = pairs.loc[pairs["fp_valid"] >= min_footprint_valid].dropna(subset=["obs", "pred"])
    if training_sites is None:
        pairs["role"] = ROLE_INDEPENDENT
    else:
        train = {str(s) for s in training_sites}
        pairs["role"] = np.where(pairs["site"].isin(train), ROLE_TRAINING, ROLE_HELD_OUT)
    pairs.insert(0, "source", "map")
    attrs = _site_attrs(sites)
    ri_map = pd.Series(vals.attrs.get("ri", {}), dtype="float64")
    attrs["ri"] = attrs["ri_table"] if "ri_table" in attrs.columns else ri_map.reindex(attrs.index)
    frames = [pairs]
    if cv_predictions is not None and len(cv_predictions):
        cv = cv_predictions.copy()
        cv["site"] = cv["site"].astype(str)
        keep = [c for c in ("site", "time", "obs", "pred", "lo", "hi", "AOA") if c in cv.columns]
        cv = cv[keep].rename(columns={"AOA": "aoa"}).assign(source="cv", role=ROLE_CV)
        if "ri_table" not in attrs.columns:
            # the CV rows take the site's map-based index so both sources stratify alike
            attrs["ri"] = attrs["ri"].fillna(ri_map.reindex(attrs.index))
        frames.append(cv)
    allp = pd.concat(frames, ignore_index=True)
    allp = allp.merge(attrs[["igbp", "ri"]], left_on="site", right_index=True, how="left")
    allp["igbp"] = allp["igbp"].fillna("unknown")
    allp["ri_class"] = _ri_class(allp["ri"])
    if "aoa" in allp.columns:
        allp["aoa_class"] = np.where(
            allp["aoa"].isna(), None, np.where(allp["aoa"] >= 0.5, "inside", "outside")
        )
    tables = stratified_tables(allp)
    info = {
        "maps": series.source,
        "units": NEE_UNITS,
        "n_maps": len(series.times),
        "bands": list(series.bands),
        "interval": series.interval,
        "footprint_method": sorted({fw.method for fw in fps.values()}),
        "n_sites_on_map": len(fps),
        "min_footprint_valid": min_footprint_valid,
        "n_dropped_low_footprint_valid": n_low,
        "training_sites": sorted(map(str, training_sites)) if training_sites is not None else None,
        "representativeness": "site table" if "ri_table" in attrs.columns else "map (footprint vs 3x window)",
        "metrics": {
            "bias": "mean(pred - obs), gC m-2 d-1",
            "rmse": "gC m-2 d-1",
            "nse": "Nash-Sutcliffe efficiency 1 - SSE/SST",
            "r2_pearson": "squared Pearson correlation",
            "rma_slope": "reduced-major-axis slope of pred on obs",
        },
    }
    return Validation(allp, tables, info)


def tower_summary(
    val: Validation, footprints: Mapping[str, FootprintWeights] | None = None
) -> dict[str, Any]:
    """Pooled map-vs-tower scores from the paired table of :func:`validate_maps` (metrics.json ``towers``).

    The same pairs as the ``footprint_validation`` tables (source 'map', footprint-valid fraction at least
    ``min_footprint_valid``), pooled over every role, so the headline and the tables never disagree.

    Parameters
    ----------
    val : the validation of the maps.
    footprints : the footprints used (adds ``footprint_method`` per site).

    Returns
    -------
    :func:`geoflux.metrics.summary` of the map pairs (``nse``, ``r2_pearson``, ``rmse``, ``bias`` in
    gC m-2 d-1, ``n`` site-steps, per-site NSE median/p10, ``n_sites``; only ``n`` with fewer than two
    pairs) plus ``min_footprint_valid`` and ``footprint_method``.
    """
    pairs = val.pairs.loc[val.pairs["source"] == "map"]
    result: dict[str, Any] = summary(pairs) if len(pairs) > 1 else {"n": len(pairs)}
    result["min_footprint_valid"] = val.info.get("min_footprint_valid")
    if footprints is not None:
        result["footprint_method"] = {s: fw.method for s, fw in footprints.items()}
    return result


def period_starts(times: pd.DatetimeIndex, step: str | None) -> tuple[pd.DatetimeIndex, pd.Timestamp]:
    """Period starts of map time stamps and the end of the last period.

    ``step`` is a pandas frequency (``8D``, ``MS``, ``1D``...); calendar steps (months, years) floor
    mid-period stamps (e.g. FLUXCOM-X monthly stamps on the 15th) to the period start. Without ``step`` it is
    inferred from the stamps (monthly when they are 28-31 days apart).
    """
    times = pd.DatetimeIndex(sorted(times))
    if step is None:
        if len(times) < 2:
            raise GeofluxError("maps: one time step only; pass the time step (--time-step, e.g. 8D or MS)")
        d = np.diff(times.to_numpy(dtype="datetime64[s]").astype("int64")) / 86_400.0  # days
        if np.all((d >= 28) & (d <= 31)):
            step = "MS"
        elif np.all((d >= 365) & (d <= 366)):
            step = "YS"
        else:
            step = f"{round(float(np.median(d)))}D"
    off = pd.tseries.frequencies.to_offset(step)
    if step.upper() in ("MS", "M", "ME", "1MS"):
        starts = times.to_period("M").to_timestamp()
    elif step.upper() in ("YS", "Y", "YE", "AS", "A"):
        starts = times.to_period("Y").to_timestamp()
    else:
        starts = times.normalize()
    if starts.has_duplicates:
        raise GeofluxError(
            f"maps: several maps fall into one {step} period ({starts[starts.duplicated()][0]})"
        )
    return pd.DatetimeIndex(starts), starts[-1] + off


def validate_product(
    maps: str | Path | Sequence[str | Path],
    towers: str | Sequence[str | Path],
    sites: str | Path,
    *,
    time_step: str | None = None,
    variable: str | None = None,
    units: str | None = None,
    radius: float = 300.0,
    qc_max: int = 1,
    min_coverage: float = 0.5,
    training_sites: Collection[str] | None = None,
) -> Validation:
    """Score NEE maps made anywhere (GeoTIFF/COG series or NetCDF) against tower files.

    Parameters
    ----------
    maps : glob of GeoTIFFs, list of files, or one NetCDF/Zarr path.
    towers : glob / folder / list of FLUXNET-family tower files (any format geoflux reads).
    sites : site table CSV (SITE_ID, LAT, LON, IGBP).
    time_step : the maps' period (pandas frequency, e.g. ``8D``, ``MS``); inferred when None.
    variable, units : NetCDF variable and units override (see :func:`open_xarray_series`).
    radius : m, disk footprint radius.
    qc_max, min_coverage : tower QC and per-period coverage thresholds (as in the run configuration).
    training_sites : sites the product was trained on, when known.
    """
    from geoflux import towers as tw

    series = open_maps(maps if isinstance(maps, (str, Path)) else list(maps), variable, units)
    starts, end = period_starts(series.times, time_step)
    series.times = starts
    site_table = tw.read_sites(sites)
    records = tw.qc_filter(tw.read_towers(towers, site_table), qc_max=qc_max)
    obs = tw.aggregate(records, starts, min_coverage=min_coverage, end=end)
    if obs.empty:
        raise GeofluxError(
            f"{towers}: no tower period in {starts[0]:%Y-%m-%d}..{end:%Y-%m-%d} reaches "
            f"min_coverage={min_coverage}"
        )
    with_obs = site_table.loc[site_table.index.isin(obs["site"].unique())]
    return validate_maps(series, with_obs, obs, radius=radius, training_sites=training_sites)


def write_validation(val: Validation, out_dir: str | Path) -> Path:
    """Write ``validation.json`` (info + tables), ``pairs.csv`` and ``skill_<stratum>.csv`` into ``out_dir``.

    Each file is written atomically; returns the JSON path.
    """
    import json

    from geoflux.atomic import atomic_path

    out = Path(out_dir)
    with atomic_path(out / "pairs.csv") as tmp:
        val.pairs.to_csv(tmp, index=False, float_format="%.5g")
    for name, table in val.tables.items():
        with atomic_path(out / f"skill_{name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "validation.json") as tmp:
        tmp.write_text(json.dumps(val.to_dict(), indent=2, default=str))
    return out / "validation.json"


def check_truth_alignment(cfg: RunConfig) -> dict[pd.Timestamp, Path] | None:
    """The truth raster of every map period (None when the run has no ``truth``), checked before any stage.

    Each truth raster's date comes from its ``period_start`` tag or its name (``nee_YYYYMMDD.tif``); there
    must be exactly one per period start of ``time`` and none for other dates, so a calendar mismatch
    (``8D`` drifting from products that restart on 1 January) stops the run before hours of mapping.

    Raises
    ------
    GeofluxError
        naming the truth glob, the counts and the first date that has no partner.
    """
    if not cfg.truth:
        return None
    files = sorted(glob.glob(str(cfg.path(cfg.truth))))
    periods = cfg.periods()
    if not files:
        raise GeofluxError(f"{cfg.truth}: no truth raster matches (expected one per map period)")
    by_date: dict[pd.Timestamp, Path] = {}
    for f in files:
        t = time_from_name(f)
        if t is None:
            raise GeofluxError(f"{f}: truth raster without a date (expected a period_start tag or _YYYYMMDD)")
        if t in by_date:
            raise GeofluxError(f"{f}: second truth raster for {t:%Y-%m-%d} (first: {by_date[t]})")
        by_date[t] = Path(f)
    missing = [p for p in periods if p not in by_date]
    extra = sorted(t for t in by_date if t not in set(periods))
    if missing or extra:
        first = (
            f"no truth raster for period {missing[0]:%Y-%m-%d}"
            if missing
            else f"truth raster {by_date[extra[0]].name} dated {extra[0]:%Y-%m-%d} starts no period"
        )
        raise GeofluxError(
            f"{cfg.truth}: {len(files)} truth rasters for {len(periods)} map time steps of time.step "
            f"{cfg.time.step}; {first} (expected one truth raster per period start; a world whose "
            "periods restart on 1 January needs time.step MODIS8D)"
        )
    return {p: by_date[p] for p in periods}
