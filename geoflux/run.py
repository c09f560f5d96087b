"""The run folder: every artefact a run writes, where it lives, and how a stage reads and writes it.

:class:`RunLayout` is a value (the run folder) passed to whoever reads or writes an artefact; no other module
spells a path inside a run folder. Layout under the output folder::

    towers/observations.parquet   aggregated, QC-filtered tower NEE (gC m-2 d-1) and meteorology
    towers/footprints.npz, .json  footprint weights of each tower on the grid (with the grid they are on)
    towers/footprint_methods.csv  footprint method per tower and, for a disk fallback, why
    cube.zarr                     the driver cube (``geoflux cube``, for inspection)
    training/training.parquet     footprint-weighted drivers joined with observations
    training/pixels.parquet       every kept footprint pixel per tower and step: weight, per-pixel features
    model/model.skops, model.json fitted model + card; cv_predictions.parquet, cv_metrics.json
    maps/nee_YYYYMMDD.tif         NEE COG per time step (and one file per band); maps/catalog.json (STAC)
    validation/metrics.json       truth / cv / towers scores; pairs.parquet, skill_<stratum>.csv
    analysis/                     ``geoflux analyze``: analysis.json, importance.csv, partial_dependence.csv
    budgets/budgets.json, .csv    ``geoflux budgets``: budgets per window, region and class
    analysis/attribution_years.*  year-to-year budget attribution (table); analysis/attribution/*.tif maps
    maps/scenarios/<name>/        scenario maps (same bands as maps/), ``geoflux project``
    budgets/scenarios/<name>/     scenario budgets and projection.json
    report/index.html             the report
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from geoflux.atomic import atomic_path
from geoflux.errors import GeofluxError

OBSERVATIONS = "towers/observations.parquet"
FOOTPRINTS = "towers/footprints.npz"
FOOTPRINT_METHODS = "towers/footprint_methods.csv"
CUBE = "cube.zarr"
TRAINING = "training/training.parquet"
PIXELS = "training/pixels.parquet"
MODEL = "model/model.skops"
CV_PREDICTIONS = "model/cv_predictions.parquet"
CV_METRICS = "model/cv_metrics.json"
MAPS = "maps"
METRICS = "validation/metrics.json"
VALIDATION_PAIRS = "validation/pairs.parquet"
SITE_SKILL = "validation/skill_site.csv"
ANALYSIS = "analysis"
ANALYSIS_JSON = "analysis/analysis.json"
BUDGETS_JSON = "budgets/budgets.json"
BUDGETS_CSV = "budgets/budgets.csv"
REPORT = "report/index.html"
ATTRIBUTION_YEARS = "analysis/attribution_years.json"
ATTRIBUTION_MAPS = "analysis/attribution"
SCENARIO_MAPS = "maps/scenarios"
SCENARIO_BUDGETS = "budgets/scenarios"

# which command writes each artefact (for "run ... first" messages)
PRODUCERS = {
    OBSERVATIONS: "towers aggregate",
    FOOTPRINTS: "towers aggregate",
    FOOTPRINT_METHODS: "towers aggregate",
    TRAINING: "extract",
    PIXELS: "extract",
    MODEL: "train",
    CV_PREDICTIONS: "train",
    CV_METRICS: "train",
    METRICS: "validate",
    VALIDATION_PAIRS: "validate",
}


def band_stem(band: str) -> str:
    """File-name stem of a model band: ``NEE`` → ``nee``, ``NEE_q05`` → ``nee-q05``, ``DI`` → ``di``.

    The band and the date are separated by ``_`` and nothing else is, so ``nee_*.tif`` lists exactly the
    NEE maps (as tools written for single-band runs expect).
    """
    return band.lower().replace("_", "-")


@dataclass(frozen=True)
class RunLayout:
    """The artefacts of one run folder.

    Attributes
    ----------
    root : the run's output folder.
    """

    root: Path

    def path(self, rel: str) -> Path:
        """Path of an artefact given by its layout name (e.g. :data:`TRAINING`)."""
        return self.root / rel

    def require(self, rel: str, producer: str | None = None) -> Path:
        """Path of an artefact that must exist; otherwise a one-line error saying which command writes it."""
        path = self.path(rel)
        if not path.exists():
            by = producer or PRODUCERS.get(rel, "the previous stage")
            raise GeofluxError(f"{path}: not found (run 'geoflux {by}' first)")
        return path

    # --------------------------------------------------------------------------------------------- writers

    def write_parquet(self, rel: str, df: pd.DataFrame) -> Path:
        """Write a table atomically."""
        path = self.path(rel)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        return path

    def write_json(self, rel: str, obj: dict) -> Path:
        """Write a JSON document atomically (non-JSON values as strings)."""
        path = self.path(rel)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, default=str))
        return path

    # --------------------------------------------------------------------------------------------- readers

    def read_parquet(self, rel: str) -> pd.DataFrame:
        """Read a stage's table (error naming the producing command if it is missing)."""
        return pd.read_parquet(self.require(rel))

    def read_json(self, rel: str) -> dict:
        """Read a stage's JSON document (error naming the producing command if it is missing)."""
        return json.loads(self.require(rel).read_text())

    def optional_json(self, rel: str) -> dict | None:
        """A JSON document of an optional stage (``analyze``, ``budgets``), or None when it was not run."""
        path = self.path(rel)
        return json.loads(path.read_text()) if path.is_file() else None

    def optional_csv(self, rel: str) -> pd.DataFrame | None:
        """A CSV table of an optional output (e.g. :data:`SITE_SKILL`), or None when it is absent."""
        path = self.path(rel)
        return pd.read_csv(path) if path.is_file() else None

    def analysis_files(self, pattern: str) -> list[Path]:
        """Files of ``analysis/`` matching a glob (``pd2_*.png``), sorted; empty before an analysis."""
        return sorted(self.path(ANALYSIS).glob(pattern))

    def model_card(self) -> dict | None:
        """The model card (``model/model.json``), or None before training."""
        card = self.path(MODEL).with_suffix(".json")
        return json.loads(card.read_text()) if card.exists() else None

    def training_sites(self) -> list[str] | None:
        """Sites the model was fitted on (model card ``provenance.sites``); None without a model card."""
        card = self.model_card()
        sites = (card or {}).get("provenance", {}).get("sites")
        return [str(s) for s in sites] if sites is not None else None

    def footprints(self, sites: Iterable[str] | None = None, geobox: Any = None) -> dict:
        """Footprint weights written by the towers stage (of ``sites`` if given).

        ``geobox``: the grid the caller will use them on; footprints computed on another grid are refused
        (their row/column offsets would point at the wrong pixels).
        """
        from geoflux.footprint import load_footprints

        fps = load_footprints(self.require(FOOTPRINTS), geobox=geobox)
        keep = None if sites is None else set(map(str, sites))
        return {s: fw for s, fw in fps.items() if keep is None or s in keep}

    def map_path(self, period: pd.Timestamp, band: str = "NEE", folder: Path | None = None) -> Path:
        """``maps/<band>_YYYYMMDD.tif`` of a period (``folder`` replaces ``maps/``, e.g. for tiles)."""
        base = self.path(MAPS) if folder is None else folder
        return base / f"{band_stem(band)}_{period:%Y%m%d}.tif"

    def map_paths(
        self, periods: Iterable[pd.Timestamp], band: str = "NEE", folder: Path | None = None
    ) -> dict[pd.Timestamp, Path]:
        """Map path per period start."""
        return {p: self.map_path(p, band, folder) for p in periods}

    def scenario_maps(self, name: str) -> Path:
        """``maps/scenarios/<name>/``: the maps of a scenario (``geoflux project``)."""
        return self.path(SCENARIO_MAPS) / name

    def scenario_budgets(self, name: str) -> Path:
        """``budgets/scenarios/<name>/``: the budgets and ``projection.json`` of a scenario."""
        return self.path(SCENARIO_BUDGETS) / name


def layout(cfg: Any) -> RunLayout:
    """The run folder of a configuration (its ``output``, resolved against the config's folder)."""
    return RunLayout(Path(cfg.out_dir))


def load_sites(cfg: Any) -> pd.DataFrame:
    """The configured site table (``towers.sites``), indexed by SITE_ID."""
    from geoflux.towers import read_sites

    return read_sites(cfg.path(cfg.towers.sites))
