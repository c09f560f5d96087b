"""Extraction: footprint-weighted drivers at the towers, joined with tower observations.

The table this stage writes (``training.parquet``) is what the model stage trains on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dask
import numpy as np
import pandas as pd
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.config import FootprintSpec, VariableSpec
from geoflux.features import feature_names, pixel_features
from geoflux.footprint import FootprintWeights, tower_footprint


def tower_footprints(
    sites: pd.DataFrame, geobox: GeoBox, spec: FootprintSpec, records: pd.DataFrame | None = None
) -> dict[str, FootprintWeights]:
    """Footprint weights of every site on the grid.

    Parameters
    ----------
    sites : site table indexed by SITE_ID with LAT/LON (degrees), HEIGHT_MEAS/HEIGHT_CANOPY (m) for FFP.
    geobox : target grid.
    spec : footprint method and parameters.
    records : tidy half-hourly records of the sites (wind, u*) for FFP climatologies; None → disks.

    Raises
    ------
    GridError
        naming the site if a tower lies outside the grid.
    """
    by_site = dict(tuple(records.groupby("site", sort=False))) if records is not None else {}
    out = {}
    for site, row in sites.iterrows():
        recs = by_site.get(site)
        if recs is not None:
            recs.attrs = dict(records.attrs)
        out[str(site)] = tower_footprint(
            geobox,
            row,
            recs,
            method=spec.method,
            radius=spec.radius,
            max_records=spec.max_records,
            boundary_layer_height=spec.boundary_layer_height,
            seed=spec.seed,
        )
    return out


def extract_drivers(
    cube: xr.Dataset,
    footprints: Mapping[str, FootprintWeights],
    variables: Sequence[VariableSpec],
) -> pd.DataFrame:
    """Footprint-weighted features per site and time step.

    Only the footprint windows are read (one dask computation for all sites). Pixels with a missing driver
    are left out and the remaining weights renormalized; ``fp_valid`` is the footprint fraction that had
    all drivers.

    Returns
    -------
    DataFrame with ``site``, ``time``, one column per feature (see :mod:`geoflux.features`),
    ``fp_coverage`` (footprint fraction inside the grid), ``fp_valid`` and ``fp_method``.
    """
    names = feature_names(variables)
    times = pd.DatetimeIndex(cube["time"].to_numpy())
    windows = {
        site: {v.name: cube[v.name].isel(y=fw.window[0], x=fw.window[1]).data for v in variables}
        for site, fw in footprints.items()
    }
    (computed,) = dask.compute(windows)
    frames = []
    for site, fw in footprints.items():
        vals = {}
        for v in variables:
            a = computed[site][v.name]
            vals[v.name] = np.broadcast_to(a, (len(times), *fw.weights.shape)) if a.ndim == 2 else a
        feats = pixel_features(vals, variables)  # (time, r, c, f)
        ok = ~np.isnan(feats).any(axis=-1)
        w = np.where(ok, fw.weights[None], 0.0)
        wsum = w.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.einsum("trc,trcf->tf", w, np.nan_to_num(feats)) / wsum[:, None]
        df = pd.DataFrame(mean, columns=names)
        df.insert(0, "time", times)
        df.insert(0, "site", site)
        df["fp_coverage"] = fw.coverage
        df["fp_valid"] = wsum
        df["fp_method"] = fw.method
        frames.append(df.loc[wsum > 0])
    return pd.concat(frames, ignore_index=True)


def training_table(drivers: pd.DataFrame, observations: pd.DataFrame) -> pd.DataFrame:
    """Join footprint-weighted drivers with aggregated tower NEE on (site, time); rows lacking either drop."""
    obs = observations[["site", "time", "NEE", "NEE_coverage"]]
    table = drivers.merge(obs, on=["site", "time"], how="inner")
    return table.dropna(subset=["NEE"]).reset_index(drop=True)
