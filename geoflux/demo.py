"""The generated world: a demo region whose true NEE field is known.

Everything is deterministic from a seed. The world has elevation, four land-cover classes in patches,
climate gradients, and per-time-step weather; true NEE is a light-use-efficiency GPP model minus
Lloyd–Taylor respiration with moisture limitation and class-dependent parameters:

    GPP  = eps[class] · fAPAR(NDVI) · PAR · f(T) · f(VPD) · f(SM)                 gC m-2 d-1
    RECO = Rref[class] · exp(E0 (1/(Tref−T0) − 1/(T−T0))) · (0.3 + 0.7 f(SM)) + 0.15 GPP
    NEE  = RECO − GPP

Towers see the footprint-weighted truth with a diurnal cycle, measurement noise, gaps and FLUXNET QC flags.
:func:`write_world` writes it all as real files: a static STAC catalog with COG drivers, FLUXNET2015
FULLSET-style half-hourly tower CSVs, a site table, truth COGs and the run configuration.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from odc.geo.geobox import GeoBox
from pyproj import Transformer
from scipy import fft as sp_fft
from scipy.ndimage import fourier_gaussian, uniform_filter

from geoflux.atomic import atomic_path
from geoflux.cog import RasterSpec, save_catalog, stac_item_for_cog, write_cog
from geoflux.config import (
    MODIS_8DAY,
    FootprintSpec,
    config_from_dict,
    dump_config,
    make_period_starts,
    period_ends,
)
from geoflux.extract import site_footprint
from geoflux.footprint import FootprintWeights, tower_xy
from geoflux.memory import trim_heap
from geoflux.towers.aggregate import UMOL_TO_GC_PER_DAY

CLASSES = {1: "ENF", 2: "DBF", 3: "GRA", 4: "CRO"}
# class-dependent parameters: light-use efficiency (gC MJ-1 PAR), Rref at 15 degC (gC m-2 d-1),
# measurement height (m), canopy height (m)
EPS = {1: 1.15, 2: 1.5, 3: 1.0, 4: 1.7}
RREF = {1: 1.8, 2: 2.4, 3: 1.9, 4: 2.1}
HEIGHTS = {1: (32.0, 18.0), 2: (35.0, 22.0), 3: (3.0, 0.3), 4: (3.5, 1.0)}
E0_K, TREF_K, T0_K = 309.0, 288.15, 227.13  # Lloyd & Taylor (1994)

NEE_UNITS = "gC m-2 d-1"
# the generator's annual budgets and their driver attribution, beside truth/ (and a .csv of the budgets)
TRUTH_BUDGETS = "truth_budgets.json"


@dataclass(frozen=True)
class WorldSpec:
    """Size and placement of a generated world."""

    seed: int = 42
    nx: int = 256
    ny: int = 256
    resolution: float = 250.0
    crs: str = "EPSG:32632"
    x0: float = 440_000.0
    y_top: float = 5_580_000.0
    start: str = "2021-01-01"
    n_steps: int = 46
    step_days: int = 8
    n_towers: int = 30
    footprint_radius: float = 300.0
    # Where towers stand: "mixed" (a share ``mixed_share`` at land-cover boundaries, the rest in homogeneous
    # patches), "homogeneous" (every tower inside a > 99 % one-class 3x3 patch) or "random" (anywhere,
    # without regard to land cover). Real towers mostly see mixed landscapes (Chu et al. 2021).
    placement: str = "mixed"
    mixed_share: float = 0.5
    # The towers' TRUE source area: "ffp" (the FFP climatology geoflux models from the tower's records),
    # "rotated" (the real wind blows ``rotate_deg`` clockwise of what the file records, e.g. a mis-oriented
    # sonic anemometer) or "box" (a uniform square of ``box_half_width`` m around the tower).
    source_area: str = "ffp"
    # land-cover patch size (Gaussian smoothing sigma, pixels); None: 1/25 of the larger grid edge
    patch_pixels: float | None = None
    rotate_deg: float = 60.0
    box_half_width: float = 600.0
    # Time steps: "steps" (``n_steps`` periods of ``step_days`` from ``start``, one continuous range) or
    # "MODIS8D" (``n_years`` whole years from ``start``'s year in 8-day periods restarting every 1 January,
    # 46 a year, the last 5 or 6 days long, as MODIS 8-day products are dated; ``n_steps`` is ignored).
    calendar: str = "steps"
    n_years: int = 1
    # Interannual anomalies imposed on the weather, one per year (cycled over the years), so that the true
    # budget differs between years for known reasons (see :data:`YEAR_ANOMALIES`): "none", "warm-spring",
    # "drought-summer" or "cloudy". Empty: none (the weather still varies at random).
    year_anomalies: tuple[str, ...] = ()
    # what the run's model learns (``model.target``): the multi-year worlds ask why budgets differ between
    # years and what warming does, which a model of NEE alone answers poorly (README 'Why budgets differ
    # between years, and projection')
    model_target: str = "nee"

    @property
    def geobox(self) -> GeoBox:
        bbox = (
            self.x0,
            self.y_top - self.ny * self.resolution,
            self.x0 + self.nx * self.resolution,
            self.y_top,
        )
        gb = GeoBox.from_bbox(bbox, self.crs, resolution=self.resolution)
        if gb.shape != (self.ny, self.nx):  # from_bbox snaps the bbox to multiples of the resolution
            raise ValueError(f"x0 and y_top must be multiples of the resolution ({self.resolution} m)")
        return gb

    @property
    def time_step(self) -> str:
        """The run configuration's ``time.step`` for this world's periods."""
        if self.calendar == "steps":
            return f"{self.step_days}D"
        if self.calendar == MODIS_8DAY:
            return MODIS_8DAY
        raise ValueError(f"calendar: {self.calendar!r} (expected steps or {MODIS_8DAY})")

    @property
    def periods(self) -> pd.DatetimeIndex:
        """Start of every time step."""
        if self.time_step == MODIS_8DAY:
            y0 = pd.Timestamp(self.start).year
            return make_period_starts(f"{y0}-01-01", f"{y0 + self.n_years - 1}-12-31", MODIS_8DAY)
        return pd.date_range(self.start, periods=self.n_steps, freq=f"{self.step_days}D")

    @property
    def period_days(self) -> np.ndarray:
        """Length of every time step, days (int)."""
        starts = self.periods
        return ((period_ends(starts, self.time_step) - starts) // pd.Timedelta(days=1)).to_numpy().astype(int)

    def year_anomaly(self, year_index: int) -> str:
        """The anomaly imposed on the ``year_index``-th year (0 = the first)."""
        if not self.year_anomalies:
            return "none"
        kind = self.year_anomalies[year_index % len(self.year_anomalies)]
        if kind not in YEAR_ANOMALIES:
            raise ValueError(f"year_anomalies: {kind!r} (expected one of {', '.join(YEAR_ANOMALIES)})")
        return kind


# What each interannual anomaly does to the weather (day of year doy; applied on top of the random weather):
YEAR_ANOMALIES = {
    "none": "no imposed anomaly",
    # +3.5 degC peaking mid-April (doy 105, width 30 d): deciduous green-up (NDVI follows smoothed
    # temperature) and crop/grass growth start early; respiration rises too
    "warm-spring": "air temperature +3.5 degC in March-May (Gaussian in day of year, peak 15 April)",
    # precipitation x0.15, +2 degC and relative humidity -0.2 around mid-July (doy 195, width 40 d): the soil
    # bucket dries (f(SM) and the NDVI of grass and crops fall) and VPD rises (f(VPD) falls)
    "drought-summer": "summer precipitation x0.15, air temperature +2 degC, relative humidity -0.2 "
    "(Gaussian in day of year, peak mid-July): low soil moisture, high VPD",
    # cloud cover logit +1.2 all year: less shortwave (PAR), slightly cooler days, more humid air
    "cloudy": "cloud cover raised all year (logit +1.2): dull, less PAR, slightly cooler and more humid",
}


WORLD_SIZES: dict[str, WorldSpec] = {
    "default": WorldSpec(),
    # small enough for an end-to-end test in seconds; spring–summer so fluxes have range
    "tiny": WorldSpec(nx=48, ny=48, resolution=500.0, start="2021-03-06", n_steps=16, n_towers=25),
    # three whole years in MODIS 8-day periods (138 steps) with a warm spring, a drought summer and a dull
    # cloudy year, so budgets differ between years for known reasons
    "multiyear": WorldSpec(
        nx=128,
        ny=128,
        start="2021-01-01",
        calendar=MODIS_8DAY,
        n_years=3,
        year_anomalies=("warm-spring", "drought-summer", "cloudy"),
        model_target="partitioned",
    ),
    # the same three years on a small grid with fewer towers, for tests
    "tiny-multiyear": WorldSpec(
        nx=32,
        ny=32,
        resolution=500.0,
        start="2021-01-01",
        calendar=MODIS_8DAY,
        n_years=3,
        year_anomalies=("warm-spring", "drought-summer", "cloudy"),
        model_target="partitioned",
        n_towers=12,
    ),
}


@dataclass
class WorldFields:
    """All gridded fields of a world. Per-step arrays are (step, y, x); static ones (y, x)."""

    elevation: np.ndarray  # m
    landcover: np.ndarray  # class code 1..4
    sw: np.ndarray  # W m-2, daily mean shortwave
    ta: np.ndarray  # degC
    vpd: np.ndarray  # hPa
    precip: np.ndarray  # mm d-1
    sm: np.ndarray  # relative soil moisture 0..1
    ndvi: np.ndarray  # -
    lst: np.ndarray  # degC, daytime land-surface temperature
    gpp: np.ndarray  # gC m-2 d-1
    reco: np.ndarray  # gC m-2 d-1
    nee: np.ndarray  # gC m-2 d-1


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit standard deviation."""
    # a periodic Gaussian filter is a product in Fourier space: O(n log n) whatever sigma (a direct
    # convolution with sigma = a quarter of the grid cost a third of the world's generation time)
    spectrum = sp_fft.rfftn(rng.standard_normal(shape))
    fourier_gaussian(spectrum, sigma, n=shape[-1], axis=-1, output=spectrum)  # in place: one spectrum alive
    f = sp_fft.irfftn(spectrum, s=shape)
    del spectrum
    mean, std = f.mean(), f.std()
    f -= mean  # in place, the same operations as (f - mean) / std
    f /= std
    return f


