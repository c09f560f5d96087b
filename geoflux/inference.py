"""Compiled inference for tree ensembles: faster predictions than the model library's own ``predict``.

Tree ensembles (scikit-learn forests and gradient boosting, LightGBM, XGBoost) are converted with
`treelite <https://treelite.readthedocs.io>`_ and compiled to a shared library with its code generator
`tl2cgen <https://tl2cgen.readthedocs.io>`_ (needs a C compiler). Each tree becomes nested ``if``
statements in C, so a prediction is a branch walk without the Python/Cython dispatch, input validation and
per-tree array traversal of the library's ``predict``.

Both are optional (``pip install geoflux[compiled]``). When they are missing, or the estimator type is not
supported, :func:`prepare` falls back to the library's predict and says so. Compiled libraries are cached
by a hash of the converted model, so a model is compiled once.

Predictions agree with the library's to floating-point rounding: tl2cgen sums the trees in the same
order but in its own precision (see ``tests/test_mapping_inference.py`` for the measured difference).

Compiled is not always faster: a forest of deep trees compiles to megabytes of branches that thrash the
instruction cache: on the demo's 200-tree forest (202k nodes) it was 2.9x slower than scikit-learn, while
the default model's shallow boosting trees (compiled with ``quantize``, :data:`TL2CGEN_PARAMS`) run 5x
faster per CPU second (``bench/bench_production.py``). So ``auto`` never assumes: per estimator (point
model, each quantile model) it times the library's and the compiled predict (CPU seconds) on a sample of
the model's own training pixels, as a map task runs them (one thread), and keeps the compiled one only
if it agrees with the library within :data:`AGREEMENT_ATOL` and is at least :data:`MIN_SPEEDUP` times
faster. It compiles only when the estimated compile time (from the node count)
fits the budget or the library is already cached, and records the timings and the choice in
``<cache_dir>/auto.json``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from geoflux.atomic import atomic_path
from geoflux.errors import ModelError
from geoflux.model import PartitionedRegressor, TrainedModel

log = logging.getLogger("geoflux")

MODES = ("library", "compiled", "auto")

# A compiled predict is used by ``auto`` only if no prediction of the sample differs from the library's by
# more than this (gC m-2 d-1): far below what a map can resolve, far above float summation-order noise.
AGREEMENT_ATOL = 1e-4
# ... and only if it is at least this much faster: within timing noise the library (the reference) wins.
MIN_SPEEDUP = 1.1
# ``auto`` skips compiling a model whose estimated compile time exceeds this (seconds); a cached library
# costs nothing and is always tried.
COMPILE_BUDGET_S = 60.0
# Compile cost via tl2cgen + gcc, CPU-seconds per tree node, measured on this project's 2-core machine:
# 1.15e-3 for a 10-tree fully grown forest (50k nodes), 0.36e-3 for a 100-iteration boosting model; the
# demo's 200-tree forest (202k nodes) plus its two quantile models took 385 s wall at load 5-8. Wall time =
# this x nodes / compiler jobs: the demo forest is estimated at ~100 s on 2 cores, over the budget.
COMPILE_CPU_S_PER_NODE = 1e-3
SAMPLE_ROWS = 16_384  # one 128 x 128 map chunk

_LOADED: dict[str, Any] = {}  # library hash → tl2cgen.Predictor, once per process
_BUILT: dict[str, Path] = {}  # library file name (model hash) → where this process compiled it
_LOAD_LOCK = threading.Lock()


_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """tl2cgen's C++ side writes log lines to stderr and its Python side build steps to stdout: send both
    to the debug log instead, so a run's output stays what geoflux says."""
    with _QUIET_LOCK, tempfile.TemporaryFile(mode="w+b") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        buf = io.StringIO()
        try:
            os.dup2(err.fileno(), 2)
            with contextlib.redirect_stdout(buf):
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            text = buf.getvalue() + err.read().decode("utf-8", "replace")
            for line in text.splitlines():
                log.debug("%s: %s", what, line)


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in names)


def available() -> bool:
    """Whether treelite and tl2cgen are installed."""
    return _installed("treelite", "tl2cgen")


