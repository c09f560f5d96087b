"""The pipeline: the only place that knows the order of the stages.

Each stage reads the previous stage's file from the output folder and writes its own, so stages can be
run one at a time from the CLI (``geoflux towers|extract|train|map|validate CONFIG``) or all at once
(:func:`run`). Output layout under ``cfg.output``::

    towers/observations.parquet   aggregated, QC-filtered tower NEE (gC m-2 d-1) and meteorology
    towers/footprints.npz, .json  footprint weights of each tower on the grid (method per site)
    training/training.parquet     footprint-weighted drivers joined with observations
    model/model.skops, model.json fitted model + card; cv_predictions.parquet, cv_metrics.json
    maps/nee_YYYYMMDD.tif         NEE COG per time step (gC m-2 d-1); maps/catalog.json (STAC)
    validation/metrics.json       truth / cv / towers scores
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import geoflux
from geoflux import towers as tw
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig, period_edges, period_ends
from geoflux.errors import GeofluxError
from geoflux.features import feature_names, feature_units
from geoflux.metrics import summarize_metrics  # noqa: F401 (the CLI prints it)
from geoflux.run import (
    CUBE,
    CV_METRICS,
    CV_PREDICTIONS,
    FOOTPRINT_METHODS,
    FOOTPRINTS,
    MAPS,
    METRICS,
    MODEL,
    OBSERVATIONS,
    PIXELS,
    REPORT,  # noqa: F401 (layout names stay importable from the pipeline)
    TRAINING,
    VALIDATION_PAIRS,
    layout,
    load_sites,
)
from geoflux.validate import check_truth_alignment

log = logging.getLogger("geoflux")


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def _write_json(obj: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return path


def _read_stage(cfg: RunConfig, rel: str, producer: str) -> Path:
    return layout(cfg).require(rel, producer)


def stage_towers(cfg: RunConfig, echo: Callable[[str], None] = log.info) -> pd.DataFrame:
    """Read, QC-filter and aggregate tower files to the model time step, and compute each tower's footprint.

    Everything is checked (files, site table, towers inside the grid) before anything is written; then the
    observations table and the footprints are written.
    """
    from geoflux.cube import target_grid
    from geoflux.extract import check_footprint_methods, tower_footprints
    from geoflux.footprint import save_footprints

    sites = load_sites(cfg)
    records = tw.read_towers(str(cfg.path(cfg.towers.files)), sites)
    with_records = sites.loc[sites.index.isin(records["site"].unique())]
    fps = tower_footprints(with_records, target_grid(cfg.grid), cfg.footprint, records=records)
    methods = check_footprint_methods(fps, with_records, records, cfg.footprint)  # raises on fallback=error
    filtered = tw.qc_filter(records, qc_max=cfg.towers.qc_max)
    starts, ends = cfg.period_bounds()
    obs = tw.aggregate(filtered, starts, min_coverage=cfg.towers.min_coverage, end=ends[-1])
    if obs.empty:
        raise GeofluxError(
            f"{cfg.towers.files}: no tower period in {cfg.time.start}..{cfg.time.end} reaches "
            f"min_coverage={cfg.towers.min_coverage}"
        )
    _write_parquet(obs, cfg.out_dir / OBSERVATIONS)
    save_footprints(fps, cfg.out_dir / FOOTPRINTS, geobox=target_grid(cfg.grid))
    with atomic_path(cfg.out_dir / FOOTPRINT_METHODS) as tmp:
        methods.to_csv(tmp, index=False)
    _report_footprints(methods, cfg.footprint.fallback, echo)
    return obs


def _report_footprints(methods: pd.DataFrame, fallback: str, echo: Callable[[str], None]) -> None:
    """One summary line of footprint methods, and one warning line per tower that fell back to the disk."""
    counts = methods["method"].value_counts()
    echo("footprints: " + ", ".join(f"{n} {m}" for m, n in counts.items()))
    if fallback == "warn":
        for r in methods.loc[methods["reason"] != ""].itertuples():
            log.warning("footprint %s: disk instead of FFP: %s", r.site, r.reason)


def footprints_for(cfg: RunConfig, sites: pd.DataFrame) -> dict:
    """Footprint weights (written by the towers stage) of the given sites, checked against the run's grid."""
    from geoflux.cube import target_grid

    return layout(cfg).footprints(sites.index, geobox=target_grid(cfg.grid))