def _esat(t: np.ndarray) -> np.ndarray:
    """Saturation vapour pressure (hPa) at air temperature t (degC), Magnus formula."""
    return 6.1078 * np.exp(17.27 * t / (t + 237.3))


def _clear_sky_sw(lat_deg: float, doy: np.ndarray) -> np.ndarray:
    """Daily mean clear-sky shortwave (W m-2): 0.75 × extraterrestrial radiation (FAO-56 eq. 21)."""
    phi = np.deg2rad(lat_deg)
    dr = 1 + 0.033 * np.cos(2 * np.pi * doy / 365)
    decl = 0.409 * np.sin(2 * np.pi * doy / 365 - 1.39)
    ws = np.arccos(np.clip(-np.tan(phi) * np.tan(decl), -1, 1))
    ra = 1367 / np.pi * dr * (ws * np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.sin(ws))
    return 0.75 * ra


def true_fluxes(
    landcover: np.ndarray, sw: np.ndarray, ta: np.ndarray, vpd: np.ndarray, sm: np.ndarray, ndvi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """GPP and RECO (gC m-2 d-1) of the generator's process model; arrays broadcast together."""
    eps = np.select([landcover == k for k in EPS], list(EPS.values()), 0.0)
    rref = np.select([landcover == k for k in RREF], list(RREF.values()), 0.0)
    fapar = np.clip(1.24 * ndvi - 0.168, 0.0, 0.95)
    par = 0.45 * sw * 0.0864  # MJ m-2 d-1
    f_t = np.where(ta < 18.0, np.clip((ta + 2.0) / 20.0, 0.0, 1.0), np.exp(-(((ta - 18.0) / 14.0) ** 2)))
    f_vpd = np.clip(1.0 - (vpd - 6.0) / 24.0, 0.0, 1.0)
    f_sm = 1.0 - np.exp(-sm / 0.22)
    gpp = eps * fapar * par * f_t * f_vpd * f_sm
    tk = np.maximum(ta + 273.15, T0_K + 5.0)
    reco = rref * np.exp(E0_K * (1.0 / (TREF_K - T0_K) - 1.0 / (tk - T0_K))) * (0.3 + 0.7 * f_sm) + 0.15 * gpp
    return gpp, reco


def _imposed_anomalies(spec: WorldSpec, periods: pd.DatetimeIndex, doy: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step additive (``ta`` degC, ``rh``, ``cloud_logit``) and multiplicative (``precip``) weather
    anomalies of each year's :data:`YEAR_ANOMALIES` kind, shaped (step, 1, 1) to broadcast over the grid."""
    year_index = periods.year.to_numpy() - periods.year[0]
    kinds = np.array([spec.year_anomaly(int(i)) for i in year_index])
    spring = np.exp(-(((doy - 105.0) / 30.0) ** 2))
    summer = np.exp(-(((doy - 195.0) / 40.0) ** 2))
    warm, dry, dull = kinds == "warm-spring", kinds == "drought-summer", kinds == "cloudy"
    out = {
        "ta": 3.5 * spring * warm + 2.0 * summer * dry,
        "rh": -0.2 * summer * dry,
        "cloud_logit": 1.2 * dull,
        "precip": 1.0 - 0.85 * summer * dry,
    }
    return {k: v.astype(float)[:, None, None] for k, v in out.items()}


def generate_fields(spec: WorldSpec) -> WorldFields:
    """Generate every gridded field of the world (pure numpy, deterministic from ``spec.seed``)."""
    rng = np.random.default_rng(spec.seed)
    periods = spec.periods
    days = spec.period_days
    ny, nx, nt = spec.ny, spec.nx, len(periods)
    scale = max(nx, ny)
    yy, xx = np.mgrid[0:ny, 0:nx] / scale  # 0 at the top/west edge

    elev = (
        180
        + 700 * (0.5 + 0.5 * np.tanh(_smooth(rng, (ny, nx), scale / 6)))
        + 60 * _smooth(rng, (ny, nx), scale / 30)
    )
    elev = np.clip(elev + 250 * yy, 50, None)  # rising to the south

    patches = _smooth(rng, (ny, nx), spec.patch_pixels or max(1.5, scale / 25))
    forest = patches + 0.0025 * (elev - elev.mean()) > 0.15
    crop = ~forest & (_smooth(rng, (ny, nx), max(1.5, scale / 20)) - 0.003 * (elev - elev.mean()) > 0.0)
    lc = np.where(forest, np.where(elev > np.median(elev[forest]), 1, 2), np.where(crop, 4, 3)).astype(
        np.uint8
    )

    doy = (periods.day_of_year.to_numpy() + days / 2).astype(float)
    lat_c = 50.0
    clear = _clear_sky_sw(lat_c, doy)[:, None, None]
    imposed = _imposed_anomalies(spec, periods, doy)

    # weather anomalies: spatially smooth, AR(1) in time
    def anomalies(sigma_space: float, rho: float) -> np.ndarray:
        out = _smooth(rng, (nt, ny, nx), (0, sigma_space, sigma_space))
        for t in range(1, nt):  # in place: step t - 1 already holds its AR(1) value
            out[t] = rho * out[t - 1] + np.sqrt(1 - rho**2) * out[t]
        return out

    cloud = 1 / (
        1 + np.exp(-(0.6 * anomalies(scale / 4, 0.3) - 0.2 + 0.8 * xx[None] + imposed["cloud_logit"]))
    )  # cloudier in the west
    sw = clear * (1 - 0.65 * cloud)
    season = np.sin(2 * np.pi * (doy - 110) / 365)[:, None, None]
    ta = (
        10.5
        + 9.5 * season
        - 6.5e-3 * (elev - 200)[None]
        - 2.0 * yy[None]
        + 2.2 * anomalies(scale / 3, 0.5)
        + 0.012 * (sw - clear * 0.7)
        + imposed["ta"]
    )
    rh = np.clip(
        0.85 - 0.3 * xx[None] * (0.5 + 0.5 * season) - 0.35 * (1 - cloud) - 0.1 * season + imposed["rh"],
        0.2,
        0.97,
    )
    # Fields are computed in float64 and stored as float32. Each float64 (step, y, x) array is 8 bytes a
    # pixel-step (24 MB on the default world): each is cast or freed as soon as nothing else reads it
    # in float64, and per-step work runs step by step, which keeps the generation's peak memory (and the
    # heap it leaves behind) down. Every value is the same operation on the same float64 inputs as when
    # computed on the whole cube at once.
    f32 = np.float32
    vpd = (_esat(ta) * (1 - rh)).astype(f32)
    del rh
    precip = (
        np.clip(
            rng.gamma(1.2, 1.0, size=(nt, 1, 1))
            * (0.6 + 0.8 * cloud)
            * (1.4 - 0.6 * xx[None] + elev[None] / 1500)
            * (1 + 0.3 * anomalies(scale / 5, 0.0)),
            0,
            None,
        )
        * imposed["precip"]
    )
    del cloud
    sm = np.empty(ta.shape, f32)
    moist = np.empty_like(ta)
    bucket = np.full((ny, nx), 0.75)
    for t in range(nt):
        et = 0.3 + 3.0 * np.clip(sw[t] / 250, 0, 1.3) * np.clip(ta[t] / 18, 0, 1.3)
        bucket = np.clip(bucket + (precip[t] - et) * days[t] / 150.0, 0.03, 1.0)
        sm[t] = bucket
        moist[t] = np.clip(bucket / 0.5, 0, 1)
    precip = precip.astype(f32)

    green = 1 / (1 + np.exp(-(uniform_filter(ta, size=(3, 1, 1), mode="nearest") - 8.0) / 2.0))
    crop_cycle = np.exp(-(((doy - 175) / 38) ** 2))
    classes = [lc == 1, lc == 2, lc == 3, lc == 4]
    ndvi = np.empty_like(ta)
    for t in range(nt):
        ndvi[t] = np.select(
            classes,
            [
                0.62 + 0.13 * green[t],
                0.22 + 0.62 * green[t],
                0.2 + 0.5 * green[t] * moist[t],
                0.15 + 0.7 * crop_cycle[t] * moist[t],
            ],
        )
    del green
    ndvi = np.clip(
        ndvi + 0.03 * _smooth(rng, (ny, nx), 1.0)[None] + 0.015 * rng.standard_normal(ndvi.shape), 0.05, 0.95
    )
    lst = (ta + 0.025 * sw * (1.1 - ndvi) - 2.0 * moist + 0.5 * rng.standard_normal(ta.shape)).astype(f32)
    del moist
    sw, ta, ndvi = sw.astype(f32), ta.astype(f32), ndvi.astype(f32)

    # the truth is computed from the drivers exactly as stored (after encoding) so the model could learn it
    gpp, reco, nee = (np.empty(ta.shape, f32) for _ in range(3))
    for t in range(nt):
        step = slice(t, t + 1)
        ta_q = np.round(ta[step] * 100) / 100
        ndvi_q = np.round(ndvi[step] * 1e4) / 1e4
        g, r = true_fluxes(lc[None], sw[step], ta_q, vpd[step], sm[step], ndvi_q)
        gpp[step], reco[step], nee[step] = g, r, r - g
    return WorldFields(
        elevation=elev.astype(f32),
        landcover=lc,
        sw=sw,
        ta=ta,
        vpd=vpd,
        precip=precip,
        sm=sm,
        ndvi=ndvi,
        lst=lst,
        gpp=gpp,
        reco=reco,
        nee=nee,
    )


ATTRIBUTION_DRIVERS = ("sw", "ta", "vpd", "sm", "ndvi")


def _budget_by_year(flux: np.ndarray, years: np.ndarray, days: np.ndarray, mask: np.ndarray) -> dict:
    """Per year: sum over its steps of flux (gC m-2 d-1) x step days, averaged over ``mask`` pixels."""
    per_step = flux[:, mask].mean(axis=1, dtype=np.float64) * days  # gC m-2 per step
    return {int(y): float(per_step[years == y].sum()) for y in np.unique(years)}


def true_budgets(spec: WorldSpec, fields: WorldFields) -> dict:
    """The generator's own annual budgets and the driver attribution of their anomalies.

    Budgets: per calendar year, the sum over its steps of GPP, RECO and NEE (gC m-2 d-1) times the step's
    days, averaged over the region's pixels and per land-cover class (gC m-2 yr-1 when the year is
    complete), and the region total in Tg C. Attribution (worlds of two or more years whose years have the
    same steps): for each driver d of :func:`true_fluxes` (sw, ta, vpd, sm, ndvi), NEE is recomputed with d
    at its climatology (per pixel, the mean over years of the same step of the year); d's contribution to a
    year's anomaly (year minus mean over years) is anomaly(NEE) - anomaly(NEE with d at climatology).
    Contributions need not add up to the anomaly (the model is not additive): the rest is ``interaction``.
    NDVI is itself driven by temperature and moisture in the generator; its share is the greenness path.
    """
    periods, days = spec.periods, spec.period_days.astype(float)
    years = periods.year.to_numpy()
    ends = period_ends(periods, spec.time_step)
    lc = fields.landcover
    area_m2 = spec.nx * spec.ny * spec.resolution**2
    masks = {"region": np.ones(lc.shape, bool), **{name: lc == code for code, name in CLASSES.items()}}
    out: dict = {
        "units": "gC m-2 over the year's steps (gC m-2 yr-1 for complete years); total_tgc: Tg C",
        "sign": "NEE > 0 is a source to the atmosphere",
        "time_step": spec.time_step,
        "area_m2": area_m2,
        "anomalies": {
            str(y): {"kind": spec.year_anomaly(i), "what": YEAR_ANOMALIES[spec.year_anomaly(i)]}
            for i, y in enumerate(np.unique(years))
        },
        "years": {},
    }
    for y in np.unique(years):
        sel = years == y
        first, last_end = periods[sel][0], ends[sel][-1]
        complete = first == pd.Timestamp(year=int(y), month=1, day=1) and last_end == pd.Timestamp(
            year=int(y) + 1, month=1, day=1
        )
        out["years"][str(y)] = {"complete": bool(complete), "days": float(days[sel].sum()), "region": {}}
    for region, mask in masks.items():
        if not mask.any():
            continue
        b = {k: _budget_by_year(getattr(fields, k), years, days, mask) for k in ("gpp", "reco", "nee")}
        for y in b["nee"]:
            entry = {k: b[k][y] for k in b}
            if region == "region":
                out["years"][str(y)]["region"] = {**entry, "nee_total_tgc": b["nee"][y] * area_m2 * 1e-12}
            else:
                out["years"][str(y)].setdefault("classes", {})[region] = {
                    **entry,
                    "pixels": int(mask.sum()),
                }
    # attribution: needs >= 2 years with the same number of steps (steps of the year line up)
    counts = pd.Series(years).value_counts()
    if len(counts) < 2 or counts.nunique() != 1:
        out["attribution"] = None
        out["attribution_note"] = "needs two or more years with the same steps"
        return out
    n_years, per_year = len(counts), int(counts.iloc[0])
    drivers = _stored_drivers(fields)  # the truth was computed from the drivers as stored
    region = masks["region"]
    base = _budget_by_year(fields.nee, years, days, region)

    def anomaly(b: dict[int, float]) -> dict[int, float]:
        mean = float(np.mean(list(b.values())))
        return {y: v - mean for y, v in b.items()}

    total = anomaly(base)
    contrib: dict[str, dict[int, float]] = {}
    for d in ATTRIBUTION_DRIVERS:
        x = drivers[d]
        clim = x.reshape(n_years, per_year, *x.shape[1:]).mean(axis=0)
        held = dict(drivers, **{d: np.tile(clim, (n_years, 1, 1))})
        gpp, reco = true_fluxes(lc[None], held["sw"], held["ta"], held["vpd"], held["sm"], held["ndvi"])
        a = anomaly(_budget_by_year(reco - gpp, years, days, region))
        contrib[d] = {y: total[y] - a[y] for y in total}
    out["attribution"] = {
        "method": "true_fluxes with one driver at a time held at its per-pixel climatology (mean over years "
        "of the same step); contribution = anomaly(NEE) - anomaly(NEE with the driver at climatology)",
        "units": "gC m-2 yr-1 (region mean NEE anomaly against the mean over years)",
        "years": {
            str(y): {
                "anomaly": total[y],
                **{f"contrib_{d}": contrib[d][y] for d in ATTRIBUTION_DRIVERS},
                "interaction": total[y] - sum(contrib[d][y] for d in ATTRIBUTION_DRIVERS),
            }
            for y in total
        },
    }
    return out


TRUTH_DRIVERS = ("sw", "ta", "vpd", "sm", "ndvi")


def _stored_drivers(fields: WorldFields) -> dict[str, np.ndarray]:
    """The inputs of :func:`true_fluxes` as the truth was computed: from the drivers as stored."""
    return {
        "sw": fields.sw,
        "ta": np.round(fields.ta * 100) / 100,
        "vpd": fields.vpd,
        "sm": fields.sm,
        "ndvi": np.round(fields.ndvi * 1e4) / 1e4,
    }


def perturbed_truth_budgets(
    spec: WorldSpec, fields: WorldFields, changes: tuple[tuple[str, str, float], ...]
) -> dict:
    """The generator's truth function under a driver perturbation: regional annual NEE budgets.

    Each change is ``(driver, op, value)``: ``add`` adds ``value`` (driver units), ``scale`` multiplies by
    it, ``vpd_at_constant_rh`` multiplies VPD (hPa) by esat(ta + value) / esat(ta) (air temperature raised
    by ``value`` degC at unchanged relative humidity; esat by the Magnus formula). Only the inputs of
    :func:`true_fluxes` (sw, ta, vpd, sm, ndvi) can change the truth; other drivers (e.g. ``lst``, which the
    truth does not depend on) are listed as ``ignored``. Everything else (land cover, the other drivers,
    NDVI's own response to temperature) is held as generated: the same "one driver moves, the rest stay"
    question a model scenario answers.

    Returns
    -------
    ``{"years": {year: {"base", "perturbed", "change"}}, "ignored": [...], "units"}``, region means in
    gC m-2 over the year's steps (gC m-2 yr-1 for complete years).
    """
    periods, days = spec.periods, spec.period_days.astype(float)
    years = periods.year.to_numpy()
    drivers = _stored_drivers(fields)
    held = dict(drivers)
    ignored = []
    for var, op, value in changes:
        if var not in held:
            ignored.append(var)
            continue
        if op == "add":
            held[var] = held[var] + value
        elif op == "scale":
            held[var] = held[var] * value
        elif op == "vpd_at_constant_rh":
            ta = drivers["ta"]
            held[var] = held[var] * _esat(ta + value) / _esat(ta)
        else:
            raise ValueError(f"change {var}: unknown op {op!r} (expected add, scale, vpd_at_constant_rh)")
    region = np.ones(fields.landcover.shape, bool)
    lc = fields.landcover[None]
    gpp, reco = true_fluxes(lc, *(held[k] for k in TRUTH_DRIVERS))
    after = _budget_by_year(reco - gpp, years, days, region)
    gpp0, reco0 = true_fluxes(lc, *(drivers[k] for k in TRUTH_DRIVERS))  # same precision as ``after``
    before = _budget_by_year(reco0 - gpp0, years, days, region)
    return {
        "units": "gC m-2 yr-1 (region mean NEE budget; NEE > 0 is a source)",
        "changes": [list(c) for c in changes],
        "ignored": ignored,
        "years": {
            str(y): {"base": before[y], "perturbed": after[y], "change": after[y] - before[y]} for y in before
        },
    }


def _budget_rows(budgets: dict) -> pd.DataFrame:
    """The true budgets as a long table: year, region (region or class), gpp, reco, nee (gC m-2)."""
    rows = []
    for y, entry in budgets["years"].items():
        for region, b in {"region": entry["region"], **entry.get("classes", {})}.items():
            rows.append({"year": int(y), "region": region, "complete": entry["complete"], **b})
    return pd.DataFrame(rows)


def _tower_pixels(spec: WorldSpec, lc: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(row, col, class) of every tower pixel under ``spec.placement``."""
    margin = max(2, int(np.ceil(spec.footprint_radius / spec.resolution)) + 1)
    interior = np.zeros(lc.shape, bool)
    interior[margin:-margin, margin:-margin] = True
    taken = np.zeros(lc.shape, bool)
    out: list[tuple[int, int, int]] = []

    def take(cand: np.ndarray, n: int) -> None:
        cand = cand[~taken.ravel()[cand]]
        for p in rng.choice(cand, size=min(n, len(cand)), replace=False):
            r, c = divmod(int(p), lc.shape[1])
            taken[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = True
            out.append((r, c, int(lc[r, c])))

    if spec.placement == "random":
        take(np.flatnonzero(interior), spec.n_towers)
        return out
    if spec.placement not in ("mixed", "homogeneous"):
        raise ValueError(f"placement: {spec.placement!r} (expected mixed, homogeneous or random)")
    n_mixed = round(spec.n_towers * spec.mixed_share) if spec.placement == "mixed" else 0
    n_pure = spec.n_towers - n_mixed
    # neighbourhood judged for purity: about half the footprint radius around the tower (3x3 at 250 m)
    size = 2 * int(np.ceil(0.5 * spec.footprint_radius / spec.resolution)) + 1
    for n_total, pure in ((n_pure, True), (n_mixed, False)):
        per_class = np.full(len(CLASSES), n_total // len(CLASSES))
        per_class[: n_total % len(CLASSES)] += 1
        for code, n in zip(CLASSES, per_class, strict=True):
            share = uniform_filter((lc == code).astype(float), size=size if pure else 3)
            # pure: > 99 % one class around the tower; mixed: the class holds the tower pixel but only
            # 3-6 of its 3x3 neighbourhood, so a second class is close upwind in some direction
            ok = (share > 0.99) if pure else ((lc == code) & (share > 0.3) & (share < 0.7))
            cand = np.flatnonzero(ok & interior)
            if len(cand) < n:
                cand = np.flatnonzero((lc == code) & interior)
            take(cand, n)
    return out


def place_towers(spec: WorldSpec, fields: WorldFields) -> pd.DataFrame:
    """Tower placement by ``spec.placement`` (equal numbers per class unless random), away from edges.

    Returns the site table (``SITE_ID, LAT, LON, IGBP, ELEV, HEIGHT_MEAS, HEIGHT_CANOPY``); IGBP and heights
    are those of the tower's own pixel.
    """
    rng = np.random.default_rng(spec.seed + 1)
    picked = _tower_pixels(spec, fields.landcover, rng)
    rows = np.array([p[0] for p in picked])
    cols = np.array([p[1] for p in picked])
    codes = [p[2] for p in picked]
    gb = spec.geobox
    jitter = rng.uniform(-0.3, 0.3, size=(2, len(rows)))
    aff = gb.affine
    x = aff.c + aff.a * (cols + 0.5 + jitter[0])
    y = aff.f + aff.e * (rows + 0.5 + jitter[1])
    lon, lat = Transformer.from_crs(gb.crs.to_wkt(), "EPSG:4326", always_xy=True).transform(x, y)
    sites = pd.DataFrame(
        {
            "SITE_ID": [f"XX-D{i + 1:02d}" for i in range(len(rows))],
            "LAT": np.round(lat, 6),
            "LON": np.round(lon, 6),
            "IGBP": [CLASSES[c] for c in codes],
            "ELEV": np.round(fields.elevation[rows, cols], 1),
            "HEIGHT_MEAS": [HEIGHTS[c][0] for c in codes],
            "HEIGHT_CANOPY": [HEIGHTS[c][1] for c in codes],
        }
    )
    return sites


def box_weights(geobox: GeoBox, x: float, y: float, half_width: float) -> FootprintWeights:
    """Uniform square source area of ``half_width`` m around ``(x, y)`` (grid CRS, metres), pixel centres."""
    aff = geobox.affine
    ny, nx = geobox.shape
    cols = aff.c + aff.a * (np.arange(nx) + 0.5)
    rows = aff.f + aff.e * (np.arange(ny) + 0.5)
    cin = np.flatnonzero(np.abs(cols - x) <= half_width)
    rin = np.flatnonzero(np.abs(rows - y) <= half_width)
    w = np.full((len(rin), len(cin)), 1.0 / (len(rin) * len(cin)))
    return FootprintWeights(int(rin[0]), int(cin[0]), w, 1.0, "box")


def footprint_mean(field: np.ndarray, fw: FootprintWeights) -> np.ndarray:
    """Footprint-weighted mean of a (step, y, x) or (y, x) field."""
    rows, cols = fw.window
    return np.tensordot(field[..., rows, cols], fw.normalized(), axes=([-2, -1], [0, 1]))


DEMO_CV_FOLDS = 10  # site-grouped CV folds of the demo's run config (worlds with more towers than that)


def write_fluxnet_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a tower table as FLUXNET CSV: values rounded to 4 decimals, missing values as -9999.

    Arrow's CSV writer formats numbers in C++ (pandas' ``to_csv`` with a float format spent over half of
    the world's generation time formatting the towers' half-hourly records one value at a time).
    """
    num = df.select_dtypes("number").columns
    out = df.assign(**{c: df[c].round(4) for c in num if df[c].dtype.kind == "f"})
    table = pa.Table.from_pandas(out, preserve_index=False)
    with open(path, "wb") as fh:
        fh.write((",".join(map(str, df.columns)) + "\n").encode())
        pa_csv.write_csv(
            table, fh, pa_csv.WriteOptions(include_header=False, null_string="-9999", quoting_style="none")
        )


def synthesize_tower(
    site: pd.Series,
    fields: WorldFields,
    spec: WorldSpec,
    rng: np.random.Generator,
    footprints: bool = True,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Half-hourly FLUXNET2015 FULLSET-style records for one tower.

    Meteorology is measured at the tower (its pixel); the fluxes are the truth weighted by the tower's FFP
    footprint climatology, computed from the tower's own wind and u* records exactly as the pipeline will
    (:func:`geoflux.footprint.tower_footprint` with the default :class:`~geoflux.config.FootprintSpec`).

    Returns the file's columns and the noise-free per-period truth at the tower (``nee``, ``gpp``, ``reco``
    in gC m-2 d-1) plus the footprint (``footprint``) for tests. ``footprints=False`` stands the tower's
    pixel in for its footprints: the same random draws (none depends on a footprint), a fraction of the work.
    """
    gb = spec.geobox
    x, y = tower_xy(gb, site.LON, site.LAT)
    row, col = int((y - gb.affine.f) / gb.affine.e), int((x - gb.affine.c) / gb.affine.a)
    met = {k: getattr(fields, k)[:, row, col] for k in ("sw", "ta", "vpd", "precip")}
    days = spec.period_days
    n_days = int(days.sum())
    start = spec.periods[0]
    t = start + pd.to_timedelta(np.arange(n_days * 48) * 30, unit="min")
    step = np.repeat(np.arange(len(days)), days * 48)  # period of each half-hour
    hour = (np.arange(n_days * 48) % 48) / 2 + 0.25  # record centre, local solar ≈ standard time
    doy = t.day_of_year.to_numpy()
    phi = np.deg2rad(site.LAT)
    decl = 0.409 * np.sin(2 * np.pi * doy / 365 - 1.39)
    sin_elev = np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(np.pi * (hour - 12) / 12)
    shape = np.clip(sin_elev, 0, None).reshape(n_days, 48)
    shape = (shape / shape.mean(axis=1, keepdims=True)).ravel()

    # values are rounded as they will be written, so the pipeline sees the same inputs
    sw_d, ta_d, vpd_d = met["sw"][step], met["ta"][step], met["vpd"][step]
    sw = np.round(sw_d * shape, 4)
    ws = np.round(rng.gamma(2.5, 1.1, size=t.size) * (0.7 + 0.3 * shape / shape.max()), 4)
    ustar = np.round(np.clip(0.11 * ws * (1 + 0.2 * rng.standard_normal(t.size)), 0.01, None), 4)
    wd = np.round(np.mod(np.rad2deg(rng.vonmises(np.deg2rad(240), 1.2, size=t.size)), 360), 4)
    # Obukhov length from a sensible heat flux ~0.3 SW by day (unstable, L < 0) and a weakly stable night
    heat = np.where(sw > 0, 0.3 * sw, -15.0)  # W m-2
    ol = -(ustar**3) * 300.0 * 1.2 * 1005.0 / (0.41 * 9.81 * heat)
    ol = np.round(np.clip(ol, -5000.0, 5000.0), 2)
    sigmav = np.round(ustar * (1.9 + 0.6 * rng.random(t.size)), 4)
    wind = pd.DataFrame({"USTAR": ustar, "WS": ws, "WD": wd, "SW_IN": sw, "MO_LENGTH": ol, "V_SIGMA": sigmav})
    wind.attrs["resolution"] = "HH"
    fp = FootprintSpec(radius=spec.footprint_radius)

    def footprint_of(records: pd.DataFrame) -> FootprintWeights:
        # what geoflux.extract.tower_footprints computes for this one site, on this thread: write_world
        # runs the towers on threads already, and a pool thread per tower added a malloc arena each,
        # whose freed footprint temporaries raised the world's peak memory
        return site_footprint(fp, gb, site, records)

    if not footprints:
        fw = box_weights(gb, x, y, 0.5 * spec.resolution)
    else:
        fw = footprint_of(wind.assign(site=site.name))
    if spec.source_area == "ffp" or not footprints:
        true_fw = fw
    elif spec.source_area == "rotated":
        # the wind really blows rotate_deg clockwise of the recorded direction
        turned = wind.assign(site=site.name, WD=np.mod(wd + spec.rotate_deg, 360.0))
        turned.attrs = dict(wind.attrs)
        true_fw = footprint_of(turned)
    elif spec.source_area == "box":
        true_fw = box_weights(gb, x, y, spec.box_half_width)
    else:
        raise ValueError(f"source_area: {spec.source_area!r} (expected ffp, rotated or box)")
    per = {k: footprint_mean(getattr(fields, k), true_fw) for k in ("gpp", "reco", "nee")}

    ta = ta_d + (3.0 + 0.01 * sw_d) * np.sin(2 * np.pi * (hour - 9) / 24)
    rh = 1 - vpd_d / _esat(ta_d)
    vpd = np.clip(_esat(ta) * (1 - rh), 0, None)
    q10 = np.exp(0.0693 * (ta - ta_d)).reshape(n_days, 48)
    q10 = (q10 / q10.mean(axis=1, keepdims=True)).ravel()
    gpp = per["gpp"][step] * shape
    reco = per["reco"][step] * q10
    nee_true = (reco - gpp) / UMOL_TO_GC_PER_DAY  # umol m-2 s-1
    sigma = 0.5 + 0.2 * np.abs(nee_true)
    nee = nee_true + rng.laplace(0, sigma / np.sqrt(2))

    # gaps: more at night (low turbulence), plus a few multi-day outages
    night = shape == 0
    missing = rng.random(t.size) < np.where(night, 0.45, 0.15)
    missing |= ustar < 0.1
    for _ in range(rng.integers(1, 4)):
        g0 = rng.integers(0, t.size)
        missing[g0 : g0 + int(rng.integers(3, 9)) * 48] = True
    run_id = np.cumsum(np.r_[True, missing[1:] != missing[:-1]])
    run_len = np.bincount(run_id)[run_id]
    qc = np.zeros(t.size, np.int8)
    qc[missing] = np.select(
        [run_len[missing] <= 8, run_len[missing] <= 48 * 3], [1, 2], 3
    )  # MDS quality falls with gap length
    # gap-filled values: good fills scatter about the truth, poorer ones fall back to the period mean
    fill1 = nee_true + rng.normal(0, 0.8 * sigma)
    fill_poor = np.repeat(pd.Series(nee_true).groupby(step).transform("mean").to_numpy(), 1) + rng.normal(
        0, sigma
    )
    nee_out = np.where(qc == 0, nee, np.where(qc == 1, fill1, fill_poor))
    unfilled = rng.random(t.size) < 0.003
    nee_out[unfilled] = np.nan
    qc_out = qc.astype(float)
    qc_out[unfilled] = np.nan

    p = met["precip"][step] / 48

    def stamp(ts: pd.DatetimeIndex) -> np.ndarray:
        return ts.strftime("%Y%m%d%H%M").to_numpy()

    df = pd.DataFrame(
        {
            "TIMESTAMP_START": stamp(t),
            "TIMESTAMP_END": stamp(t + pd.Timedelta("30min")),
            "NEE_VUT_REF": nee_out,
            "NEE_VUT_REF_QC": qc_out,
            "TA_F": ta,
            "SW_IN_F": sw,
            "VPD_F": vpd,
            "P_F": p,
            "USTAR": ustar,
            "WS": ws,
            "WD": wd,
            "MO_LENGTH": ol,
            "V_SIGMA": sigmav,
        }
    )
    return df, {**{k: per[k] for k in ("nee", "gpp", "reco")}, "footprint": fw, "true_footprint": true_fw}


def tower_file_name(site_id: str, spec: WorldSpec) -> str:
    y0 = spec.periods[0].year
    y1 = (spec.periods[-1] + pd.Timedelta(days=int(spec.period_days[-1]) - 1)).year
    return f"FLX_{site_id}_FLUXNET2015_FULLSET_HH_{y0}-{y1}_1-4.csv"


# How each driver is stored in its COGs (as real products do: scaled integers, Kelvin, nodata codes).
# name: (field, dtype, scale, offset, nodata, units, kind, static)
DRIVER_ENCODING: dict[str, tuple[str, str, float, float, float, str, str, bool]] = {
    "sw": ("sw", "float32", 1.0, 0.0, -9999.0, "W m-2", "continuous", False),
    "ta": ("ta", "int16", 0.01, 0.0, -32768, "degC", "continuous", False),
    "vpd": ("vpd", "float32", 1.0, 0.0, -9999.0, "hPa", "continuous", False),
    "sm": ("sm", "float32", 1.0, 0.0, -9999.0, "1 (relative soil moisture)", "continuous", False),
    "ndvi": ("ndvi", "int16", 1e-4, 0.0, -3000, "1", "continuous", False),
    "lst": ("lst", "uint16", 0.02, -273.15, 0, "degC", "continuous", False),
    "elevation": ("elevation", "int16", 1.0, 0.0, -32768, "m", "continuous", True),
    "landcover": ("landcover", "uint8", 1.0, 0.0, 0, "class", "categorical", True),
}


# Physically possible range of each driver (physical units): decoded values outside it are reported.
DRIVER_PHYSICAL_RANGE: dict[str, tuple[float, float]] = {
    "sw": (0.0, 1400.0),
    "ta": (-90.0, 60.0),
    "vpd": (0.0, 150.0),
    "sm": (0.0, 1.0),
    "ndvi": (-1.0, 1.0),
    "lst": (-95.0, 95.0),
    "elevation": (-500.0, 9000.0),
}


def _encode(values: np.ndarray, dtype: str, scale: float, offset: float) -> np.ndarray:
    raw = (values - offset) / scale
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        raw = np.clip(np.round(raw), info.min + 1, info.max)
    return raw.astype(dtype)


def driver_variables() -> list[dict]:
    """The configuration's ``variables`` entries of a generated world's drivers (:data:`DRIVER_ENCODING`)."""
    return [
        {
            "name": name,
            "collection": f"demo-{name}",
            "asset": "data",
            "scale": scale,
            "offset": offset,
            "nodata": nodata,
            "units": units,
            "kind": kind,
            "static": static,
            **({"classes": sorted(CLASSES)} if kind == "categorical" else {}),
            **(
                {"physical_range": list(DRIVER_PHYSICAL_RANGE[name])} if name in DRIVER_PHYSICAL_RANGE else {}
            ),
        }
        for name, (_, _, scale, offset, nodata, units, kind, static) in DRIVER_ENCODING.items()
    ]


def write_world(out: str | Path, size: str | WorldSpec = "default", seed: int | None = None) -> Path:
    """Generate a world and write it under ``out/world``; return the run configuration's path.

    Layout: ``world/catalog.json`` (static STAC, one collection per driver), ``world/cogs/``,
    ``world/towers/*.csv``, ``world/sites.csv``, ``world/truth/nee_<date>.tif``, the true annual budgets
    and their driver attribution ``world/truth_budgets.json`` (+ ``.csv``, see :func:`true_budgets`) and
    ``out/config.yaml``.
    """
    spec = WORLD_SIZES[size] if isinstance(size, str) else size
    if seed is not None:
        spec = replace(spec, seed=seed)
    out = Path(out)
    world = out / "world"
    gb = spec.geobox
    fields = generate_fields(spec)
    trim_heap()
    periods = spec.periods
    ends = period_ends(periods, spec.time_step)
    tags = {"generator": "geoflux.demo", "seed": str(spec.seed)}

    # every COG is an independent file and GDAL releases the GIL: written on threads, catalogued in order
    pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def driver_cog(name: str, i: int, t0: dt.datetime, t1: dt.datetime) -> Any:
        fld, dtype, scale, offset, nodata, units, kind, static = DRIVER_ENCODING[name]
        data = getattr(fields, fld)
        values = data if static else data[i]
        path = world / "cogs" / name / f"{name}_{t0:%Y%m%d}.tif"
        write_cog(
            _encode(values, dtype, scale, offset),
            gb,
            RasterSpec(
                path,
                dtype=dtype,
                nodata=nodata,
                units=units,
                description=name,
                tags={**tags, "scale": str(scale), "offset": str(offset)},
                resampling="NEAREST" if kind == "categorical" else "AVERAGE",
            ),
        )
        return stac_item_for_cog(
            path, gb, f"{name}-{t0:%Y%m%d}", t0, t1, properties={"geoflux:variable": name}
        )

    collections: dict[str, list] = {}
    with pool:
        for name, (*_, static) in DRIVER_ENCODING.items():
            steps = (
                [(0, dt.datetime(2000, 1, 1), dt.datetime(2000, 1, 1))]
                if static
                else [
                    (i, p.to_pydatetime(), e.to_pydatetime())
                    for i, (p, e) in enumerate(zip(periods, ends, strict=True))
                ]
            )
            collections[f"demo-{name}"] = list(pool.map(lambda s, n=name: driver_cog(n, *s), steps))
        save_catalog(world, "geoflux-demo-world", "geoflux generated demo world", collections, gb)

        truth_dir = world / "truth"

        def truth_cog(i: int) -> None:
            spec_i = RasterSpec(
                truth_dir / f"nee_{periods[i]:%Y%m%d}.tif", units=NEE_UNITS, description="true NEE", tags=tags
            )
            write_cog(fields.nee[i], gb, spec_i)

        list(pool.map(truth_cog, range(len(periods))))
    trim_heap()

    budgets = true_budgets(spec, fields)
    with atomic_path(world / TRUTH_BUDGETS) as tmp:
        tmp.write_text(json.dumps(budgets, indent=2))
    with atomic_path((world / TRUTH_BUDGETS).with_suffix(".csv")) as tmp:
        _budget_rows(budgets).to_csv(tmp, index=False, float_format="%.4f")

    sites = place_towers(spec, fields)
    # every COG is written: the towers read only the weather at their pixels and the true fluxes, so the
    # other cubes are dropped before the towers' footprints, the stage of the world's peak memory
    unused = np.empty((0, spec.ny, spec.nx), np.float32)
    fields = replace(fields, sm=unused, ndvi=unused, lst=unused)
    trim_heap()
    (world / "towers").mkdir(parents=True, exist_ok=True)
    # The towers' records come from one random stream, drawn tower after tower in table order. A pass
    # without footprints (no draw depends on them) finds where each tower's draws start; the towers, mostly
    # footprint integration, then run on threads and write the same files a serial loop would.
    rng = np.random.default_rng(spec.seed + 2)
    starts = []
    for _, site in sites.iterrows():
        starts.append(copy.deepcopy(rng.bit_generator.state))
        synthesize_tower(site, fields, spec, rng, footprints=False)

    def one_tower(site: pd.Series, state: dict) -> None:
        own = np.random.default_rng()
        own.bit_generator.state = state
        df, _ = synthesize_tower(site, fields, spec, own)
        with atomic_path(world / "towers" / tower_file_name(site.SITE_ID, spec)) as tmp:
            write_fluxnet_csv(df, tmp)
        del df
        trim_heap()

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(one_tower, [site for _, site in sites.iterrows()], starts))
    with atomic_path(world / "sites.csv") as tmp:
        sites.to_csv(tmp, index=False)

    end = ends[-1] - pd.Timedelta(days=1)
    cfg = {
        "catalog": "world/catalog.json",
        "variables": driver_variables(),
        "towers": {
            "files": "world/towers/*.csv",
            "sites": "world/sites.csv",
            "qc_max": 1,
            "min_coverage": 0.5,
        },
        "grid": {
            "crs": spec.crs,
            "resolution": spec.resolution,
            "bbox": list(gb.boundingbox),
            # one chunk per step on the default 256² grid: each scene file is opened once per stage
            "chunk": 256 if max(spec.nx, spec.ny) >= 256 else (128 if max(spec.nx, spec.ny) > 128 else 32),
        },
        "time": {"start": f"{periods[0]:%Y-%m-%d}", "end": f"{end:%Y-%m-%d}", "step": spec.time_step},
        "footprint": {**FootprintSpec().model_dump(), "radius": spec.footprint_radius},
        "model": {
            # ten site groups: each fold holds out 3 of the default world's 30 towers. Leave-one-site-out
            # costs 3x the fits for little change in the held-out figures (README "Where a demo run's
            # time goes"); small worlds keep it.
            "cv_folds": DEMO_CV_FOLDS if spec.n_towers > DEMO_CV_FOLDS else 0,
            "target": spec.model_target,
            "seed": spec.seed,
        },
        "output": ".",
        "truth": "world/truth/*.tif",
    }
    cfg_path = out / "config.yaml"
    dump_config(config_from_dict(cfg, source=str(cfg_path), base_dir=out.resolve()), cfg_path)
    return cfg_path
