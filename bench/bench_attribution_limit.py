"""How far year-to-year attribution can go with ideal training data, on a multi-year generated world.

Issue #16 asks that, for each year's budget anomaly, the driver attribution ranks first be the generator's
first. On the multi-year world the run's model ranks NDVI first in the drought year where the generator
ranks VPD (a near-tie of VPD, soil moisture and NDVI). This script asks whether better tower data could fix
that: it trains geoflux's two-headed model (``model.target: partitioned``, the default estimator and
parameters) on N random pixel-steps of the generator's own fields with their exact RECO and GPP (no
towers, no footprints, no partitioning error), then runs :func:`geoflux.analysis.attribution`'s per-chunk
attribution on the grid and compares each year's contributions with :func:`geoflux.demo.true_budgets`.

A second row per N adds N more samples whose inputs are the attribution's own counterfactuals (one driver
of the truth function held at its per-pixel climatology), labelled with the truth function. If the
counterfactual rows fix the ranking, what the model lacks is data where attribution asks its questions:
inputs off the drivers' joint distribution, which no tower network observes.

    PYTHONPATH=$PWD python bench/bench_attribution_limit.py --size multiyear --n 5000,50000,500000 \
        --json /tmp/attribution-limit.json

Load: one process; training uses the machine's cores (scikit-learn OpenMP); prediction one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    from geoflux.analysis.attribution import _attribution_block, year_matrices
    from geoflux.config import ModelSpec, VariableSpec
    from geoflux.demo import (
        ATTRIBUTION_DRIVERS,
        WORLD_SIZES,
        _stored_drivers,
        driver_variables,
        generate_fields,
        true_budgets,
        true_fluxes,
    )
    from geoflux.features import feature_names, pixel_features
    from geoflux.model import PartitionedRegressor, make_estimator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="multiyear", help="a multi-year world size (default multiyear)")
    ap.add_argument("--n", default="5000,50000,500000", help="training pixel-steps, comma-separated")
    ap.add_argument("--stride", type=int, default=2, help="attribute every STRIDE-th pixel in y and x")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    spec = WORLD_SIZES[args.size]
    fields = generate_fields(spec)
    truth = true_budgets(spec, fields)["attribution"]
    if truth is None:
        raise SystemExit(f"--size {args.size}: not a multi-year world")
    variables = [VariableSpec(**d) for d in driver_variables()]
    features = feature_names(variables)
    values = {**{v.name: getattr(fields, v.name) for v in variables}, **_stored_drivers(fields)}
    dynamic = [v.name for v in variables if not v.static and v.kind == "continuous"]
    years = spec.periods.year.to_numpy()
    year_names = [str(y) for y in np.unique(years)]
    year_w, clim = year_matrices(spec.periods, years - years[0], spec.period_days.astype(float))
    n_years, per_year = len(year_names), len(years) // len(year_names)
    lc = fields.landcover
    shape = fields.ta.shape

    feats = pixel_features(
        {k: np.broadcast_to(v, shape) if v.ndim == 2 else v for k, v in values.items()}, variables
    ).reshape(-1, len(features))
    target = np.c_[fields.reco.ravel(), fields.gpp.ravel()]

    def held_inputs(rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Each row with one truth driver at its per-pixel climatology, and the truth there."""
        t, yx = np.divmod(rows, shape[1] * shape[2])
        y, x = np.divmod(yx, shape[2])
        step = t % per_year
        which = rng.integers(0, len(ATTRIBUTION_DRIVERS), len(rows))
        drv = {d: np.asarray(values[d], np.float64)[t, y, x] for d in ATTRIBUTION_DRIVERS}
        for k, d in enumerate(ATTRIBUTION_DRIVERS):
            sel = which == k
            series = np.asarray(values[d], np.float64)[:, y[sel], x[sel]]
            clim_d = series.reshape(n_years, per_year, -1).mean(axis=0)
            drv[d][sel] = clim_d[step[sel], np.arange(sel.sum())]
        gpp, reco = true_fluxes(lc[y, x], drv["sw"], drv["ta"], drv["vpd"], drv["sm"], drv["ndvi"])
        x_held = feats[rows].copy()
        for d in ATTRIBUTION_DRIVERS:
            x_held[:, features.index(d)] = drv[d]
        return x_held, np.c_[reco, gpp]

    s = slice(None, None, args.stride)
    blocks = [
        values[v.name][s, s] if values[v.name].ndim == 2 else values[v.name][:, s, s] for v in variables
    ]
    layers = [(d, [features.index(d)]) for d in dynamic]

    def attribute(model: PartitionedRegressor) -> dict:
        out = _attribution_block(
            *blocks, model=model, variables=variables, layers=layers, year_w=year_w, clim=clim
        )
        means = np.nanmean(out.reshape(n_years, 2 + len(layers), -1), axis=2)
        res = {}
        for k, y in enumerate(year_names):
            c = {d: float(means[k, 1 + j]) for j, (d, _) in enumerate(layers)}
            res[y] = {"anomaly": float(means[k, 0]), **c, "first": max(c, key=lambda d: abs(c[d]))}
        return res

    spec_m = ModelSpec(target="partitioned", seed=args.seed)
    rng = np.random.default_rng(args.seed)
    rows_out = []
    truth_rows = {}
    for y, r in truth["years"].items():
        c = {d: r[f"contrib_{d}"] for d in ATTRIBUTION_DRIVERS}
        truth_rows[y] = {"anomaly": r["anomaly"], **c, "first": max(c, key=lambda d: abs(c[d]))}
    rows_out.append({"model": "generator (truth)", "years": truth_rows})
    for n in (int(v) for v in args.n.split(",")):
        pick = rng.choice(feats.shape[0], n, replace=False)
        for with_cf in (False, True):
            x, yv = feats[pick], target[pick]
            if with_cf:
                xh, yh = held_inputs(rng.choice(feats.shape[0], n, replace=False), rng)
                x, yv = np.r_[x, xh], np.r_[yv, yh]
            t1 = time.perf_counter()
            model = PartitionedRegressor(
                make_estimator(spec_m.model_copy(update={"target": "nee"}), features),
                make_estimator(spec_m.model_copy(update={"target": "nee"}), features),
            ).fit(x, yv)
            name = f"{n} true pixel-steps" + (f" + {n} counterfactual inputs" if with_cf else "")
            rows_out.append({"model": name, "years": attribute(model), "seconds": time.perf_counter() - t1})
            print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)

    shown = ["sw", "ta", "vpd", "sm", "ndvi"]
    print(f"\n{args.size}: each year's regional NEE budget anomaly and driver contributions (gC m-2 yr-1)")
    print(f"{'model':52s} {'year':5s} {'anomaly':>8s} " + " ".join(f"{d:>7s}" for d in shown) + "  first")
    for row in rows_out:
        for y, r in row["years"].items():
            print(
                f"{row['model']:52s} {y:5s} {r['anomaly']:+8.1f} "
                + " ".join(f"{r[d]:+7.1f}" for d in shown)
                + f"  {r['first']}"
                + ("" if r["first"] == truth_rows[y]["first"] else "  (differs)")
            )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "stride": args.stride, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
