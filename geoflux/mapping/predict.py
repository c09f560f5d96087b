"""Mapping stage: predict NEE (and the model's other bands) chunk by chunk over the driver cube.

One dask task per output chunk: each task assembles the features of its chunk (float32), skips pixels
with a missing driver, and calls the model once for all of the chunk's valid pixels. The model enters the
graph once — in :func:`predict_bands` as a single delayed object, or, in :func:`write_maps`, as a
:class:`~geoflux.mapping.scheduler.Shared` handle to a copy broadcast once to every worker — never copied into
each task.

:func:`write_maps` streams the chunks into COGs: a finished chunk goes straight into its window of an
intermediate tiled GeoTIFF (one per band) in the thread that collects results, whatever the scheduler
(threads, processes, dask.distributed), so memory is bounded by the chunks in flight and every scheduler
writes the same bytes. Each time step's files are converted to COGs and renamed into place as soon as the
step is done (overlapping the next step's computation), so a killed run loses at most the steps in flight
and a re-run skips what is finished — but only files whose provenance tags (model hash, input items,
variables, ...) equal the current run's: after a retrain or a change of inputs they are redone, so a map's
tags always describe how its bytes were made (:func:`redo_reason`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import rasterio
import rasterio.errors
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.cog import COGStream, RasterSpec
from geoflux.config import VariableSpec
from geoflux.errors import GridError, ModelError
from geoflux.features import feature_names, pixel_features
from geoflux.mapping.scheduler import Scheduler, Shared, open_scheduler
from geoflux.mapping.tiles import Tile
from geoflux.model import PartitionedRegressor, TrainedModel
from geoflux.run import band_stem  # noqa: F401 (file naming lives in the run layout; kept importable here)

log = logging.getLogger("geoflux")

# Units and overview resampling of the bands a model may produce (see TrainedModel.predict_bands).
BAND_UNITS = {"DI": "1", "AOA": "1"}
BAND_DESCRIPTIONS = {
    "NEE": "net ecosystem exchange",
    "DI": "dissimilarity index (area of applicability)",
    "AOA": "area of applicability: 1 inside, 0 outside",
}
# What each band's values are (the ``quantity`` tag); quantile bands are described by band_quantity.
BAND_QUANTITIES = {
    "NEE": "net ecosystem exchange (positive = CO2 source to the atmosphere)",
    "DI": "dissimilarity index of the drivers to the training data (0 = like the training data)",
    "AOA": "area of applicability of the model (1 inside, 0 outside)",
}
CATEGORICAL_BANDS = {"AOA"}
# The AOA is a 0/1 mask: one byte per pixel with its own nodata, not float32 with -9999.
BAND_DTYPES = {"AOA": ("uint8", 255)}
FLOAT_NODATA = -9999.0


def band_units(band: str, target_units: str) -> str:
    """Units of a band: NEE and its quantiles carry the model's target units; DI and AOA are unitless."""
    return BAND_UNITS.get(band, target_units)


def band_dtype(band: str) -> tuple[str, float | int]:
    """(data type, nodata value) of a band's files: float32 with -9999, the AOA mask uint8 with 255."""
    return BAND_DTYPES.get(band, ("float32", FLOAT_NODATA))


def band_quantity(band: str) -> str:
    """What a band's values are, for the ``quantity`` tag (``NEE_q05``: the 5 % quantile of NEE)."""
    if band.startswith("NEE_q"):
        return f"{int(band[5:])} % quantile of net ecosystem exchange (prediction band)"
    return BAND_QUANTITIES.get(band, band)


def band_description(band: str) -> str:
    """Long name of a band (``long_name`` tag, band description)."""
    if band.startswith("NEE_q"):
        return f"NEE quantile {band[5:]} % (uncertainty band)"
    return BAND_DESCRIPTIONS.get(band, band)


def band_spec(band: str, path: Path, target_units: str, tags: Mapping[str, str]) -> RasterSpec:
    """The :class:`RasterSpec` of one band's output file.

    Parameters
    ----------
    band : model band (``NEE``, ``NEE_q05``, ``NEE_q95``, ``DI``, ``AOA``).
    path : output file.
    target_units : the model's NEE units (gC m-2 d-1); DI and AOA are unitless (``1``).
    tags : run provenance shared by all bands; ``band``, ``quantity`` and ``long_name`` are added here.
    """
    desc = band_description(band)
    dtype, nodata = band_dtype(band)
    return RasterSpec(
        Path(path),
        dtype=dtype,
        nodata=nodata,
        units=band_units(band, target_units),
        description=band if band == "NEE" else f"{band}: {desc}",
        tags={**tags, "band": band, "quantity": band_quantity(band), "long_name": desc},
        resampling="NEAREST" if band in CATEGORICAL_BANDS else "AVERAGE",
    )


