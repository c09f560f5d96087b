"""Gridded reanalysis drivers (ERA5-like Zarr / NetCDF) onto projected grids, checked against numpy/scipy.

A generated catalog copies Planetary Computer's era5-pds layout: one item per month and kind (``era5:kind``
an/fc), one Zarr store per variable named like the asset, hourly, 0.25 degree, dims (time, lat, lon), lat
north→south, lon in 0..360, ``cube:dimensions`` on the item, ``xarray:open_kwargs`` on the assets.
Independent computation: hourly arrays reshaped to (period, hour) and averaged by numpy, then bilinear
interpolation in lon/lat at the target pixel centres (pyproj + scipy RegularGridInterpolator).
"""

from __future__ import annotations

import datetime as dt
import itertools
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pystac
import pytest
import xarray as xr
from pyproj import Transformer
from scipy.interpolate import RegularGridInterpolator

from geoflux.catalog.variables import CONVERTERS
from geoflux.config import GridSpec, VariableSpec
from geoflux.cube import load_cube, target_grid, vpd_from_dewpoint
from geoflux.errors import CubeError
from geoflux.reanalysis import aggregate_hours, cos_zenith

TOL = 2e-3  # K / hPa / W m-2: float32 stores and float32 GDAL warping against a float64 reference
AN = ("air_temperature_at_2_metres", "dew_point_temperature_at_2_metres")
FC = (
    "integral_wrt_time_of_surface_direct_downwelling_shortwave_flux_in_air_1hour_Accumulation",
    "precipitation_amount_1hour_Accumulation",
)


def hourly_fields(times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray, seed: int = 0) -> dict:
    """Plausible hourly fields (K, K, J m-2 per hour, m per hour) on (time, lat, lon); lon in 0..360."""
    rng = np.random.default_rng(seed)
    h = times.hour.to_numpy()[:, None, None] + times.dayofyear.to_numpy()[:, None, None] * 0.0
    la, lo = lat[None, :, None], lon[None, None, :]
    # smooth large-scale gradients plus pixel-scale noise, so interpolation errors would show
    t2m = 275.0 + 8.0 * np.sin(2 * np.pi * (h - 9) / 24) - 0.6 * (la - 50) + 0.1 * np.cos(np.deg2rad(lo) * 7)
    t2m = t2m + rng.normal(0, 0.5, (len(times), len(lat), len(lon)))
    d2m = t2m - 2.0 - 3.0 * rng.random((len(times), len(lat), len(lon)))
    cz = np.clip(cos_zenith(times.to_numpy(), lat, lon), 0, None)
    ssrd = 3600.0 * 900.0 * cz * (0.5 + 0.5 * rng.random((len(times), len(lat), len(lon))))
    tp = np.where(rng.random((len(times), len(lat), len(lon))) < 0.2, rng.gamma(1.0, 4e-4, t2m.shape), 0.0)
    return {AN[0]: t2m, AN[1]: d2m, FC[0]: ssrd, FC[1]: tp}


def _spatial_dims(lat: np.ndarray, lon: np.ndarray) -> dict:
    """datacube-extension lat/lon dimensions of a 0.25 degree grid."""
    return {
        "lat": {
            "type": "spatial",
            "axis": "y",
            "extent": [float(lat.min()), float(lat.max())],
            "step": -0.25,
            "reference_system": "epsg:4326",
        },
        "lon": {
            "type": "spatial",
            "axis": "x",
            "extent": [float(lon.min()), float(lon.max())],
            "step": 0.25,
            "reference_system": "epsg:4326",
        },
    }


def _era5_item(
    month: pd.Timestamp, kind: str, first: pd.Timestamp, last: pd.Timestamp, dims: dict | None = None
) -> pystac.Item:
    """A global era5-pds item (no assets) for one month and kind, hourly from ``first`` to ``last``."""
    iso = "%Y-%m-%dT%H:%M:%SZ"
    time_dim = {"type": "temporal", "extent": [f"{first:{iso}}", f"{last:{iso}}"], "step": "P0DT1H0M0S"}
    return pystac.Item(
        f"era5-pds-{month:%Y-%m}-{kind}",
        {"type": "Polygon", "coordinates": [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]},
        [-180.0, -90.0, 180.0, 90.0],
        None,
        {
            "start_datetime": f"{first:{iso}}",
            "end_datetime": f"{last:{iso}}",
            "era5:kind": kind,
            "cube:dimensions": {"time": time_dim, **(dims or {})},
        },
        collection="era5-pds",
    )


