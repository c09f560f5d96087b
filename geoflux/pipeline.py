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

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

import geoflux
from geoflux import towers as tw
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig
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
    if cfg.model.target == "partitioned":  # RECO and GPP for the two heads of the model
        records = _partitioned(records, cfg, echo)
    filtered = tw.qc_filter(records, qc_max=cfg.towers.qc_max)
    starts, ends = cfg.period_bounds()
    obs = tw.aggregate(filtered, starts, min_coverage=cfg.towers.min_coverage, end=ends[-1])
    if obs.empty:
        raise GeofluxError(
            f"{cfg.towers.files}: no tower period in {cfg.time.start}..{cfg.time.end} reaches "
            f"min_coverage={cfg.towers.min_coverage}"
        )
    layout(cfg).write_parquet(OBSERVATIONS, obs)
    save_footprints(fps, cfg.out_dir / FOOTPRINTS, geobox=target_grid(cfg.grid))
    with atomic_path(cfg.out_dir / FOOTPRINT_METHODS) as tmp:
        methods.to_csv(tmp, index=False)
    _report_footprints(methods, cfg.footprint.fallback, echo)
    return obs


def _partitioned(records: pd.DataFrame, cfg: RunConfig, echo: Callable[[str], None]) -> pd.DataFrame:
    """Records with RECO and GPP for every site (:func:`~geoflux.towers.processing.partition.
    complete_partitioning`); its refusal as this run's one-line error."""
    from geoflux.towers.processing.partition import complete_partitioning

    try:
        records, n_files, n_here = complete_partitioning(records)
    except ValueError as exc:
        raise GeofluxError(f"{cfg.towers.files}: model.target partitioned: {exc}") from None
    echo(
        f"partitioned fluxes: {n_files} site(s) from their files (ONEFlux night-time), "
        f"{n_here} partitioned here (night-time, per site and year)"
    )
    return records


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

    obs = layout(cfg).read_parquet(OBSERVATIONS)
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
    layout(cfg).write_parquet(TRAINING, table)
    layout(cfg).write_parquet(PIXELS, training_table(pixels, obs))
    return table


def stage_train(cfg: RunConfig) -> dict:
    """Site-grouped cross-validation, then a fit on all sites (with the uncertainty band calibrated on the
    grouped CV and the area of applicability); writes model, CV predictions and metrics."""
    from geoflux.extract import harden_classes
    from geoflux.features import class_groups
    from geoflux.model import save_model, train

    table = layout(cfg).read_parquet(TRAINING)
    pixels = layout(cfg).read_parquet(PIXELS)
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
        class_groups=class_groups(cfg.variables),
    )
    layout(cfg).write_parquet(CV_PREDICTIONS, cv_pred)
    layout(cfg).write_json(CV_METRICS, cv)
    save_model(model, cfg.out_dir / MODEL)
    return cv


