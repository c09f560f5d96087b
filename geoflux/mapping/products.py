"""Map products around the COGs: STAC items and the catalog, tile mosaics, the time cube and VRT stacks.

Everything here is described from the files on disk (their own tags), never from the run's configuration,
so the catalog always describes the bytes it points at. Inputs are plain values: the run folder
(:class:`~geoflux.run.RunLayout`), the period starts and step, the bands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pystac
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox

import geoflux
from geoflux.atomic import remove_tree
from geoflux.cog import mosaic_to_cog, raster_band_fields, save_catalog, stac_item_for_cog
from geoflux.config import period_edges, period_ends
from geoflux.cube import LOADED_ITEMS_ATTR
from geoflux.errors import GeofluxError
from geoflux.mapping.outputs import write_band_vrt, write_time_cube
from geoflux.mapping.predict import band_dtype, band_quantity, band_spec, band_units, redo_reason
from geoflux.mapping.tiles import TileScheme, write_vrt
from geoflux.run import MAPS, RunLayout, band_stem

log = logging.getLogger("geoflux")


def input_item_ids(cube: xr.Dataset, periods: pd.DatetimeIndex, step: str) -> dict[pd.Timestamp, str]:
    """Per period, the ids of the STAC items the cube was loaded from (static drivers' in every period).

    Taken from the cube itself (attribute written by :func:`geoflux.cube.cube_from_config`), never from a
    second search, so they are exactly the items behind the map. A scene counts for the period its time
    falls in, as :func:`geoflux.cube.composite` bins it.
    """
    if LOADED_ITEMS_ATTR not in cube.attrs:
        raise GeofluxError(
            f"driver cube: attribute '{LOADED_ITEMS_ATTR}' missing (expected from cube_from_config)"
        )
    loaded = json.loads(cube.attrs[LOADED_ITEMS_ATTR])
    edges = period_edges(periods, step)
    ids: dict[pd.Timestamp, set[str]] = {p: set() for p in periods}
    for var in loaded.values():
        for item_id, time in var["items"]:
            if var["static"]:
                for p in periods:
                    ids[p].add(item_id)
                continue
            k = int(edges.searchsorted(pd.Timestamp(time), side="right")) - 1
            if 0 <= k < len(periods):
                ids[periods[k]].add(item_id)
    return {p: ",".join(sorted(v)) for p, v in ids.items()}


def band_specs(
    run: RunLayout,
    cube: xr.Dataset,
    periods: pd.DatetimeIndex,
    ends: pd.DatetimeIndex,
    step: str,
    bands: Sequence[str],
    target_units: str,
    tags: dict[str, str],
    folder: Path | None = None,
) -> dict[int, list]:
    """The output file of every band and period (:class:`~geoflux.cog.RasterSpec`, keyed by period index),
    tagged with the run's ``tags``, the period's start and end (``YYYY-MM-DD``), ``step`` and the ids of the
    STAC items ``cube`` was loaded from for that period. ``folder`` replaces ``maps/`` (a tile's folder)."""
    item_ids = input_item_ids(cube, periods, step)
    per_band = {b: run.map_paths(periods, b, folder) for b in bands}
    out = {}
    for i, (p, end) in enumerate(zip(periods, ends, strict=True)):
        ptags = {
            **tags,
            "period_start": f"{p:%Y-%m-%d}",
            "period_end": f"{end:%Y-%m-%d}",
            "period": step,
            "input_items": item_ids[p],
        }
        out[i] = [band_spec(b, per_band[b][p], target_units, ptags) for b in bands]
    return out


# Map tags copied into each STAC item as ``geoflux:<tag>`` (lists for the comma-separated ones).
_ITEM_TAGS = (
    "model_sha256",
    "model_kind",
    "config_sha256",
    "software",
    "catalog",
    "variables",
    "input_items",
    "period",
)
_LIST_TAGS = ("variables", "input_items")
# STAC asset roles of the map bands: the estimate, its uncertainty band, and where it can be trusted.
_BAND_ROLES = {"NEE": ["data"], "DI": ["quality"], "AOA": ["quality"]}
# Licence of the map products (the maps, not the software): CC BY 4.0 unless the lead decides otherwise.
MAP_LICENSE = ("CC-BY-4.0", "https://creativecommons.org/licenses/by/4.0/")


def band_roles(band: str) -> list[str]:
    """STAC asset roles of a map band: ``data`` (NEE), ``uncertainty`` (quantiles), ``quality`` (DI, AOA)."""
    return ["uncertainty"] if band.startswith("NEE_q") else list(_BAND_ROLES.get(band, ["data"]))


def _file_props(path: Path) -> tuple:
    """(STAC properties, GeoBox, period start or None, STAC band fields) read from a map file itself."""
    with rasterio.open(path) as src:
        tags, units = src.tags(), src.tags(1).get("units", "")
        geobox = GeoBox(src.shape, src.transform, src.crs.to_wkt())
        band = raster_band_fields(
            tags.get("band", "NEE"),
            tags.get("quantity") or tags.get("long_name", ""),
            src.nodata,
            src.dtypes[0],
            units,
        )
    props = {}
    for k in _ITEM_TAGS:
        if k in tags:
            props[f"geoflux:{k}"] = [x for x in tags[k].split(",") if x] if k in _LIST_TAGS else tags[k]
    if "created" in tags:
        props["created"] = tags["created"]
    start = pd.Timestamp(tags["period_start"]) if "period_start" in tags else None
    return props, geobox, start, band


def map_item(band_files: dict[str, Path], item_id: str, p: pd.Timestamp, step: str) -> pystac.Item:
    """The STAC item of one period's map files, described by the files' own tags (not by this run's).

    Each asset carries its band's nodata, data type and unit (STAC 1.1 ``bands`` and ``raster:bands``) and
    a role: ``data`` (NEE), ``uncertainty`` (quantiles), ``quality`` (DI, AOA). Band files whose model hash
    or input items differ from the NEE file's (a run interrupted between bands) are left out of the item
    rather than described wrongly; ``geoflux:bands`` lists those in it. ``step``: the period length of
    files without a ``period`` tag.
    """
    props, geobox, start, nee_band = _file_props(band_files["NEE"])
    start = start if start is not None else p
    period = props.get("geoflux:period", step)
    end = period_ends(pd.DatetimeIndex([start]), period)[0]
    same = ("geoflux:model_sha256", "geoflux:input_items")
    extras = {}
    for band, path in band_files.items():
        if band == "NEE":
            continue
        bprops, _, _, fields = _file_props(path)
        if all(bprops.get(k) == props.get(k) for k in same):
            extras[band] = (path, fields)
        else:
            log.warning(
                "map: %s: made by another model or from other inputs than %s; not in the STAC item",
                path,
                band_files["NEE"],
            )
    props["geoflux:bands"] = ["NEE", *extras]
    item = stac_item_for_cog(
        band_files["NEE"],
        geobox,
        item_id,
        start.to_pydatetime(),
        end.to_pydatetime(),
        properties=props,
        asset_title=f"NEE ({nee_band.get('unit', '')})",
        roles=band_roles("NEE"),
        band=nee_band,
    )
    for band, (path, fields) in extras.items():
        extra = stac_item_for_cog(
            path,
            geobox,
            item_id,
            start.to_pydatetime(),
            end.to_pydatetime(),
            asset_title=band,
            roles=band_roles(band),
            band=fields,
        )
        item.add_asset(band_stem(band), extra.assets["data"])
    return item


MAP_CUBE = "nee.zarr"  # inside the maps folder


def drop_map_products(run: RunLayout, bands: Sequence[str]) -> None:
    """Remove the time cube and the VRT stacks (they would mix runs once any full-grid file changes)."""
    remove_tree(run.path(MAPS) / MAP_CUBE)
    for b in bands:
        (run.path(MAPS) / f"{band_stem(b)}.vrt").unlink(missing_ok=True)


def write_map_products(
    run: RunLayout,
    periods: pd.DatetimeIndex,
    bands: Sequence[str],
    chunk: int,
    echo: Callable[[str], None] = log.info,
) -> dict:
    """The time-aware products of the finished full-grid COGs: ``maps/nee.zarr`` and ``maps/<band>.vrt``.

    Written (or kept, when the cube was made from exactly these files) only when every band of every period
    exists; otherwise stale ones are removed. See :mod:`geoflux.mapping.outputs`.

    Returns
    -------
    STAC collection-level assets (key → pystac.Asset) of what is on disk.
    """
    files = {b: run.map_paths(periods, b) for b in bands}
    if not all(f.exists() for per in files.values() for f in per.values()):
        drop_map_products(run, bands)
        return {}
    path, written = write_time_cube(files, run.path(MAPS) / MAP_CUBE, chunk=chunk)
    if written:
        echo(f"map: time cube {path}")
    with rasterio.open(files["NEE"][periods[0]]) as src:
        geobox = GeoBox(src.shape, src.transform, src.crs.to_wkt())
        target_units = src.tags(1).get("units", "")
    assets = {
        "zarr": pystac.Asset(
            href=str(path.resolve()),
            title="all bands over time (Zarr, CF: time_bnds, grid_mapping, _FillValue)",
            media_type="application/vnd+zarr",
            roles=["data"],
            extra_fields={"xarray:open_kwargs": {"engine": "zarr", "consolidated": True}},
        )
    }
    for b in bands:
        dtype, nodata = band_dtype(b)
        vrt = write_band_vrt(
            run.path(MAPS) / f"{band_stem(b)}.vrt",
            files[b],
            geobox,
            dtype,
            nodata,
            band_units(b, target_units),
            band_quantity(b),
        )
        assets[f"{band_stem(b)}-vrt"] = pystac.Asset(
            href=str(vrt.resolve()),
            title=f"{b}: one band per period (GDAL VRT)",
            media_type="application/xml",
            roles=band_roles(b),
        )
    return assets


MAP_COLLECTIONS = ("geoflux-nee", "geoflux-nee-tiles")


def drop_catalog_maps(run: RunLayout) -> None:
    """Remove ``maps/catalog.json`` and the collection folders :func:`save_catalog_maps` writes."""
    root = run.path(MAPS)
    (root / "catalog.json").unlink(missing_ok=True)
    for cid in MAP_COLLECTIONS:
        if (root / cid / "collection.json").exists():
            remove_tree(root / cid)


def save_catalog_maps(
    run: RunLayout, collections: dict[str, list[pystac.Item]], geobox: GeoBox, assets: dict | None = None
) -> Path:
    """Write ``maps/catalog.json`` describing the map outputs (one collection per kind).

    Each collection gets ``item_assets`` (every band's role, unit, nodata and data type), summaries, the
    licence (:data:`MAP_LICENSE`) with its link, geoflux as processor, and ``assets`` (the time cube and
    VRT stacks, on the full-grid collection). Replaces the catalog written before (collections or items
    that are gone leave nothing behind).
    """

    def decorate(coll: pystac.Collection) -> None:
        items = list(coll.get_items())
        coll.license = MAP_LICENSE[0]
        coll.add_link(pystac.Link("license", MAP_LICENSE[1], media_type="text/html", title=MAP_LICENSE[0]))
        coll.providers = [
            pystac.Provider(
                "geoflux",
                description=f"geoflux {geoflux.__version__}: footprint-aware NEE maps from flux towers",
                roles=[pystac.ProviderRole.PROCESSOR],
            )
        ]
        defs = {}
        for item in items:
            for key, asset in item.assets.items():
                if key not in defs:
                    fields = {k: v for k, v in asset.extra_fields.items() if k in ("bands", "raster:bands")}
                    defs[key] = pystac.ItemAssetDefinition.create(
                        title=asset.title,
                        description=None,
                        media_type=asset.media_type,
                        roles=asset.roles,
                        extra_fields=fields,
                    )
        coll.item_assets = defs
        summary = {
            "geoflux:model_sha256": sorted(
                {i.properties.get("geoflux:model_sha256") for i in items} - {None}
            ),
            "geoflux:period": sorted({i.properties.get("geoflux:period") for i in items} - {None}),
            "geoflux:bands": sorted({b for i in items for b in i.properties.get("geoflux:bands", [])}),
            "proj:code": sorted({i.properties.get("proj:code") for i in items} - {None}),
        }
        coll.summaries = pystac.Summaries({k: v for k, v in summary.items() if v})
        if coll.id == MAP_COLLECTIONS[0]:
            for key, asset in (assets or {}).items():
                coll.add_asset(key, asset.clone())

    drop_catalog_maps(run)
    return save_catalog(
        run.path(MAPS), "geoflux-maps", "geoflux NEE maps", collections, geobox, decorate=decorate
    )


def mosaic_tags(files: list[Path]) -> dict[str, str] | None:
    """Tags of a mosaic of ``files``: the tags they share, ``input_items`` the union of theirs.

    None when the files were made by different models or from different variables (a mosaic of them would
    have no single provenance).
    """
    tags = []
    for f in files:
        with rasterio.open(f) as src:
            tags.append(src.tags())
    if len({(t.get("model_sha256"), t.get("variables")) for t in tags}) != 1:
        return None
    # ``created`` is the mosaic's own (set when it is written), not its tiles'
    common = {k: v for k, v in tags[0].items() if k != "created" and all(t.get(k) == v for t in tags[1:])}
    ids = {x for t in tags for x in t.get("input_items", "").split(",") if x}
    common["input_items"] = ",".join(sorted(ids))
    return common


def mosaic_tiles(
    run: RunLayout,
    periods: pd.DatetimeIndex,
    scheme: TileScheme,
    bands: Sequence[str],
    target_units: str,
    mosaic_cog: bool,
) -> list[tuple[dict[str, Path], str, pd.Timestamp]]:
    """VRT mosaics of every finished tile per band and period (and COGs of complete ones if asked).

    A mosaic COG gets the tags its tiles share (``input_items``: their union); it is (re)written when its
    tags differ from those, and not at all when the tiles come from different models.

    Returns (band files, item id, period) of every finished tile output, for STAC items.
    """
    root = run.path(MAPS)
    n_tiles = scheme.shape[0] * scheme.shape[1]
    found = []
    for p in periods:
        per_band: dict[str, list] = {b: [] for b in bands}
        for tile in scheme.tiles():
            folder = root / scheme.folder / tile.id
            files = {b: run.map_path(p, b, folder) for b in bands}
            if all(f.exists() for f in files.values()):
                found.append((files, f"nee-{p:%Y%m%d}-{tile.id}", p))
                for b in bands:
                    per_band[b].append((files[b], tile.rows, tile.cols))
        for b, sources in per_band.items():
            if not sources:
                continue
            spec = band_spec(b, root / f"{band_stem(b)}_{p:%Y%m%d}.vrt", target_units, {})
            vrt = write_vrt(
                spec.path,
                scheme.geobox,
                sources,
                nodata=spec.nodata,
                units=spec.units,
                description=spec.description,
                resampling="nearest" if spec.resampling == "NEAREST" else "average",
            )
            if not (mosaic_cog and len(sources) == n_tiles):
                continue
            tags = mosaic_tags([f for f, _, _ in sources])
            if tags is None:
                log.warning("map: %s: tiles made by different models; no mosaic COG", vrt)
                continue
            cog = dataclasses.replace(spec, path=vrt.with_suffix(".tif"), tags={**tags, **spec.tags})
            if redo_reason(cog) is not None:
                mosaic_to_cog(vrt, cog)
    return found


def publish_maps(
    run: RunLayout,
    periods: pd.DatetimeIndex,
    step: str,
    bands: Sequence[str],
    geobox: GeoBox,
    chunk: int,
    scheme: TileScheme | None = None,
    target_units: str = "",
    mosaic_cog: bool = False,
    echo: Callable[[str], None] = log.info,
) -> Path | None:
    """Describe the finished map files: tile mosaics (with ``scheme``), the time cube and VRT stacks, and
    ``maps/catalog.json`` (STAC), every item built from its files' own tags so the catalog describes the
    bytes on disk.

    Returns
    -------
    The catalog's path, or None when no period has all its band files.
    """
    collections: dict[str, list[pystac.Item]] = {}
    full = {b: run.map_paths(periods, b) for b in bands}
    items = [
        map_item({b: full[b][p] for b in bands}, f"nee-{p:%Y%m%d}", p, step)
        for p in periods
        if all(full[b][p].exists() for b in bands)
    ]
    if items:
        collections[MAP_COLLECTIONS[0]] = items
    if scheme is not None:
        tile_items = mosaic_tiles(run, periods, scheme, bands, target_units, mosaic_cog)
        tile_items = [map_item(files, iid, p, step) for files, iid, p in tile_items]
        if tile_items:
            collections[MAP_COLLECTIONS[1]] = tile_items
    # the time cube and VRT stacks exist only while every full-grid file does (else they would mix runs)
    assets = write_map_products(run, periods, bands, chunk, echo=echo)
    if not collections:
        return None
    return save_catalog_maps(run, collections, geobox, assets=assets)
