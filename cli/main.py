"""The ``geoflux`` command line: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

import geoflux
from geoflux.errors import GeofluxError

CONFIG_HELP = (
    "Run configuration (YAML); see README 'Configuration'. Relative paths resolve against its folder."
)


log = logging.getLogger("geoflux")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _fail_cleanly(fn: Callable) -> Callable:
    """Turn any failure into one line ``error: <message>`` on stderr and exit status 1 (no traceback).

    A :class:`GeofluxError` already names its culprit. An OSError the library did not anticipate (disk
    full, permissions) names its file. Anything else is a bug: it is still one line, marked as an internal
    error, and ``-vv`` logs the traceback. Click's own usage errors pass through (exit status 2).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except GeofluxError as exc:
            message = " ".join(str(exc).split("\n"))  # a message is one line, even a careless one
        except OSError as exc:
            # rasterio/GDAL errors are OSErrors whose text names the file but whose filename is unset
            message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else _first_line(exc)
        except Exception as exc:
            log.debug("internal error", exc_info=True)
            message = (
                f"internal error: {type(exc).__name__}: {_first_line(exc)} "
                "(please report it; -vv shows the traceback)"
            )
        click.echo(f"error: {message}", err=True)
        sys.exit(1)

    return wrapper


def _check_output_dir(path: Path, what: str = "output") -> None:
    """Refuse, before any work is done, an output folder that cannot be created or written.

    Missing folders are created for the test and removed again, so a refused run leaves nothing behind.
    A write probe (a temporary file, deleted at once) catches what permission bits do not tell (root on a
    read-only mount, /proc).
    """
    import tempfile

    from geoflux.errors import OutputError

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{what}: {existing}: is a file, not a folder (expected {path} to be a folder, not in a file)"
        )
    created = []
    try:
        for folder in reversed([path, *path.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".geoflux-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"{what}: {path}: cannot create or write the folder ({exc.strerror or _first_line(exc)}; "
            "expected a writable folder)"
        ) from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _load(config: Path):
    from geoflux.config import load_config

    cfg = load_config(config)
    _check_output_dir(cfg.out_dir, f"{config}: output")
    return cfg


# Set by the group from -q/--quiet: progress bars and informational lines on stderr are left out (warnings
# and errors are not).
_QUIET = {"on": False}


def _quiet() -> bool:
    return _QUIET["on"]


def _info(message: str) -> None:
    """An informational line on stderr (left out with -q)."""
    if not _quiet():
        click.echo(message, err=True)


def _refuse_existing(paths, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing output unless --overwrite (one line naming it).

    A folder counts as existing when it has any content (an empty one is simply used).
    """
    from geoflux.errors import OutputExistsError

    if overwrite:
        return
    for p in paths:
        p = Path(p)
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            raise OutputExistsError(f"{p}: exists (expected a new output, or --overwrite to replace it)")


def _stage_outputs(cfg, *names: str) -> list[Path]:
    from geoflux import pipeline

    return [cfg.out_dir / getattr(pipeline, n) for n in names]


OVERWRITE_HELP = "Replace outputs that exist (default: refuse with an error naming the first one)."
overwrite_opt = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
json_opt = click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON on stdout.")
config_arg = click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
scheduler_opt = click.option(
    "--scheduler",
    default="threads",
    show_default=True,
    metavar="threads|processes|local|tcp://HOST:PORT",
    help="Where chunks run: threads, processes, a local dask.distributed cluster, or an existing one.",
)
workers_opt = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Threads/processes (default: all CPUs)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(geoflux.__version__, prog_name="geoflux")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bars or informational lines (errors, warnings stay)."
)
def cli(verbose: int, quiet: bool) -> None:
    """geoflux: flux-tower NEE → footprint-aware NEE maps (Cloud-Optimized GeoTIFF, Zarr, STAC).

    Most verbs take CONFIG, the run configuration (YAML; relative paths resolve against its folder; see
    README 'Configuration'), and read the previous stage's files from its output folder:

    \b
      demo              generate a world with known true NEE and run everything on it
      run               all stages below in order (towers → ... → report)
      towers aggregate  tower files → towers/observations.parquet (NEE gC m-2 d-1) + footprints
      towers summary    years, coverage and gaps of tower files (writes nothing)
      towers analyze    one tower's carbon dynamics: gap-filling, partitioning, budgets
      towers model      tower-only NEE model with leave-one-site-out skill
      cube              driver cube on the grid → cube.zarr (for inspection)
      extract           drivers in each tower footprint → training/training.parquet
      train             site-grouped CV + fit → model/model.skops, model/cv_metrics.json
      map               chunk-wise prediction → maps/nee_YYYYMMDD.tif (COG, gC m-2 d-1),
                        maps/nee.zarr (time cube), maps/<band>.vrt, maps/catalog.json (STAC)
      validate          maps vs truth/towers → validation/metrics.json (or maps made elsewhere)
      report            report/index.html from the run's outputs
      analyze           driver importance, dependence, anomalies, scenarios → analysis/
      budgets           annual budgets with 90 % intervals from the maps → budgets/
      attribute         each year's budget anomaly by driver, through the model → analysis/attribution*
      project           scenario maps (all bands) and budgets → maps/scenarios/, budgets/scenarios/

    Verbs that write refuse to replace existing outputs unless --overwrite (`map` resumes: it keeps finished
    maps whose provenance equals the run's). Errors are one line: `error: <file or key>: <what>`, exit 1.
    """
    _QUIET["on"] = quiet
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("geoflux").setLevel(level)


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("geoflux-demo"),
    show_default=True,
    help="Output folder: world/, config.yaml, maps/, validation/ ...",
)
@click.option(
    "--size",
    type=click.Choice(["tiny", "default", "multiyear", "tiny-multiyear"]),
    default="default",
    show_default=True,
    help="World size: 'default' 256x256 px at 250 m, 46 8-day steps, 30 towers; 'tiny' for tests; "
    "'multiyear' 128x128 px, three years in MODIS 8-day periods (a warm spring, a drought summer, a cloudy "
    "year; about 5 min and 1.0 GB on 2 cores); 'tiny-multiyear' the same three years on 32x32 px. The "
    "multi-year worlds' configurations set model.target: partitioned (RECO and GPP learnt separately, for "
    "attribution and projection).",
)
@click.option("--seed", type=int, default=None, help="Random seed of the world (default: the size's seed).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Write into a non-empty OUT (replacing world/, config.yaml) and redo maps.",
)
@_fail_cleanly
def demo(out: Path, size: str, seed: int | None, overwrite: bool) -> None:
    """Generate a demo world (STAC catalog of COG drivers, FLUXNET-format towers, true NEE) and map it.

    Writes OUT/world/, OUT/config.yaml, then runs the same code path as `geoflux run OUT/config.yaml`
    and prints the validation summary (map vs true NEE, leave-site-out CV, map vs towers).
    """
    from geoflux import pipeline
    from geoflux.demo import write_world
    from geoflux.errors import OutputExistsError

    if not overwrite and out.is_dir() and any(out.iterdir()):
        # write_world would replace OUT/config.yaml (maybe the user's own) and world/: only with --overwrite
        raise OutputExistsError(
            f"{out}: folder is not empty (expected a new or empty folder, or --overwrite)"
        )
    t0 = time.perf_counter()
    _info(f"generating the {size} world in {out}/world ...")
    cfg_path = write_world(out, size, seed=seed)
    _info(f"world: {time.perf_counter() - t0:.1f} s")
    _run(cfg_path, overwrite, as_json=False)
    _info(f"done in {time.perf_counter() - t0:.1f} s; config: {cfg_path}")
    del pipeline


# What `run` writes, checked before it starts (maps are checked by the map stage itself: it resumes).
RUN_OUTPUTS = ("OBSERVATIONS", "TRAINING", "MODEL", "CV_METRICS", "METRICS", "REPORT")


def _run(config: Path, overwrite: bool, as_json: bool) -> None:
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, *RUN_OUTPUTS), overwrite)
    metrics = pipeline.run(cfg, overwrite=overwrite, progress=not _quiet(), echo=_info)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, default=str))
        return
    click.echo(pipeline.summarize_metrics(metrics))
    click.echo(f"metrics: {cfg.out_dir / pipeline.METRICS}")


@cli.command()
@config_arg
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the outputs of an earlier run and redo every map (default: refuse if they exist).",
)
@json_opt
@_fail_cleanly
def run(config: Path, overwrite: bool, as_json: bool) -> None:
    """Run the whole pipeline from CONFIG: towers → extract → train → map → validate → report.

    CONFIG is the run configuration (YAML; see README 'Configuration'); every output goes to its
    `output` folder. Prints the validation summary (JSON with --json).
    """
    _run(config, overwrite, as_json)


@cli.group()
def towers() -> None:
    """Tower data: aggregate for the pipeline, summarize files, analyze site carbon dynamics."""


@towers.command("aggregate")
@config_arg
@overwrite_opt
@_fail_cleanly
def towers_aggregate(config: Path, overwrite: bool) -> None:
    """Read tower files, keep QC-passed NEE, aggregate to the time step → towers/observations.parquet.

    CONFIG is the run configuration (YAML): `towers.files`, `towers.sites`, `time`, `grid`, `footprint`.
    NEE is converted to gC m-2 d-1; periods below towers.min_coverage are dropped. Also writes each
    tower's footprint weights (towers/footprints.npz, towers/footprint_methods.csv).
    """
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, "OBSERVATIONS", "FOOTPRINTS", "FOOTPRINT_METHODS"), overwrite)
    obs = pipeline.stage_towers(cfg, echo=_info)
    summary = obs.groupby("site").agg(
        periods=("time", "size"), coverage=("NEE_coverage", "mean"), nee_mean=("NEE", "mean")
    )
    click.echo(summary.round(3).to_string())


@towers.command("summary")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_fail_cleanly
def towers_summary(files: tuple[Path, ...]) -> None:
    """Per-site years, record counts, NEE coverage and gaps of tower FILES (any supported format)."""
    import pandas as pd

    from geoflux.towers import read_tower_file, summarize

    table = pd.concat([summarize(read_tower_file(f)) for f in files], ignore_index=True)
    click.echo(table.to_string(index=False))


@towers.command("analyze")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder for tables (parquet/CSV), PNG plots and summary.json.",
)
@click.option("--site", default=None, help="Site ID (default: from the file name, e.g. FLX_<SITE>_...).")
@click.option(
    "--ustar",
    default="auto",
    show_default=True,
    help="u* threshold: 'auto' (moving-point test), 'none', or a value in m s-1.",
)
@click.option("--no-daytime", is_flag=True, help="Skip day-time (Lasslop 2010) partitioning.")
@click.option("--no-despike", is_flag=True, help="Skip spike detection.")
@click.option("--csv", "as_csv", is_flag=True, help="Write record tables as CSV instead of parquet.")
@overwrite_opt
@json_opt
@_fail_cleanly
def towers_analyze(
    file: Path,
    out: Path,
    site: str | None,
    ustar: str,
    no_daytime: bool,
    no_despike: bool,
    as_csv: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Site carbon dynamics of one half-hourly tower FILE (not gap-filled data welcome).

    u* filtering (Papale 2006), MDS gap-filling (Reichstein 2005), night-time (Reichstein 2005) and day-time
    (Lasslop 2010) partitioning; writes diurnal/seasonal cycles, fingerprint, cumulative NEE, annual
    NEE/GPP/RECO budgets (gC m-2 yr-1) with uncertainty, light and temperature responses, and prints the
    budget. Fluxes in the tables are umol CO2 m-2 s-1.
    """
    from geoflux.towers import read_tower_file
    from geoflux.towers.processing import analyze_site

    try:
        ustar_opt: str | float | None = {"auto": "auto", "none": None}[ustar.lower()]
    except KeyError:
        try:
            ustar_opt = float(ustar)
        except ValueError:
            msg = f"'{ustar}' (expected auto, none or a number)"
            raise click.BadParameter(msg, param_hint="--ustar") from None
    _check_output_dir(out, "--out")
    _refuse_existing([out], overwrite)
    records = read_tower_file(file, site=site)
    summary = analyze_site(
        records,
        out,
        table_format="csv" if as_csv else "parquet",
        ustar=ustar_opt,
        daytime=not no_daytime,
        despike=not no_despike,
    )
    keys = ("site", "budgets", "ustar_threshold", "e0", "q10", "alpha_max", "warnings")
    if as_json:
        click.echo(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
    else:
        click.echo(_site_summary(summary))
    _info(f"tables and plots: {out}")


def _site_summary(summary: dict) -> str:
    """A few lines of `towers analyze` results: budgets per year, u* threshold, temperature sensitivity."""
    lines = [f"site {summary.get('site', '?')}: annual budgets (gC m-2 yr-1)"]
    for b in summary.get("budgets", []):
        parts = [f"{k} {b[k]:+.0f}" for k in ("NEE", "GPP", "RECO") if isinstance(b.get(k), int | float)]
        lines.append(f"  {b.get('year', '?')}: {'  '.join(parts)}")
    if summary.get("ustar_threshold") is not None:
        lines.append(f"u* threshold {summary['ustar_threshold']:.3f} m s-1")
    if summary.get("e0") is not None:
        lines.append(f"E0 {summary['e0']:.0f} K, Q10 {summary.get('q10', float('nan')):.2f}")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


@towers.command("model")
@click.argument("files", nargs=-1, required=True)
@click.argument("sites", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder: model.skops + model.json, cv_predictions.csv, skill.json, site_flags.csv ...",
)
@click.option("--resolution", default="MM", show_default=True, help="Model time step (MM: calendar months).")
@click.option(
    "--model",
    "kind",
    type=click.Choice(["random_forest", "hist_gradient_boosting"]),
    default="random_forest",
    show_default=True,
    help="Regressor of every variant.",
)
@click.option("--trees", type=click.IntRange(min=1), default=100, show_default=True, help="Trees per forest.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--min-qc",
    type=click.FloatRange(0, 1),
    default=0.8,
    show_default=True,
    help="Score (and, without QC weights, train on) months whose NEE QC fraction is at least this.",
)
@click.option(
    "--setup",
    default="auto",
    show_default=True,
    type=click.Choice(
        ["auto", "features", "features+qc_weights", "carbon_balance", "carbon_balance+qc_weights"]
    ),
    help="auto: choose variant and forest parameters by nested leave-site-out validation; or a fixed "
    "variant (every variant is then compared in the same run).",
)
@click.option(
    "--select-by",
    type=click.Choice(["nse", "nse_site_median"]),
    default="nse",
    show_default=True,
    help="auto: the inner loop's ranking score (pooled NSE, or the median per-site NSE).",
)
@overwrite_opt
@_fail_cleanly
def towers_model(
    files: tuple[str, ...],
    sites: Path,
    out: Path,
    resolution: str,
    kind: str,
    trees: int,
    seed: int,
    min_qc: float,
    setup: str,
    select_by: str,
    overwrite: bool,
) -> None:
    """Tower FILES (globs, folders or files) + SITES table → leave-one-site-out NEE model and its skill.

    Features: hemisphere-aware season, potential radiation and day length, antecedent water balance,
    site climate (MAT, MAP, aridity) and IGBP. Compares the plain forest on TA/SW_IN/VPD/P with the
    geoflux setup on the same folds (with --setup auto, chosen by a nested leave-site-out loop so the
    printed score never saw the choice); prints pooled nse, r2_pearson, rmse, bias (gC m-2 d-1) and the
    median per-site NSE, then the per-site NSE next to the extrapolation flags. Writes report.html.
    """
    from geoflux.towers import read_sites
    from geoflux.towers.modelling import check_out_dir, comparison_table, expand_files, model_towers
    from geoflux.towers.report import site_flag_columns, write_outputs

    check_out_dir(out, overwrite)
    t0 = time.perf_counter()
    result = model_towers(
        expand_files(files),
        read_sites(sites),
        resolution=resolution,
        kind=kind,
        trees=trees,
        seed=seed,
        min_qc=min_qc,
        setup=setup,
        select_by=select_by,
        echo=_info,
    )
    write_outputs(result, out, overwrite=overwrite)
    for scale in ("monthly", "seasonal_cycle", "annual_anomaly"):
        click.echo(f"{scale} (leave-one-site-out, gC m-2 d-1):")
        click.echo(comparison_table(result, scale).round(3).to_string(index=False))
    click.echo(f"per held-out site ({setup}):")
    click.echo(result.flags[site_flag_columns(result.flags)].round(3).to_string(index=False))
    if result.info.get("selection"):
        click.echo(f"final model (ranked over all sites): {result.info['final_model']}")
    _info(f"written to {out} in {time.perf_counter() - t0:.1f} s")


@cli.command()
@config_arg
@overwrite_opt
@_fail_cleanly
def cube(config: Path, overwrite: bool) -> None:
    """Build the driver cube on the target grid and write it to cube.zarr (for inspection and reuse).

    CONFIG is the run configuration (YAML): `catalog`, `variables`, `grid`, `time`.
    """
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, "CUBE"), overwrite)
    path = pipeline.stage_cube(cfg, progress=not _quiet())
    click.echo(str(path))


@cli.command()
@config_arg
@overwrite_opt
@_fail_cleanly
def extract(config: Path, overwrite: bool) -> None:
    """Footprint-weighted drivers at each tower joined with observations → training/training.parquet.

    CONFIG is the run configuration (YAML); needs `geoflux towers aggregate CONFIG` first.
    """
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, "TRAINING", "PIXELS"), overwrite)
    if _quiet():
        table = pipeline.stage_extract(cfg)
    else:
        from geoflux.progress import progress_bar

        with progress_bar("extract"):  # the driver reads are dask computations: counting them is free
            table = pipeline.stage_extract(cfg)
    click.echo(f"{len(table)} rows, {table['site'].nunique()} sites")


def _cv_summary(cv: dict, units: str = "gC m-2 d-1") -> str:
    """Two lines of cross-validation skill: pooled NSE, r² (Pearson), RMSE, bias and the median site NSE."""
    head = (
        f"{cv.get('scheme', 'cross-validation')} over {cv.get('n_sites', '?')} sites (n={cv.get('n', '?')}):"
    )
    return (
        f"{head}\n  NSE {cv['nse']:.3f}  r² (Pearson) {cv['r2_pearson']:.3f}  rmse {cv['rmse']:.3f} {units}"
        f"  bias {cv['bias']:+.3f} {units}  median site NSE {cv.get('nse_site_median', float('nan')):.3f}"
    )


@cli.command()
@config_arg
@overwrite_opt
@json_opt
@_fail_cleanly
def train(config: Path, overwrite: bool, as_json: bool) -> None:
    """Leave-site-out CV, then fit on all sites → model/model.skops (+ model.json card, cv_metrics.json).

    CONFIG is the run configuration (YAML): `model` settings; needs `geoflux extract CONFIG` first.
    Prints the cross-validation skill (the full cv_metrics.json with --json).
    """
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, "MODEL", "CV_PREDICTIONS", "CV_METRICS"), overwrite)
    _info(f"train: {cfg.model.kind}, site-grouped cross-validation then a fit on all sites ...")
    t0 = time.perf_counter()
    cv = pipeline.stage_train(cfg)
    _info(f"train: done in {time.perf_counter() - t0:.1f} s; model: {cfg.out_dir / pipeline.MODEL}")
    if as_json:
        click.echo(json.dumps(cv, indent=2, default=str))
    else:
        click.echo(_cv_summary(cv))


