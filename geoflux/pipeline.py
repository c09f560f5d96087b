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
import glob
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import geoflux
from geoflux import towers as tw
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig
from geoflux.errors import GeofluxError
from geoflux.features import feature_names, feature_units

log = logging.getLogger("geoflux")

OBSERVATIONS = "towers/observations.parquet"
FOOTPRINTS = "towers/footprints.npz"
CUBE = "cube.zarr"
TRAINING = "training/training.parquet"
MODEL = "model/model.skops"
CV_PREDICTIONS = "model/cv_predictions.parquet"
CV_METRICS = "model/cv_metrics.json"
MAPS = "maps"
METRICS = "validation/metrics.json"


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def _write_json(obj: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return path


def _read_stage(cfg: RunConfig, rel: str, producer: str) -> Path:
    path = cfg.out_dir / rel
    if not path.exists():
        raise GeofluxError(f"{path}: not found (run 'geoflux {producer}' first)")
    return path


def load_sites(cfg: RunConfig) -> pd.DataFrame:
    """The site table restricted to sites that have a tower file."""
    sites = tw.read_sites(cfg.path(cfg.towers.sites))
    return sites


def stage_towers(cfg: RunConfig) -> pd.DataFrame:
    """Read, QC-filter and aggregate tower files to the model time step, and compute each tower's footprint.

    Everything is checked (files, site table, towers inside the grid) before anything is written; then the
    observations table and the footprints are written.
    """
    from geoflux.cube import target_grid
    from geoflux.extract import tower_footprints
    from geoflux.footprint import save_footprints

    sites = load_sites(cfg)
    records = tw.read_towers(str(cfg.path(cfg.towers.files)), sites)
    fps = tower_footprints(sites.loc[sites.index.isin(records["site"].unique())], target_grid(cfg.grid),
                           cfg.footprint, records=records)
    filtered = tw.qc_filter(records, qc_max=cfg.towers.qc_max)
    obs = tw.aggregate(filtered, cfg.periods(), min_coverage=cfg.towers.min_coverage)
    if obs.empty:
        raise GeofluxError(
            f"{cfg.towers.files}: no tower period in {cfg.time.start}..{cfg.time.end} reaches "
            f"min_coverage={cfg.towers.min_coverage}"
        )
    _write_parquet(obs, cfg.out_dir / OBSERVATIONS)
    save_footprints(fps, cfg.out_dir / FOOTPRINTS)
    return obs


def footprints_for(cfg: RunConfig, sites: pd.DataFrame) -> dict:
    """Footprint weights (written by the towers stage) of the given sites."""
    from geoflux.footprint import load_footprints

    fps = load_footprints(_read_stage(cfg, FOOTPRINTS, "towers aggregate"))
    return {s: fw for s, fw in fps.items() if s in sites.index}


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
    drivers = extract_drivers(cube, fps, cfg.variables)
    table = training_table(drivers, obs)
    if table.empty:
        raise GeofluxError("extract: no tower observation coincides with driver data (check time range)")
    _write_parquet(table, cfg.out_dir / TRAINING)
    return table


def stage_train(cfg: RunConfig) -> dict:
    """Site-grouped cross-validation, then a fit on all sites (with the uncertainty band calibrated on the
    grouped CV and the area of applicability); writes model, CV predictions and metrics."""
    from geoflux.model import save_model, train

    table = pd.read_parquet(_read_stage(cfg, TRAINING, "extract"))
    features = feature_names(cfg.variables)
    model, cv_pred, cv = train(
        table,
        features,
        feature_units(cfg.variables),
        cfg.model,
        provenance={"catalog": cfg.catalog, "towers": cfg.towers.files},
        sites=load_sites(cfg),
    )
    _write_parquet(cv_pred, cfg.out_dir / CV_PREDICTIONS)
    _write_json(cv, cfg.out_dir / CV_METRICS)
    save_model(model, cfg.out_dir / MODEL)
    return cv


def map_paths(cfg: RunConfig) -> dict[pd.Timestamp, Path]:
    """Output map path per period start."""
    return {p: cfg.out_dir / MAPS / f"nee_{p:%Y%m%d}.tif" for p in cfg.periods()}


def stage_map(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Predict NEE over the cube chunk by chunk and stream it into one COG per time step.

    Finished maps are skipped unless ``overwrite`` (a re-run resumes); a STAC catalog describes them.
    """
    from geoflux.cog import RasterSpec, save_catalog, stac_item_for_cog, write_cogs
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.mapping import predict_map
    from geoflux.model import load_model

    model_path = _read_stage(cfg, MODEL, "train")
    model = load_model(model_path)
    geobox = target_grid(cfg.grid)
    cube = cube_from_config(cfg)
    nee = predict_map(cube, model, cfg.variables)
    paths = map_paths(cfg)
    sha = json.loads(model_path.with_suffix(".json").read_text())["sha256"]
    tags = {
        "software": f"geoflux {geoflux.__version__}",
        "model_sha256": sha,
        "model_kind": cfg.model.kind,
        "catalog": cfg.catalog,
        "variables": ",".join(v.name for v in cfg.variables),
        "quantity": "net ecosystem exchange (positive = CO2 source to the atmosphere)",
    }
    arrays, specs = [], []
    for i, (p, path) in enumerate(paths.items()):
        arrays.append(nee.data[i])
        specs.append(
            RasterSpec(
                path,
                units=model.target_units,
                description="NEE",
                tags={**tags, "period_start": f"{p:%Y-%m-%d}", "period": cfg.time.step},
            )
        )
    write_cogs(arrays, geobox, specs, overwrite=overwrite, progress=progress)
    step = pd.tseries.frequencies.to_offset(cfg.time.step)
    items = [
        stac_item_for_cog(
            path,
            geobox,
            f"nee-{p:%Y%m%d}",
            p.to_pydatetime(),
            (p + step).to_pydatetime(),
            properties={"geoflux:units": model.target_units, "geoflux:model_sha256": sha},
            asset_title=f"NEE ({model.target_units})",
        )
        for p, path in paths.items()
    ]
    save_catalog(cfg.out_dir / MAPS, "geoflux-maps", "geoflux NEE maps", {"geoflux-nee": items}, geobox)
    return list(paths.values())


VALIDATION_PAIRS = "validation/pairs.parquet"
REPORT = "report/index.html"


def _training_sites(cfg: RunConfig) -> list[str] | None:
    """Sites the model was fitted on (model card ``provenance.sites``); None without a model card."""
    card = (cfg.out_dir / MODEL).with_suffix(".json")
    if not card.exists():
        return None
    sites = json.loads(card.read_text()).get("provenance", {}).get("sites")
    return [str(s) for s in sites] if sites is not None else None


def stage_validate(cfg: RunConfig) -> dict:
    """Score maps against the truth (if configured), the CV results and the towers; writes metrics.json.

    Besides ``truth``, ``cv`` and ``towers`` (pooled footprint-weighted scores), metrics.json gets
    ``footprint_validation``: skill tables (bias, RMSE, R², NSE, RMA slope) overall, per IGBP class, per
    representativeness class, per site and inside/outside the AOA, with training sites, held-out sites and
    the CV's held-out predictions always in separate rows; and ``multiscale`` (held-out skill per time
    scale) when the analysis module is installed. The paired table goes to ``validation/pairs.parquet`` and
    each skill table to ``validation/skill_<stratum>.csv``.
    """
    from geoflux.cube import target_grid
    from geoflux.validate import open_geotiff_series, tower_scores, truth_scores, validate_maps

    paths = map_paths(cfg)
    missing = [p for p in paths.values() if not p.exists()]
    if missing:
        raise GeofluxError(f"{missing[0]}: map not found (run 'geoflux map' first)")
    metrics: dict = {"units": "gC m-2 d-1", "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    if cfg.truth:
        truths = sorted(glob.glob(str(cfg.path(cfg.truth))))
        if len(truths) != len(paths):
            raise GeofluxError(f"{cfg.truth}: {len(truths)} truth rasters for {len(paths)} map time steps")
        metrics["truth"] = truth_scores(list(paths.values()), [Path(t) for t in truths])
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
    _, metrics["towers"] = tower_scores(paths, fps, obs)
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
    echo("towers: QC, aggregation and footprints")
    stage_towers(cfg)
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


def summarize_metrics(metrics: dict) -> str:
    """A short human summary of metrics.json."""
    lines = [f"NEE maps validated (units {metrics.get('units', '?')}):"]
    if "truth" in metrics:
        t = metrics["truth"]
        lines.append(
            f"  map vs true field : R2 {t['r2']:.3f}  RMSE {t['rmse']:.3f}  bias {t['bias']:+.3f}"
            f"  (n={t['n']} pixel-steps)"
        )
    if "cv" in metrics:
        c = metrics["cv"]
        lines.append(
            f"  {c['scheme']} CV: R2 {c['r2']:.3f}  RMSE {c['rmse']:.3f}  "
            f"median site NSE {c['nse_site_median']:.3f}  ({c['n_sites']} sites)"
        )
    if "towers" in metrics and "r2" in metrics["towers"]:
        w = metrics["towers"]
        lines.append(
            f"  map vs towers (footprint-weighted): R2 {w['r2']:.3f}  RMSE {w['rmse']:.3f}  "
            f"bias {w['bias']:+.3f}"
        )
    return "\n".join(lines)
