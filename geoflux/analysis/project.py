"""`geoflux project`: NEE maps and budgets under a scenario.

A scenario is either

* a documented driver perturbation (:data:`~geoflux.analysis.scenarios.SCENARIOS`, e.g. ``warming_2K``:
  +2 K air and surface temperature with VPD at constant relative humidity), applied to every pixel and
  period of the run's drivers before the model sees them; or
* a scenario file (YAML) naming future driver rasters in a STAC catalog, loaded like any other driver::

      name: future-2050            # default: the file's stem
      description: CMIP6 SSP2-4.5 2050 drivers
      catalog: future/catalog.json # default catalog of the overridden drivers (relative to this file)
      time: {start: 2050-01-01, end: 2050-12-31}   # optional: the scenario's periods (step: the run's)
      variables:                   # per driver: fields of the run's definition to replace
        ta: {collection: future-ta}
        vpd: {collection: future-vpd, scale: 0.1}
      changes:                     # optional deltas on top, as the built-in scenarios
        - [sm, scale, 0.9]

Maps (every model band: NEE, NEE_q05, NEE_q95, DI, AOA) go to ``maps/scenarios/<name>/`` as COGs named as
the run's maps, with the scenario in their tags, plus ``outside-aoa.tif``: the share of periods each pixel
is outside the area of applicability. Budgets (:func:`geoflux.analysis.budgets.compute_budgets`) go to
``budgets/scenarios/<name>/``, with ``projection.json``: the scenario budgets, their change against the
run's own maps over the same periods, and the share of the region outside the AOA (NEE gC m-2 d-1; budgets
gC m-2 yr-1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geoflux.analysis.scenarios import SCENARIOS, Scenario
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig, TimeSpec
from geoflux.errors import ConfigError, GeofluxError, ModelError
from geoflux.model import TrainedModel

log = logging.getLogger("geoflux")

PROJECTION_JSON = "projection.json"
OUTSIDE_AOA = "outside-aoa.tif"


@dataclass
class ScenarioModel(TrainedModel):
    """A model that perturbs its features by a scenario before predicting (every band alike).

    Mapping calls ``predict_bands`` once per chunk; the perturbation happens there, so NEE, its band and
    the dissimilarity index (AOA) all see the scenario's drivers.
    """

    scenario: Scenario | None = None

    def _plain(self) -> TrainedModel:
        # a TrainedModel over the same (possibly single-threaded) estimators: no shared state to mutate
        return TrainedModel(**{k: getattr(self, k) for k in TrainedModel.__dataclass_fields__})

    def _perturb(self, x: np.ndarray) -> np.ndarray:
        return self.scenario.apply_features(x, self.features) if self.scenario else np.asarray(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """NEE (gC m-2 d-1) under the scenario."""
        return self._plain().predict(self._perturb(x))

    def predict_bands(self, x: np.ndarray) -> np.ndarray:
        """Every band under the scenario (see :meth:`TrainedModel.predict_bands`)."""
        return self._plain().predict_bands(self._perturb(x))


class _ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    catalog: str | None = None
    time: dict[str, Any] | None = None
    variables: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changes: list[tuple[str, str, float]] = Field(default_factory=list)


@dataclass(frozen=True)
class ScenarioSpec:
    """A resolved scenario: its perturbation (maybe none) and the run configuration its drivers load from."""

    name: str
    description: str
    perturbation: Scenario | None
    cfg: RunConfig
    source: str  # "built-in" or the scenario file
    overridden: tuple[str, ...] = ()  # drivers loaded from the scenario's catalog/collections


def scenario_names() -> list[str]:
    """Names of the built-in scenarios."""
    return [s.name for s in SCENARIOS]


def load_scenario(cfg: RunConfig, scenario: str | Path) -> ScenarioSpec:
    """A built-in scenario by name, or a scenario YAML file (see the module docstring).

    Raises
    ------
    ConfigError
        naming the scenario file and key (unknown driver, bad field), or an unknown built-in name.
    """
    from geoflux.catalog.variables import VariableSpec, format_validation_error, read_yaml

    builtin = {s.name: s for s in SCENARIOS}
    if str(scenario) in builtin:
        sc = builtin[str(scenario)]
        return ScenarioSpec(sc.name, sc.description, sc, cfg, "built-in")
    path = Path(scenario)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.exists():
        raise ConfigError(
            f"--scenario {scenario}: neither a built-in scenario nor a scenario YAML file (expected one of "
            f"{', '.join(builtin)}, or a .yaml file)"
        )
    data = read_yaml(path, ConfigError, "scenario")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys name, catalog, variables, time, changes")
    try:
        spec = _ScenarioFile(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
    name = spec.name or path.stem
    base = path.resolve().parent
    catalog = None
    if spec.catalog is not None:
        catalog = spec.catalog if "://" in spec.catalog else str((base / spec.catalog).resolve())
    by_name = {v.name: v for v in cfg.variables}
    variables = list(cfg.variables)
    for var, fields in spec.variables.items():
        if var not in by_name:
            raise ConfigError(
                f"{path}: variables.{var}: not a driver of the run (expected one of {', '.join(by_name)})"
            )
        fields = dict(fields)
        if "name" in fields:
            raise ConfigError(f"{path}: variables.{var}.name: cannot rename a driver (the model needs it)")
        if "catalog" in fields and "://" not in str(fields["catalog"]):
            fields["catalog"] = str((base / str(fields["catalog"])).resolve())
        elif "catalog" not in fields and catalog is not None:
            fields["catalog"] = catalog
        merged = {**by_name[var].model_dump(), **fields}
        try:
            new = VariableSpec(**merged)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(f"{path}: variables.{var}", exc)) from None
        if (new.kind, new.static, new.classes) != (
            by_name[var].kind,
            by_name[var].static,
            by_name[var].classes,
        ):
            raise ConfigError(
                f"{path}: variables.{var}: kind, static and classes must stay the run's "
                "(they are the model's features)"
            )
        variables[variables.index(by_name[var])] = new
    update: dict[str, Any] = {"variables": variables}
    if spec.time is not None:
        try:
            update["time"] = TimeSpec(**{"step": cfg.time.step, **spec.time})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(f"{path}: time", exc)) from None
        if update["time"].step != cfg.time.step:
            raise ConfigError(
                f"{path}: time.step: {update['time'].step} (expected the run's {cfg.time.step})"
            )
    known = {"add", "scale", "vpd_at_constant_rh"}
    for k, (_, op, _) in enumerate(spec.changes):
        if op not in known:
            raise ConfigError(
                f"{path}: changes.{k}: operation {op!r} (expected one of {', '.join(sorted(known))})"
            )
    pert = Scenario(name, spec.description, tuple(spec.changes)) if spec.changes else None
    return ScenarioSpec(
        name,
        spec.description,
        pert,
        cfg.model_copy(update=update),
        str(path),
        tuple(spec.variables),
    )


def _aoa_share(paths: Sequence[Path], chunk: int, geobox: Any) -> tuple[float, Any]:
    """Share of valid pixel-periods outside the AOA, and the lazy per-pixel share of periods outside."""
    import dask
    import dask.array as da

    from geoflux.analysis.budgets import _open_stack

    stack = _open_stack(list(paths), chunk, geobox)
    outside = da.where(da.isfinite(stack), stack == 0, np.nan)
    per_pixel = da.nanmean(outside, axis=0).astype("float32")
    n_out, n_valid = dask.compute(da.nansum(outside), da.isfinite(outside).sum())
    return (float(n_out / n_valid) if n_valid else float("nan")), per_pixel


def project(
    cfg: RunConfig,
    scenario: str | Path,
    *,
    overwrite: bool = False,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Scenario NEE maps (every band, COG) and budgets; see the module docstring for the outputs.

    Parameters
    ----------
    cfg : the run configuration (a trained model; the run's own maps for the change against them).
    scenario : a built-in scenario name (:func:`scenario_names`) or a scenario YAML file.
    overwrite : redo maps and budgets that exist (default: keep maps whose provenance equals this
        scenario's, as ``geoflux map`` resumes).
    scheduler, workers, progress, echo : as for ``geoflux map``.

    Returns
    -------
    The content of ``projection.json``: ``scenario``, ``budgets`` per year (scenario, base and change,
    gC m-2 yr-1, with the scenario's 90 % interval), ``aoa`` (share of the region's pixel-periods outside
    the area of applicability, scenario and base), the drivers the perturbation names that the run lacks,
    and the output folders.
    """
    import geoflux
    from geoflux.analysis.budgets import compute_budgets
    from geoflux.cog import RasterSpec, write_cogs
    from geoflux.cube import cube_from_config, target_grid
    from geoflux.features import feature_names
    from geoflux.mapping.predict import band_spec, write_maps
    from geoflux.mapping.products import input_item_ids
    from geoflux.model import load_model
    from geoflux.run import MODEL, layout

    spec = load_scenario(cfg, scenario)
    scfg = spec.cfg
    run = layout(cfg)
    model_path = run.require(MODEL)
    model = load_model(model_path)
    features = feature_names(cfg.variables)
    if list(model.features) != features:
        raise ModelError(f"model features {model.features} differ from the configured drivers' {features}")
    missing = [c[0] for c in (spec.perturbation.changes if spec.perturbation else ()) if c[0] not in features]
    if spec.perturbation and len(missing) == len(spec.perturbation.changes) and not spec.overridden:
        raise GeofluxError(
            f"scenario {spec.name}: changes only drivers the run does not have ({', '.join(missing)}; "
            f"expected some of {', '.join(features)})"
        )
    smodel = ScenarioModel(**{k: getattr(model, k) for k in TrainedModel.__dataclass_fields__})
    smodel.scenario = spec.perturbation
    maps_dir = run.scenario_maps(spec.name)
    budgets_dir = run.scenario_budgets(spec.name)
    geobox = target_grid(scfg.grid)
    card = json.loads(model_path.with_suffix(".json").read_text())
    stags = {
        "scenario": spec.name,
        "scenario_description": spec.description,
        "scenario_source": spec.source,
        "scenario_changes": json.dumps([list(c) for c in spec.perturbation.changes])
        if spec.perturbation
        else "",
        "scenario_drivers": ",".join(spec.overridden),
    }
    tags = {
        "software": f"geoflux {geoflux.__version__}",
        "model_sha256": card["sha256"],
        "model_kind": cfg.model.kind,
        "variables": ",".join(v.name for v in scfg.variables),
        **stags,
    }
    periods, ends = scfg.period_bounds()
    cube = cube_from_config(scfg)
    items = input_item_ids(cube, periods, scfg.time.step)
    paths = {b: run.map_paths(periods, b, maps_dir) for b in model.bands}
    outputs = {
        i: [
            band_spec(
                b,
                paths[b][p],
                model.target_units,
                {
                    **tags,
                    "period_start": f"{p:%Y-%m-%d}",
                    "period_end": f"{e:%Y-%m-%d}",
                    "period": scfg.time.step,
                    "input_items": items[p],
                },
            )
            for b in model.bands
        ]
        for i, (p, e) in enumerate(zip(periods, ends, strict=True))
    }
    echo(f"project: {spec.name}: mapping {len(periods)} periods x {len(model.bands)} bands -> {maps_dir}")
    write_maps(
        cube,
        smodel,
        scfg.variables,
        geobox,
        outputs,
        scheduler,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        echo=echo,
    )
    result: dict[str, Any] = {
        "scenario": {
            "name": spec.name,
            "description": spec.description,
            "source": spec.source,
            "changes": [list(c) for c in spec.perturbation.changes] if spec.perturbation else [],
            "drivers_from_catalog": list(spec.overridden),
            "changes_not_in_run": missing,
        },
        "units": {"budgets": "gC m-2 yr-1 (region mean; NEE > 0 is a source)", "maps": model.target_units},
        "maps": str(maps_dir),
        "budgets_folder": str(budgets_dir),
    }
    # area of applicability: the scenario's own AOA band, against the run's where its maps exist
    if "AOA" in model.bands:
        share, per_pixel = _aoa_share([paths["AOA"][p] for p in periods], scfg.grid.chunk, geobox)
        write_cogs(
            [per_pixel],
            geobox,
            [
                RasterSpec(
                    maps_dir / OUTSIDE_AOA,
                    units="1",
                    description="share of periods outside the area of applicability",
                    tags={**tags, "quantity": "share of the scenario's periods outside the AOA (0..1)"},
                )
            ],
            overwrite=True,
        )
        aoa: dict[str, Any] = {"outside_share": share, "map": str(maps_dir / OUTSIDE_AOA)}
        base_aoa = [run.map_path(p, "AOA") for p in periods]
        if spec.cfg.time == cfg.time and all(p.exists() for p in base_aoa):
            aoa["base_outside_share"] = _aoa_share(base_aoa, cfg.grid.chunk, geobox)[0]
        result["aoa"] = aoa
    else:
        result["aoa"] = None
        result["aoa_note"] = "the model has no AOA band (model.aoa: false)"
    if not {"NEE_q05", "NEE_q95"} <= set(model.bands):
        result["budgets"] = None
        result["budgets_note"] = "the model has no uncertainty band: budgets need NEE_q05/NEE_q95"
    else:
        sb = compute_budgets(scfg, maps_dir=maps_dir, out_dir=budgets_dir, truth=False, tags=stags)
        base = None
        if spec.cfg.time == cfg.time and all(run.map_path(p).exists() for p in periods):
            base = compute_budgets(cfg, write=False, truth=False)
        years = {}
        for name, w in sb["windows"].items():
            r = w["region"]
            entry = {"complete": w["complete"], "nee": r.get("nee"), "interval": r.get("interval")}
            if base is not None and "nee" in base["windows"][name]["region"]:
                b = base["windows"][name]["region"]["nee"]
                entry |= {"base": b, "change": r["nee"] - b}
            years[name] = entry
        result["budgets"] = years
        if base is None:
            result["budgets_note"] = (
                "no change against the run: the scenario's periods differ from the run's or the run's "
                "maps are missing ('geoflux map' first)"
            )
    budgets_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(budgets_dir / PROJECTION_JSON) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str))
    return result