@cli.command("map")
@config_arg
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo every map/tile (default: resume, keeping maps whose provenance equals this run's).",
)
@scheduler_opt
@workers_opt
@click.option(
    "--tile",
    "tiles",
    type=(int, int),
    multiple=True,
    metavar="X Y",
    help="Map only tile X (column, from the west) Y (row, from the north) of the fixed tiling; repeatable.",
)
@click.option(
    "--bbox",
    type=(float, float, float, float),
    default=None,
    metavar="XMIN YMIN XMAX YMAX",
    help="Map the tiles intersecting this box (grid CRS units).",
)
@click.option(
    "--tile-size",
    type=click.IntRange(min=16),
    default=None,
    help="Tile edge in pixels (default 2048, rounded down to a multiple of grid.chunk).",
)
@click.option(
    "--inference",
    type=click.Choice(["library", "compiled", "auto"]),
    default="auto",
    show_default=True,
    help="library: the model's own predict; compiled: tree ensembles compiled with treelite/tl2cgen; "
    "auto: per tree model, the compiled predict only where it agrees with the library and was measured "
    "faster on a sample chunk (the library otherwise, e.g. without a C compiler).",
)
@click.option("--mosaic-cog", is_flag=True, help="With tiles: also write complete mosaics as COGs.")
@_fail_cleanly
def map_(
    config: Path,
    overwrite: bool,
    scheduler: str,
    workers: int | None,
    tiles: tuple[tuple[int, int], ...],
    bbox: tuple[float, float, float, float] | None,
    tile_size: int | None,
    inference: str,
    mosaic_cog: bool,
) -> None:
    """Predict NEE chunk by chunk → maps/nee_YYYYMMDD.tif (COG, float32, gC m-2 d-1) + maps/catalog.json.

    CONFIG is the run configuration (YAML); needs `geoflux train CONFIG` first. Every band of the model
    is written (nee-q05_..., nee-q95_..., di_..., aoa_... (uint8, 255 = nodata) when the model has them),
    then maps/nee.zarr (all bands over time) and maps/<band>.vrt (one band per period). With
    --tile/--bbox, tiles go to maps/tiles-<size>/x<X>_y<Y>/ and maps/<band>_YYYYMMDD.vrt mosaics them.
    """
    from geoflux import pipeline

    paths = pipeline.stage_map(
        _load(config),
        overwrite=overwrite,
        progress=not _quiet(),
        scheduler=scheduler,
        workers=workers,
        tiles=[tuple(t) for t in tiles] if tiles else None,
        bbox=bbox,
        tile_size=tile_size,
        inference=inference,
        mosaic_cog=mosaic_cog,
        echo=_info,
    )
    folders = sorted({str(p.parent) for p in paths})
    click.echo(f"{len(paths)} maps in {', '.join(folders[:3])}{' ...' if len(folders) > 3 else ''}")


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--maps", default=None, help="Maps made elsewhere: quoted glob of GeoTIFFs, or a NetCDF/Zarr.")
@click.option("--towers", "tower_files", default=None, help="Quoted glob (or folder) of tower files.")
@click.option(
    "--sites",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Site table CSV (SITE_ID, LAT, LON, IGBP).",
)
@click.option("--time-step", default=None, help="Period of the maps, e.g. 8D, 1D, MS (default: inferred).")
@click.option("--variable", default=None, help="NetCDF variable holding NEE (default: NEE or the only one).")
@click.option("--units", default=None, help="NEE units when the maps do not say (default gC m-2 d-1).")
@click.option(
    "--radius",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Footprint disk radius, m.",
)
@click.option(
    "--qc-max",
    type=click.IntRange(0, 3),
    default=1,
    show_default=True,
    help="Keep half-hourly NEE_VUT_REF_QC <= this.",
)
@click.option(
    "--min-coverage",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Drop tower periods with less QC-passed coverage.",
)
@click.option(
    "--training-sites",
    default=None,
    help="Comma-separated sites the product was trained on (scored apart from the others).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --maps: write validation.json, pairs.csv and skill_*.csv here.",
)
@json_opt
@overwrite_opt
@_fail_cleanly
def validate(
    config: Path | None,
    maps: str | None,
    tower_files: str | None,
    sites: Path | None,
    time_step: str | None,
    variable: str | None,
    units: str | None,
    radius: float,
    qc_max: int,
    min_coverage: float,
    training_sites: str | None,
    out: Path | None,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Score NEE maps against towers through their footprints (and the truth when configured).

    \b
    geoflux validate CONFIG
        the run's maps → validation/metrics.json (+ pairs.parquet, skill_*.csv);
        CONFIG is the run configuration (YAML), `truth` optional
    geoflux validate --maps 'dir/*.tif' --towers 'towers/*.csv' --sites sites.csv [--time-step 8D]
        maps made elsewhere (any CRS; GeoTIFF/COG series or a NetCDF such as FLUXCOM-X)

    Scores: bias, RMSE, R² (squared correlation), NSE, reduced-major-axis slope; overall, per IGBP class,
    per representativeness class and inside/outside the area of applicability; training and held-out sites
    in separate rows.
    """
    import json as _json

    from geoflux import pipeline

    if config is not None and maps is not None:
        raise click.UsageError("give either CONFIG or --maps/--towers/--sites, not both")
    if config is not None:
        cfg = _load(config)
        _refuse_existing(_stage_outputs(cfg, "METRICS", "VALIDATION_PAIRS"), overwrite)
        metrics = pipeline.stage_validate(cfg)
        text = _json.dumps(metrics, indent=2, default=str) if as_json else pipeline.summarize_metrics(metrics)
        click.echo(text)
        return
    if maps is None:
        raise click.UsageError("give CONFIG, or --maps with --towers and --sites")
    missing = [n for n, v in (("--towers", tower_files), ("--sites", sites)) if v is None]
    if missing:
        raise click.UsageError(f"--maps needs {' and '.join(missing)}")
    from geoflux.validate import validate_product, write_validation

    if out is not None:
        _check_output_dir(out, "--out")
        _refuse_existing([out / "validation.json", out / "pairs.csv"], overwrite)
    train = [s.strip() for s in training_sites.split(",") if s.strip()] if training_sites else None
    val = validate_product(
        maps,
        tower_files,
        sites,
        time_step=time_step,
        variable=variable,
        units=units,
        radius=radius,
        qc_max=qc_max,
        min_coverage=min_coverage,
        training_sites=train,
    )
    if out is not None:
        _info(f"written: {write_validation(val, out)}")
    click.echo(_json.dumps(val.to_dict(), indent=2, default=str) if as_json else val.summary_text())


@cli.command()
@config_arg
@click.option(
    "--date",
    "dates",
    multiple=True,
    metavar="YYYY-MM-DD",
    help="Map date to show (repeatable; default: first, strongest-uptake and last step).",
)
@overwrite_opt
@_fail_cleanly
def report(config: Path, dates: tuple[str, ...], overwrite: bool) -> None:
    """Write report/index.html + PNGs from the run's outputs (run 'geoflux validate CONFIG' first).

    CONFIG is the run configuration (YAML) whose output folder holds the run.
    """
    from geoflux import pipeline

    cfg = _load(config)
    _refuse_existing(_stage_outputs(cfg, "REPORT"), overwrite)
    click.echo(str(pipeline.stage_report(cfg, dates=list(dates) or None)))


@cli.command()
@config_arg
@click.option(
    "--pixels",
    type=int,
    default=2000,
    show_default=True,
    help="Map pixels sampled for dependence, IAV and scenario analyses.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: <output>/analysis).",
)
@overwrite_opt
@_fail_cleanly
def analyze(config: Path, pixels: int, out: Path | None, overwrite: bool) -> None:
    """What governs NEE: driver importance (grouped permutation), partial dependence and interactions,
    inter-annual/seasonal anomaly attribution and scenarios (+2 K, drying), written as tables and PNGs.

    CONFIG is the run configuration (YAML). Needs a trained model (`geoflux train`). Prints the
    multi-scale skill table (gC m-2 d-1).
    """
    from geoflux.analysis import analyze as run_analysis
    from geoflux.analysis import multiscale_table

    cfg = _load(config)
    if out is not None:
        _check_output_dir(out, "--out")
    _refuse_existing([out if out is not None else cfg.out_dir / "analysis"], overwrite)
    result = run_analysis(cfg, out_dir=out, n_pixels=pixels)
    click.echo(multiscale_table(result["multiscale"]))


@cli.command()
@config_arg
@click.option(
    "--correlation",
    type=click.Choice(["full", "period", "independent"]),
    default="full",
    show_default=True,
    help="How map errors combine in a budget: full (correlated across pixels and periods: conservative), "
    "period (correlated across pixels, independent between periods) or independent.",
)
@click.option(
    "--window",
    "windows",
    nargs=2,
    multiple=True,
    metavar="START END",
    help="Budget over [START, END) (dates, repeatable) instead of calendar years.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@_fail_cleanly
def budgets(config: Path, correlation: str, windows: tuple[tuple[str, str], ...], as_json: bool) -> None:
    """Annual (or --window) NEE budgets from the maps: per pixel (budgets/*.tif), per land-cover class and
    for the region (gC m-2 yr-1, Tg C) with a 90 % interval from the maps' band; against the truth when the
    run has one. Writes budgets/budgets.json, budgets.csv and budget and anomaly COGs."""
    import pandas as pd

    from geoflux.analysis.budgets import Window, compute_budgets
    from geoflux.errors import ConfigError

    cfg = _load(config)
    wins = None
    if windows:
        wins = []
        for a, b in windows:
            try:
                start, end = pd.Timestamp(a), pd.Timestamp(b)
            except ValueError:
                raise ConfigError(
                    f"--window {a} {b}: not dates (expected e.g. 2022-04-01 2022-10-01)"
                ) from None
            if end <= start:
                raise ConfigError(f"--window {a} {b}: end is not after start (expected START < END)")
            wins.append(Window(f"{start:%Y%m%d}-{end:%Y%m%d}", start, end))
    out = compute_budgets(cfg, windows=wins, correlation=correlation)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"NEE budgets (gC m-2 over the window; yr-1 for whole years), 90 % interval ({correlation}):")
    for name, w in out["windows"].items():
        r = w["region"]
        lo, hi = r["interval"]
        line = f"  {name}: {r['nee']:8.1f} [{lo:8.1f}, {hi:8.1f}]  {r['nee_total_tgc']:+.4f} Tg C"
        if not w["complete"]:
            line += f"  ({w['days']:g} days of map periods)"
        if "truth" in r:
            t = r["truth"]
            line += f"  true {t['nee']:8.1f} ({'inside' if t['covered'][correlation] else 'outside'})"
        click.echo(line)
    click.echo(f"budgets: {cfg.out_dir / 'budgets'}")


@cli.command()
@config_arg
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.8,
    show_default=True,
    help="|r| between driver anomalies at the towers above which drivers are reported as collinear and "
    "grouped.",
)
@overwrite_opt
@_fail_cleanly
def attribute(config: Path, threshold: float, overwrite: bool) -> None:
    """Why budgets differ between years: each year's NEE budget anomaly split into driver contributions
    through the model (each driver in turn held at its per-pixel climatology), over the whole grid.

    Needs two or more complete calendar years of map periods and a trained model. Writes
    analysis/attribution_years.json/.csv (region and land-cover classes, gC m-2 yr-1) and
    analysis/attribution/<layer>_<year>.tif (COG). Collinear drivers at the towers are warned about and
    their grouped effect is reported too. For each year and driver, the share of pixel-days whose inputs
    leave the area of applicability when the driver is held at its climatology is written
    (outside-aoa-<driver>_<year>.tif, and outside-aoa_<year>.tif for the run's own drivers); a contribution
    whose counterfactual leaves it much more often than the run is warned about as an extrapolation.
    """
    from geoflux.analysis.attribution import year_attribution
    from geoflux.run import ATTRIBUTION_MAPS, ATTRIBUTION_YEARS

    cfg = _load(config)
    _refuse_existing([cfg.out_dir / ATTRIBUTION_YEARS, cfg.out_dir / ATTRIBUTION_MAPS], overwrite)
    # the warnings (collinear drivers, extrapolated counterfactuals) are logged by year_attribution
    out = year_attribution(cfg, threshold=threshold, overwrite=overwrite)
    flagged = {(e["year"], e["driver"]) for e in (out.get("extrapolation") or {}).get("flagged") or []}
    click.echo("NEE budget anomaly and driver contributions (region mean, gC m-2 yr-1):")
    for row in out["table"]:
        if row["region"] != "region":
            continue
        parts = ", ".join(f"{k[8:]} {v:+.1f}" for k, v in row.items() if k.startswith("contrib_"))
        first = row["first_driver"]
        click.echo(
            f"  {row['year']}: anomaly {row['anomaly']:+.1f} = {parts}; interaction {row['interaction']:+.1f}"
            f" (first: {first}"
            + (", an extrapolation: see the warning" if (str(row["year"]), first) in flagged else "")
            + ")"
        )
    click.echo(f"attribution: {cfg.out_dir / ATTRIBUTION_YEARS}")


@cli.command()
@config_arg
@click.option(
    "--scenario",
    required=True,
    metavar="NAME|FILE.yaml",
    help="A built-in scenario (warming_2K, ta_plus_2K, drying_20pct) or a scenario YAML naming future "
    "driver rasters in a STAC catalog (see README 'Projection').",
)
@scheduler_opt
@workers_opt
@overwrite_opt
@_fail_cleanly
def project(config: Path, scenario: str, scheduler: str, workers: int | None, overwrite: bool) -> None:
    """NEE under a scenario: maps of every band → maps/scenarios/NAME/ (COG, as `geoflux map`) and budgets
    → budgets/scenarios/NAME/ (+ projection.json: budgets, change against the run's maps, share of the
    region outside the area of applicability).

    CONFIG is the run configuration (YAML); needs `geoflux train` (and `geoflux map` for the change).
    """
    from geoflux.analysis.project import load_scenario
    from geoflux.analysis.project import project as run_project
    from geoflux.run import layout

    cfg = _load(config)
    spec = load_scenario(cfg, scenario)
    run = layout(cfg)
    _refuse_existing([run.scenario_maps(spec.name), run.scenario_budgets(spec.name)], overwrite)
    out = run_project(
        cfg,
        scenario,
        overwrite=overwrite,
        scheduler=scheduler,
        workers=workers,
        progress=not _quiet(),
        echo=_info,
    )
    click.echo(f"scenario {spec.name}: {spec.description}")
    if out.get("aoa"):
        a = out["aoa"]
        base = f" (run: {a['base_outside_share']:.1%})" if "base_outside_share" in a else ""
        click.echo(f"  outside the area of applicability: {a['outside_share']:.1%} of pixel-periods{base}")
    for name, b in (out.get("budgets") or {}).items():
        lo, hi = b["interval"]
        line = f"  {name}: {b['nee']:8.1f} [{lo:8.1f}, {hi:8.1f}] gC m-2"
        if "change" in b:
            line += f"  change {b['change']:+.1f} against the run's {b['base']:.1f}"
        click.echo(line)
    click.echo(f"maps: {out['maps']}; budgets: {out['budgets_folder']}")


if __name__ == "__main__":  # pragma: no cover
    cli()