def stage_cube(cfg: RunConfig, progress: bool = True) -> Path:
    """Build the driver cube and write it to ``cube.zarr`` in the output folder (for inspection and reuse)."""
    from geoflux.cube import cube_from_config
    from geoflux.progress import progress_bar

    ds = cube_from_config(cfg)
    path = cfg.out_dir / CUBE
    with atomic_path(path) as tmp:
        if progress:
            with progress_bar("cube"):
                ds.to_zarr(tmp, mode="w")
        else:
            ds.to_zarr(tmp, mode="w")
    return path


def stage_extract(cfg: RunConfig) -> pd.DataFrame:
    """Footprint-weighted drivers at the towers joined with observations; writes the training table."""
    from geoflux.cube import cube_from_config
    from geoflux.extract import extract_drivers, training_table

    obs = pd.read_parquet(_read_stage(cfg, OBSERVATIONS, "towers"))
    sites = load_sites(cfg).loc[lambda s: s.index.isin(obs["site"].unique())]
    fps = footprints_for(cfg, sites)
    cube = cube_from_config(cfg)
    fp = cfg.footprint
    drivers, pixels = extract_drivers(
        cube,
        fps,
        cfg.variables,
        pixel_mass=fp.pixel_mass,
        max_pixels=fp.max_pixels,
        hedge_radius=fp.hedge_radius,
        hedge_pixels=fp.hedge_pixels,
        seed=fp.seed,
    )
    table = training_table(drivers, obs)
    if table.empty:
        raise GeofluxError("extract: no tower observation coincides with driver data (check time range)")
    _write_parquet(table, cfg.out_dir / TRAINING)
    _write_parquet(training_table(pixels, obs), cfg.out_dir / PIXELS)
    return table


def stage_train(cfg: RunConfig) -> dict:
    """Site-grouped cross-validation, then a fit on all sites (with the uncertainty band calibrated on the
    grouped CV and the area of applicability); writes model, CV predictions and metrics."""
    from geoflux.extract import harden_classes
    from geoflux.model import save_model, train

    table = pd.read_parquet(_read_stage(cfg, TRAINING, "extract"))
    pixels = pd.read_parquet(_read_stage(cfg, PIXELS, "extract"))
    if cfg.model.training == "averaged":
        table = harden_classes(table, cfg.variables)
    features = feature_names(cfg.variables)
    model, cv_pred, cv = train(
        table,
        features,
        feature_units(cfg.variables),
        cfg.model,
        provenance={"catalog": cfg.catalog, "towers": cfg.towers.files},
        sites=load_sites(cfg),
        pixels=pixels,
    )
    _write_parquet(cv_pred, cfg.out_dir / CV_PREDICTIONS)
    _write_json(cv, cfg.out_dir / CV_METRICS)
    save_model(model, cfg.out_dir / MODEL)
    return cv


def map_paths(cfg: RunConfig, band: str = "NEE", folder: Path | None = None) -> dict[pd.Timestamp, Path]:
    """Output map path per period start: ``maps/<band>_YYYYMMDD.tif`` (``nee_...`` for NEE).

    ``folder`` replaces ``maps/`` (tile outputs live in ``maps/tiles-<size>/x<X>_y<Y>/``).
    """
    return layout(cfg).map_paths(cfg.periods(), band, folder)


