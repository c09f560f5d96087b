"""Input checks of the site-processing chain: one-line errors that name site, column and problem."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from geoflux.errors import TowerFormatError

REQUIRED = ("time", "NEE", "TA", "SW_IN", "VPD")
_WHY = {
    "time": "record start times",
    "NEE": "the flux to gap-fill and partition",
    "TA": "MDS similarity and the respiration temperature",
    "SW_IN": "MDS similarity and the day/night split (incoming short-wave radiation, W m-2)",
    "VPD": "MDS similarity (vapour-pressure deficit, hPa)",
}


def site_name(records: pd.DataFrame) -> str:
    """The site id of a single-site record table (``"?"`` when absent)."""
    if "site" in records.columns and len(records):
        sites = pd.unique(records["site"].astype(str))
        if len(sites) > 1:
            raise TowerFormatError(
                f"records: column site: {len(sites)} sites ({', '.join(sites[:3])}, …) "
                "(expected one site per call; loop over sites)"
            )
        return str(sites[0])
    return str(records.attrs.get("site", "?"))


def warn(msgs: list[str], text: str) -> None:
    """Record a fallback in the output metadata and emit it as a UserWarning."""
    msgs.append(text)
    warnings.warn(text, UserWarning, stacklevel=3)


def check_records(
    records: pd.DataFrame, max_missing: float = 0.5, msgs: list[str] | None = None
) -> tuple[pd.DataFrame, int]:
    """Validate and regularise one site's half-hourly/hourly records.

    Parameters
    ----------
    records : DataFrame
        Tidy records (``site``, ``time`` = record start, ``NEE`` umol m-2 s-1, ``TA`` degC, ``SW_IN`` W m-2,
        ``VPD`` hPa, optional ``USTAR`` m s-1).
    max_missing : float, fraction
        Largest fraction of missing NEE allowed in any calendar year.
    msgs : list of str, optional
        Receives the warnings of documented fallbacks.

    Returns
    -------
    records : DataFrame
        Sorted, on a gap-free equidistant time axis (missing rows inserted as NaN, with a warning).
    per_day : int
        Records per day (48 or 24).

    Raises
    ------
    TowerFormatError
        Missing column, non-equidistant or mixed time steps, duplicated times, too much missing NEE.
    """
    msgs = [] if msgs is None else msgs
    site = site_name(records)
    for col in REQUIRED:
        if col not in records.columns:
            raise TowerFormatError(f"site {site}: column {col}: missing (needed for {_WHY[col]})")
    if len(records) < 2:
        raise TowerFormatError(f"site {site}: column time: {len(records)} records (expected a site-year)")
    df = records.copy()
    df["time"] = pd.to_datetime(df["time"])
    if df["time"].isna().any():
        raise TowerFormatError(f"site {site}: column time: {int(df['time'].isna().sum())} missing timestamps")
    df = df.sort_values("time", kind="stable").reset_index(drop=True)
    dup = df["time"].duplicated()
    if dup.any():
        raise TowerFormatError(
            f"site {site}: column time: duplicated timestamp {df['time'][dup].iloc[0]} "
            "(expected one record per time step)"
        )
    steps = df["time"].diff().dropna()
    # The most common step is the resolution; anything else is missing rows, irregular times or a second
    # resolution, told apart below.
    step = steps.mode().iloc[0]
    if step not in (pd.Timedelta("30min"), pd.Timedelta("60min")):
        raise TowerFormatError(
            f"site {site}: column time: time step {step} (expected 30 min or 60 min records)"
        )
    ratio = (steps / step).to_numpy()
    off = np.flatnonzero((np.abs(ratio - np.round(ratio)) > 1e-6) | (ratio < 0.5))
    if off.size:
        at = df["time"].iloc[off[0] + 1]
        raise TowerFormatError(
            f"site {site}: column time: non-equidistant time axis at {at} "
            f"(step {steps.iloc[off[0]]}, expected multiples of {step})"
        )
    # Mixed steps: a run of several consecutive larger steps is another resolution, not a few missing rows.
    larger = (ratio > 1.5).astype(np.int8)
    if larger.any():
        run = np.diff(np.concatenate(([0], larger, [0])))
        lengths = np.flatnonzero(run == -1) - np.flatnonzero(run == 1)
        if lengths.max() >= 3 and np.unique(np.round(ratio[ratio > 1.5])).size == 1:
            first = np.flatnonzero(larger)[0]
            raise TowerFormatError(
                f"site {site}: column time: mixed time steps ({step} and "
                f"{steps.iloc[first]} from {df['time'].iloc[first]}; expected one step)"
            )
        full = pd.date_range(df["time"].iloc[0], df["time"].iloc[-1], freq=step)
        n_add = len(full) - len(df)
        df = df.set_index("time").reindex(full).rename_axis("time").reset_index()
        if "site" in df.columns:
            df["site"] = site
        warn(msgs, f"site {site}: column time: {n_add} missing time steps inserted as gaps")
    per_day = int(pd.Timedelta("1D") / step)
    years = df["time"].dt.year
    miss = df["NEE"].isna().groupby(years).mean()
    bad = miss[miss > max_missing]
    if len(bad):
        y = bad.index[0]
        raise TowerFormatError(
            f"site {site}: column NEE: {bad.iloc[0]:.0%} missing in {y} "
            f"(expected at most {max_missing:.0%} for gap-filling)"
        )
    for col in ("TA", "SW_IN", "VPD"):
        if df[col].isna().all():
            raise TowerFormatError(f"site {site}: column {col}: all values missing (needed for {_WHY[col]})")
    return df, per_day