def write_era5_like(
    root: Path,
    start: str,
    months: int,
    lat: np.ndarray,
    lon: np.ndarray,
    fields: Callable[[pd.DatetimeIndex, np.ndarray, np.ndarray], dict] = hourly_fields,
    *,
    store_chunks: dict | None = None,
    days: int | None = None,
) -> tuple[list[pystac.Item], dict[str, np.ndarray], pd.DatetimeIndex]:
    """Write monthly an/fc items with one Zarr store per variable; return (items, full fields, times).

    ``days``: only the first days of each month (small global test bands).
    """
    first = pd.Timestamp(start)
    allt = pd.date_range(first, first + pd.DateOffset(months=months), freq="1h", inclusive="left")
    if days is not None:
        allt = allt[allt.day <= days]
    full = fields(allt, lat, lon)
    items = []
    for m in range(months):
        t0 = first + pd.DateOffset(months=m)
        sel = (allt >= t0) & (allt < t0 + pd.DateOffset(months=1))
        times = allt[sel]
        for kind, names in (("an", AN), ("fc", FC)):
            item = _era5_item(t0, kind, times[0], times[-1], _spatial_dims(lat, lon))
            for name in names:
                path = root / "ERA5" / f"{t0:%Y}" / f"{t0:%m}" / f"{name}.zarr"
                ds = xr.Dataset(
                    {name: (("time", "lat", "lon"), full[name][sel].astype("float32"))},
                    coords={"time": times.to_numpy(), "lat": lat, "lon": lon},
                )
                if store_chunks:
                    ds = ds.chunk(store_chunks)
                ds.to_zarr(path, mode="w", consolidated=True, zarr_format=2)  # era5-pds: Zarr v2
                item.add_asset(
                    name,
                    pystac.Asset(
                        str(path),
                        media_type="application/vnd+zarr",
                        roles=["data"],
                        extra_fields={
                            "xarray:open_kwargs": {"engine": "zarr", "chunks": {}, "consolidated": True}
                        },
                    ),
                )
            items.append(item)
    return items, full, allt


def era5_specs(names: Sequence[str]) -> list[VariableSpec]:
    from geoflux.catalog.definitions import find_definition, variable_specs

    return variable_specs(find_definition("pc-era5-pds"), list(names))


def pick(items: list[pystac.Item], kind: str) -> list[pystac.Item]:
    return [i for i in items if i.properties["era5:kind"] == kind]


def bilinear_at(field: np.ndarray, lat: np.ndarray, lon: np.ndarray, plon: np.ndarray, plat: np.ndarray):
    """Reference bilinear interpolation of a (lat, lon) field at points, longitudes mod 360."""
    order = np.argsort(lat)
    field = field[order]
    if len(lon) * 0.25 >= 360:  # a global source: the column at 360 is the one at 0
        lon, field = np.append(lon, 360.0), np.concatenate([field, field[:, :1]], axis=1)
    f = RegularGridInterpolator((lat[order], lon), field, method="linear", bounds_error=True)
    return f(np.stack([plat, np.mod(plon, 360.0)], axis=-1))


def pixel_lonlat(gb) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = gb.shape
    cc, rr = np.meshgrid(np.arange(nx) + 0.5, np.arange(ny) + 0.5)
    x, y = gb.affine * (cc, rr)
    return Transformer.from_crs(gb.crs.to_wkt(), "EPSG:4326", always_xy=True).transform(x, y)


def period_reduce(values: np.ndarray, times: pd.DatetimeIndex, periods: pd.DatetimeIndex, step: str, how):
    edges = periods.append(pd.DatetimeIndex([periods[-1] + pd.tseries.frequencies.to_offset(step)]))
    return np.stack([how(values[(times >= a) & (times < b)]) for a, b in itertools.pairwise(edges)])


class CountingSigner:
    """Records the hrefs it signs. Module level: the graph carries a pickled copy (by reference here)."""

    calls: ClassVar[list[str]] = []

    def __call__(self, href: str) -> str:
        self.calls.append(href)
        return href


