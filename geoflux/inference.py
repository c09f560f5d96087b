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
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from geoflux.errors import ModelError
from geoflux.model import TrainedModel

log = logging.getLogger("geoflux")

MODES = ("library", "compiled", "auto")

_LOADED: dict[str, Any] = {}  # library hash → tl2cgen.Predictor, once per process
_LOAD_LOCK = threading.Lock()


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
                    folder = Path(tempfile.gettempdir()) / f"geoflux-compiled-{os.getuid()}-{os.getpid()}"
                    folder.mkdir(mode=0o700, exist_ok=True)
                    path = folder / f"{self.digest}.so"
                    if not path.exists():
                        path.write_bytes(self.lib)
                    # One thread per call: dask runs one chunk per core.
                    pred = tl2cgen.Predictor(str(path), nthread=1)
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


def compile_estimator(est: Any, cache_dir: str | Path | None = None, nthread: int | None = None) -> Any:
    """A :class:`CompiledEstimator` for ``est``, or None when treelite cannot convert it.

    Parameters
    ----------
    est : fitted tree ensemble.
    cache_dir : where compiled libraries are kept by model hash (default: a folder in the temp dir).
    nthread : compiler jobs (default: all CPUs).
    """
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"geoflux-compiled-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    import tl2cgen

    tl_model = _to_treelite(est)
    if tl_model is None:
        return None
    key = hashlib.sha256(tl_model.serialize_bytes()).hexdigest()[:24]
    lib = cache / f"{type(est).__name__}-{key}.so"
    if not lib.exists():
        n = nthread or os.cpu_count() or 1
        log.warning(
            "compiling %s (%d trees) with tl2cgen, once; cached in %s",
            type(est).__name__,
            tl_model.num_tree,
            cache,
        )
        part = lib.with_name(lib.name + f".{os.getpid()}.part.so")
        # Split big ensembles into several C files so the compiler runs in parallel and each file stays
        # small enough for gcc to optimize quickly.
        params = {"parallel_comp": max(n, min(64, tl_model.num_tree // 25))}
        tl2cgen.export_lib(tl_model, toolchain="gcc", libpath=str(part), params=params, nthread=n)
        os.replace(part, lib)
    return CompiledEstimator(lib.read_bytes(), tl_model.num_feature, type(est).__name__)


def prepare(
    model: TrainedModel, mode: str = "library", cache_dir: str | Path | None = None
) -> tuple[TrainedModel, str]:
    """The model to map with: the library's predict, or compiled estimators where possible.

    Parameters
    ----------
    model : the fitted model.
    mode : ``library`` (the estimator's own predict), ``compiled`` (compile; error if impossible) or
        ``auto`` (compile when treelite/tl2cgen are installed and the estimator is supported, else fall
        back to the library).
    cache_dir : compiled-library cache (e.g. ``<out>/model/compiled``).

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
    try:
        compiled = compile_estimator(model.estimator, cache_dir)
    except ImportError:
        compiled = None
    if compiled is None:
        if mode == "compiled":
            raise ModelError(f"inference: treelite cannot compile {type(model.estimator).__name__}")
        return model, f"library predict ({type(model.estimator).__name__} not supported by treelite)"
    m = copy.copy(model)
    m.estimator = compiled
    what = [f"compiled {compiled.name}"]
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