def _to_treelite(est: Any) -> Any | None:
    """The estimator as a treelite model, or None if treelite cannot convert it."""
    import treelite
    import treelite.frontend

    mod = type(est).__module__
    try:
        if mod.startswith("sklearn."):
            return treelite.sklearn.import_model(est)
        if mod.startswith("lightgbm."):
            booster = est.booster_ if hasattr(est, "booster_") else est
            return treelite.frontend.from_lightgbm(booster)
        if mod.startswith("xgboost."):
            booster = est.get_booster() if hasattr(est, "get_booster") else est
            return treelite.frontend.from_xgboost(booster)
    except Exception as exc:  # treelite raises its own error types for unsupported losses/options
        log.info("compiled inference: %s not supported by treelite (%s)", type(est).__name__, exc)
    return None


class CompiledEstimator:
    """``predict(x)`` through a tl2cgen-compiled shared library.

    Pickles as the library's bytes (a few MB), so it can be broadcast to worker processes or cluster
    workers; each process writes them to a private file once and loads it on first use.

    Parameters
    ----------
    lib : the shared library's bytes.
    n_features : number of input columns.
    name : what was compiled (for messages).
    """

    def __init__(self, lib: bytes, n_features: int, name: str):
        self.lib = lib
        self.n_features = n_features
        self.name = name
        self.digest = hashlib.sha256(lib).hexdigest()[:20]

    def _predictor(self) -> Any:
        pred = _LOADED.get(self.digest)
        if pred is None:
            import tl2cgen

            with _LOAD_LOCK:
                pred = _LOADED.get(self.digest)
                if pred is None:
                    # A private folder per load, removed once the library is loaded: the loader maps the
                    # file, so nothing is left behind in the temporary directory by each process (a
                    # folder per process id used to stay there for good).
                    folder = Path(tempfile.mkdtemp(prefix="geoflux-compiled-"))
                    path = folder / f"{self.digest}.so"
                    try:
                        path.write_bytes(self.lib)
                        # One thread per call: dask runs one chunk per core.
                        with _quiet("loading a compiled library"):
                            pred = tl2cgen.Predictor(str(path), nthread=1)
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)
                    if folder.exists():  # a platform that keeps a loaded library's file open
                        atexit.register(shutil.rmtree, folder, True)
                    _LOADED[self.digest] = pred
        return pred

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions for a (n, n_features) array, float64 like scikit-learn's."""
        import tl2cgen

        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            return np.empty(0)
        if x.shape[1] != self.n_features:
            raise ModelError(f"compiled {self.name}: {x.shape[1]} features given, {self.n_features} expected")
        out = self._predictor().predict(tl2cgen.DMatrix(x, dtype="float32"))
        return np.asarray(out, dtype=np.float64).reshape(x.shape[0], -1)[:, 0]

    def __getstate__(self) -> dict:
        return {"lib": self.lib, "n_features": self.n_features, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["lib"], state["n_features"], state["name"])


def _cache(cache_dir: str | Path | None) -> Path:
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"geoflux-compiled-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


# tl2cgen code-generation options. ``quantize`` replaces each float comparison by a comparison of small
# integer indices into the sorted thresholds of that feature (the input is mapped to its index once per row
# by binary search): the same branch outcomes, hence the same predictions, with tighter generated code. On
# the default model (200 depth-6 boosting trees) it cut one-thread CPU time per pixel from 1.70 to 1.12 us
# (bench/bench_production.py; scikit-learn: 5.7 us).
TL2CGEN_PARAMS: dict[str, Any] = {"quantize": 1}


def _converted(est: Any, cache: Path) -> tuple[Any, Path] | None:
    """The treelite model and the path of its compiled library in ``cache``.

    Keyed by the hash of the converted model and of :data:`TL2CGEN_PARAMS`, so a library built with other
    code-generation options is never reused.
    """
    tl_model = _to_treelite(est)
    if tl_model is None:
        return None
    h = hashlib.sha256(tl_model.serialize_bytes())
    h.update(json.dumps(TL2CGEN_PARAMS, sort_keys=True).encode())
    return tl_model, cache / f"{type(est).__name__}-{h.hexdigest()[:24]}.so"


