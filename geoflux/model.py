"""Model stage: fit a scikit-learn regressor on the training table, validate it by site, save/load safely.

Validation is always grouped by site (leave-one-site-out or GroupKFold): random-row splits leak a site's
own data into its test fold and overstate skill.

Model files are written with skops (no code runs on load) next to a JSON card holding the feature list,
units, training domain, provenance and the SHA-256 of the estimator file; loading refuses a file whose
hash does not match or that contains types other than the expected scikit-learn ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import skops.io as sio
from sklearn.base import RegressorMixin
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

import geoflux
from geoflux.atomic import atomic_path
from geoflux.config import ModelSpec
from geoflux.errors import ModelError
from geoflux.metrics import per_site_scores, summary

TARGET_UNITS = "gC m-2 d-1"
_TRUSTED_PREFIXES = ("sklearn.", "numpy.")


@dataclass
class TrainedModel:
    """A fitted estimator and what it needs to be applied honestly elsewhere."""

    estimator: RegressorMixin
    features: list[str]
    feature_units: dict[str, str]
    target_units: str = TARGET_UNITS
    domain: dict[str, list[float]] = field(default_factory=dict)  # feature → [min, max] seen in training
    provenance: dict = field(default_factory=dict)

    bands: tuple[str, ...] = ("NEE",)  # output bands of predict_bands, NEE first

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predict NEE (gC m-2 d-1) for a (n, n_features) float array."""
        return self.estimator.predict(x)

    def predict_bands(self, x: np.ndarray) -> np.ndarray:
        """All output bands for a (n, n_features) array: (n, len(bands)) float32, NEE in column 0.

        The plain model has only NEE; models with uncertainty or an area of applicability add bands.
        """
        return np.asarray(self.predict(x), dtype=np.float32)[:, None]


def make_estimator(spec: ModelSpec) -> RegressorMixin:
    """The configured regressor; ``spec.params`` override the defaults."""
    params = dict(spec.params)
    try:
        if spec.kind == "random_forest":
            return RandomForestRegressor(
                **{"n_estimators": 200, "n_jobs": -1, "random_state": spec.seed, **params}
            )
        return HistGradientBoostingRegressor(**{"random_state": spec.seed, **params})
    except TypeError as exc:
        raise ModelError(f"model.params: {exc}") from None


def _check_table(table: pd.DataFrame, features: list[str]) -> None:
    missing = [c for c in [*features, "site", "NEE"] if c not in table.columns]
    if missing:
        raise ModelError(f"training table lacks column(s) {missing}")
    if table["site"].nunique() < 2:
        raise ModelError("training table has fewer than 2 sites: site-grouped validation is impossible")


def cross_validate(table: pd.DataFrame, features: list[str], spec: ModelSpec) -> tuple[pd.DataFrame, dict]:
    """Site-grouped cross-validation.

    Parameters
    ----------
    table : training table with ``site``, ``time``, feature columns and ``NEE`` (gC m-2 d-1).
    features : feature columns.
    spec : model spec; ``cv_folds`` 0 = leave-one-site-out, k > 1 = GroupKFold(k).

    Returns
    -------
    Held-out predictions (``site``, ``time``, ``obs``, ``pred``) and a summary: pooled ``r2``, ``rmse``,
    ``bias``, per-site median ``nse`` (``nse_site_median``) and the per-site table.
    """
    _check_table(table, features)
    x = table[features].to_numpy(np.float32)
    y = table["NEE"].to_numpy()
    groups = table["site"].to_numpy()
    n_sites = len(np.unique(groups))
    splitter = LeaveOneGroupOut() if spec.cv_folds == 0 else GroupKFold(n_splits=min(spec.cv_folds, n_sites))
    pred = np.full(len(y), np.nan)
    for train, test in splitter.split(x, y, groups):
        est = make_estimator(spec).fit(x[train], y[train])
        pred[test] = est.predict(x[test])
    out = table[["site", "time"]].assign(obs=y, pred=pred)
    result = summary(out)
    result["scheme"] = "leave-one-site-out" if spec.cv_folds == 0 else f"GroupKFold({spec.cv_folds})"
    result["per_site"] = per_site_scores(out).to_dict(orient="records")
    return out, result


def fit(
    table: pd.DataFrame,
    features: list[str],
    feature_units: dict[str, str],
    spec: ModelSpec,
    provenance: dict | None = None,
) -> TrainedModel:
    """Fit the configured regressor on all rows of the training table."""
    _check_table(table, features)
    x = table[features].to_numpy(np.float32)
    est = make_estimator(spec).fit(x, table["NEE"].to_numpy())
    domain = {f: [float(np.nanmin(table[f])), float(np.nanmax(table[f]))] for f in features}
    prov = {
        "geoflux_version": geoflux.__version__,
        "kind": spec.kind,
        "params": dict(spec.params),
        "n_samples": len(table),
        "sites": sorted(map(str, table["site"].unique())),
        **(provenance or {}),
    }
    return TrainedModel(est, list(features), dict(feature_units), TARGET_UNITS, domain, prov)


def _card_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(model: TrainedModel, path: str | Path) -> Path:
    """Write ``path`` (skops estimator) and ``path.with_suffix('.json')`` (card with the estimator's hash)."""
    path = Path(path)
    blob = sio.dumps(model.estimator)
    card = {k: v for k, v in asdict(model).items() if k != "estimator"}
    card["sha256"] = hashlib.sha256(blob).hexdigest()
    card["format"] = "skops"
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    with atomic_path(_card_path(path)) as tmp:
        tmp.write_text(json.dumps(card, indent=2))
    return path


def load_model(path: str | Path) -> TrainedModel:
    """Load a model saved by :func:`save_model`, refusing tampered or foreign files.

    Raises
    ------
    ModelError
        if the card is missing, the hash does not match, or the file holds types outside scikit-learn/numpy.
    """
    path = Path(path)
    card_path = _card_path(path)
    try:
        blob = path.read_bytes()
        card = json.loads(card_path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{exc.filename}: model file not found") from None
    except json.JSONDecodeError:
        raise ModelError(f"{card_path}: model card is not valid JSON") from None
    if card.get("format") != "skops" or "sha256" not in card:
        raise ModelError(f"{card_path}: not a geoflux model card (no skops format/sha256)")
    if hashlib.sha256(blob).hexdigest() != card["sha256"]:
        raise ModelError(f"{path}: content hash does not match its card {card_path.name} (file was altered)")
    try:
        untrusted = sio.get_untrusted_types(data=blob)
    except Exception:
        raise ModelError(f"{path}: not a skops model file") from None
    foreign = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise ModelError(f"{path}: refuses to load untrusted type(s) {foreign[:3]}")
    est = sio.loads(blob, trusted=untrusted)
    return TrainedModel(
        est, card["features"], card["feature_units"], card["target_units"], card["domain"], card["provenance"]
    )
