"""From tower files straight to answers: a site-level NEE model validated on sites it has not seen.

:func:`model_towers` runs, in one pass and on the *same* leave-one-site-out folds:

* ``plain_forest`` — the baseline: a random forest on the monthly meteorology columns (TA, SW_IN, VPD, P);
* ``features`` — plus the features of :mod:`geoflux.towers.features` (hemisphere-aware season, potential
  radiation and day length, antecedent water balance, site climate, IGBP one-hot);
* ``features+qc_weights`` — trained on every month with NEE, weighted by its QC fraction (the share of
  measured and good gap-filled half-hours) instead of dropping months below ``min_qc``;
* ``carbon_balance`` / ``carbon_balance+qc_weights`` — GPP and RECO (night-time partitioning,
  ``*_NT_VUT_REF``) predicted by two forests on the features, NEE = RECO − GPP; only where every site
  has the partitioned columns.

With ``setup="auto"`` (the default) the geoflux setup is *chosen* rather than fixed, by nested
leave-site-out validation (:func:`nested_selection`): inside each outer fold, an inner leave-one-site-out
loop over that fold's training sites ranks the :data:`CANDIDATES` (variant × forest parameters) by the
pooled NSE of their inner held-out months, and the outer held-out site is predicted by the winner
retrained on all the fold's training sites. The outer score therefore never saw the choice. The saved
model is the candidate that wins the same ranking over all sites.

Every variant is scored on the same held-out months: the months of the held-out site with NEE QC fraction
at least ``min_qc``. Scores (gC m-2 d-1): pooled ``nse`` (1 − SSE/SST), ``r2_pearson`` (squared
correlation), ``rmse``, ``bias`` (pred − obs), and the median per-site NSE; at the monthly scale, on the
mean seasonal cycle, on annual means and on annual anomalies (site-year minus the site's mean year).

Each held-out site also gets a site-level extrapolation flag (:func:`site_flags`): its distance to the
nearest training site in standardized site-climate space plus ecosystem type, above a threshold found
by leave-one-site-out among the training sites of the same fold, or an ecosystem type with fewer than
``min_type_sites`` training sites.
"""

from __future__ import annotations

import glob
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoflux.atomic import atomic_path
from geoflux.config import ModelSpec
from geoflux.errors import ModelError, OutputExistsError, TowerFormatError
from geoflux.metrics import skill
from geoflux.towers.aggregate import aggregate, qc_filter
from geoflux.towers.columns import SUBDAILY
from geoflux.towers.features import FEATURE_UNITS, SITE_CLIMATE, add_features, igbp_onehot
from geoflux.towers.read import read_tower_file

MET = ("TA", "SW_IN", "VPD", "P")
ENGINEERED = (
    "season_sin",
    "season_cos",
    "rpot",
    "daylength",
    "sw_ratio",
    "pet",
    "wb_0",
    "wb_1",
    "wb_2",
    "wb_3",
    *SITE_CLIMATE,
)
# Night-time partitioning of the same u* filtering as NEE_VUT_REF, so RECO - GPP reproduces NEE.
PARTITION = {"GPP": "GPP_NT_VUT_REF", "RECO": "RECO_NT_VUT_REF"}
# NEE at the 25th and 75th percentile of the u* threshold ensemble: the u*-filtering uncertainty.
USTAR_RANGE = {"NEE_25": "NEE_VUT_25", "NEE_75": "NEE_VUT_75"}
VARIANTS = (
    "plain_forest",
    "features",
    "features+qc_weights",
    "carbon_balance",
    "carbon_balance+qc_weights",
)
AUTO = "auto"
DEFAULT_SETUP = AUTO
# Leaves of at least 5 months and half the features per split: a forest that cannot memorize single
# site-months, which is what a site it has never seen needs (and 3x faster to fit).
FOREST_PARAMS: dict[str, Any] = {"min_samples_leaf": 5, "max_features": 0.5}
FOREST_SETTINGS: dict[str, dict[str, Any]] = {"sklearn": {}, "leaf5": FOREST_PARAMS}
# The nested selection's grid: the QC-weighted features variant with scikit-learn's default forest and
# with the regularized one, the unweighted features variant and the carbon balance (regularized).
# Four candidates keep the nested run on 7 sites under a minute.
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("features+qc_weights", "sklearn"),
    ("features+qc_weights", "leaf5"),
    ("features", "leaf5"),
    ("carbon_balance+qc_weights", "leaf5"),
)
# Inner folds are single sites up to this many training sites, else this many site groups.
MAX_INNER_LOSO = 12
INNER_GROUPS = 5
_RES_ORDER = {"MM": 0, "WW": 1, "DD": 2, "HR": 3, "HH": 4, "YY": 5}
# A site-year enters the annual scores only with at least this many QC-passing months.
MIN_MONTHS_PER_YEAR = 10


@dataclass
class TowerModelResult:
    """Everything :func:`model_towers` computed; :func:`geoflux.towers.report.write_outputs` writes it."""

    table: pd.DataFrame  # monthly table with features, obs and QC
    features: list[str]
    predictions: pd.DataFrame  # held-out predictions of every variant, evaluation months only
    skill: dict[str, dict[str, Any]]  # variant -> scale -> scores
    flags: pd.DataFrame  # per held-out site: NSE of the setup, climate DI, flags
    annual: pd.DataFrame  # per site-year: obs/pred annual means, anomalies, QC coverage, attribution
    setup: str
    models: dict[str, Any] = field(default_factory=dict)  # target -> TrainedModel fitted on all sites
    climate: pd.DataFrame | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # held-out site -> the setup's model that never saw it (for the report's importance and dependence)
    fold_models: dict[str, Any] = field(default_factory=dict)
    min_qc: float = 0.8
    # nested selection's inner held-out predictions (outer, candidate, site, row, obs, pred); None if fixed
    inner: pd.DataFrame | None = None