# Tags that do not decide what the bytes are: a new geoflux version alone does not force a re-map (the file
# keeps saying which version wrote it, so its provenance stays true); ``created`` is when the file was
# written, which a resumed run must not compare; ``catalog`` (an absolute URI) and ``config_sha256`` (the
# config holds absolute paths) change when a run folder is moved or copied, while the model, its inputs,
# variables and period (checked) decide the values.
UNCHECKED_TAGS = frozenset({"software", "created", "catalog", "config_sha256"})


def redo_reason(spec: RasterSpec) -> str | None:
    """Why the file at ``spec.path`` must be (re)written, or None if it can be kept as it is.

    An existing file is kept only when every tag of ``spec`` (but :data:`UNCHECKED_TAGS`) has the same
    value in the file, e.g. ``model_sha256``, ``input_items``, ``variables``, ``period_start``, ``band``:
    then it was made by the same model from the same inputs.
    A file that cannot be read, or whose data type or nodata differ from the spec's, is redone too.

    Returns
    -------
    None, or a short reason such as ``"missing"`` or ``"model_sha256 differs"``.
    """
    if not spec.path.exists():
        return "missing"
    try:
        with rasterio.open(spec.path) as src:
            have = src.tags()
            dtype, nodata = src.dtypes[0], src.nodata
    except rasterio.errors.RasterioIOError:
        return "unreadable"
    differ = [k for k, v in spec.tags.items() if k not in UNCHECKED_TAGS and have.get(k) != str(v)]
    if dtype != spec.dtype or (spec.nodata is not None and nodata != spec.nodata):
        differ.append("data type")
    return f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}" if differ else None


def single_threaded(model: TrainedModel) -> TrainedModel:
    """A shallow copy of ``model`` whose estimators predict on one thread.

    dask already runs one task per core; a forest that also fans out over all cores per task would
    oversubscribe them, and its tree sums would depend on thread timing (not bit-reproducible).
    """
    m = copy.copy(model)

    def one(est: Any) -> Any:
        if isinstance(est, PartitionedRegressor):
            return PartitionedRegressor(one(est.reco), one(est.gpp))
        if hasattr(est, "get_params") and "n_jobs" in est.get_params(deep=False):
            est = copy.copy(est)
            est.set_params(n_jobs=1)
        return est

    m.estimator = one(model.estimator)
    if getattr(model, "quantile_models", None) is not None:
        m.quantile_models = tuple(one(q) for q in model.quantile_models)
    return m


def _predict_chunk(
    blocks: Sequence[np.ndarray], model: Any, variables: Sequence[VariableSpec], all_bands: bool
) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    if isinstance(model, Shared):
        model = model.get()
    values = {v.name: b for v, b in zip(variables, blocks, strict=True)}
    feats = pixel_features(values, variables)
    shape = feats.shape[:-1]
    flat = feats.reshape(-1, feats.shape[-1])
    valid = ~np.isnan(flat).any(axis=1)
    nb = len(model.bands) if all_bands else 1
    out = np.full((flat.shape[0], nb), np.nan, dtype=np.float32)
    if valid.any():
        # One OpenMP thread per task (HistGradientBoosting, LightGBM): dask provides the parallelism.
        with threadpool_limits(1, user_api="openmp"):
            x = np.ascontiguousarray(flat[valid])
            out[valid] = model.predict_bands(x) if all_bands else np.asarray(model.predict(x))[:, None]
    return np.moveaxis(out, -1, 0).reshape((nb, *shape))


def _predict_block(*blocks: np.ndarray, model: Any, variables: Sequence[VariableSpec]) -> np.ndarray:
    return _predict_chunk(blocks, model, variables, all_bands=False)[0]


def _predict_bands_block(*blocks: np.ndarray, model: Any, variables: Sequence[VariableSpec]) -> np.ndarray:
    return _predict_chunk(blocks, model, variables, all_bands=True)


