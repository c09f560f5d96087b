"""Annual budgets of a multi-year generated world: mapped (with 90 % intervals) against the truth.

Generates the world, runs the pipeline stages of ``geoflux run`` (towers, extract, train, map, validate;
the HTML report is skipped, see --report), then ``geoflux budgets`` and prints, per year, the true regional
budget, the mapped budget and its interval under each correlation assumption, whether the interval covers
the truth, and whether the mapped year-to-year ranking matches the truth's.

    PYTHONPATH=$PWD python bench/bench_budgets.py --size multiyear --out /tmp/bench-budgets

Done-when (issue #16): the truth inside the mapped interval in >= 2 of 3 years; the ranking matches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="multiyear", help="world size (multiyear, tiny-multiyear)")
    ap.add_argument("--out", type=Path, default=Path("bench-budgets"))
    ap.add_argument("--report", action="store_true", help="also write the HTML report (stage_report)")
    ap.add_argument("--reuse", action="store_true", help="keep an existing world and finished stages")
    ap.add_argument(
        "--budgets-only",
        action="store_true",
        help="only the budgets, from a run folder that is already mapped (e.g. bench_project.py's --out)",
    )
    args = ap.parse_args()

    from geoflux import pipeline
    from geoflux.analysis.budgets import CORRELATIONS, compute_budgets
    from geoflux.config import load_config
    from geoflux.demo import TRUTH_BUDGETS, write_world

    timings = {}
    t0 = time.perf_counter()
    cfg_path = args.out / "config.yaml"
    if not ((args.reuse or args.budgets_only) and cfg_path.exists()):
        write_world(args.out, args.size)
    timings["world"] = time.perf_counter() - t0
    cfg = load_config(cfg_path)
    stages = [
        ("check", lambda: pipeline.check_truth_alignment(cfg)),
        ("towers", lambda: pipeline.stage_towers(cfg)),
        ("extract", lambda: pipeline.stage_extract(cfg)),
        ("train", lambda: pipeline.stage_train(cfg)),
        ("map", lambda: pipeline.stage_map(cfg, progress=False)),
        ("validate", lambda: pipeline.stage_validate(cfg)),
    ]
    if args.report:
        stages.append(("report", lambda: pipeline.stage_report(cfg)))
    if args.budgets_only:
        stages = []
    metrics = None
    for name, fn in stages:
        t = time.perf_counter()
        res = fn()
        timings[name] = time.perf_counter() - t
        if name == "validate":
            metrics = res
        print(f"{name}: {timings[name]:.1f} s", flush=True)
    t = time.perf_counter()
    out = compute_budgets(cfg)
    timings["budgets"] = time.perf_counter() - t

    gen = json.loads((args.out / "world" / TRUTH_BUDGETS).read_text())
    if metrics is not None:
        print(f"\nmap vs true field (pixel-steps): {json.dumps(metrics.get('truth'), default=str)}")
    print("\nregional NEE budget, gC m-2 yr-1 (true: from truth COGs; generator: its own JSON)")
    head = f"{'year':6} {'anomaly':15} {'true':>8} {'gen':>8} {'mapped':>8}"
    head += "".join(f"  {c + ' 90%':>22} cov" for c in CORRELATIONS)
    print(head)
    for name, w in out["windows"].items():
        r = w["region"]
        line = (
            f"{name:6} {gen['anomalies'].get(name, {}).get('kind', '?'):15} {r['truth']['nee']:8.1f} "
            f"{gen['years'][name]['region']['nee']:8.1f} {r['nee']:8.1f}"
        )
        for c in CORRELATIONS:
            lo, hi = r["intervals"][c]
            line += f"  [{lo:9.1f}, {hi:9.1f}] {'yes' if r['truth']['covered'][c] else 'no ':>3}"
        print(line)
    s = out["truth_summary"]
    print(f"\ncovered (of {len(s['windows'])}): {s['covered']}; ranking matches: {s['ranking_matches']}")
    print(f"bias {s['bias']:+.1f}, rmse {s['rmse']:.1f} gC m-2 yr-1")
    print("\nper class (mapped / true, gC m-2 yr-1):")
    for name, w in out["windows"].items():
        cells = [
            f"{k}: {v['nee']:.0f}/{v['truth']['nee']:.0f}" for k, v in w["classes"].items() if "nee" in v
        ]
        print(f"  {name}: " + ", ".join(cells))
    if gen.get("attribution"):
        print("\ngenerator's attribution of the true anomalies (gC m-2 yr-1):")
        for y, a in gen["attribution"]["years"].items():
            print(f"  {y}: " + ", ".join(f"{k}={v:+.1f}" for k, v in a.items()))
    print(f"\ntimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    summary = {
        "size": args.size,
        "truth_summary": s,
        "timings": timings,
        "metrics_truth": None if metrics is None else metrics.get("truth"),
    }
    (args.out / "bench_budgets.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