# ------------------------------------------------------------------------------------------------ fixtures

LAT = np.arange(53.0, 48.99, -0.25)  # north -> south, as ERA5
LON = np.arange(7.0, 14.01, 0.25)  # 0..360 convention (same numbers here, east of Greenwich)
HAINICH = (10.4522, 51.0792)


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    root = tmp_path_factory.mktemp("era5")
    items, full, times = write_era5_like(root, "2021-01-01", 3, LAT, LON)
    return items, full, times


@pytest.fixture(scope="module")
def utm_grid():
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(*HAINICH)
    x0, y0 = round(x / 1000) * 1000 - 30_000, round(y / 1000) * 1000 - 30_000
    spec = GridSpec(crs="EPSG:32632", resolution=2000.0, bbox=(x0, y0, x0 + 60_000, y0 + 60_000), chunk=16)
    return target_grid(spec)


# ----------------------------------------------------------------------------------------------- tests


def test_converters_and_aggregation_kernels():
    assert CONVERTERS["kgC_per_8d_to_gC_per_d"].factor == pytest.approx(125.0)
    v = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    np.testing.assert_allclose(aggregate_hours(v, "mean"), [2.0, np.nan])
    np.testing.assert_allclose(aggregate_hours(v, "sum"), [4.0, np.nan])
    np.testing.assert_allclose(aggregate_hours(v, "min"), [1.0, np.nan])
    np.testing.assert_allclose(aggregate_hours(v, "max"), [3.0, np.nan])
    np.testing.assert_allclose(aggregate_hours(v, "median"), [2.0, np.nan])
    day = np.array([[False, True], [True, True], [True, True]])
    np.testing.assert_allclose(aggregate_hours(v, "daytime_mean", daytime=day), [3.0, np.nan])
    # solar geometry: noon at Greenwich in June is day at 51N, midnight is night; 12 h later the reverse
    t = np.array(["2021-06-21T12:00", "2021-06-21T00:00"], dtype="datetime64[s]")
    cz = cos_zenith(t, np.array([51.0]), np.array([0.0, 180.0]))
    # solstice noon elevation at 51N: 90 - 51 + 23.44 degrees (Greenwich noon is ~2 min off solar noon)
    assert cz[0, 0, 0] == pytest.approx(np.sin(np.deg2rad(90 - 51 + 23.44)), abs=2e-3)
    assert cz[1, 0, 0] < 0 and cz[0, 0, 1] < 0 and cz[1, 0, 1] > 0


def test_daily_mean_on_utm_equals_hand_computation(era5, utm_grid):
    """Done-when: ERA5-like Zarr → daily means on a UTM grid = numpy daily means + bilinear (|err| < TOL)."""
    items, full, times = era5
    (ta,) = era5_specs(["ta"])
    periods = pd.date_range("2021-01-30", "2021-02-02", freq="1D")  # crosses a month (two items)
    cube = load_cube({"ta": pick(items, "an")}, [ta], utm_grid, periods, "1D", chunk=16)
    arr = cube["ta"]
    assert arr.dims == ("time", "y", "x") and arr.attrs["units"] == "degC"
    # one task per output chunk: 4 periods x 2 x 2 spatial chunks (30 px at chunk 16)
    assert arr.data.npartitions == 4 * 2 * 2
    got = arr.to_numpy()
    daily = period_reduce(full[AN[0]] - 273.15, times, periods, "1D", lambda a: a.mean(axis=0))
    plon, plat = pixel_lonlat(utm_grid)
    want = np.stack([bilinear_at(d, LAT, LON, plon, plat) for d in daily])
    assert np.abs(got - want).max() < TOL
    np.testing.assert_array_equal(cube["ta_coverage"].to_numpy(), 1.0)