def _driver_arrays(
    cube: xr.Dataset, variables: Sequence[VariableSpec]
) -> tuple[list[da.Array], xr.DataArray]:
    ref = next((cube[v.name] for v in variables if "time" in cube[v.name].dims), None)
    if ref is None:
        raise ModelError("cube has no time-varying driver: nothing to map per time step")
    nt, ny, nx = ref.shape
    chunks = ref.data.chunks
    arrays = []
    for v in variables:
        a = cube[v.name].data
        if a.dtype != np.float32:
            a = a.astype(np.float32)
        if a.ndim == 2:  # static driver: broadcast along time lazily (no copies until a chunk runs)
            a = da.broadcast_to(a[None], (nt, ny, nx), chunks=chunks)
        arrays.append(a.rechunk(chunks))
    return arrays, ref


def _check_features(model: TrainedModel, variables: Sequence[VariableSpec]) -> None:
    names = feature_names(variables)
    if names != list(model.features):
        raise ModelError(f"model features {model.features} differ from the configured drivers' {names}")


def _model_node(model: TrainedModel | Shared) -> Any:
    if isinstance(model, Shared):
        return model  # a few bytes: the object itself lives once per worker process
    return dask.delayed(single_threaded(model), pure=True, traverse=False)


def predict_bands(
    cube: xr.Dataset,
    model: TrainedModel | Shared,
    variables: Sequence[VariableSpec],
    bands: Sequence[str] | None = None,
) -> xr.DataArray:
    """Lazy map of every model band (band, time, y, x), float32, NaN where a driver is missing.

    One task per (time, y, x) chunk computes all bands of that chunk at once.

    Parameters
    ----------
    cube : driver cube, (time, y, x) and static (y, x) variables, dask-backed.
    model : the model, or a :class:`Shared` handle to it (then ``bands`` must be given).
    variables : driver definitions (their features must equal the model's).
    bands : band names (default ``model.bands``); NEE first, gC m-2 d-1.
    """
    if isinstance(model, TrainedModel):
        _check_features(model, variables)
        bands = tuple(bands or model.bands)
    elif bands is None:
        raise ValueError("predict_bands: pass bands= with a shared model handle")
    arrays, ref = _driver_arrays(cube, variables)
    pairs = [x for a in arrays for x in (a, "tyx")]
    out = da.blockwise(
        _predict_bands_block,
        "btyx",
        *pairs,
        new_axes={"b": len(bands)},
        dtype=np.float32,
        model=_model_node(model),
        variables=list(variables),
        meta=np.empty((0, 0, 0, 0), dtype=np.float32),
    )
    return xr.DataArray(
        out,
        coords={"band": list(bands), "time": ref["time"], "y": ref["y"], "x": ref["x"]},
        dims=("band", "time", "y", "x"),
        name="prediction",
    )