def _input_item_ids(cfg: RunConfig, cube) -> dict[pd.Timestamp, str]:
    """Per period, the ids of the STAC items the cube was loaded from (static drivers' in every period).

    Taken from the cube itself (attribute written by :func:`geoflux.cube.cube_from_config`), never from a
    second search, so they are exactly the items behind the map. A scene counts for the period its time
    falls in, as :func:`geoflux.cube.composite` bins it.
    """
    from geoflux.cube import LOADED_ITEMS_ATTR

    if LOADED_ITEMS_ATTR not in cube.attrs:
        raise GeofluxError(
            f"driver cube: attribute '{LOADED_ITEMS_ATTR}' missing (expected from cube_from_config)"
        )
    loaded = json.loads(cube.attrs[LOADED_ITEMS_ATTR])
    periods = cfg.periods()
    edges = period_edges(periods, cfg.time.step)
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


def _tile_cube(cfg: RunConfig, geobox):
    """The driver cube on one tile's grid (the run's config with the tile's bbox)."""
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.errors import GridError

    bbox = tuple(geobox.extent.boundingbox)
    tile_cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"bbox": bbox})})
    got = target_grid(tile_cfg.grid)
    if got.shape != geobox.shape or not got.affine.almost_equals(geobox.affine, precision=1e-6):
        raise GridError(f"tile grid {got} differs from the tiling's {geobox} (grid bbox not pixel-aligned?)")
    return cube_from_config(tile_cfg)


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


def _band_roles(band: str) -> list[str]:
    return ["uncertainty"] if band.startswith("NEE_q") else list(_BAND_ROLES.get(band, ["data"]))


def _file_props(path: Path) -> tuple:
    """(STAC properties, GeoBox, period start or None, STAC band fields) read from a map file itself."""
    import rasterio
    from odc.geo.geobox import GeoBox

    from geoflux.cog import raster_band_fields

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


def _map_item(cfg: RunConfig, band_files: dict[str, Path], item_id: str, p: pd.Timestamp):
    """The STAC item of one period's map files, described by the files' own tags (not by this run's).

    Each asset carries its band's nodata, data type and unit (STAC 1.1 ``bands`` and ``raster:bands``) and
    a role: ``data`` (NEE), ``uncertainty`` (quantiles), ``quality`` (DI, AOA). Band files whose model hash
    or input items differ from the NEE file's (a run interrupted between bands) are left out of the item
    rather than described wrongly; ``geoflux:bands`` lists those in it.
    """
    from geoflux.cog import stac_item_for_cog
    from geoflux.mapping import band_stem

    props, geobox, start, nee_band = _file_props(band_files["NEE"])
    start = start if start is not None else p
    period = props.get("geoflux:period", cfg.time.step)
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
        roles=_band_roles("NEE"),
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
            roles=_band_roles(band),
            band=fields,
        )
        item.add_asset(band_stem(band), extra.assets["data"])
    return item


def config_sha256(cfg: RunConfig) -> str:
    """sha256 of the run configuration's canonical JSON (``cfg.model_dump_json()``)."""
    import hashlib

    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()


def catalog_uri(cfg: RunConfig) -> str:
    """The run's driver catalog as a resolvable URI: a URL as given, a local file as a ``file://`` URI."""
    if "://" in cfg.catalog:
        return cfg.catalog
    return cfg.path(cfg.catalog).resolve().as_uri()