def test_vpd_sw_precip_max_and_daytime(era5, utm_grid):
    items, full, times = era5
    specs = era5_specs(["vpd", "ta_max", "ta_day", "sw", "precip"])
    periods = pd.date_range("2021-01-01", "2021-01-17", freq="8D")
    by = {s.name: pick(items, "fc" if s.name in ("sw", "precip") else "an") for s in specs}
    cube = load_cube(by, specs, utm_grid, periods, "8D", chunk=16)
    plon, plat = pixel_lonlat(utm_grid)

    def ref(hourly, how, t=times):
        agg = period_reduce(hourly, t, periods, "8D", how)
        return np.stack([bilinear_at(a, LAT, LON, plon, plat) for a in agg])

    t_c, td_c = full[AN[0]] - 273.15, full[AN[1]] - 273.15
    vpd = np.asarray(vpd_from_dewpoint(xr.DataArray(t_c), xr.DataArray(td_c)), dtype=np.float64)
    assert np.abs(cube["vpd"].to_numpy() - ref(vpd, lambda a: a.mean(0))).max() < TOL
    assert np.abs(cube["ta_max"].to_numpy() - ref(t_c, lambda a: a.max(0))).max() < TOL
    day = cos_zenith((times + pd.Timedelta("30min")).to_numpy(), LAT, LON) > 0
    t_day = np.where(day, t_c, np.nan)
    assert np.abs(cube["ta_day"].to_numpy() - ref(t_day, lambda a: np.nanmean(a, 0))).max() < TOL
    # accumulations are stamped at the end of their hour: the value at 00:00 belongs to the previous day
    t_start = times - pd.Timedelta("1h")
    sw = ref(full[FC[0]] / 3600.0, lambda a: a.mean(0), t_start)
    assert np.abs(cube["sw"].to_numpy() - sw).max() < 0.05  # W m-2 of values up to ~300
    pr = cube["precip"]
    assert pr.attrs["units"] == "mm d-1"
    # average resampling upsampling 0.25 deg -> 2 km copies the covering source cell: check the domain mean
    pr_ref = period_reduce(full[FC[1]] * 24000.0, t_start, periods, "8D", lambda a: a.mean(0))
    assert 0 < float(pr.mean()) < 20 and np.nanmax(pr.to_numpy()) <= pr_ref.max() + 1e-3
    # 1 Jan 00:00 belongs to 31 Dec, and 9 Jan 00:00 closes the first period: every period is whole
    np.testing.assert_array_equal(cube["sw_coverage"].to_numpy(), 1.0)
    assert cube["sw"].attrs["partial_periods"] == []


def test_antimeridian_and_0_360_wrap(tmp_path):
    """A global 0..360 band: grids straddling lon 0 and the antimeridian read across the seam."""
    lat = np.arange(-15.5, -18.51, -0.25)
    lon = np.arange(0.0, 360.0, 0.25)
    items, full, times = write_era5_like(
        tmp_path, "2021-03-01", 1, lat, lon, store_chunks={"lon": 360}, days=3
    )
    (ta,) = era5_specs(["ta"])
    periods = pd.date_range("2021-03-02", "2021-03-03", freq="1D")
    daily = period_reduce(full[AN[0]] - 273.15, times, periods, "1D", lambda a: a.mean(axis=0))
    # Fiji (UTM 60S / 1S straddle 180) and lon 0 (UTM 31S straddles Greenwich)
    for crs, centre in (("EPSG:32760", (180.0, -17.0)), ("EPSG:32731", (0.0, -17.0))):
        x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(*centre)
        gb = target_grid(
            GridSpec(crs=crs, resolution=5000.0, bbox=(x - 60_000, y - 60_000, x + 60_000, y + 60_000))
        )
        cube = load_cube({"ta": pick(items, "an")}, [ta], gb, periods, "1D", chunk=8)
        plon, plat = pixel_lonlat(gb)
        assert (plon.min() < centre[0] - 0.1 or plon.max() > 179) and np.isfinite(cube["ta"]).all()
        want = np.stack([bilinear_at(d, lat, lon, plon, plat) for d in daily])
        assert np.abs(cube["ta"].to_numpy() - want).max() < TOL, crs