def node_count(est: Any) -> int | None:
    """Number of tree nodes (splits and leaves) of a fitted ensemble, or None for an unknown type."""
    if hasattr(est, "estimators_") and hasattr(est, "decision_path"):  # scikit-learn forests
        return int(sum(t.tree_.node_count for t in est.estimators_))
    if hasattr(est, "_predictors"):  # scikit-learn HistGradientBoosting
        return int(sum(len(p.nodes) for it in est._predictors for p in it))
    if type(est).__module__.startswith("lightgbm."):
        booster = est.booster_ if hasattr(est, "booster_") else est
        return int(sum(2 * t["num_leaves"] - 1 for t in booster.dump_model()["tree_info"]))
    if type(est).__module__.startswith("xgboost."):
        booster = est.get_booster() if hasattr(est, "get_booster") else est
        return len(booster.trees_to_dataframe())
    return None


def estimate_compile_seconds(est: Any, nthread: int | None = None) -> float | None:
    """Estimated wall time (s) to compile ``est`` with tl2cgen on ``nthread`` compiler jobs (None: unknown).

    C code size, hence gcc's time, grows with the number of tree nodes; see :data:`COMPILE_CPU_S_PER_NODE`.
    """
    nodes = node_count(est)
    if nodes is None:
        return None
    return nodes * COMPILE_CPU_S_PER_NODE / (nthread or os.cpu_count() or 1)