def map_paths(cfg: RunConfig, band: str = "NEE", folder: Path | None = None) -> dict[pd.Timestamp, Path]:
    """Output map path per period start: ``maps/<band>_YYYYMMDD.tif`` (``nee_...`` for NEE).

    ``folder`` replaces ``maps/`` (tile outputs live in ``maps/tiles-<size>/x<X>_y<Y>/``).
    """
    return layout(cfg).map_paths(cfg.periods(), band, folder)


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
    inference: str = "auto",
    mosaic_cog: bool = False,
    echo: Callable[[str], None] = log.info,
) -> list[Path]:
    """Predict every model band chunk by chunk and stream it into one COG per band and time step.

    Without ``tiles``/``bbox`` the whole grid is mapped to ``maps/<band>_YYYYMMDD.tif``; with them, the
    selected tiles of the fixed tiling (:mod:`geoflux.mapping.tiles`) are mapped to
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
    tile_size : tile edge in pixels (default :data:`geoflux.mapping.tiles.DEFAULT_TILE_PIXELS`).
    inference : ``library``, ``compiled`` or ``auto`` (see :mod:`geoflux.inference`).
    mosaic_cog : with tiles, convert complete mosaics to COGs.
    echo : progress messages (dashboard address, inference used).
    """
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.inference import prepare
    from geoflux.mapping import write_maps, write_tiles
    from geoflux.mapping.products import band_specs, drop_catalog_maps, publish_maps
    from geoflux.mapping.scheduler import open_scheduler
    from geoflux.mapping.tiles import TileScheme, tile_pixels
    from geoflux.model import load_model

    run = layout(cfg)
    model_path = layout(cfg).require(MODEL)
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
    bands = tuple(model.bands)

    def outputs_for(folder: Path | None, cube) -> dict[int, list]:
        # input_items from the items this cube was loaded from (a tile's cube: the tile's items)
        return band_specs(
            run, cube, periods, period_end, cfg.time.step, bands, model.target_units, tags, folder
        )

    tiled = tiles is not None or bbox is not None
    # Files are about to be replaced: a run that dies before the end leaves no catalog rather than one that
    # describes the files it replaced (the next run writes it again from the files on disk).
    drop_catalog_maps(run)
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
            written = write_tiles(
                chosen,
                lambda gb: cube_from_config(cfg, geobox=gb),
                lambda tile, cube: outputs_for(cfg.out_dir / MAPS / scheme.folder / tile.id, cube),
                model,
                cfg.variables,
                sched,
                overwrite=overwrite,
                progress=progress,
                echo=echo,
            )
    publish_maps(
        run,
        periods,
        cfg.time.step,
        bands,
        geobox,
        cfg.grid.chunk,
        scheme=scheme if tiled else None,
        target_units=model.target_units,
        mosaic_cog=mosaic_cog,
        echo=echo,
    )
    return written


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
    from geoflux.validate import (
        aoa_truth_scores,
        open_geotiff_series,
        tower_summary,
        truth_scores,
        validate_maps,
    )

    # the model card says which sites were trained on: without it no score could be labelled held-out
    layout(cfg).require(MODEL)
    paths = map_paths(cfg)
    missing = [p for p in paths.values() if not p.exists()]
    if missing:
        raise GeofluxError(f"{missing[0]}: map not found (run 'geoflux map' first)")
    metrics: dict = {"units": "gC m-2 d-1", "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    truths = check_truth_alignment(cfg)
    if truths is not None:
        true_maps = [truths[p] for p in paths]
        aoa_maps = list(map_paths(cfg, "AOA").values())
        if cfg.model.aoa and all(p.exists() for p in aoa_maps):
            # generated worlds: is the map better inside its area of applicability than outside? Scored
            # from the written NEE, AOA and band maps in one pass (the files users get, not a re-prediction)
            band = [list(map_paths(cfg, b).values()) for b in ("NEE_q05", "NEE_q95")]
            has_band = all(p.exists() for paths_b in band for p in paths_b)
            by_aoa = aoa_truth_scores(
                list(paths.values()), true_maps, aoa_maps, *(band if has_band else (None, None))
            )
            metrics["truth"] = {k: by_aoa["all"][k] for k in ("nse", "rmse", "bias", "n")}
            metrics["truth_aoa"] = by_aoa
            threshold = (layout(cfg).model_card() or {}).get("aoa_threshold")
            if threshold is not None:
                metrics["truth_aoa"]["threshold"] = threshold
        else:
            metrics["truth"] = truth_scores(list(paths.values()), true_maps)
    cv_path = cfg.out_dir / CV_METRICS
    if cv_path.exists():
        metrics["cv"] = json.loads(cv_path.read_text())
    obs = layout(cfg).read_parquet(OBSERVATIONS)
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
    layout(cfg).write_parquet(VALIDATION_PAIRS, val.pairs)
    for name, table in val.tables.items():
        with atomic_path(cfg.out_dir / f"validation/skill_{name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
    layout(cfg).write_json(METRICS, metrics)
    return metrics


def stage_report(cfg: RunConfig, dates: list[str] | None = None) -> Path:
    """Write ``report/index.html`` with its PNG figures from the run's outputs (see :mod:`geoflux.report`)."""
    from geoflux.report import write_report

    layout(cfg).require(METRICS)
    return write_report(cfg, dates=dates)


def run(
    cfg: RunConfig,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = log.info,
    inference: str = "auto",
) -> dict:
    """Run every stage in order and return the validation metrics.

    The towers stage checks its inputs (tower files, site table, towers inside the grid) before it writes
    anything, so a bad input leaves no partial output. Each stage's wall time (s) is echoed when it ends and
    returned under ``stage_seconds`` (not written to metrics.json, which describes the maps).
    ``inference`` is the map stage's (default ``auto``: compiled trees only where they agree with the
    library and were measured faster; see :mod:`geoflux.inference`).
    """
    # cheap checks of inputs that only later stages read, so a mismatch stops the run before any work
    check_truth_alignment(cfg)
    seconds: dict[str, float] = {}

    def timed(name: str, what: str, call: Callable[[], Any]) -> Any:
        echo(f"{name}: {what}")
        t0 = time.perf_counter()
        out = call()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    timed("towers", "QC, aggregation and footprints", lambda: stage_towers(cfg, echo=echo))
    timed("extract", "footprint-weighted drivers at towers", lambda: stage_extract(cfg))
    timed("train", "site-grouped cross-validation and fit", lambda: stage_train(cfg))
    timed(
        "map",
        "chunk-wise prediction to COGs",
        lambda: stage_map(cfg, overwrite=overwrite, progress=progress, inference=inference, echo=echo),
    )
    metrics = timed("validate", "maps vs truth and towers", lambda: stage_validate(cfg))
    report = timed("report", "figures and report/index.html", lambda: stage_report(cfg))
    echo(f"report: {report}")
    echo("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return {**metrics, "stage_seconds": seconds}