def test_reads_happen_in_tasks_and_signing_only_there(era5, utm_grid, monkeypatch):
    items, _, _ = era5
    (ta,) = era5_specs(["ta"])
    calls = CountingSigner.calls
    calls.clear()

    periods = pd.date_range("2021-02-01", "2021-02-02", freq="1D")

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    opened = []
    real_open = xr.open_dataset
    monkeypatch.setattr(xr, "open_dataset", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    cube = load_cube(
        {"ta": pick(items, "an")},
        [ta],
        utm_grid,
        periods,
        "1D",
        chunk=16,
        patch_urls={"ta": CountingSigner()},
    )
    assert calls == [] and opened == []  # building opened nothing and signed nothing (metadata only)
    cube["ta"].isel(time=0, x=slice(0, 4), y=slice(0, 4)).compute()
    assert len(calls) == 1 and len(opened) == 1  # one chunk, one store, signed when read


def test_offline_signing_at_read_time_is_one_line(era5, utm_grid):
    from geoflux.catalog import PlanetaryComputerSigner, default_retry

    items, _, _ = era5
    (ta,) = era5_specs(["ta"])
    it = pick(items, "an")[1].clone()
    asset = it.assets[AN[0]]
    asset.href = "abfs://era5/ERA5/2021/02/air_temperature_at_2_metres.zarr"
    asset.extra_fields["xarray:open_kwargs"] = {
        "engine": "zarr",
        "storage_options": {"account_name": "cpdataeuwest"},
    }
    signer = PlanetaryComputerSigner(
        "http://127.0.0.1:9/api/sas/v1/token", retry=default_retry(total=0, backoff=0)
    )
    periods = pd.date_range("2021-02-01", "2021-02-02", freq="1D")
    cube = load_cube({"ta": [it]}, [ta], utm_grid, periods, "1D", chunk=16, patch_urls={"ta": signer})
    assert signer.requests == 0
    from geoflux.errors import CatalogError

    with pytest.raises(
        CatalogError,
        match=r"^http://127\.0\.0\.1:9/api/sas/v1/token/cpdataeuwest/era5: cannot get a SAS token \(",
    ) as exc:
        cube["ta"].isel(time=0).compute(scheduler="synchronous")
    assert "\n" not in str(exc.value)


def test_errors_name_item_and_asset(era5, utm_grid, tmp_path):
    items, _, _ = era5
    (ta,) = era5_specs(["ta"])
    periods = pd.date_range("2021-02-01", "2021-02-02", freq="1D")
    it = pick(items, "an")[1].clone()
    del it.properties["cube:dimensions"]
    it.assets[AN[0]].href = "https://example.invalid/x.zarr"
    with pytest.raises(
        CubeError, match=r"era5-pds-2021-02-an: asset 'air_temperature_at_2_metres'.*no time axis"
    ):
        load_cube({"ta": [it]}, [ta], utm_grid, periods, "1D")
    it.assets[AN[0]].href = str(tmp_path / "gone.zarr")
    with pytest.raises(CubeError, match=r"store not found at .*gone\.zarr"):
        load_cube({"ta": [it]}, [ta], utm_grid, periods, "1D")
    bad = ta.model_copy(update={"physical_range": (-5.0, -4.0)})
    cube = load_cube({"ta": pick(items, "an")}, [bad], utm_grid, periods, "1D", chunk=16)
    with pytest.raises(
        CubeError,
        match=r"variable 'ta': step 2021-02-01 00:00: items era5-pds-2021-02-an: .*outside physical_range",
    ):
        cube["ta"].isel(time=0).compute(scheduler="synchronous")


def test_generic_cf_netcdf(tmp_path, utm_grid):
    """A CF NetCDF with latitudes south→north, -180..180 longitudes and packed int16 values."""
    lat = np.arange(49.0, 53.01, 0.5)
    lon = np.arange(7.0, 14.01, 0.5)
    times = pd.date_range("2021-05-01", periods=72, freq="1h")
    rng = np.random.default_rng(3)
    t = 285.0 + rng.normal(0, 2, (len(times), len(lat), len(lon)))
    ds = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), t)},
        coords={"time": times, "latitude": lat, "longitude": lon},
    )
    enc = {"t2m": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 285.0, "_FillValue": -32767}}
    path = tmp_path / "t2m.nc"
    ds.to_netcdf(path, engine="h5netcdf", encoding=enc)
    item = pystac.Item("cf", None, None, dt.datetime(2021, 5, 1), {})
    item.add_asset("data", pystac.Asset(str(path), media_type="application/x-netcdf"))
    var = VariableSpec(
        name="t", collection="c", asset="data", convert="K_to_degC", units="degC", aggregation="min"
    )
    periods = pd.date_range("2021-05-01", "2021-05-03", freq="1D")
    cube = load_cube({"t": [item]}, [var], utm_grid, periods, "1D", chunk=16)
    packed = np.round((t - 285.0) / 0.01) * 0.01 + 285.0
    agg = period_reduce(packed - 273.15, times, periods, "1D", lambda a: a.min(axis=0))
    plon, plat = pixel_lonlat(utm_grid)
    want = np.stack([bilinear_at(a, lat, lon, plon, plat) for a in agg])
    assert np.abs(cube["t"].to_numpy() - want).max() < TOL