def compile_estimator(est: Any, cache_dir: str | Path | None = None, nthread: int | None = None) -> Any:
    """A :class:`CompiledEstimator` for ``est``, or None when treelite cannot convert it.

    Parameters
    ----------
    est : fitted tree ensemble.
    cache_dir : where compiled libraries are kept by model hash (default: a folder in the temp dir).
    nthread : compiler jobs (default: all CPUs).
    """
    cache = _cache(cache_dir)
    import tl2cgen

    conv = _converted(est, cache)
    if conv is None:
        return None
    tl_model, lib = conv
    built = _BUILT.get(lib.name)
    if not lib.exists() and built is not None and built.exists():
        # the same model (same hash) was compiled earlier in this process for another run folder: copy
        part = lib.with_name(lib.name + f".{os.getpid()}.part.so")
        shutil.copyfile(built, part)
        os.replace(part, lib)
    if not lib.exists():
        n = nthread or os.cpu_count() or 1
        log.info(
            "compiling %s (%d trees) with tl2cgen, once; cached in %s",
            type(est).__name__,
            tl_model.num_tree,
            cache,
        )
        part = lib.with_name(lib.name + f".{os.getpid()}.part.so")
        # Split big ensembles into several C files so the compiler runs in parallel and each file stays
        # small enough for gcc to optimize quickly.
        params = {**TL2CGEN_PARAMS, "parallel_comp": max(n, min(64, tl_model.num_tree // 25))}
        with _quiet("tl2cgen"):
            tl2cgen.export_lib(tl_model, toolchain="gcc", libpath=str(part), params=params, nthread=n)
        os.replace(part, lib)
        _BUILT[lib.name] = lib
    return CompiledEstimator(lib.read_bytes(), tl_model.num_feature, type(est).__name__)


def sample_pixels(model: TrainedModel, n: int = SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """(n, n_features) float32 feature rows like the ones the model will map, for timing its paths.

    The model's own training pixels when it has an area of applicability (they are stored, standardized,
    for the DI: undone here), else uniform draws inside its training domain. Tree traversal cost depends on
    where the rows fall, so rows from the training distribution time what a map costs.
    """
    rng = np.random.default_rng(seed)
    aoa = model.aoa
    nf = len(model.features)
    if aoa is not None and len(aoa.points):
        w = np.asarray(aoa.weights, dtype=np.float64)
        safe = np.where(w != 0, w, 1.0)
        pts = aoa.points[rng.integers(0, len(aoa.points), n)]
        x = pts / safe * aoa.scale + aoa.center
        if (w == 0).any():  # a zero-weight feature cannot be recovered: draw it inside the domain
            for j in np.flatnonzero(w == 0):
                lo, hi = model.domain.get(model.features[j], [aoa.center[j], aoa.center[j]])
                x[:, j] = rng.uniform(lo, hi, n)
        return np.ascontiguousarray(x, dtype=np.float32)
    lo = np.array([model.domain.get(f, [0.0, 1.0])[0] for f in model.features])
    hi = np.array([model.domain.get(f, [0.0, 1.0])[1] for f in model.features])
    return rng.uniform(lo, hi, (n, nf)).astype(np.float32)


def time_predict(predict: Callable[[np.ndarray], Any], x: np.ndarray, repeats: int = 5) -> float:
    """Best-of-``repeats`` CPU seconds of ``predict(x)`` on one thread (as a map task runs it).

    CPU time of the whole process (every thread an engine might start counts), not wall time: on shared
    cores wall time mostly measures the other processes' load (at load 7 on 2 cores it was twice the CPU
    time), CPU time the work itself. The minimum is the run least disturbed by cache sharing.
    """
    from threadpoolctl import threadpool_limits

    best = np.inf
    with threadpool_limits(1, user_api="openmp"):
        for _ in range(repeats):
            t0 = time.process_time()
            predict(x)
            best = min(best, time.process_time() - t0)
    return float(max(best, 1e-9))


def _estimators(model: TrainedModel) -> dict[str, Any]:
    """The model's tree estimators by the band they produce (the point model, or its RECO and GPP heads,
    and each quantile model)."""
    est = model.estimator
    if isinstance(est, PartitionedRegressor):  # each head is a plain library model: compiled on its own
        out = {"NEE_reco": est.reco, "NEE_gpp": est.gpp}
    else:
        out = {"NEE": est}
    quantiles = getattr(model, "quantile_models", None)
    if quantiles is not None and len(quantiles) == 1:  # one residual-scale model gives both bounds
        out["NEE_band"] = quantiles[0]
    elif quantiles is not None:
        names = [b for b in model.bands if b.startswith("NEE_q")] or ["NEE_lo", "NEE_hi"]
        out.update({names[0]: quantiles[0], names[-1]: quantiles[1]})
    return out


def _with_point(model: TrainedModel, ests: list[Any]) -> int:
    """Put the first of ``ests`` (ordered as :func:`_estimators`) in as ``model``'s point model (both heads
    of a partitioned one); returns how many were used."""
    if isinstance(model.estimator, PartitionedRegressor):
        model.estimator = PartitionedRegressor(ests[0], ests[1])
        return 2
    model.estimator = ests[0]
    return 1


def _choose_one(
    est: Any, one_thread: Any, x: np.ndarray, cache: Path, budget_s: float
) -> tuple[Any, dict[str, Any]]:
    """The faster of the library and compiled predict for one estimator that agrees with the library."""
    rec: dict[str, Any] = {"estimator": type(est).__name__, "rows": len(x)}
    ref = np.asarray(one_thread.predict(x), dtype=np.float64)
    t_lib = time_predict(one_thread.predict, x)
    rec["library_kpix_s"] = round(len(x) / t_lib / 1e3, 1)
    conv = _converted(est, cache)
    if conv is None:
        rec["choice"], rec["why"] = "library", "not supported by treelite"
        return est, rec
    est_s = estimate_compile_seconds(est)
    rec["compile_estimate_s"] = None if est_s is None else round(est_s, 1)
    cached = conv[1].exists() or conv[1].name in _BUILT
    if not cached and (est_s is None or est_s > budget_s):
        rec["choice"] = "library"
        guess = "unknown" if est_s is None else f"{est_s:.0f} s"
        rec["why"] = f"compile estimate {guess} over budget {budget_s:g} s"
        return est, rec
    t0 = time.perf_counter()
    try:
        comp = compile_estimator(est, cache)
    except Exception as exc:  # no C compiler, a tl2cgen build error: auto must still map, with the library
        rec["choice"], rec["why"] = "library", f"compilation failed: {str(exc).splitlines()[0][:200]}"
        return est, rec
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    diff = float(np.max(np.abs(np.asarray(comp.predict(x), dtype=np.float64) - ref))) if len(x) else 0.0
    t_comp = time_predict(comp.predict, x)
    rec["compiled_kpix_s"] = round(len(x) / t_comp / 1e3, 1)
    rec["max_abs_diff"] = diff
    if not diff <= AGREEMENT_ATOL:
        rec["choice"] = "library"
        rec["why"] = f"compiled differs by {diff:.3g} > {AGREEMENT_ATOL:g} gC m-2 d-1"
        return est, rec
    if t_comp * MIN_SPEEDUP > t_lib:
        rec["choice"], rec["why"] = "library", f"compiled not {MIN_SPEEDUP:g}x faster"
        return est, rec
    rec["choice"], rec["why"] = "compiled", f"{t_lib / t_comp:.1f}x faster"
    return comp, rec


def choose(
    model: TrainedModel,
    cache_dir: str | Path | None = None,
    sample: np.ndarray | None = None,
    budget_s: float = COMPILE_BUDGET_S,
) -> tuple[TrainedModel, str]:
    """``auto`` inference: per estimator, the library or compiled predict, whichever is faster and agrees.

    Parameters
    ----------
    model : the fitted model.
    cache_dir : compiled-library cache; the decision is recorded there as ``auto.json``.
    sample : (n, n_features) feature rows to time on (default :func:`sample_pixels`, the model's own
        training pixels).
    budget_s : skip compiling an estimator whose estimated compile time (s) is larger, unless cached.

    Returns
    -------
    The model to map with and a one-line description of the choice with the measured speeds (kpix/s,
    one thread), for the run's log.
    """
    from geoflux.mapping import single_threaded

    cache = _cache(cache_dir)
    x = sample_pixels(model) if sample is None else np.ascontiguousarray(sample, dtype=np.float32)
    one = _estimators(single_threaded(model))
    chosen: dict[str, Any] = {}
    record: dict[str, dict[str, Any]] = {}
    for band, est in _estimators(model).items():
        chosen[band], record[band] = _choose_one(est, one[band], x, cache, budget_s)
    m = copy.copy(model)
    ests = list(chosen.values())
    n_point = _with_point(m, ests)
    if getattr(model, "quantile_models", None) is not None:
        m.quantile_models = tuple(ests[n_point:])
    parts = []
    for band, r in record.items():
        speeds = f"library {r['library_kpix_s']:g}"
        if "compiled_kpix_s" in r:
            speeds += f", compiled {r['compiled_kpix_s']:g}"
        parts.append(f"{band} {r['choice']} ({speeds} kpix/s; {r['why']})")
    how = "auto: " + "; ".join(parts)
    with atomic_path(cache / "auto.json") as tmp:
        tmp.write_text(json.dumps({"atol_gC_m-2_d-1": AGREEMENT_ATOL, "bands": record}, indent=2))
    log.info("inference %s", how)
    if all(r["choice"] == "library" for r in record.values()):
        return model, how
    return m, how


def prepare(
    model: TrainedModel,
    mode: str = "library",
    cache_dir: str | Path | None = None,
    sample: np.ndarray | None = None,
    budget_s: float = COMPILE_BUDGET_S,
) -> tuple[TrainedModel, str]:
    """The model to map with: the library's predict, or compiled estimators where possible.

    Parameters
    ----------
    model : the fitted model.
    mode : ``library`` (the estimator's own predict), ``compiled`` (compile every estimator; error if
        impossible) or ``auto`` (see :func:`choose`: per estimator the compiled predict only where it was
        measured faster and agrees with the library; the library when treelite/tl2cgen are missing).
    cache_dir : compiled-library cache (e.g. ``<out>/model/compiled``).
    sample, budget_s : for ``auto``, see :func:`choose`.

    Returns
    -------
    The model to use (a shallow copy whose estimators are compiled, or ``model`` itself) and a short
    description of what is used, for logs.

    Raises
    ------
    ModelError
        for an unknown mode, or with ``compiled`` when the compilers are missing or cannot handle the model.
    """
    if mode not in MODES:
        raise ModelError(f"inference: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if mode == "library":
        return model, f"library predict ({type(model.estimator).__name__})"
    if not available():
        if mode == "compiled":
            raise ModelError("inference: compiled needs treelite and tl2cgen (pip install geoflux[compiled])")
        return model, "library predict (treelite/tl2cgen not installed)"
    if mode == "auto":
        return choose(model, cache_dir, sample, budget_s)
    point = [e for band, e in _estimators(model).items() if band in ("NEE", "NEE_reco", "NEE_gpp")]
    try:
        compiled = [compile_estimator(e, cache_dir) for e in point]
    except ImportError:
        compiled = [None]
    if any(c is None for c in compiled):
        raise ModelError(f"inference: treelite cannot compile {type(model.estimator).__name__}")
    m = copy.copy(model)
    _with_point(m, compiled)
    what = [f"compiled {' and '.join(c.name for c in compiled)}"]
    quantiles = getattr(model, "quantile_models", None)
    if quantiles is not None:
        try:
            cq = [compile_estimator(q, cache_dir) for q in quantiles]
        except ImportError:
            cq = [None]
        if all(c is not None for c in cq):
            m.quantile_models = tuple(cq)
            what.append("compiled quantile models")
    return m, " + ".join(what)