def write_maps(
    cube: xr.Dataset,
    model: TrainedModel,
    variables: Sequence[VariableSpec],
    geobox: GeoBox,
    outputs: Mapping[int, Sequence[RasterSpec]],
    scheduler: str | Scheduler | None = "threads",
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Predict every band chunk by chunk and stream it into one COG per band and time step.

    Parameters
    ----------
    cube : driver cube on ``geobox`` (dask-backed, chunked in y/x; time chunks of 1).
    model : the fitted model (library or compiled predictor, see :mod:`geoflux.inference`).
    variables : driver definitions.
    geobox : the output grid (the cube's).
    outputs : time index in the cube → one :class:`RasterSpec` per model band (``model.bands`` order).
    scheduler : ``threads``, ``processes``, ``local``, ``tcp://host:port`` or an open scheduler.
    overwrite : rewrite files that exist (default: keep those whose provenance tags equal the specs',
        i.e. resume; a step with some bands missing or stale (:func:`redo_reason`) is computed again and only
        those files are written, each replacing its old version atomically).
    progress : a progress bar on stderr (chunks written).
    workers : parallel task slots (default: all CPUs).
    echo : where to print the dashboard address of a distributed cluster and which existing files are
        redone because their provenance differs (default: the ``geoflux`` logger).

    Returns
    -------
    All output paths (skipped ones included), in ``outputs`` order.

    Raises
    ------
    ModelError
        if the model's features differ from the drivers', or ``outputs`` has the wrong number of bands.
    GridError
        if the cube is not on ``geobox``.
    """
    _check_features(model, variables)
    bands = tuple(model.bands)
    for t, specs in outputs.items():
        if len(specs) != len(bands):
            raise ModelError(f"time step {t}: {len(specs)} output files for {len(bands)} bands {bands}")
    say = echo or log.info
    # per step, the bands still to write: a step is redone only for its missing or stale files
    missing: dict[int, list[int]] = {}
    for t, specs in outputs.items():
        missing[t] = []
        for k, spec in enumerate(specs):
            why = "overwrite" if overwrite else redo_reason(spec)
            if why is None:
                continue
            if why not in ("missing", "overwrite"):
                say(f"map: {spec.path}: {why} from this run's (redoing it)")
            missing[t].append(k)
    todo = [t for t in outputs if missing[t]]
    paths = [s.path for specs in outputs.values() for s in specs]
    if not todo:
        return paths
    with open_scheduler(scheduler, workers=workers, echo=echo) as sched:
        # a scheduler mapping many tiles with one model ships it once
        handle = sched.broadcast(single_threaded(model), origin=model)
        pred = predict_bands(cube, handle, variables, bands)
        if tuple(pred.shape[2:]) != tuple(geobox.shape):
            raise GridError(
                f"cube is {pred.shape[2]} x {pred.shape[3]} px, output grid {tuple(geobox.shape)}"
            )
        _, _, ychunks, xchunks = pred.data.chunks
        y0 = np.concatenate([[0], np.cumsum(ychunks)])
        x0 = np.concatenate([[0], np.cumsum(xchunks)])
        chunk = max(ychunks[0], xchunks[0])
        # Optimized once for the whole cube; each time step then computes only its own blocks.
        blocks = pred.data.to_delayed(optimize_graph=True)
        nbx = len(xchunks)
        bar = _progress(len(todo) * len(ychunks) * nbx, progress)
        finishing: list[Future] = []
        # One background thread converts a finished step to COGs while the next step computes.
        with ThreadPoolExecutor(1, thread_name_prefix="geoflux-cog") as finisher:
            try:
                for t in todo:
                    keep = missing[t]
                    stream = COGStream(geobox, [outputs[t][k] for k in keep], chunk=chunk)
                    try:

                        def put(i: int, block: np.ndarray, stream: COGStream = stream, keep=keep) -> None:
                            iy, ix = divmod(i, nbx)
                            rows, cols = slice(y0[iy], y0[iy + 1]), slice(x0[ix], x0[ix + 1])
                            stream.write(rows, cols, block[keep, 0])
                            bar.update(1)

                        sched.stream(list(blocks[0, t].ravel()), put)
                    except BaseException:
                        stream.abort()
                        raise
                    finishing.append(finisher.submit(stream.finish))
                    # at most one step converting while the next computes: bounded disk and memory
                    while len(finishing) > 1:
                        finishing.pop(0).result()
                for f in finishing:
                    f.result()
            finally:
                bar.close()
    return paths


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc="mapping", unit="chunk", file=sys.stderr, leave=False)


def write_tiles(
    tiles: Sequence[Tile],
    make_cube: Callable[[GeoBox], xr.Dataset],
    outputs_for: Callable[[Tile, xr.Dataset], Mapping[int, Sequence[RasterSpec]]],
    model: TrainedModel,
    variables: Sequence[VariableSpec],
    scheduler: Scheduler,
    overwrite: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """:func:`write_maps` for each tile of a fixed tiling, one tile after the other on one scheduler.

    Parameters
    ----------
    tiles : the tiles to map (:class:`geoflux.mapping.tiles.Tile`).
    make_cube : the driver cube on a tile's grid (searches only that tile's extent).
    outputs_for : a tile's output files per time index and band, given its cube (whose loaded items name
        the tile's inputs).
    model, variables, scheduler, overwrite, progress, echo : as for :func:`write_maps`.

    Returns
    -------
    Every output file of the tiles: written, or kept because its provenance equals this run's.
    """
    say = echo or log.info
    written: list[Path] = []
    for tile in tiles:
        cube = make_cube(tile.geobox)
        outputs = outputs_for(tile, cube)
        specs = [s for specs in outputs.values() for s in specs]
        if not overwrite and all(redo_reason(s) is None for s in specs):
            written += [s.path for s in specs]
            continue
        say(f"map: tile {tile.id} ({tile.geobox.shape[1]} x {tile.geobox.shape[0]} px)")
        written += write_maps(
            cube,
            model,
            variables,
            tile.geobox,
            outputs,
            scheduler,
            overwrite=overwrite,
            progress=progress,
            echo=echo,
        )
    return written