# --------------------------------------------------------------------------------------------------
# Tower files -> monthly table.
def expand_files(patterns: list[str] | tuple[str, ...]) -> list[Path]:
    """Paths from globs, folders or plain file names, sorted; one-line error when nothing matches."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            hits = sorted(glob.glob(str(pat)))
            if not hits:
                raise TowerFormatError(f"{pat}: no tower files match (expected a glob, folder or file)")
            out.extend(Path(h) for h in hits)
    return sorted(dict.fromkeys(out))


def _to_monthly(records: pd.DataFrame, min_qc: float, qc_max: int) -> pd.DataFrame:
    """One site's records as calendar months with NEE, ``qc`` (0-1) and meteorology."""
    res = records.attrs["resolution"]
    start = records["time"].min().to_period("M").to_timestamp()
    end = records["time_end"].max() if "time_end" in records else records["time"].max()
    periods = pd.date_range(start, end - pd.Timedelta("1ns"), freq="MS")
    with warnings.catch_warnings():
        # Low-QC months are kept here on purpose (weighted later); the readers' warnings about
        # sites without valid NEE still matter and are re-raised by the caller's checks.
        warnings.simplefilter("ignore")
        if res in SUBDAILY:
            # Flag QC: coverage of the month by records passing qc_max is the month's QC fraction.
            filt = qc_filter(records, qc_max=qc_max)
            out = aggregate(filt, periods, min_coverage=0.0, end=periods[-1] + pd.offsets.MonthBegin())
            out["qc"] = out["NEE_coverage"]
        else:
            # Fraction QC (DD and coarser): keep every value, the day-weighted QC fraction is NEE_measured.
            filt = qc_filter(records, min_fraction=0.0)
            out = aggregate(filt, periods, min_coverage=0.0, end=periods[-1] + pd.offsets.MonthBegin())
            out["qc"] = out["NEE_measured"]
    del min_qc
    return out


def _partition(
    path: Path, records: pd.DataFrame, min_qc: float, qc_max: int, columns: dict[str, str] = PARTITION
) -> pd.DataFrame | None:
    """Monthly GPP and RECO (or other NEE-like ``columns``, gC m-2 d-1) read through the tower reader, or
    None when the file lacks any of them."""
    qc_src = records.attrs.get("columns", {}).get("NEE_QC")
    parts = []
    for var, col in columns.items():
        cols = {"NEE": col, **({"NEE_QC": qc_src} if qc_src else {})}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec = read_tower_file(path, site=str(records["site"].iloc[0]), columns=cols)
        except TowerFormatError:
            return None
        m = _to_monthly(rec, min_qc, qc_max)
        parts.append(m.set_index("time")["NEE"].rename(var))
    return pd.concat(parts, axis=1).reset_index()


