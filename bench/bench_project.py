"""Year-to-year attribution and +2 K projection on a multi-year generated world, against the generator.

Uses a run folder of a multi-year world (generated and run through towers, extract, train and map unless
--reuse finds them done; ``bench/bench_budgets.py --out DIR`` leaves one), then

1. ``geoflux attribute``: each year's budget anomaly split into driver contributions through the model;
   is the driver ranked first (largest |contribution|) the generator's first (``truth_budgets.json``)?
2. ``geoflux project --scenario warming_2K``: the mapped change of each year's regional budget against the
   change of the generator's own truth function under the same perturbation
   (:func:`geoflux.demo.perturbed_truth_budgets`), and the share of the region outside the AOA.

    PYTHONPATH=$PWD python bench/bench_project.py --size tiny-multiyear --out /tmp/bench-project --reuse

``--monotonic sw:-1,ndvi:-1,vpd:1`` and ``--param max_features=0.5`` set ``model.monotonic`` and
``model.params`` of a new world's configuration (README 'Projection': the sign-constrained option);
``--model averaged_share=0`` sets any other model field. ``--from DIR`` compares a model option on the same
training table: it reuses a finished run's world (symlinked), towers and extract, then trains and maps anew:

    PYTHONPATH=$PWD python bench/bench_project.py --from /tmp/bench-project --out /tmp/bench-mono \
        --monotonic sw:-1,ndvi:-1,vpd:1 --param max_features=0.5

``--bag-without sw,ta,vpd,sm,lst`` (bench-only) makes the point model an average of models each fitted
without one of those features.
The truth NSE of the run's own NEE maps (every pixel and period) is printed beside the projection, so an
option that projects better at the cost of the ordinary maps shows it.

Done-when (issue #16): first drivers agree in every year; the +2 K change within 25 % of the truth's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _set_model(cfg_path: Path, monotonic: str, params: list[str], fields: list[str] = ()) -> None:
    """Write model.monotonic / model.params / other model fields into a fresh world's configuration."""
    import yaml

    data = yaml.safe_load(cfg_path.read_text())
    model = data.setdefault("model", {})
    if monotonic:
        model["monotonic"] = {k: int(v) for k, v in (t.split(":") for t in monotonic.split(","))}
    for p in params:
        k, v = p.split("=")
        model.setdefault("params", {})[k] = yaml.safe_load(v)
    for p in fields:
        k, v = p.split("=")
        model[k] = yaml.safe_load(v)
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))


