"""Tidy tower tables out: parquet (atomic) and a per-site summary for the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geoflux.atomic import atomic_path
from geoflux.errors import TowerFormatError
from geoflux.towers.aggregate import qc_pass, qc_rule

_META_KEY = b"geoflux.towers"


def write_records(df: pd.DataFrame, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write tidy records (or aggregates) to parquet, atomically.

    The table is written to ``<path>.part``, checked (row count read back from the footer) and only then
    renamed to ``path``, so an interrupted run never leaves a truncated file under the final name.
    ``df.attrs`` (resolution, units, time reference, sources) is stored in the file's metadata under
    ``geoflux.towers`` and restored by :func:`read_records`.

    Parameters
    ----------
    df : tidy records from :func:`~geoflux.towers.read_towers` / :func:`~geoflux.towers.aggregate`.
    path : output file, conventionally ``*.parquet``.
    overwrite : replace an existing file (default); ``False`` raises ``OutputExistsError``.

    Returns
    -------
    The final path.
    """
    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps(df.attrs, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path, overwrite=overwrite) as tmp:
        pq.write_table(table, tmp)
        n = pq.read_metadata(tmp).num_rows
        if n != len(df):
            raise TowerFormatError(f"{path}: wrote {n} rows, expected {len(df)}")
    return path


def read_records(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_records`, with its ``attrs`` restored."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise TowerFormatError(f"{path}: cannot read parquet records ({exc})") from None
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_META_KEY)
    df.attrs = json.loads(raw) if raw else {}
    return df


def summarize(
    records: pd.DataFrame,
    *,
    min_gap: str | pd.Timedelta = "1D",
    qc_max: int = 1,
    min_fraction: float = 0.8,
) -> pd.DataFrame:
    """Per-site summary of tidy records: years, coverage and gaps (what the CLI prints).

    Parameters
    ----------
    records : tidy records, QC-filtered or not (NaN NEE counts as missing).
    min_gap : a stretch without valid NEE at least this long counts as a gap.
    qc_max, min_fraction : the QC rule of :func:`~geoflux.towers.qc_filter` (defaults as there) used
        for ``n_qc`` / ``qc_coverage``: flag files (HH/HR) pass ``NEE_QC <= qc_max``, fraction files
        (DD, WW, MM, YY) pass ``NEE_QC >= min_fraction`` (share of measured and good gap-filled data).

    Returns
    -------
    One row per site: ``site``, ``resolution``, ``first`` (first record start), ``last`` (last record
    end), ``years`` (e.g. ``'1997-2014'``), ``n_years`` (calendar years with any valid NEE),
    ``n_records``, ``n_nee`` (records with valid NEE), ``n_qc`` (records with valid NEE that pass QC),
    ``coverage`` (time covered by valid NEE over the span from first to last record, 0-1; gap-filled
    NEE counts), ``qc_coverage`` (the same for QC-passing NEE: what the pipeline can use), ``qc_rule``
    (e.g. ``NEE_QC<=1`` or ``NEE_QC>=0.8``), ``measured`` (share of valid NEE that is measured, QC 0, at
    HH/HR; NaN for coarser records), ``n_gaps`` (stretches without valid NEE of at least ``min_gap``,
    including the file's own missing rows) and ``longest_gap_days``.
    """
    res = records.attrs.get("resolution")
    min_gap = pd.Timedelta(min_gap)
    try:
        passed = qc_pass(records, qc_max, min_fraction)
        rule = qc_rule(records, qc_max, min_fraction)
    except TowerFormatError:  # QC flags and fractions mixed: no single rule applies
        passed, rule = np.full(len(records), np.nan), "mixed QC kinds"
    records = records.assign(_qc_pass=passed)
    rows = []
    for site, g in records.groupby("site", sort=True):
        t0 = g["time"].to_numpy(dtype="datetime64[ns]")
        t1 = g["time_end"].to_numpy(dtype="datetime64[ns]") if "time_end" in g else t0
        valid = g["NEE"].notna().to_numpy()
        span = (t1.max() - t0.min()) / np.timedelta64(1, "D")
        covered = ((t1 - t0)[valid] / np.timedelta64(1, "D")).sum()
        mixed = g["_qc_pass"].isna().any()
        good = valid & (g["_qc_pass"].to_numpy() == 1)
        qc_covered = np.nan if mixed else ((t1 - t0)[good] / np.timedelta64(1, "D")).sum()
        # Gaps between consecutive valid records, plus the lead-in and tail without valid NEE.
        if valid.any():
            starts = np.concatenate((t0[valid], [t1.max()]))
            ends = np.concatenate(([t0.min()], t1[valid]))
            gaps = (starts - ends) / np.timedelta64(1, "D")
        else:
            gaps = np.array([span])
        long = gaps[gaps >= min_gap / pd.Timedelta("1D")]
        years = g.loc[valid, "time"].dt.year
        measured = np.nan
        if res in ("HH", "HR") and valid.any() and "NEE_QC" in g:
            measured = float((g.loc[valid, "NEE_QC"] == 0).mean())
        rows.append(
            {
                "site": site,
                "resolution": res,
                "first": pd.Timestamp(t0.min()),
                "last": pd.Timestamp(t1.max()),
                "years": (f"{years.min()}-{years.max()}" if years.min() != years.max() else str(years.min()))
                if len(years)
                else "",
                "n_years": int(years.nunique()),
                "n_records": len(g),
                "n_nee": int(valid.sum()),
                "n_qc": np.nan if mixed else int(good.sum()),
                "coverage": float(covered / span) if span > 0 else np.nan,
                "qc_coverage": float(qc_covered / span) if span > 0 else np.nan,
                "qc_rule": rule,
                "measured": measured,
                "n_gaps": len(long),
                "longest_gap_days": float(gaps.max()) if len(gaps) else 0.0,
            }
        )
    return pd.DataFrame(rows)