def monthly_table(
    files: list[Path], sites: pd.DataFrame, *, min_qc: float = 0.8, qc_max: int = 1
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read tower files into one row per site and calendar month.

    Parameters
    ----------
    files : tower files (any format :func:`~geoflux.towers.read_tower_file` reads). Per site the monthly
        (MM) file is used; daily or half-hourly files only for sites without one (aggregated to months).
    sites : site table indexed by SITE_ID (every site must have a row).
    min_qc : kept for the caller; every month with NEE is returned with its ``qc`` fraction.
    qc_max : half-hourly files: records with NEE_QC above this fail QC.

    Returns
    -------
    The table (``site``, ``time`` month start, ``NEE`` and, where the files have them, ``NEE_UNC``
    (random uncertainty of the monthly mean; at DD/HH the mean of the records' values), ``NEE_25``,
    ``NEE_75`` (NEE at the 25th/75th percentile u* threshold, DD and coarser), ``GPP``, ``RECO``
    in gC m-2 d-1, ``qc`` the fraction of the month's NEE that is measured or good gap-fill, monthly
    meteorology) and the file used per site.
    """
    by_site: dict[str, list[tuple[str, Path, pd.DataFrame]]] = {}
    for path in files:
        rec = read_tower_file(path)
        site = str(rec["site"].iloc[0]) if len(rec) else path.stem
        if site not in sites.index.map(str):
            raise TowerFormatError(
                f"{path}: site {site} has no row in the site table (expected a SITE_ID row with LAT, LON)"
            )
        by_site.setdefault(site, []).append((rec.attrs["resolution"], path, rec))
    frames = []
    used: dict[str, str] = {}
    for site, cands in sorted(by_site.items()):
        res, path, rec = min(cands, key=lambda c: (_RES_ORDER.get(c[0], 9), str(c[1])))
        # GPP/RECO come from PARTITION below (VUT only, DD and coarser files), not from the reader's own
        # RECO/GPP, which would collide with them in the merge (GPP_x, GPP_y) and drop both.
        rec = rec.drop(columns=[c for c in PARTITION if c in rec.columns])
        m = _to_monthly(rec, min_qc, qc_max)
        for cols in (PARTITION, USTAR_RANGE):
            part = _partition(path, rec, min_qc, qc_max, cols) if res not in SUBDAILY else None
            if part is not None:
                m = m.merge(part, on="time", how="left")
        m["site"] = site
        frames.append(m)
        used[site] = f"{path.name} ({res})"
    table = pd.concat(frames, ignore_index=True)
    extra = ("NEE_UNC", *USTAR_RANGE, "GPP", "RECO", *MET)
    keep = ["site", "time", "NEE", "qc", *[c for c in extra if c in table.columns]]
    table = table[keep].sort_values(["site", "time"]).reset_index(drop=True)
    return table, used


# --------------------------------------------------------------------------------------------------
# Scores.
def scores(obs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pooled ``nse`` (1 − SSE/SST), ``r2_pearson`` (squared correlation), ``rmse``, ``bias`` (pred − obs,
    units of the inputs) and ``n``."""
    s = skill(obs, pred)
    return {"nse": s["nse"], "r2_pearson": s["r2_pearson"], "rmse": s["rmse"], "bias": s["bias"], "n": s["n"]}


def _per_site_nse(df: pd.DataFrame, obs: str = "obs", pred: str = "pred") -> pd.Series:
    return df.groupby("site").apply(lambda g: skill(g[obs], g[pred])["nse"], include_groups=False)


def _scale_scores(df: pd.DataFrame) -> dict[str, float]:
    out = scores(df["obs"].to_numpy(), df["pred"].to_numpy())
    nse = _per_site_nse(df)
    out["nse_site_median"] = float(nse.median())
    out["n_sites"] = int(nse.size)
    return out


def annual_table(pred: pd.DataFrame, qc: pd.DataFrame) -> pd.DataFrame:
    """Per site-year annual means (gC m-2 d-1) of obs and pred over the evaluated months, and anomalies.

    Only site-years with at least :data:`MIN_MONTHS_PER_YEAR` evaluated months; the anomaly is the
    site-year mean minus the mean of the site's site-years (obs and pred alike). ``qc_coverage`` is the
    mean QC fraction of all 12 months (months without NEE count as 0).
    """
    p = pred.assign(year=pred["time"].dt.year)
    g = p.groupby(["site", "year"])
    ann = g.agg(obs=("obs", "mean"), pred=("pred", "mean"), n_months=("obs", "size")).reset_index()
    q = qc.assign(year=qc["time"].dt.year).groupby(["site", "year"])["qc"].sum() / 12.0
    ann["qc_coverage"] = ann.set_index(["site", "year"]).index.map(q).to_numpy(dtype=float)
    ann = ann[ann["n_months"] >= MIN_MONTHS_PER_YEAR].copy()
    for c in ("obs", "pred"):
        ann[f"{c}_anomaly"] = ann[c] - ann.groupby("site")[c].transform("mean")
    # gC m-2 yr-1 for readers used to annual budgets (mean daily rate over the evaluated months x 365.25)
    ann["obs_gC_m2_yr"] = ann["obs"] * 365.25
    ann["pred_gC_m2_yr"] = ann["pred"] * 365.25
    return ann.reset_index(drop=True)


def multiscale(pred: pd.DataFrame, qc: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Scores at the monthly scale, on the mean seasonal cycle, annual means and annual anomalies."""
    out = {"monthly": _scale_scores(pred)}
    cyc = pred.assign(month=pred["time"].dt.month).groupby(["site", "month"])[["obs", "pred"]].mean()
    out["seasonal_cycle"] = _scale_scores(cyc.reset_index())
    ann = annual_table(pred, qc)
    if ann["site"].nunique() >= 1 and len(ann) >= 2:
        out["annual"] = _scale_scores(ann)
        anom = ann[["site", "obs_anomaly", "pred_anomaly"]].rename(
            columns={"obs_anomaly": "obs", "pred_anomaly": "pred"}
        )
        out["annual_anomaly"] = _scale_scores(anom)
    return out


# --------------------------------------------------------------------------------------------------
# Site-level extrapolation flags.
# A held-out site is ``flagged`` when any of these is True (see :func:`site_flags`).
FLAG_COLUMNS = ("type_flag", "type_skill_flag", "low_signal_flag", "climate_flag")


def _climate_matrix(clim: pd.DataFrame) -> np.ndarray:
    x = clim[list(SITE_CLIMATE)].to_numpy(dtype=float).copy()
    # Precipitation and aridity act multiplicatively (500 vs 1000 mm matters more than 2000 vs 2500).
    for j, name in enumerate(SITE_CLIMATE):
        if name in ("MAP", "AI"):
            x[:, j] = np.log(np.where(x[:, j] > 0, x[:, j], np.nan))
    return x


def _distances(z: np.ndarray, types: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances between sites a (rows) and b (cols): climate (NaN dimensions skipped, rescaled to the
    full dimension count) plus 1 standardized unit for a different ecosystem type."""
    d = z[a][:, None, :] - z[b][None, :, :]
    ok = np.isfinite(d)
    n_ok = ok.sum(axis=2)
    sq = np.where(ok, d * d, 0.0).sum(axis=2) * z.shape[1] / np.maximum(n_ok, 1)
    sq = sq + (types[a][:, None] != types[b][None, :]).astype(float)
    return np.sqrt(sq)


def inner_site_stats(inner: pd.DataFrame) -> pd.DataFrame:
    """Per (outer site, inner held-out site): the inner loop's ``nse``, ``rmse`` and predicted std.

    Parameters
    ----------
    inner : inner held-out predictions of *one* candidate per outer site (``outer``, ``site``, ``obs``,
        ``pred`` in gC m-2 d-1), as :func:`nested_selection` returns them (filtered to the chosen one).

    Returns
    -------
    Rows indexed by (``outer``, ``site``): ``nse``, ``rmse`` and ``pred_std`` (std of the predicted monthly
    NEE, gC m-2 d-1), plus ``rmse_pooled`` (RMSE of all the outer fold's inner held-out months).
    """

    def one(g: pd.DataFrame) -> pd.Series:
        s = skill(g["obs"], g["pred"])
        return pd.Series({"nse": s["nse"], "rmse": s["rmse"], "pred_std": float(g["pred"].std(ddof=0))})

    out = inner.groupby(["outer", "site"]).apply(one, include_groups=False)
    err2 = (inner["pred"] - inner["obs"]) ** 2
    pooled = np.sqrt(err2.groupby(inner["outer"]).mean())
    out["rmse_pooled"] = out.index.get_level_values("outer").map(pooled).to_numpy(dtype=float)
    return out


def _success_threshold(values: np.ndarray, nse: np.ndarray, low: bool) -> float:
    """The inner loop's calibration: the threshold on ``values`` that best separates the training sites
    predicted with inner NSE < 0 from those with NSE >= 0 (fewest misclassified; ties: the middle of the
    tied range), flagging values below it (``low``) or above it. NaN if no site was predicted with
    NSE >= 0 (nothing is known to be safe); -inf/+inf (flag nothing) if none had NSE < 0."""
    ok = np.isfinite(values) & np.isfinite(nse)
    v, good = values[ok], nse[ok] >= 0
    if not good.any():
        return np.nan
    if good.all():
        return -np.inf if low else np.inf
    u = np.unique(v)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    if low:  # flag below: errors are failures at or above, successes below
        err = np.array([np.sum(~good & (v >= c)) + np.sum(good & (v < c)) for c in cands])
    else:
        err = np.array([np.sum(~good & (v <= c)) + np.sum(good & (v > c)) for c in cands])
    best = np.flatnonzero(err == err.min())
    return float(cands[best[len(best) // 2]])


def site_flags(
    clim: pd.DataFrame,
    nse: pd.Series,
    *,
    min_type_sites: int = 1,
    nse_good: float = 0.3,
    pred: pd.DataFrame | None = None,
    inner: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per held-out site: extrapolation and low-signal flags, each next to its inputs.

    No flag uses the held-out site's NEE: only its drivers (through the model's predictions), its site
    climate and type, and the NEE of the *training* sites (through the inner leave-site-out loop of
    :func:`nested_selection`). Thresholds come from that inner loop, never from the outer sites.

    Parameters
    ----------
    clim : per-site climate (``MAT`` degC, ``MAP`` mm yr-1, ``AI``, ``TA_range`` K, ``IGBP``), index site.
    nse : held-out monthly NSE per site (reported next to the flags; not used to set them).
    min_type_sites : ``type_flag`` a site whose IGBP class has fewer than this many training sites.
    nse_good : only used for the ``summary`` attribute (how many sites above it are flagged).
    pred : held-out predictions (``site``, ``pred`` gC m-2 d-1) of the setup: predicted variability.
    inner : inner held-out predictions of the candidate chosen for each outer site (``outer``, ``site``,
        ``obs``, ``pred``); without it (a fixed setup has no inner loop) ``climate_threshold`` falls back
        to the max-pairwise rule and ``type_skill_flag``/``low_signal_flag`` are False with NaN inputs.

    Returns
    -------
    One row per site: ``nse``, ``IGBP``, ``n_same_type_training``, ``type_flag``, ``type_inner_nse``,
    ``type_skill_flag``, ``pred_std``, ``expected_rmse``, ``signal_ratio``, ``signal_threshold``,
    ``low_signal_flag``, ``climate_di``, ``climate_threshold``, ``climate_flag``, ``nearest_site``,
    ``flagged`` (any flag). ``attrs["summary"]`` counts negative-NSE sites flagged and sites with NSE above
    ``nse_good`` flagged.

    Notes
    -----
    For held-out site s the training sites T are the others; the inner loop held out each t in T and
    predicted it with a model fitted on T \\ {t}.

    * ``type_flag``: fewer than ``min_type_sites`` sites of T share s's IGBP class.
    * ``type_skill_flag``: ``type_inner_nse``, the median inner NSE of the sites of T that share s's class,
      is below 0: the model could not transfer this ecosystem type between sites inside the training set.
      (The inner site had one same-type site fewer in training than s has, so this errs on the side of
      flagging.)
    * ``low_signal_flag``: NSE < 0 when a site's NEE varies less than the model's error. ``pred_std`` is
      the std of s's predicted monthly NEE (drivers only); ``expected_rmse`` the pooled RMSE of the inner
      held-out months; ``signal_ratio`` = pred_std / expected_rmse. Each t in T gets the same ratio from
      its inner prediction; ``signal_threshold`` is the ratio that best separates the t predicted with
      inner NSE < 0 from those with NSE >= 0 (fewest misclassified), and s is flagged below it (or when
      no t was predicted with NSE >= 0).
    * ``climate_flag``: DI(s) = distance to the nearest site of T in standardized site-climate space
      (T's mean and std; MAP and AI on a log scale) plus 1 unit for a different IGBP class, divided by the
      mean distance between T's sites. Each t in T gets the same DI with respect to T \\ {t};
      ``climate_threshold`` is the largest DI among the t predicted with inner NSE >= 0, and s is flagged
      above it (or when no t was). Without ``inner``: the largest DI of any t (CAST's AOA threshold).
    """
    ids = clim.index.to_numpy()
    x = _climate_matrix(clim)
    types = clim["IGBP"].astype(str).to_numpy()
    stats = inner_site_stats(inner) if inner is not None and len(inner) else None
    pstd = pred.groupby("site")["pred"].std(ddof=0) if pred is not None else pd.Series(dtype=float)
    rows = []
    for i, site in enumerate(ids):
        train = np.array([j for j in range(len(ids)) if j != i])
        mu = np.nanmean(x[train], axis=0)
        sd = np.nanstd(x[train], axis=0)
        sd[~(sd > 0)] = 1.0
        z = (x - mu) / sd
        d_tt = _distances(z, types, train, train)
        n_t = len(train)
        dbar = d_tt[~np.eye(n_t, dtype=bool)].mean() if n_t > 1 else np.nan
        d_st = _distances(z, types, np.array([i]), train)[0]
        di = float(d_st.min() / dbar) if dbar > 0 else np.nan
        np.fill_diagonal(d_tt, np.inf)
        di_train = d_tt.min(axis=1) / dbar if n_t > 1 and dbar > 0 else np.full(n_t, np.nan)
        same = types[train] == types[i]
        row: dict[str, Any] = {
            "site": site,
            "nse": float(nse.get(site, np.nan)),
            "IGBP": types[i],
            "n_same_type_training": int(same.sum()),
            "type_flag": bool(same.sum() < min_type_sites),
        }
        ps = float(pstd.get(site, np.nan))
        if stats is not None and site in stats.index.get_level_values("outer"):
            st = stats.loc[site].reindex(ids[train])
            inner_nse = st["nse"].to_numpy(dtype=float)
            e_rmse = float(st["rmse_pooled"].dropna().iloc[0]) if st["rmse_pooled"].notna().any() else np.nan
            type_nse = float(np.nanmedian(inner_nse[same])) if np.isfinite(inner_nse[same]).any() else np.nan
            ratio_train = st["pred_std"].to_numpy(dtype=float) / e_rmse
            sig_thr = _success_threshold(ratio_train, inner_nse, low=True)
            clim_thr = _success_threshold(di_train, inner_nse, low=False)
            ratio = ps / e_rmse if e_rmse > 0 else np.nan
            row |= {
                "type_inner_nse": type_nse,
                "type_skill_flag": bool(type_nse < 0),
                "pred_std": ps,
                "expected_rmse": e_rmse,
                "signal_ratio": ratio,
                "signal_threshold": sig_thr,
                # NaN threshold: no training site was predicted with skill inside, so nothing is safe
                "low_signal_flag": bool(not ratio >= sig_thr),
            }
        else:
            clim_thr = float(np.nanmax(di_train)) if np.isfinite(di_train).any() else np.nan
            row |= {
                "type_inner_nse": np.nan,
                "type_skill_flag": False,
                "pred_std": ps,
                "expected_rmse": np.nan,
                "signal_ratio": np.nan,
                "signal_threshold": np.nan,
                "low_signal_flag": False,
            }
        row |= {
            "climate_di": di,
            "climate_threshold": clim_thr,
            "climate_flag": bool(not di <= clim_thr),
            "nearest_site": str(ids[train][int(np.argmin(d_st))]),
        }
        rows.append(row)
    out = pd.DataFrame(rows)
    out["flagged"] = out[list(FLAG_COLUMNS)].any(axis=1)
    bad = out["nse"] < 0
    good = out["nse"] > nse_good
    out.attrs["summary"] = {
        "negative_nse_sites": int(bad.sum()),
        "negative_nse_flagged": int((bad & out["flagged"]).sum()),
        f"nse_above_{nse_good}_sites": int(good.sum()),
        f"nse_above_{nse_good}_flagged": int((good & out["flagged"]).sum()),
        "min_type_sites": min_type_sites,
        "calibration": "inner leave-site-out" if stats is not None else "max-pairwise (no inner loop)",
        **{
            f"{c}_hits": f"{int((bad & out[c]).sum())}/{int(bad.sum())} negative, "
            f"{int((good & out[c]).sum())}/{int(good.sum())} above {nse_good}"
            for c in FLAG_COLUMNS
        },
    }
    return out


# --------------------------------------------------------------------------------------------------
# Cross-validation of the variants.
DRIVER_GROUPS: dict[str, tuple[str, ...]] = {
    "TA": ("TA",),
    "radiation": ("SW_IN", "sw_ratio"),
    "VPD": ("VPD",),
    "water": ("P", "pet", "wb_0", "wb_1", "wb_2", "wb_3"),
}


def _variant_parts(variant: str) -> tuple[bool, bool, bool]:
    """(engineered features, QC weights, carbon balance) of a variant name."""
    return variant != "plain_forest", variant.endswith("+qc_weights"), variant.startswith("carbon_balance")


class _Predictor:
    """The fitted forest(s) of one variant: NEE directly, or RECO − GPP."""

    def __init__(self, models: dict[str, Any], features: list[str]):
        self.models = models
        self.features = features

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        x = df[self.features].to_numpy(np.float32)
        if "NEE" in self.models:
            return self.models["NEE"].predict(x)
        return self.models["RECO"].predict(x) - self.models["GPP"].predict(x)


def _fit_variant(
    df: pd.DataFrame,
    rows: np.ndarray,
    variant: str,
    features: list[str],
    spec: ModelSpec,
    min_qc: float,
    forest_params: dict[str, Any],
) -> _Predictor:
    from geoflux.model import make_estimator

    # The baseline stays scikit-learn's default forest; the geoflux variants use the setup's parameters.
    if variant != "plain_forest" and spec.kind == "random_forest":
        spec = spec.model_copy(update={"params": {**forest_params, **spec.params}})

    _, weighted, balance = _variant_parts(variant)
    sub = df.iloc[rows]
    use = sub["NEE"].notna() & ((sub["qc"] > 0) if weighted else (sub["qc"] >= min_qc))
    targets = ("GPP", "RECO") if balance else ("NEE",)
    models = {}
    for target in targets:
        ok = use & sub[target].notna()
        if not ok.any():
            raise ModelError(f"variant {variant}: no training month with {target} (check the tower files)")
        x = sub.loc[ok, features].to_numpy(np.float32)
        y = sub.loc[ok, target].to_numpy(np.float64)
        # QC fraction as weight: a month that is 30 % measured counts 30 % as much as a fully measured one
        w = sub.loc[ok, "qc"].to_numpy(np.float64) if weighted else None
        models[target] = make_estimator(spec).fit(x, y, sample_weight=w)
    return _Predictor(models, features)


def _climatology_swap(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """``df`` with ``cols`` replaced by each site's calendar-month mean (the 'average year' of a driver)."""
    out = df.copy()
    month = df["time"].dt.month
    for c in cols:
        out[c] = df.groupby([df["site"], month])[c].transform("mean")
    return out


def candidate_name(variant: str, forest: str) -> str:
    """Name of a nested-selection candidate, e.g. ``features+qc_weights@leaf5``."""
    return f"{variant}@{forest}"


@dataclass
class _Run:
    """One model configuration scored leave-one-site-out: a variant and its forest parameters."""

    name: str
    variant: str
    params: dict[str, Any]


def _criterion(df: pd.DataFrame, select_by: str) -> float:
    """The ranking score of held-out predictions (``obs``, ``pred``, ``site``): higher is better."""
    if select_by == "nse_site_median":
        return float(_per_site_nse(df).median())
    return float(skill(df["obs"], df["pred"])["nse"])


def _inner_groups(train_sites: list[str]) -> list[list[str]]:
    """Inner folds over an outer fold's training sites: one site each, or round-robin site groups."""
    if len(train_sites) <= MAX_INNER_LOSO:
        return [[s] for s in train_sites]
    return [train_sites[k::INNER_GROUPS] for k in range(INNER_GROUPS)]


def nested_selection(
    labelled: pd.DataFrame,
    scored: np.ndarray,
    candidates: list[_Run],
    features: list[str],
    spec: ModelSpec,
    min_qc: float,
    *,
    select_by: str = "nse",
    say: Any = None,
) -> tuple[dict[str, str], pd.DataFrame]:
    """For each outer held-out site, the candidate an inner leave-site-out loop without it prefers.

    Parameters
    ----------
    labelled : monthly rows with NEE (``site``, features, ``NEE``, ``qc``, GPP/RECO where used).
    scored : boolean mask of ``labelled`` rows that are scored (NEE QC fraction >= ``min_qc``).
    candidates : the configurations to choose between.
    features : feature columns of the geoflux variants.
    spec : model spec of the inner fits (its ``n_estimators`` may be smaller than the outer one's).
    min_qc : QC threshold of the unweighted variants' training months.
    select_by : ``nse`` (pooled NSE of the inner held-out months, gC m-2 d-1) or ``nse_site_median``.

    Returns
    -------
    ``{outer site: chosen candidate name}``, the inner scores (rows outer site, columns candidate) and
    the inner held-out predictions (``outer``, ``candidate``, ``site`` = inner held-out site, ``row`` of
    ``labelled``, ``obs``, ``pred`` in gC m-2 d-1) that the site-level flags are calibrated on.

    Notes
    -----
    The inner model for outer site o and inner group G is fitted on the sites outside {o} ∪ G. With
    single-site inner groups the fit that excludes {a, b} serves both (outer a, inner b) and (outer b,
    inner a), so each candidate needs n(n−1)/2 inner fits rather than n(n−1); the predictions are
    identical to a naive nested loop (same rows, same seed).
    """
    say = say or (lambda _m: None)
    sites = sorted(labelled["site"].unique())
    site_arr = labelled["site"].to_numpy()
    cache: dict[tuple[str, frozenset[str]], pd.Series] = {}
    table = {}
    inner_rows = []
    for outer in sites:
        others = [s for s in sites if s != outer]
        row = {}
        for cand in candidates:
            parts = []
            for group in _inner_groups(others):
                key = (cand.name, frozenset([outer, *group]))
                if key not in cache:
                    train = np.flatnonzero(~np.isin(site_arr, list(key[1])))
                    test = np.flatnonzero(np.isin(site_arr, list(key[1])) & scored)
                    model = _fit_variant(labelled, train, cand.variant, features, spec, min_qc, cand.params)
                    cache[key] = pd.Series(model.predict(labelled.iloc[test]), index=test)
                pred = cache[key]
                rows = pred.index[np.isin(site_arr[pred.index], group)]
                parts.append(
                    pd.DataFrame(
                        {
                            "site": site_arr[rows],
                            "row": rows,
                            "obs": labelled["NEE"].to_numpy()[rows],
                            "pred": pred[rows].to_numpy(),
                        }
                    )
                )
            held = pd.concat(parts, ignore_index=True)
            row[cand.name] = _criterion(held, select_by)
            inner_rows.append(held.assign(outer=outer, candidate=cand.name))
        table[outer] = row
        say(f"  inner loop without {outer}: {max(row, key=row.__getitem__)}")
    scores_ = pd.DataFrame.from_dict(table, orient="index")[[c.name for c in candidates]]
    inner = pd.concat(inner_rows, ignore_index=True)[["outer", "candidate", "site", "row", "obs", "pred"]]
    # idxmax takes the first maximum: ties go to the earlier candidate of the grid
    return scores_.idxmax(axis=1).to_dict(), scores_, inner


LEVEL = "+site_level"


def relevel(pred: pd.DataFrame, site_mean: pd.Series, exclude: str | None = None) -> np.ndarray:
    """Held-out predictions with each site's predicted mean level replaced by its training sites' mean.

    Parameters
    ----------
    pred : ``site`` and ``pred`` (gC m-2 d-1), each site's held-out months.
    site_mean : mean observed NEE (gC m-2 d-1) of every site's scored months.
    exclude : a further site left out of every level (the outer site, in the inner loop).

    Returns
    -------
    pred − mean(pred over the site's rows) + mean of ``site_mean`` over the sites other than the row's
    site (and ``exclude``). The held-out site's NEE is never used: its predicted mean comes from drivers.
    """
    site = pred["site"]
    level = site.map(lambda s: site_mean.drop([s, exclude], errors="ignore").mean())
    return (pred["pred"] - pred.groupby("site")["pred"].transform("mean") + level).to_numpy(dtype=float)


def level_choice(inner: pd.DataFrame, site_mean: pd.Series, select_by: str) -> dict[str, bool]:
    """Per outer site: does its inner loop score better (``select_by``) with :func:`relevel`?"""
    out = {}
    for outer, g in inner.groupby("outer"):
        alt = g.assign(pred=relevel(g[["site", "pred"]], site_mean, exclude=str(outer)))
        out[str(outer)] = _criterion(alt, select_by) > _criterion(g, select_by)
    return out


def model_towers(
    files: list[Path],
    sites: pd.DataFrame,
    *,
    resolution: str = "MM",
    kind: str = "random_forest",
    trees: int = 100,
    seed: int = 0,
    min_qc: float = 0.8,
    qc_max: int = 1,
    setup: str = DEFAULT_SETUP,
    variants: tuple[str, ...] | None = None,
    min_type_sites: int = 1,
    forest_params: dict[str, Any] | None = None,
    candidates: tuple[tuple[str, str], ...] | None = None,
    select_by: str = "nse",
    inner_trees: int | None = None,
    echo: Any = None,
) -> TowerModelResult:
    """Tower files + site table → features → leave-one-site-out CV (nested selection) → final model.

    Parameters
    ----------
    files : tower files (see :func:`monthly_table`).
    sites : site table indexed by SITE_ID with ``LAT`` (deg N) and ``IGBP``; ``MAT`` (degC) and ``MAP``
        (mm yr-1) are used where a site's records lack TA or P.
    resolution : model time step; only ``MM`` (calendar months) in this version.
    kind, trees, seed : the regressor (:func:`geoflux.model.make_estimator`; ``trees`` sets
        ``n_estimators`` and is ignored by ``hist_gradient_boosting``).
    min_qc : months whose NEE QC fraction is below this are not scored, and not trained on except by
        the ``+qc_weights`` variants (which weight every month by its QC fraction).
    qc_max : half-hourly files only: NEE_QC flags above this fail.
    setup : ``auto`` (default): the geoflux setup is chosen among ``candidates`` by nested
        leave-site-out validation (:func:`nested_selection`); or one of :data:`VARIANTS` fixed in
        advance (with ``forest_params``), compared with ``variants``.
    variants : fixed setup only: the variants to compare (default all the files allow).
    min_type_sites : flag sites whose IGBP class has fewer training sites than this.
    forest_params : fixed setup only: random-forest parameters of every variant except the plain forest
        (default :data:`FOREST_PARAMS`; ``{}`` for scikit-learn's defaults).
    candidates : ``auto`` only: (variant, forest setting of :data:`FOREST_SETTINGS`) pairs, default
        :data:`CANDIDATES` (carbon-balance candidates are dropped when files lack GPP/RECO).
    select_by : ``auto`` only: inner ranking score, ``nse`` (pooled) or ``nse_site_median``.
    inner_trees : ``auto`` only: trees of the inner-loop forests (default half of ``trees``, at least
        10: ranking candidates needs less precision than predicting).
    echo : optional callable for progress lines.

    Returns
    -------
    :class:`TowerModelResult`. NEE and all scores in gC m-2 d-1 (annual budgets in gC m-2 yr-1). With
    ``auto`` the skill of ``auto`` is the nested (honest) score; each candidate's own leave-one-site-out
    score is listed too but is optimistic for whichever candidate looks best.

    Raises
    ------
    ModelError
        fewer than 3 sites with scored months, an unknown variant/candidate/resolution, or a
        carbon-balance setup without partitioned columns.
    """
    from geoflux.model import TrainedModel, cv_splits

    say = echo or (lambda _m: None)
    fparams = dict(FOREST_PARAMS if forest_params is None else forest_params)
    if resolution.upper() != "MM":
        raise ModelError(f"--resolution: {resolution} (expected MM; other time steps are not supported yet)")
    auto = setup == AUTO
    grid = list(candidates or CANDIDATES) if auto else []
    unknown = [v for v in ((*(variants or ()),) if auto else (setup, *(variants or ()))) if v not in VARIANTS]
    unknown += [v for v, _ in grid if v not in VARIANTS or v == "plain_forest"]
    unknown += [f for _, f in grid if f not in FOREST_SETTINGS]
    if unknown:
        raise ModelError(
            f"variant: {unknown[0]} (expected auto or one of {', '.join(VARIANTS[1:])}; "
            f"forest settings {', '.join(FOREST_SETTINGS)})"
        )
    if select_by not in ("nse", "nse_site_median"):
        raise ModelError(f"select_by: {select_by} (expected nse or nse_site_median)")
    table, used = monthly_table(files, sites, min_qc=min_qc, qc_max=qc_max)
    df, clim = add_features(table, sites)
    classes = sorted(clim["IGBP"].unique())
    df = pd.concat([df, igbp_onehot(df, classes)], axis=1)
    met = [c for c in MET if df[c].notna().any()]
    features = [*met, *[c for c in ENGINEERED if df[c].notna().any()], *[f"IGBP_{c}" for c in classes]]
    missing_met = {c: sorted(df.loc[df[c].isna(), "site"].unique()) for c in MET if df[c].isna().any()}
    partitioned = {"GPP", "RECO"} <= set(df.columns) and bool(
        df.groupby("site")["GPP"].apply(lambda s: s.notna().any()).all()
    )
    if auto:
        if not partitioned:
            grid = [(v, f) for v, f in grid if not _variant_parts(v)[2]]
        if not grid:
            raise ModelError("candidates: none usable (carbon balance needs GPP/RECO columns in every file)")
        cands = [_Run(candidate_name(v, f), v, dict(FOREST_SETTINGS[f])) for v, f in grid]
        runs = [_Run("plain_forest", "plain_forest", {}), *cands]
    else:
        names = [v for v in dict.fromkeys(["plain_forest", setup, *(variants or VARIANTS)])]
        if not partitioned:
            if _variant_parts(setup)[2]:
                raise ModelError(f"setup {setup}: some tower files lack {', '.join(PARTITION.values())}")
            names = [v for v in names if not _variant_parts(v)[2]]
        runs = [_Run(v, v, fparams) for v in names]
        cands = []
    labelled = df[df["NEE"].notna()].reset_index(drop=True)
    scored = labelled["qc"] >= min_qc
    n_scored_sites = labelled.loc[scored, "site"].nunique()
    if n_scored_sites < 3:
        raise ModelError(
            f"only {n_scored_sites} site(s) have months with NEE QC >= {min_qc} "
            "(expected at least 3 for leave-one-site-out validation)"
        )
    spec = ModelSpec(
        kind=kind,
        seed=seed,
        cv="site",
        cv_folds=0,
        uncertainty="none",
        aoa=False,
        params={"n_estimators": trees} if kind != "hist_gradient_boosting" else {},
    )
    folds, scheme = cv_splits(labelled, spec)
    say(
        f"{labelled['site'].nunique()} sites, {int(scored.sum())} scored months; {scheme}, {len(folds)} folds"
    )
    sc = scored.to_numpy()
    site_arr = labelled["site"].to_numpy()
    fold_site = [str(site_arr[test][0]) for _, test in folds]
    preds = labelled.loc[scored, ["site", "time", "NEE", "qc"]].rename(columns={"NEE": "obs"}).copy()
    outer_models: dict[tuple[str, str], _Predictor] = {}
    for run in runs:
        feats = met if run.variant == "plain_forest" else features
        p = pd.Series(np.nan, index=labelled.index)
        for (train, test), site in zip(folds, fold_site, strict=True):
            model = _fit_variant(labelled, train, run.variant, feats, spec, min_qc, run.params)
            test_rows = test[sc[test]]
            p.iloc[test_rows] = model.predict(labelled.iloc[test_rows])
            if run.variant != "plain_forest":
                outer_models[(run.name, site)] = model
        preds[f"pred_{run.name}"] = p[scored]
        say(f"  {run.name}: done")
    selection: dict[str, Any] = {}
    if auto:
        n_inner = inner_trees or max(10, trees // 2)
        inner_spec = spec.model_copy(update={"params": {**spec.params, "n_estimators": n_inner}})
        if kind == "hist_gradient_boosting":
            inner_spec = spec
        chosen, inner_scores, inner_pred = nested_selection(
            labelled, sc, cands, features, inner_spec, min_qc, select_by=select_by, say=say
        )
        nested = pd.Series(np.nan, index=preds.index)
        for site, cand in chosen.items():
            rows = preds["site"] == site
            nested[rows] = preds.loc[rows, f"pred_{cand}"]
        preds[f"pred_{AUTO}"] = nested
        preds["chosen"] = preds["site"].map(chosen)
        inner_chosen = inner_pred[inner_pred["candidate"] == inner_pred["outer"].map(chosen)]
        # The same nested predictions with each site's predicted mean level swapped for the training
        # sites' mean NEE, where the inner loop prefers that (a documented experiment, not the setup).
        site_mean = labelled.loc[scored].groupby("site")["NEE"].mean()
        use_level = level_choice(inner_chosen, site_mean, select_by)
        preds[f"pred_{AUTO}{LEVEL}"] = np.where(
            preds["site"].map(use_level).to_numpy(dtype=bool),
            relevel(preds[["site"]].assign(pred=nested), site_mean),
            nested,
        )
        preds[f"pred_plain_forest{LEVEL}"] = relevel(
            preds[["site"]].assign(pred=preds["pred_plain_forest"]), site_mean
        )
        # The saved model: the candidate that wins the same ranking over all sites (its LOSO score).
        loso = {
            c.name: _criterion(preds[["site", "obs"]].assign(pred=preds[f"pred_{c.name}"]), select_by)
            for c in cands
        }
        final_run = next(c for c in cands if c.name == max(loso, key=loso.__getitem__))
        setup_name = AUTO
        selection = {
            "method": "nested leave-one-site-out: inner leave-one-site-out over each outer fold's "
            "training sites ranks the candidates; the outer site is predicted by the winner",
            "select_by": select_by,
            "inner_trees": n_inner if kind != "hist_gradient_boosting" else None,
            "candidates": {c.name: {"variant": c.variant, "forest_params": c.params} for c in cands},
            "chosen_per_outer_site": chosen,
            "inner_scores": inner_scores.round(4).to_dict("index"),
            "final_ranking_loso": {k: round(v, 4) for k, v in loso.items()},
            "final": final_run.name,
        }
        say(f"  nested selection done; final model: {final_run.name}")
        fold_models = [
            (test[sc[test]], outer_models[(chosen[site], site)])
            for (_, test), site in zip(folds, fold_site, strict=True)
        ]
    else:
        final_run = next(r for r in runs if r.name == setup)
        setup_name = setup
        fold_models = [
            (test[sc[test]], outer_models[(setup, site)])
            for (_, test), site in zip(folds, fold_site, strict=True)
        ]
    preds = preds.reset_index(drop=True)
    qc_all = df[["site", "time", "qc"]].fillna({"qc": 0.0})
    names = [r.name for r in runs] + ([AUTO, f"{AUTO}{LEVEL}", f"plain_forest{LEVEL}"] if auto else [])
    skill_out: dict[str, dict[str, Any]] = {}
    for name in names:
        pv = preds[["site", "time", "obs"]].assign(pred=preds[f"pred_{name}"])
        skill_out[name] = multiscale(pv, qc_all)
    setup_pred = preds[["site", "time", "obs"]].assign(pred=preds[f"pred_{setup_name}"])
    nse = _per_site_nse(setup_pred)
    # The flags' inner calibration uses the candidate each outer site was actually predicted by.
    flags = site_flags(
        clim.loc[sorted(nse.index)],
        nse,
        min_type_sites=min_type_sites,
        pred=setup_pred,
        inner=inner_chosen if auto else None,
    )
    flags.insert(
        2,
        "nse_plain_forest",
        flags["site"]
        .map(_per_site_nse(preds[["site", "time", "obs"]].assign(pred=preds["pred_plain_forest"])))
        .to_numpy(),
    )
    if auto:
        flags.insert(3, "chosen", flags["site"].map(selection["chosen_per_outer_site"]).to_numpy())
    annual = _annual_with_attribution(labelled, sc, fold_models, setup_pred, qc_all)
    say(f"fitting the final model ({final_run.name}) on all sites")
    final = _fit_variant(
        labelled, np.arange(len(labelled)), final_run.variant, features, spec, min_qc, final_run.params
    )
    units = {f: FEATURE_UNITS.get(f, "0/1" if f.startswith("IGBP_") else "") for f in features}
    prov = {
        "setup": final_run.name if auto else setup,
        "variant": final_run.variant,
        "forest_params": final_run.params if kind == "random_forest" else {},
        "tower_files": used,
        "validation": scheme + (" (nested selection)" if auto else ""),
        "min_qc": min_qc,
        "cv_skill": skill_out[setup_name],
        "cv_skill_plain_forest": skill_out["plain_forest"],
    }
    models = {}
    for target, est in final.models.items():
        domain = {f: [float(np.nanmin(labelled[f])), float(np.nanmax(labelled[f]))] for f in features}
        models[target] = TrainedModel(
            est,
            list(features),
            units,
            "gC m-2 d-1",
            domain,
            {
                **prov,
                "target": target,
                "kind": kind,
                "n_estimators": trees,
                "seed": seed,
                "sites": sorted(labelled["site"].unique()),
            },
        )
    labels = {"plain_forest": "baseline"}
    for r in runs[1:]:
        labels[r.name] = (
            "candidate, not nested (optimistic if picked)"
            if auto
            else ("fixed setup" if r.name == setup else "compared")
        )
    if auto:
        labels[AUTO] = "nested selection (honest)"
        labels[f"{AUTO}{LEVEL}"] = "experiment: auto, site level from training sites if inner loop prefers"
        labels[f"plain_forest{LEVEL}"] = "experiment: plain forest, site level from training sites"
        selection["site_level_per_outer_site"] = {k: bool(v) for k, v in use_level.items()}
    info = {
        "sites": used,
        "n_scored_months": int(scored.sum()),
        "features": features,
        "plain_forest_features": met,
        "missing_drivers": missing_met,
        "missing_handling": "left NaN; the forests route NaN explicitly in each split (scikit-learn >= 1.4)",
        "climate_source": clim["climate_source"].to_dict(),
        "partitioned": partitioned,
        "variants": [r.name for r in runs],
        "run_labels": labels,
        "forest_params": (final_run.params if auto else fparams) if kind == "random_forest" else {},
        "scheme": scheme,
        "selection": selection,
        "final_model": final_run.name,
    }
    by_site = {site: model for site, (_, model) in zip(fold_site, fold_models, strict=True)}
    result = TowerModelResult(
        df, features, preds, skill_out, flags, annual, setup_name, models, clim, info, by_site, min_qc
    )
    result.inner = inner_pred if auto else None
    return result


def _annual_with_attribution(
    labelled: pd.DataFrame,
    scored: np.ndarray,
    fold_models: list[tuple[np.ndarray, _Predictor]],
    setup_pred: pd.DataFrame,
    qc_all: pd.DataFrame,
) -> pd.DataFrame:
    """Annual table of the setup plus, per driver group, how much of the predicted anomaly it explains.

    ``attr_<group>`` (gC m-2 d-1) = predicted annual anomaly − the anomaly predicted when that group's
    drivers are replaced by the site's calendar-month climatology (by the held-out fold's model). The
    groups interact in the forest, so the attributions need not add up to the predicted anomaly.
    """
    ann = annual_table(setup_pred, qc_all)
    feats = fold_models[0][1].features if fold_models else []
    for group, cols in DRIVER_GROUPS.items():
        cols_here = [c for c in cols if c in feats]
        if not cols_here:
            continue
        swapped = _climatology_swap(labelled, cols_here)
        p = pd.Series(np.nan, index=labelled.index)
        for rows, model in fold_models:
            p.iloc[rows] = model.predict(swapped.iloc[rows])
        alt = labelled.loc[scored, ["site", "time"]].assign(obs=0.0, pred=p[scored].to_numpy())
        alt_ann = annual_table(alt.reset_index(drop=True), qc_all).set_index(["site", "year"])
        key = pd.MultiIndex.from_frame(ann[["site", "year"]])
        ann[f"attr_{group}"] = (
            ann["pred_anomaly"].to_numpy() - alt_ann["pred_anomaly"].reindex(key).to_numpy()
        )
    return ann


# --------------------------------------------------------------------------------------------------
# Output.
def comparison_table(result: TowerModelResult, scale: str = "monthly") -> pd.DataFrame:
    """One row per variant at one scale: nse, r2_pearson, rmse, bias (gC m-2 d-1), nse_site_median, n."""
    rows = []
    for variant, sc in result.skill.items():
        if scale in sc:
            s = sc[scale]
            rows.append(
                {
                    "variant": variant,
                    "selection": result.info.get("run_labels", {}).get(variant, ""),
                    **{
                        k: s[k]
                        for k in ("nse", "r2_pearson", "rmse", "bias", "nse_site_median", "n", "n_sites")
                    },
                }
            )
    return pd.DataFrame(rows)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path; OutputExistsError if it is a file, or a non-empty folder without overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder (expected a new or empty folder)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: folder is not empty (expected a new or empty folder, or --overwrite)"
        )
    return out


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` as CSV at ``path``, written under a temporary name and renamed when complete."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