def _copy_inputs(base: Path, out: Path) -> None:
    """A new run folder sharing ``base``'s world (symlinked: read only) with copies of its configuration and
    tower and extract outputs, so only train and map run again (a model option compared on the same
    training table)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "config.yaml", out / "config.yaml")
    if not (out / "world").exists():
        (out / "world").symlink_to((base / "world").resolve())
    for d in ("towers", "training"):
        if (base / d).exists() and not (out / d).exists():
            shutil.copytree(base / d, out / d)


def _generator_group_effect(world, fields, members: list[str]) -> dict[str, float]:
    """The generator's own contribution of a group of drivers to each year's regional budget anomaly
    (gC m-2 yr-1): the truth function with every member it depends on held at its per-pixel climatology
    together, as :func:`geoflux.demo.true_budgets` does for one driver (members it ignores, e.g. lst,
    contribute nothing)."""
    from geoflux.demo import TRUTH_DRIVERS, _budget_by_year, _stored_drivers, true_fluxes

    years = world.periods.year.to_numpy()
    days = world.period_days.astype(float)
    n_years = len(np.unique(years))
    drivers = _stored_drivers(fields)
    held = dict(drivers)
    for d in members:
        if d in drivers:
            x = drivers[d]
            clim = x.reshape(n_years, -1, *x.shape[1:]).mean(axis=0)
            held[d] = np.tile(clim, (n_years, 1, 1))
    region = np.ones(fields.landcover.shape, bool)

    def anomaly(values: dict[str, np.ndarray]) -> dict[int, float]:
        gpp, reco = true_fluxes(fields.landcover[None], *(values[k] for k in TRUTH_DRIVERS))
        b = _budget_by_year(reco - gpp, years, days, region)
        mean = float(np.mean(list(b.values())))
        return {y: v - mean for y, v in b.items()}

    a, h = anomaly(drivers), anomaly(held)
    return {str(y): a[y] - h[y] for y in a}


def _diagnose(cfg, world, fields, changes) -> None:
    """Where the mapped scenario change falls short: per channel (each change alone) and for pixel-periods
    the change pushes beyond the training table's range (model.domain) against the rest, mapped vs truth
    function, over every pixel and period (the run's own model; region means, gC m-2 yr-1 averaged over
    the years)."""
    from geoflux.analysis.attribution import _features, sample_drivers
    from geoflux.analysis.scenarios import Scenario
    from geoflux.demo import TRUTH_DRIVERS, _esat, _stored_drivers, true_fluxes
    from geoflux.features import feature_names
    from geoflux.model import load_model
    from geoflux.run import MODEL, layout

    model = load_model(layout(cfg).require(MODEL))
    features = feature_names(cfg.variables)
    s = sample_drivers(cfg, n_pixels=world.nx * world.ny)
    nt, npix = len(world.periods), world.nx * world.ny
    if not s["valid"].all() or len(s) != nt * npix:
        print("diagnosis skipped: drivers missing at some pixels")
        return
    x0 = _features(s, cfg.variables).astype(np.float32)
    rows, cols = s["row"].to_numpy()[:npix], s["col"].to_numpy()[:npix]
    days = world.period_days.astype(float)
    n_years = len(np.unique(world.periods.year))
    drivers = {k: v[:, rows, cols] for k, v in _stored_drivers(fields).items()}
    lc = fields.landcover[None, rows, cols]

    def truth(chs) -> np.ndarray:
        held = dict(drivers)
        for var, op, val in chs:
            if var in held:
                if op == "add":
                    held[var] = held[var] + val
                elif op == "scale":
                    held[var] = held[var] * val
                else:
                    held[var] = held[var] * _esat(drivers["ta"] + val) / _esat(drivers["ta"])
        gpp, reco = true_fluxes(lc, *(held[k] for k in TRUTH_DRIVERS))
        return reco - gpp

    def budget(d: np.ndarray, mask: np.ndarray | None = None) -> float:  # mean annual region change
        d = d if mask is None else np.where(mask, d, 0.0)
        return float((d.mean(axis=1) * days).sum() / n_years)

    p0, t0 = model.predict(x0).reshape(nt, npix), truth(())
    print("\nwhere the mapped change falls short (gC m-2 yr-1, mean over years): mapped | truth function")
    for name, chs in [("all", changes), *[(c[0], (c,)) for c in changes]]:
        x1 = Scenario(name, "", tuple(chs)).apply_features(x0, features)
        d_m, d_t = model.predict(x1).reshape(nt, npix) - p0, truth(chs) - t0
        line = f"  {name:>5}: {budget(d_m):+6.1f} | {budget(d_t):+6.1f}"
        if name == "all":
            beyond = np.zeros(len(x1), bool)
            for f, (lo, hi) in model.domain.items():
                j = features.index(f)
                beyond |= ((x1[:, j] > hi) | (x1[:, j] < lo)) & (x0[:, j] <= hi) & (x0[:, j] >= lo)
            b = beyond.reshape(nt, npix)
            line += (
                f"; pushed beyond the training range: {b.mean():.1%} of pixel-periods, "
                f"{budget(d_m, b):+.1f} | {budget(d_t, b):+.1f}; the rest {budget(d_m, ~b):+.1f} | "
                f"{budget(d_t, ~b):+.1f}"
            )
        print(line)


def _bag_over_dropped_features(drop: list[str]) -> None:
    """Make every point model an average of ``len(drop)`` models, each fitted without one of ``drop``
    (scikit-learn only, so the model file loads; bench-only, patched into :mod:`geoflux.model`).

    Each collinear driver is missing from one member, so its correlated partners must carry its effect
    there: an ensemble spreads a shared effect over the group instead of crediting it to whichever
    member the greedy splits pick first."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import VotingRegressor
    from sklearn.pipeline import make_pipeline

    import geoflux.model as gm

    orig = gm.make_estimator

    def make(spec, features=None):
        feats = list(features)
        members = []
        for d in drop:
            keep = [i for i, f in enumerate(feats) if f != d]
            sub = spec.model_copy(update={"monotonic": {k: v for k, v in spec.monotonic.items() if k != d}})
            est = orig(sub, [feats[i] for i in keep])
            cols = ColumnTransformer([("keep", "passthrough", keep)])
            members.append((f"without_{d}", make_pipeline(cols, est)))
        return VotingRegressor(members)

    gm.make_estimator = make


