"""`geoflux analyze`: all analyses of a trained run, written under ``analysis/``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoflux.analysis.attribution import (
    dependence,
    driver_groups,
    grouped_permutation_importance,
    iav_attribution,
    sample_drivers,
    shap_importance,
)
from geoflux.analysis.multiscale import multiscale_scores, multiscale_table
from geoflux.analysis.scenarios import SCENARIOS, Scenario, scenario_projection
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig
from geoflux.errors import GeofluxError, ModelError

NEE_UNITS = "gC m-2 d-1"
ANALYSIS_DIR = "analysis"


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------


def _write_json(obj: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
    return path


def _bar_plot(df: pd.DataFrame, x: str, y: str, err: str | None, ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar(df[x].astype(str), df[y], yerr=df[err] if err else None, color="0.4")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _iav_plot(table: pd.DataFrame, drivers: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = table.loc[table["region"] == "all"]
    labels = [str(p)[:10] for p in g["period"]]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    pos, neg = np.zeros(len(g)), np.zeros(len(g))
    for d in [*drivers, "interaction"]:
        col = "interaction" if d == "interaction" else f"contrib_{d}"
        v = g[col].to_numpy()
        bottom = np.where(v >= 0, pos, neg)
        ax.bar(labels, v, bottom=bottom, label=d)
        pos += np.clip(v, 0, None)
        neg += np.clip(v, None, 0)
    ax.plot(labels, g["anomaly"], "k.-", label="NEE anomaly")
    ax.set_ylabel(f"NEE anomaly ({NEE_UNITS})")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def analyze(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    n_pixels: int = 2000,
    importance_folds: int = 5,
    n_repeats: int = 5,
    scenarios: Sequence[Scenario] = SCENARIOS,
) -> dict[str, Any]:
    """Everything ``geoflux analyze CONFIG`` produces, from a run that has been trained.

    Reads ``training/training.parquet``, ``model/model.skops`` and ``model/cv_predictions.parquet`` under
    ``cfg.output``; writes into ``out_dir`` (default ``<output>/analysis``): ``analysis.json`` (the returned
    dict), ``multiscale.txt``/``.csv``, ``importance.csv``/``.png``, ``pd_*.png``, ``pd2_*.png``,
    ``partial_dependence.csv``, ``iav.csv``/``.png``, ``scenarios.csv`` and, with ``shap`` installed,
    ``shap_summary.png``.

    Parameters
    ----------
    cfg : the run configuration.
    out_dir : output folder.
    n_pixels : pixels sampled from the cube for the IAV attribution and the scenarios.
    importance_folds, n_repeats : grouped folds and permutations of the importance.
    scenarios : driver perturbations to project.
    """
    from geoflux.features import feature_names
    from geoflux.model import load_model
    from geoflux.run import CV_PREDICTIONS, MODEL, TRAINING, load_sites

    out = Path(out_dir) if out_dir is not None else cfg.out_dir / ANALYSIS_DIR
    for rel, stage in ((TRAINING, "extract"), (MODEL, "train"), (CV_PREDICTIONS, "train")):
        if not (cfg.out_dir / rel).exists():
            raise GeofluxError(f"{cfg.out_dir / rel}: not found (run 'geoflux {stage}' first)")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are there: a refused run leaves nothing
    table = pd.read_parquet(cfg.out_dir / TRAINING)
    model = load_model(cfg.out_dir / MODEL)
    features = feature_names(cfg.variables)
    if list(model.features) != features:
        raise ModelError(f"model features {model.features} differ from the configured drivers' {features}")
    result: dict[str, Any] = {"units": NEE_UNITS}

    cv_pred = pd.read_parquet(cfg.out_dir / CV_PREDICTIONS)
    ms = multiscale_scores(cv_pred)
    result["multiscale"] = ms
    text = multiscale_table(ms)
    (out / "multiscale.txt").write_text(text + "\n")
    pd.DataFrame(ms["scales"]).T.rename_axis("scale").to_csv(out / "multiscale.csv")

    sites = load_sites(cfg)
    groups = driver_groups(features, cfg.variables)
    imp = grouped_permutation_importance(
        table, features, cfg.model, groups, n_folds=importance_folds, n_repeats=n_repeats, sites=sites
    )
    imp.to_csv(out / "importance.csv", index=False)
    _bar_plot(
        imp,
        "driver",
        "importance",
        "importance_std",
        "held-out MSE increase ((gC m-2 d-1)²)",
        out / "importance.png",
    )
    result["importance"] = imp.to_dict(orient="records")

    continuous = [d for d in imp["driver"] if d in features]
    result["dependence"] = dependence(model, table, continuous[:4], out, seed=cfg.model.seed)
    shap_vals = shap_importance(model, table, out, seed=cfg.model.seed)
    result["shap"] = shap_vals if shap_vals is not None else "shap not installed"

    sample = sample_drivers(cfg, n_pixels=n_pixels, seed=cfg.model.seed)
    iav, iav_info = iav_attribution(model, sample, cfg.variables)
    iav.to_csv(out / "iav.csv", index=False)
    _iav_plot(iav, iav_info["drivers"], out / "iav.png")
    result["iav"] = iav_info

    sc = scenario_projection(model, sample, cfg.variables, scenarios)
    sc.to_csv(out / "scenarios.csv", index=False)
    result["scenarios"] = sc.loc[sc["region"] == "all"].to_dict(orient="records")

    _write_json(result, out / "analysis.json")
    return result