def stage_map(
    cfg: RunConfig,
    overwrite: bool = False,
    progress: bool = True,
    scheduler: str = "threads",
    workers: int | None = None,
    tiles: list[tuple[int, int]] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    tile_size: int | None = None,
    inference: str = "library",
    mosaic_cog: bool = False,
    echo: Callable[[str], None] = log.info,
) -> list[Path]:
    """Predict every model band chunk by chunk and stream it into one COG per band and time step.

    Without ``tiles``/``bbox`` the whole grid is mapped to ``maps/<band>_YYYYMMDD.tif``; with them, the
    selected tiles of the fixed tiling (:mod:`geoflux.tiles`) are mapped to
    ``maps/tiles-<size>/x<X>_y<Y>/<band>_YYYYMMDD.tif`` and ``maps/<band>_YYYYMMDD.vrt`` mosaics list every
    finished tile (``mosaic_cog`` also writes the mosaic as ``maps/<band>_YYYYMMDD.tif`` once all tiles
    are done). Finished outputs are skipped unless ``overwrite`` (a re-run resumes) — but only if their
    provenance tags (``model_sha256``, ``input_items``, ``variables``, ...) equal this run's; otherwise they
    are redone, each replaced atomically. ``maps/catalog.json`` (STAC) describes all outputs on disk, each
    item built from its files' own tags.

    Parameters
    ----------
    cfg : run configuration.
    overwrite : redo finished outputs even when their provenance equals this run's.
    progress : progress bar on stderr.
    scheduler : ``threads``, ``processes``, ``local`` (dask.distributed LocalCluster) or ``tcp://host:port``.
    workers : parallel task slots (default: all CPUs).
    tiles : tile indices (X, Y) to map.
    bbox : map the tiles intersecting this (xmin, ymin, xmax, ymax) in the grid CRS.
    tile_size : tile edge in pixels (default :data:`geoflux.tiles.DEFAULT_TILE_PIXELS`).
    inference : ``library``, ``compiled`` or ``auto`` (see :mod:`geoflux.inference`).
    mosaic_cog : with tiles, convert complete mosaics to COGs.
    echo : progress messages (dashboard address, inference used).
    """
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.inference import prepare
    from geoflux.mapping import band_spec, redo_reason, write_maps
    from geoflux.model import load_model
    from geoflux.scheduler import open_scheduler
    from geoflux.tiles import TileScheme, tile_pixels

    model_path = _read_stage(cfg, MODEL, "train")
    model = load_model(model_path)
    model, how = prepare(model, inference, cfg.out_dir / "model" / "compiled")
    echo(f"map: {how}")
    geobox = target_grid(cfg.grid)
    sha = json.loads(model_path.with_suffix(".json").read_text())["sha256"]
    tags = {
        "software": f"geoflux {geoflux.__version__}",
        "model_sha256": sha,
        "model_kind": cfg.model.kind,
        "config_sha256": config_sha256(cfg),
        "catalog": catalog_uri(cfg),
        "variables": ",".join(v.name for v in cfg.variables),
    }
    periods, period_end = cfg.period_bounds()
    end_of = dict(zip(periods, period_end, strict=True))
    bands = tuple(model.bands)

    def outputs_for(folder: Path | None, cube) -> dict[int, list]:
        # input_items from the items this cube was loaded from (a tile's cube: the tile's items)
        item_ids = _input_item_ids(cfg, cube)
        per_band = {b: map_paths(cfg, b, folder) for b in bands}
        out = {}
        for i, p in enumerate(periods):
            ptags = {
                **tags,
                "period_start": f"{p:%Y-%m-%d}",
                "period_end": f"{end_of[p]:%Y-%m-%d}",
                "period": cfg.time.step,
                "input_items": item_ids[p],
            }
            out[i] = [band_spec(b, per_band[b][p], model.target_units, ptags) for b in bands]
        return out

    tiled = tiles is not None or bbox is not None
    # Files are about to be replaced: a run that dies before the end leaves no catalog rather than one that
    # describes the files it replaced (the next run writes it again from the files on disk).
    _drop_catalog_maps(cfg)
    # Existing outputs are kept only if their provenance tags equal this run's (same model, inputs,
    # variables): after a retrain they are redone rather than kept under a catalog naming the new model.
    with open_scheduler(scheduler, workers=workers, echo=echo) as sched:
        if not tiled:
            cube = cube_from_config(cfg)
            written = write_maps(
                cube,
                model,
                cfg.variables,
                geobox,
                outputs_for(None, cube),
                sched,
                overwrite=overwrite,
                progress=progress,
                echo=echo,
            )
        else:
            scheme = TileScheme(geobox, tile_pixels(cfg.grid.chunk, tile_size))
            chosen = [scheme.tile(x, y) for x, y in tiles or []]
            if bbox is not None:
                chosen += [t for t in scheme.tiles_in_bbox(bbox) if t not in chosen]
            written = []
            for tile in chosen:
                folder = cfg.out_dir / MAPS / scheme.folder / tile.id
                cube = _tile_cube(cfg, tile.geobox)
                outputs = outputs_for(folder, cube)
                specs = [s for specs in outputs.values() for s in specs]
                if not overwrite and all(redo_reason(s) is None for s in specs):
                    written += [s.path for s in specs]
                    continue
                echo(f"map: tile {tile.id} ({tile.geobox.shape[1]} x {tile.geobox.shape[0]} px)")
                written += write_maps(
                    cube,
                    model,
                    cfg.variables,
                    tile.geobox,
                    outputs,
                    sched,
                    overwrite=overwrite,
                    progress=progress,
                    echo=echo,
                )
    # STAC items are built from each file's own tags, so the catalog describes the bytes on disk
    collections = {}
    full = {b: map_paths(cfg, b) for b in bands}
    items = [
        _map_item(cfg, {b: full[b][p] for b in bands}, f"nee-{p:%Y%m%d}", p)
        for p in periods
        if all(full[b][p].exists() for b in bands)
    ]
    if items:
        collections[MAP_COLLECTIONS[0]] = items
    if tiled:
        tile_items = _mosaic_tiles(cfg, scheme, bands, model.target_units, mosaic_cog)
        tile_items = [_map_item(cfg, files, iid, p) for files, iid, p in tile_items]
        if tile_items:
            collections[MAP_COLLECTIONS[1]] = tile_items
    # the time cube and VRT stacks exist only while every full-grid file does (else they would mix runs)
    assets = write_map_products(cfg, bands, echo=echo, progress=progress)
    if collections:
        save_catalog_maps(cfg, collections, geobox, assets=assets)
    return written


