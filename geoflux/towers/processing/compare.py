"""Across-site comparison: one table and one plot of budgets and response parameters by IGBP class."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from geoflux.towers.processing.dynamics import compare_sites


def write_site_comparison(
    summaries: list[dict], out_dir: str | Path, sites: pd.DataFrame | None = None
) -> list[Path]:
    """Write ``site_comparison.csv`` and ``site_comparison.png`` for many site summaries.

    Parameters
    ----------
    summaries : list of dict
        Summaries of :func:`geoflux.towers.processing.analyze_site`.
    out_dir : path
    sites : DataFrame, optional
        Site table (``site``/``SITE_ID``, ``IGBP``, ``MAT`` degC, ``MAP`` mm yr-1) for the climate columns.

    Returns
    -------
    list of Path
    """
    from geoflux.towers.processing.plots import plot_compare_sites

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = compare_sites(summaries, sites)
    csv = out_dir / "site_comparison.csv"
    tmp = csv.with_name(csv.name + ".part")
    table.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, csv)
    return [csv, plot_compare_sites(table, out_dir / "site_comparison.png")]