def test_tower_met_and_cube_agree_at_tower_pixel(era5, utm_grid):
    """Tower-side daily aggregation (geoflux.towers.aggregate) of the hourly field at the tower, and the
    cube's ERA5 driver at the tower's pixel, from the same generated hourly field."""
    from geoflux.towers.aggregate import aggregate

    items, full, times = era5
    (ta,) = era5_specs(["ta"])
    periods = pd.date_range("2021-02-10", "2021-02-16", freq="1D")
    cube = load_cube({"ta": pick(items, "an")}, [ta], utm_grid, periods, "1D", chunk=16)
    # the tower sits at a pixel centre, so the two sides see the same point
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(*HAINICH)
    col, row = (~utm_grid.affine) * (x, y)
    col, row = int(col), int(row)
    xc, yc = utm_grid.affine * (col + 0.5, row + 0.5)
    tlon, tlat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(xc, yc)
    sel = (times >= periods[0]) & (times < periods[-1] + pd.Timedelta("1D"))
    ta_tower = np.array(
        [bilinear_at(f, LAT, LON, np.array([tlon]), np.array([tlat]))[0] for f in full[AN[0]][sel] - 273.15]
    )
    records = pd.DataFrame({"site": "DE-Hai", "time": times[sel], "NEE": 1.0, "NEE_QC": 0, "TA": ta_tower})
    records.attrs["resolution"] = "HR"
    tower = aggregate(records, periods).set_index("time")["TA"]
    cube_at = cube["ta"].isel(y=row, x=col).to_numpy()
    np.testing.assert_allclose(cube_at, tower.reindex(periods).to_numpy(), atol=TOL)


def test_cube_config_path_and_partial_end(era5, utm_grid, tmp_path):
    """Periods past the last item are NaN with coverage 0, the partial period is flagged, nothing crashes."""
    items, _, _ = era5
    ta, sw = era5_specs(["ta", "sw"])
    periods = pd.date_range("2021-03-30", "2021-04-02", freq="1D")
    cube = load_cube(
        {"ta": pick(items, "an"), "sw": pick(items, "fc")}, [ta, sw], utm_grid, periods, "1D", chunk=16
    )
    np.testing.assert_array_equal(cube["ta_coverage"].to_numpy(), [1.0, 1.0, 0.0, 0.0])
    v = cube["ta"].to_numpy()
    assert np.isfinite(v[:2]).all() and np.isnan(v[2:]).all()
    assert cube["ta"].attrs["partial_periods"] == ["2021-04-01T00:00", "2021-04-02T00:00"]
    # the last day's 23-24 h accumulation would be stamped 1 Apr 00:00, which the data lack: 23 of 24 hours
    np.testing.assert_allclose(cube["sw_coverage"].to_numpy(), [1.0, 23 / 24, 0.0, 0.0])
    assert cube["sw"].attrs["partial_periods"][0] == "2021-03-31T00:00"
    assert np.isfinite(cube["sw"].isel(time=1).to_numpy()).all()


# ------------------------------------------------------------------------------------ real-region recipe

RECIPE = Path(__file__).resolve().parents[1] / "catalogs" / "examples" / "hainich.yaml"


def _era5_metadata_items(months: pd.DatetimeIndex) -> list[pystac.Item]:
    """era5-pds items as Planetary Computer publishes them (abfs:// Zarr, cube:dimensions); no stores."""
    out = []
    for t0 in months:
        t1 = t0 + pd.DateOffset(months=1) - pd.Timedelta("1h")
        for kind, names in (("an", AN), ("fc", FC)):
            item = _era5_item(t0, kind, t0, t1)
            for name in names:
                item.add_asset(
                    name,
                    pystac.Asset(
                        f"abfs://era5/ERA5/{t0:%Y}/{t0:%m}/{name}.zarr",
                        media_type="application/vnd+zarr",
                        roles=["data"],
                        extra_fields={
                            "xarray:open_kwargs": {
                                "engine": "zarr",
                                "consolidated": True,
                                "storage_options": {"account_name": "cpdataeuwest"},
                            }
                        },
                    ),
                )
            out.append(item)
    return out


