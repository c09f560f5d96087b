"""Year-to-year attribution and +2 K projection on a multi-year generated world, against the generator.

Uses a run folder of a multi-year world (generated and run through towers, extract, train and map unless
--reuse finds them done; ``bench/bench_budgets.py --out DIR`` leaves one), then

1. ``geoflux attribute``: each year's budget anomaly split into driver contributions through the model;
   is the driver ranked first (largest |contribution|) the generator's first (``truth_budgets.json``)?
2. ``geoflux project --scenario warming_2K``: the mapped change of each year's regional budget against the
   change of the generator's own truth function under the same perturbation
   (:func:`geoflux.demo.perturbed_truth_budgets`), and the share of the region outside the AOA.

    PYTHONPATH=$PWD python bench/bench_project.py --size tiny-multiyear --out /tmp/bench-project --reuse

Done-when (issue #16): first drivers agree in every year; the +2 K change within 25 % of the truth's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny-multiyear", help="world size (multiyear, tiny-multiyear)")
    ap.add_argument("--out", type=Path, default=Path("bench-project"))
    ap.add_argument("--reuse", action="store_true", help="keep an existing world and finished stages")
    ap.add_argument("--scenario", default="warming_2K")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

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
        write_world(args.out, args.size)
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
        if args.reuse and done[name]:
            continue
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s", flush=True)

    gen = json.loads((args.out / "world" / TRUTH_BUDGETS).read_text())
    t = time.perf_counter()
    att = year_attribution(cfg, overwrite=True)
    timings["attribute"] = time.perf_counter() - t
    for w in att["warnings"]:
        print(f"warning: {w}")
    print("\nattribution of each year's regional budget anomaly (gC m-2 yr-1): model | generator")
    agree = 0
    rows = [r for r in att["table"] if r["region"] == "region"]
    for r in rows:
        g = gen["attribution"]["years"][r["year"]]
        gc = {k[8:]: v for k, v in g.items() if k.startswith("contrib_")}
        gfirst = max(gc, key=lambda k: abs(gc[k]))
        agree += r["first_driver"] == gfirst
        # the generator's grouped effect approximated by the sum of its members' single effects
        gg = {name: sum(gc.get(d, 0.0) for d in m) for name, m in att["groups"].items()}
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
    print(f"first driver agrees in {agree} of {len(rows)} years")

    spec = load_scenario(cfg, args.scenario)
    t = time.perf_counter()
    proj = project(cfg, args.scenario, overwrite=True, workers=args.workers)
    timings["project"] = time.perf_counter() - t
    world = WORLD_SIZES[args.size]
    truth = perturbed_truth_budgets(world, generate_fields(world), spec.perturbation.changes)
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
    print(f"\ntimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    print(f"load average at end: {os.getloadavg()}")
    summary = {
        "size": args.size,
        "first_driver_agreement": [agree, len(rows)],
        "scenario": args.scenario,
        "change_ratio_per_year": ratios,
        "change_mean": {"mapped": mean_m, "true": mean_t},
        "aoa": a,
        "timings": timings,
    }
    (args.out / "bench_project.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