MAP_CUBE = f"{MAPS}/nee.zarr"


def _drop_map_products(cfg: RunConfig, bands) -> None:
    from geoflux.atomic import _remove
    from geoflux.mapping import band_stem

    _remove(cfg.out_dir / MAP_CUBE)
    for b in bands:
        (cfg.out_dir / MAPS / f"{band_stem(b)}.vrt").unlink(missing_ok=True)


def write_map_products(
    cfg: RunConfig, bands, echo: Callable[[str], None] = log.info, progress: bool = False
) -> dict:
    """The time-aware products of the finished full-grid COGs: ``maps/nee.zarr`` and ``maps/<band>.vrt``.

    Written (or kept, when the cube was made from exactly these files) only when every band of every period
    exists; otherwise stale ones are removed. See :mod:`geoflux.outputs`.

    Returns
    -------
    STAC collection-level assets (key → pystac.Asset) of what is on disk.
    """
    import pystac
    import rasterio
    from odc.geo.geobox import GeoBox

    from geoflux.mapping import band_dtype, band_quantity, band_stem, band_units
    from geoflux.outputs import write_band_vrt, write_time_cube

    files = {b: map_paths(cfg, b) for b in bands}
    if not all(f.exists() for per in files.values() for f in per.values()):
        _drop_map_products(cfg, bands)
        return {}
    path, written = write_time_cube(files, cfg.out_dir / MAP_CUBE, chunk=cfg.grid.chunk)
    if written:
        echo(f"map: time cube {path}")
    with rasterio.open(files["NEE"][cfg.periods()[0]]) as src:
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
            cfg.out_dir / MAPS / f"{band_stem(b)}.vrt",
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
            roles=_band_roles(b),
        )
    return assets