def test_hainich_recipe_validates_offline():
    from geoflux.config import load_config

    cfg = load_config(RECIPE)
    names = [v.name for v in cfg.variables]
    assert names == ["ndvi", "lai", "lst_day", "gpp_modis", "ta", "vpd", "sw", "precip"]
    by = {v.name: v for v in cfg.variables}
    assert by["gpp_modis"].convert == "kgC_per_8d_to_gC_per_d" and by["gpp_modis"].units == "gC m-2 d-1"
    assert by["vpd"].derive == "vpd" and by["sw"].timestamp == "end" and by["ta"].convert == "K_to_degC"
    assert all(v.signing == "planetary-computer" for v in cfg.variables)
    gb = target_grid(cfg.grid)
    assert gb.shape == (80, 80) and gb.crs.epsg == 32632
    tower = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(*HAINICH)
    x0, y0, x1, y1 = cfg.grid.bbox
    assert x0 < tower[0] < x1 and y0 < tower[1] < y1
    assert len(cfg.periods()) == 12


def test_hainich_recipe_builds_lazy_cube_without_network(realdata, monkeypatch):
    """Search answered from recorded item metadata; no socket may connect while the cube is built."""
    import glob
    import json

    import geoflux.catalog as catalog
    from geoflux.config import load_config
    from geoflux.cube import cube_from_config

    cfg = load_config(RECIPE)
    assert [Path(p).name for p in glob.glob(str(cfg.path(cfg.towers.files)))] == [
        "FLX_DE-Hai_FLUXNET2015_SUBSET_MM_2000-2012_1-4.csv"
    ]
    recorded: dict[str, list[pystac.Item]] = {}
    for f in sorted((realdata / "stac" / "modis-061").glob("*/*.json")):
        d = json.loads(f.read_text())
        if d.get("type") == "Feature":
            item = pystac.Item.from_dict(d)
            for (
                a
            ) in item.assets.values():  # the examples' relative hrefs -> where Planetary Computer serves them
                a.href = f"https://modiseuwest.blob.core.windows.net/modis-061-cogs/{Path(a.href).name}"
            recorded.setdefault(d["collection"], []).append(item)
    # no recorded 17A2H item: the 15A2H item's tile and georeferencing with the 17A2H asset keys
    gpp = recorded["modis-15A2H-061"][0].clone()
    gpp.collection_id = "modis-17A2H-061"
    for old, new in (("Lai_500m", "Gpp_500m"), ("Fpar_500m", "PsnNet_500m"), ("FparLai_QC", "Psn_QC_500m")):
        gpp.assets[new] = gpp.assets.pop(old)
    recorded["modis-17A2H-061"] = [gpp]
    recorded["era5-pds"] = _era5_metadata_items(pd.date_range("2010-01-01", "2010-12-01", freq="MS"))
    searched = []

    def fake_search(catalog_url, collection, bbox, start, end, *, query=None, **kw):
        searched.append((collection, query))
        items = recorded[collection]
        for prop, ops in (query or {}).items():
            items = [i for i in items if i.properties.get(prop) == ops["eq"]]
        return items

    monkeypatch.setattr(catalog, "search_items", fake_search)

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cube = cube_from_config(cfg)
    assert len(searched) == 8 and ("era5-pds", {"era5:kind": {"eq": "fc"}}) in searched
    for name in ("ndvi", "lai", "lst_day", "gpp_modis", "ta", "vpd", "sw", "precip"):
        assert cube[name].shape == (12, 80, 80), name
        assert cube[name].chunks is not None  # lazy
    assert cube["ta"].data.npartitions == 12  # one task per month (the 80 x 80 grid is one chunk)
    np.testing.assert_array_equal(cube["sw_coverage"].to_numpy()[:-1], 1.0)  # Dec misses 1 Jan 00:00
    assert cube["sw"].attrs["partial_periods"] == ["2010-12-01T00:00"]
    assert cube["gpp_modis"].attrs["converted"] == "kgC_per_8d_to_gC_per_d"
