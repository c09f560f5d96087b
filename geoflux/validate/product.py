"""Validate any NEE product (geoflux's own or another's, e.g. FLUXCOM-X) against tower files."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from geoflux.errors import GeofluxError
from geoflux.validate.pairing import Validation, validate_maps
from geoflux.validate.series import open_maps


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