def _map_truth_nse(cfg) -> float:
    """NSE of the run's NEE maps against the true NEE rasters, pooled over every pixel and period."""
    import glob

    import rasterio

    from geoflux import pipeline
    from geoflux.metrics import scores

    maps = pipeline.map_paths(cfg)
    truth = sorted(glob.glob(str(cfg.path(cfg.truth))))
    if len(truth) != len(maps):
        return float("nan")
    obs, pred = [], []
    for t, m in zip(truth, maps.values(), strict=True):
        with rasterio.open(t) as a, rasterio.open(m) as b:
            obs.append(a.read(1, masked=True).filled(float("nan")).ravel())
            pred.append(b.read(1, masked=True).filled(float("nan")).ravel())
    o, p = np.concatenate(obs), np.concatenate(pred)
    ok = np.isfinite(o) & np.isfinite(p)
    return float(scores(o[ok], p[ok])["nse"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny-multiyear", help="world size (multiyear, tiny-multiyear)")
    ap.add_argument("--out", type=Path, default=Path("bench-project"))
    ap.add_argument("--reuse", action="store_true", help="keep an existing world and finished stages")
    ap.add_argument("--scenario", default="warming_2K")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--monotonic", default="", help="feature:sign,... for model.monotonic (new worlds)")
    ap.add_argument("--param", action="append", default=[], help="name=value for model.params (new worlds)")
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        help="field=value of model (e.g. averaged_share=0; new worlds)",
    )
    ap.add_argument(
        "--from",
        dest="base",
        type=Path,
        default=None,
        help="a finished run folder of the same size: its world, towers and extract reused; train, map anew",
    )
    ap.add_argument(
        "--bag-without",
        default="",
        help="f1,f2,...: the point model an average of models each fitted without one of them (bench-only)",
    )
    args = ap.parse_args()
    if args.bag_without:
        _bag_over_dropped_features(args.bag_without.split(","))

    from geoflux import pipeline
    from geoflux.analysis.attribution import year_attribution
    from geoflux.analysis.project import load_scenario, project
    from geoflux.config import load_config
    from geoflux.demo import TRUTH_BUDGETS, WORLD_SIZES, generate_fields, perturbed_truth_budgets, write_world

    print(f"load average at start: {os.getloadavg()}")
    timings: dict[str, float] = {}
    cfg_path = args.out / "config.yaml"
    t = time.perf_counter()
    if not (args.reuse and cfg_path.exists()):
        if args.base is not None:
            _copy_inputs(args.base, args.out)
        else:
            write_world(args.out, args.size)
        if args.monotonic or args.param or args.model:
            _set_model(cfg_path, args.monotonic, args.param, args.model)
    timings["world"] = time.perf_counter() - t
    cfg = load_config(cfg_path)
    done = {
        "towers": (cfg.out_dir / pipeline.OBSERVATIONS).exists(),
        "extract": (cfg.out_dir / pipeline.TRAINING).exists(),
        "train": (cfg.out_dir / pipeline.MODEL).exists(),
        "map": all(p.exists() for p in pipeline.map_paths(cfg).values()),
    }
    stages = {
        "towers": lambda: pipeline.stage_towers(cfg),
        "extract": lambda: pipeline.stage_extract(cfg),
        "train": lambda: pipeline.stage_train(cfg),
        "map": lambda: pipeline.stage_map(cfg, progress=False, workers=args.workers),
    }
    for name, fn in stages.items():
        if (args.reuse or (args.base is not None and name in ("towers", "extract"))) and done[name]:
            continue
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s", flush=True)

    gen = json.loads((args.out / "world" / TRUTH_BUDGETS).read_text())
    t = time.perf_counter()
    att = year_attribution(cfg, overwrite=True)
    timings["attribute"] = time.perf_counter() - t
    # its warnings are logged (stderr) by year_attribution
    world = WORLD_SIZES[args.size]
    fields = generate_fields(world)
    grouped_truth = {name: _generator_group_effect(world, fields, m) for name, m in att["groups"].items()}
    print("\nattribution of each year's regional budget anomaly (gC m-2 yr-1): model | generator")
    agree = 0
    rows = [r for r in att["table"] if r["region"] == "region"]
    for r in rows:
        g = gen["attribution"]["years"][r["year"]]
        gc = {k[8:]: v for k, v in g.items() if k.startswith("contrib_")}
        gfirst = max(gc, key=lambda k: abs(gc[k]))
        agree += r["first_driver"] == gfirst
        # the generator's grouped effects: the group's truth drivers held at climatology together
        gg = {name: grouped_truth[name][r["year"]] for name in att["groups"]}
        gg |= {d: v for d, v in gc.items() if not any(d in m for m in att["groups"].values())}
        gfirst_grouped = max(gg, key=lambda k: abs(gg[k]))
        model = ", ".join(f"{k[8:]} {v:+.1f}" for k, v in r.items() if k.startswith("contrib_"))
        print(f"  {r['year']} anomaly {r['anomaly']:+.1f} | {g['anomaly']:+.1f}")
        print(f"    model:     {model}; interaction {r['interaction']:+.1f}")
        print(
            "    generator: "
            + ", ".join(f"{k} {v:+.1f}" for k, v in gc.items())
            + f"; interaction {g['interaction']:+.1f}"
        )
        print(
            f"    first: model {r['first_driver']} | generator {gfirst}; grouped: model "
            f"{r['first_grouped']} | generator {gfirst_grouped}"
        )
        if "outside_aoa" in r:
            print(
                f"    outside the AOA (share of pixel-days): run {r['outside_aoa']:.1%}; with the driver at "
                "climatology: " + ", ".join(f"{d} {r[f'outside_aoa_{d}']:.1%}" for d in att["drivers"])
            )
    print(f"first driver agrees in {agree} of {len(rows)} years")

    spec = load_scenario(cfg, args.scenario)
    t = time.perf_counter()
    proj = project(cfg, args.scenario, overwrite=True, workers=args.workers)
    timings["project"] = time.perf_counter() - t
    truth = perturbed_truth_budgets(world, fields, spec.perturbation.changes)
    print(f"\n{args.scenario}: change of the regional budget (gC m-2 yr-1), mapped vs truth function")
    ratios = []
    for y, b in proj["budgets"].items():
        tc = truth["years"][y]["change"]
        ratios.append(b["change"] / tc)
        print(f"  {y}: mapped {b['change']:+.1f}  true {tc:+.1f}  ratio {b['change'] / tc:.2f}")
    mean_m = sum(b["change"] for b in proj["budgets"].values()) / len(proj["budgets"])
    mean_t = sum(truth["years"][y]["change"] for y in proj["budgets"]) / len(proj["budgets"])
    print(f"  mean over years: mapped {mean_m:+.1f} true {mean_t:+.1f} (ratio {mean_m / mean_t:.2f})")
    a = proj["aoa"]
    print(
        f"outside the AOA: {a['outside_share']:.1%} of pixel-periods under {args.scenario} "
        f"(run: {a.get('base_outside_share', float('nan')):.1%})"
    )
    _diagnose(cfg, world, fields, spec.perturbation.changes)
    truth_nse = _map_truth_nse(cfg)
    print(f"truth NSE of the run's NEE maps (all pixels and periods): {truth_nse:.4f}")
    print(f"\ntimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    print(f"load average at end: {os.getloadavg()}")
    summary = {
        "size": args.size,
        "first_driver_agreement": [agree, len(rows)],
        "attribution_extrapolated": (att.get("extrapolation") or {}).get("flagged"),
        "scenario": args.scenario,
        "change_ratio_per_year": ratios,
        "change_mean": {"mapped": mean_m, "true": mean_t},
        "aoa": a,
        "model": {
            "kind": cfg.model.kind,
            "params": cfg.model.params,
            "monotonic": cfg.model.monotonic,
            "averaged_share": cfg.model.averaged_share,
            "bag_without": args.bag_without,
        },
        "map_truth_nse": truth_nse,
        "timings": timings,
    }
    (args.out / "bench_project.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