MAP_COLLECTIONS = ("geoflux-nee", "geoflux-nee-tiles")


def _drop_catalog_maps(cfg: RunConfig) -> None:
    """Remove ``maps/catalog.json`` and the collection folders :func:`save_catalog_maps` writes."""
    import shutil

    root = cfg.out_dir / MAPS
    (root / "catalog.json").unlink(missing_ok=True)
    for cid in MAP_COLLECTIONS:
        if (root / cid / "collection.json").exists():
            shutil.rmtree(root / cid)


def save_catalog_maps(cfg: RunConfig, collections: dict, geobox, assets: dict | None = None) -> Path:
    """Write ``maps/catalog.json`` describing the map outputs (one collection per kind).

    Each collection gets ``item_assets`` (every band's role, unit, nodata and data type), summaries, the
    licence (:data:`MAP_LICENSE`) with its link, geoflux as processor, and ``assets`` (the time cube and
    VRT stacks, on the full-grid collection). Replaces the catalog written before (collections or items
    that are gone leave nothing behind).
    """
    import pystac

    from geoflux.cog import save_catalog

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

    _drop_catalog_maps(cfg)
    return save_catalog(
        cfg.out_dir / MAPS, "geoflux-maps", "geoflux NEE maps", collections, geobox, decorate=decorate
    )


def _mosaic_tags(files: list[Path]) -> dict[str, str] | None:
    """Tags of a mosaic of ``files``: the tags they share, ``input_items`` the union of theirs.

    None when the files were made by different models or from different variables (a mosaic of them would
    have no single provenance).
    """
    import rasterio

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


def _mosaic_tiles(cfg: RunConfig, scheme, bands, target_units: str, mosaic_cog: bool) -> list:
    """VRT mosaics of every finished tile per band and period (and COGs of complete ones if asked).

    A mosaic COG gets the tags its tiles share (``input_items``: their union); it is (re)written when its
    tags differ from those, and not at all when the tiles come from different models.

    Returns (band files, item id, period) of every finished tile output, for STAC items.
    """
    from geoflux.cog import mosaic_to_cog
    from geoflux.mapping import band_spec, band_stem, redo_reason
    from geoflux.tiles import write_vrt

    root = cfg.out_dir / MAPS
    n_tiles = scheme.shape[0] * scheme.shape[1]
    found = []
    for p in cfg.periods():
        per_band: dict[str, list] = {b: [] for b in bands}
        for tile in scheme.tiles():
            folder = root / scheme.folder / tile.id
            files = {b: map_paths(cfg, b, folder)[p] for b in bands}
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
            tags = _mosaic_tags([f for f, _, _ in sources])
            if tags is None:
                log.warning("map: %s: tiles made by different models; no mosaic COG", vrt)
                continue
            cog = dataclasses.replace(spec, path=vrt.with_suffix(".tif"), tags={**tags, **spec.tags})
            if redo_reason(cog) is not None:
                mosaic_to_cog(vrt, cog)
    return found


def _training_sites(cfg: RunConfig) -> list[str] | None:
    """Sites the model was fitted on (model card ``provenance.sites``); None without a model card."""
    return layout(cfg).training_sites()


