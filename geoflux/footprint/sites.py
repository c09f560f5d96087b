"""Footprints of whole towers: which records feed a site's FFP climatology, heights from the site table,
the disk fallback, and persistence of the weights between stages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from odc.geo.crs import CRS
from odc.geo.geobox import GeoBox

from geoflux.atomic import atomic_path
from geoflux.errors import GeofluxError
from geoflux.footprint.georef import site_footprint_weights
from geoflux.footprint.weights import FootprintWeights, disk_weights, tower_xy

DISPLACEMENT_FRACTION = 0.67  # d = 2/3 of canopy height (Garratt 1992), the usual FLUXNET assumption
DAYTIME_SW_IN = 20.0  # W m-2; daytime records carry most of the flux signal the footprint should describe


def footprint_records(records: pd.DataFrame, max_records: int, seed: int = 0) -> pd.DataFrame:
    """The records a site's footprint climatology is built from.

    Daytime records (``SW_IN`` > 20 W m-2 when present) with u*, wind speed and direction, sampled without
    replacement to at most ``max_records`` (FFP cost is linear in records; a few hundred give a stable mean).
    """
    need = [c for c in ("USTAR", "WS", "WD") if c in records.columns]
    ok = records[need].notna().all(axis=1) if need else pd.Series(False, index=records.index)
    if "SW_IN" in records.columns:
        ok &= records["SW_IN"] > DAYTIME_SW_IN
    sel = records.loc[ok]
    if len(sel) > max_records:
        sel = sel.sample(max_records, random_state=seed).sort_index()
    sel.attrs = dict(records.attrs)
    return sel


def tower_footprint(
    geobox: GeoBox,
    site: pd.Series,
    records: pd.DataFrame | None,
    method: str = "ffp",
    radius: float = 300.0,
    max_records: int = 200,
    boundary_layer_height: float = 1000.0,
    seed: int = 0,
) -> FootprintWeights:
    """Footprint weights of one tower on ``geobox``.

    Parameters
    ----------
    geobox : target grid.
    site : site-table row with ``LAT``, ``LON`` (degrees), optional ``HEIGHT_MEAS`` and ``HEIGHT_CANOPY`` (m).
    records : the site's half-hourly/hourly tidy records (``USTAR``, ``WS``, ``WD``, ...), or None.
    method : ``'ffp'`` (Kljun et al. 2015 climatology, falling back to the disk) or ``'disk'``.
    radius : disk radius, m.
    max_records, seed : record sample for the climatology (:func:`footprint_records`).
    boundary_layer_height : h, m.

    Returns
    -------
    FootprintWeights whose ``method`` says what was used: 'ffp', 'ffp-neutral' or 'disk'.
    """
    name = str(site.name)
    lon, lat = float(site["LON"]), float(site["LAT"])
    height = float(site.get("HEIGHT_MEAS", np.nan))
    canopy = float(site.get("HEIGHT_CANOPY", np.nan))
    if method == "ffp" and records is not None and np.isfinite(height):
        zm = height - DISPLACEMENT_FRACTION * (canopy if np.isfinite(canopy) else 0.0)
        if zm > 0:
            recs = footprint_records(records, max_records, seed)
            return site_footprint_weights(
                geobox, lon, lat, recs, zm, z0=None, h=boundary_layer_height, disk_radius=radius, site=name
            )
    return disk_weights(geobox, *tower_xy(geobox, lon, lat), radius, site=name)


def _grid_record(geobox: GeoBox) -> dict:
    a = geobox.affine
    return {"crs": geobox.crs.to_wkt(), "affine": [a.a, a.b, a.c, a.d, a.e, a.f], "shape": list(geobox.shape)}


def save_footprints(
    footprints: Mapping[str, FootprintWeights], path: str | Path, geobox: GeoBox | None = None
) -> Path:
    """Write footprint weights of many sites to one ``.npz`` (weights) with a ``.json`` index beside it.

    ``geobox``: the grid the weights' row/column offsets refer to, stored with them so that a reader on
    another grid is refused instead of reading misplaced footprints.
    """
    path = Path(path)
    index = {
        s: {
            "row_off": fw.row_off,
            "col_off": fw.col_off,
            "coverage": fw.coverage,
            "method": fw.method,
            "shape": list(fw.weights.shape),
        }
        for s, fw in footprints.items()
    }
    doc = {"grid": _grid_record(geobox) if geobox is not None else None, "sites": index}
    arrays = {f"w{i}": fw.weights for i, fw in enumerate(footprints.values())}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return path


def load_footprints(path: str | Path, geobox: GeoBox | None = None) -> dict[str, FootprintWeights]:
    """Read footprints written by :func:`save_footprints`.

    With ``geobox``, footprints stored with another grid raise a one-line error (re-run the towers stage).
    """
    path = Path(path)
    try:
        doc = json.loads(path.with_suffix(".json").read_text())
        arrays = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        msg = f"{exc.filename}: footprints not found (run 'geoflux towers aggregate' first)"
        raise GeofluxError(msg) from None
    index = doc["sites"] if "sites" in doc and isinstance(doc.get("sites"), dict) else doc
    grid = doc.get("grid") if "sites" in doc else None
    if geobox is not None and grid is not None:
        want = _grid_record(geobox)
        same = (
            grid["shape"] == want["shape"]
            and np.allclose(grid["affine"], want["affine"], rtol=0, atol=1e-6)
            and CRS(grid["crs"]) == geobox.crs
        )
        if not same:
            raise GeofluxError(
                f"{path}: footprints were computed on another grid (shape {grid['shape']}, origin "
                f"{grid['affine'][2]:.1f}, {grid['affine'][5]:.1f}) than the run's (shape "
                f"{want['shape']}, origin {want['affine'][2]:.1f}, {want['affine'][5]:.1f}); re-run "
                "'geoflux towers aggregate'"
            )
    return {
        s: FootprintWeights(v["row_off"], v["col_off"], arrays[f"w{i}"], float(v["coverage"]), v["method"])
        for i, (s, v) in enumerate(index.items())
    }
