"""Time ``geoflux train`` (grouped CV + fit) on an existing run folder, e.g. a finished ``geoflux demo``.

The towers and extraction outputs of RUN are linked into a scratch folder, so RUN is not modified. Prints
the wall time and /proc/loadavg before and after (the machine's other load changes the figure).

Usage::

    geoflux demo --out demo && python bench/bench_train.py demo [--training iterative|pixel|averaged]

Comparing two versions: run each version's script on a run folder that version wrote (its extraction
outputs differ), back to back, and take the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoflux import pipeline
from geoflux.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="run folder holding config.yaml, towers/ and training/")
    ap.add_argument("--training", default=None, help="override model.training")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml")
    with tempfile.TemporaryDirectory(prefix="geoflux-train-") as tmp:
        out = Path(tmp)
        for sub in ("towers", "training"):
            os.symlink((args.run / sub).resolve(), out / sub)
        update: dict = {"output": str(out)}
        if args.training:
            update["model"] = cfg.model.model_copy(update={"training": args.training})
        cfg = cfg.model_copy(update=update)
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        t0 = time.perf_counter()
        cv = pipeline.stage_train(cfg)
        dt = time.perf_counter() - t0
        load1 = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"train {dt:.1f} s  training={cv.get('training')}  cv nse={cv.get('nse', float('nan')):.3f}  "
        f"load before {' '.join(load0)}  after {' '.join(load1)}"
    )


if __name__ == "__main__":
    main()