def stage_validate(cfg: RunConfig) -> dict:
    """Score maps against the truth (if configured), the CV results and the towers; writes metrics.json.

    Besides ``truth`` (``nse``, ``rmse``, ``bias``, ``n``), ``cv`` and ``towers`` (pooled footprint-weighted
    ``nse``, ``r2_pearson``, ``rmse``, ``bias`` in gC m-2 d-1, from the same paired table as the skill tables,
    map rows of every role; :func:`geoflux.validate.tower_summary`), metrics.json gets
    ``footprint_validation``: skill tables (bias, RMSE, NSE, r² (Pearson), RMA slope) overall, per IGBP
    class, per representativeness class, per site and inside/outside the AOA, with training sites, held-out
    sites and the CV's held-out predictions always in separate rows; and ``multiscale`` (held-out skill per
    time scale) when the analysis module is installed. The paired table goes to
    ``validation/pairs.parquet`` and each skill table to ``validation/skill_<stratum>.csv``.
    """
    from geoflux.cube import target_grid
    from geoflux.validate import open_geotiff_series, tower_summary, truth_scores, validate_maps

    paths = map_paths(cfg)
    missing = [p for p in paths.values() if not p.exists()]
    if missing:
        raise GeofluxError(f"{missing[0]}: map not found (run 'geoflux map' first)")
    metrics: dict = {"units": "gC m-2 d-1", "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    truths = check_truth_alignment(cfg)
    if truths is not None:
        metrics["truth"] = truth_scores(list(paths.values()), [truths[p] for p in paths])
        if cfg.model.aoa:
            # generated worlds: is the map better inside its area of applicability than outside?
            from geoflux.analysis import aoa_truth_scores

            metrics["truth_aoa"] = aoa_truth_scores(cfg)
    cv_path = cfg.out_dir / CV_METRICS
    if cv_path.exists():
        metrics["cv"] = json.loads(cv_path.read_text())
    obs = pd.read_parquet(_read_stage(cfg, OBSERVATIONS, "towers"))
    sites = load_sites(cfg).loc[lambda s: s.index.isin(obs["site"].unique())]
    fps = footprints_for(cfg, sites)
    cv_pred_path = cfg.out_dir / CV_PREDICTIONS
    cv_pred = pd.read_parquet(cv_pred_path) if cv_pred_path.exists() else None
    val = validate_maps(
        open_geotiff_series(paths),
        sites,
        obs,
        footprints=fps,
        footprint_geobox=target_grid(cfg.grid),
        radius=cfg.footprint.radius,
        training_sites=_training_sites(cfg),
        cv_predictions=cv_pred,
    )
    # one pairing pass: the headline towers scores are the skill tables' own pairs, pooled over roles
    metrics["towers"] = tower_summary(val, fps)
    metrics["footprint_validation"] = val.to_dict()
    if cv_pred is not None:
        try:
            from geoflux.analysis import multiscale_scores
        except ImportError:  # the analysis module is optional
            multiscale_scores = None
        if multiscale_scores is not None:
            metrics["multiscale"] = multiscale_scores(cv_pred)
    _write_parquet(val.pairs, cfg.out_dir / VALIDATION_PAIRS)
    for name, table in val.tables.items():
        with atomic_path(cfg.out_dir / f"validation/skill_{name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
    _write_json(metrics, cfg.out_dir / METRICS)
    return metrics


def stage_report(cfg: RunConfig, dates: list[str] | None = None) -> Path:
    """Write ``report/index.html`` with its PNG figures from the run's outputs (see :mod:`geoflux.report`)."""
    from geoflux.report import write_report

    _read_stage(cfg, METRICS, "validate")
    return write_report(cfg, dates=dates)


def run(
    cfg: RunConfig, overwrite: bool = False, progress: bool = True, echo: Callable[[str], None] = log.info
) -> dict:
    """Run every stage in order and return the validation metrics.

    The towers stage checks its inputs (tower files, site table, towers inside the grid) before it writes
    anything, so a bad input leaves no partial output.
    """
    # cheap checks of inputs that only later stages read, so a mismatch stops the run before any work
    check_truth_alignment(cfg)
    echo("towers: QC, aggregation and footprints")
    stage_towers(cfg, echo=echo)
    echo("extract: footprint-weighted drivers at towers")
    stage_extract(cfg)
    echo("train: site-grouped cross-validation and fit")
    stage_train(cfg)
    echo("map: chunk-wise prediction to COGs")
    stage_map(cfg, overwrite=overwrite, progress=progress)
    echo("validate")
    metrics = stage_validate(cfg)
    echo(f"report: {stage_report(cfg)}")
    return metrics
