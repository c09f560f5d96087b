"""Report section of a tower-only model run (``geoflux towers model``): ``report.html`` and its figures.

Written into the run's output folder by :func:`write_report`, self-contained apart from the PNGs it links
relatively (``figures/*.png``), so the folder can be moved or zipped as a whole:

* **skill per held-out site**: monthly NSE of the setup and of the plain forest, the nested choice, and
  the extrapolation flags (``site_flags.csv``);
* **site-year budgets**: annual NEE (gC m-2 yr-1) from the tower's gap-filled monthly values, its random
  uncertainty and gap-filled share, and the anomaly from the site's mean year (``site_year_budget.csv``);
* **attribution of annual anomalies** (gC m-2 yr-1): the predicted anomaly minus the anomaly predicted
  with one driver group set to the site's calendar-month climatology, by the model that never saw the
  site (``annual.csv``);
* **driver importance across sites** (``driver_importance.csv``): per held-out site, the increase of
  the monthly RMSE (gC m-2 d-1) when one driver group is permuted among the site's months;
* **driver dependence across sites** (``driver_dependence.csv``): per held-out site, the mean predicted
  NEE (gC m-2 d-1) with one driver set to each value of a common grid (partial dependence), by the
  site's held-out model.

Importance and dependence use each site's held-out model on that site's own months, so they describe
what the model learnt from the *other* sites, as applied to this one.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoflux.atomic import atomic_path
from geoflux.towers.modelling import TowerModelResult, check_out_dir, comparison_table, write_csv

DAYS_PER_YEAR = 365.25
# Driver groups varying within a site (site climate and IGBP are constant there, so permuting them
# among a site's months measures nothing).
IMPORTANCE_GROUPS: dict[str, tuple[str, ...]] = {
    "TA": ("TA",),
    "radiation": ("SW_IN", "sw_ratio"),
    "VPD": ("VPD",),
    "water": ("P", "pet", "wb_0", "wb_1", "wb_2", "wb_3"),
    "season": ("season_sin", "season_cos", "rpot", "daylength"),
}
DEPENDENCE_DRIVERS: dict[str, str] = {"TA": "degC", "SW_IN": "W m-2", "VPD": "hPa", "wb_3": "mm d-1"}
N_GRID = 15
N_REPEATS = 3
GAPFILLED_WEAK = 0.5  # share of gap-filled NEE above which a site-year is ringed in the budget figure
IQR_TO_SD = 1.349  # interquartile range of a normal distribution in standard deviations


def site_year_budget(table: pd.DataFrame) -> pd.DataFrame:
    """Annual NEE per site-year from the tower's monthly values, with uncertainty and anomaly.

    Parameters
    ----------
    table : monthly table (``site``, ``time`` month start, ``NEE`` gC m-2 d-1, ``qc`` 0-1, optional
        ``NEE_UNC`` gC m-2 d-1: random uncertainty of the monthly mean).

    Returns
    -------
    One row per site-year with all 12 months of NEE: ``nee_gC_m2_yr`` = Σ NEE_m × days_m;
    ``unc_random_gC_m2_yr`` = sqrt(Σ (NEE_UNC_m × days_m)²) (random errors of different months taken as
    independent; NaN without ``NEE_UNC``); ``unc_ustar_gC_m2_yr`` = |Σ (NEE_75 − NEE_25)_m × days_m| / 1.349
    (the u*-threshold ensemble's interquartile range as a standard deviation; the same threshold
    applies all year, so months add up linearly); ``unc_total_gC_m2_yr`` both in quadrature;
    ``gapfilled_share`` = 1 − day-weighted mean QC fraction;
    ``anomaly_gC_m2_yr`` = the year minus the mean of the site's complete years; ``anomaly_z`` = anomaly
    / total uncertainty. All in gC m-2 yr-1.
    """
    df = table[table["NEE"].notna()].copy()
    days = df["time"].dt.days_in_month.astype(float)
    df["year"] = df["time"].dt.year
    df["_nee"] = df["NEE"] * days
    df["_unc2"] = (df["NEE_UNC"] * days) ** 2 if "NEE_UNC" in df else np.nan
    df["_iqr"] = (df["NEE_75"] - df["NEE_25"]) * days if {"NEE_25", "NEE_75"} <= set(df) else np.nan
    df["_qcd"] = df["qc"].fillna(0.0) * days
    df["_days"] = days
    g = df.groupby(["site", "year"])
    out = g.agg(
        n_months=("NEE", "size"),
        nee_gC_m2_yr=("_nee", "sum"),
        _unc2=("_unc2", _sum_or_nan),
        _iqr=("_iqr", _sum_or_nan),
        _qcd=("_qcd", "sum"),
        _days=("_days", "sum"),
    ).reset_index()
    out = out[out["n_months"] == 12].copy()
    out["unc_random_gC_m2_yr"] = np.sqrt(out["_unc2"])
    out["unc_ustar_gC_m2_yr"] = out["_iqr"].abs() / IQR_TO_SD
    out["unc_total_gC_m2_yr"] = np.hypot(out["unc_random_gC_m2_yr"], out["unc_ustar_gC_m2_yr"])
    out["gapfilled_share"] = 1.0 - out["_qcd"] / out["_days"]
    out["anomaly_gC_m2_yr"] = out["nee_gC_m2_yr"] - out.groupby("site")["nee_gC_m2_yr"].transform("mean")
    out["anomaly_z"] = out["anomaly_gC_m2_yr"] / out["unc_total_gC_m2_yr"]
    return out.drop(columns=["_unc2", "_iqr", "_qcd", "_days", "n_months"]).reset_index(drop=True)


def _sum_or_nan(s: pd.Series) -> float:
    """Sum of a site-year's monthly terms, NaN when any month lacks the term."""
    return float(s.sum()) if s.notna().all() else np.nan


def _site_rows(result: TowerModelResult, site: str) -> pd.DataFrame:
    t = result.table
    return t[(t["site"] == site) & t["NEE"].notna() & (t["qc"] >= result.min_qc)]


def driver_importance(result: TowerModelResult, seed: int = 0) -> pd.DataFrame:
    """Per held-out site and driver group: RMSE increase (gC m-2 d-1) when the group is permuted.

    The group's columns are permuted together (one permutation of the site's months, so lagged water
    balance stays consistent with precipitation), ``N_REPEATS`` times; the score is the mean RMSE with
    the permuted drivers minus the RMSE of the site's held-out predictions.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for site, model in sorted(result.fold_models.items()):
        sub = _site_rows(result, site)
        if len(sub) < 2:
            continue
        obs = sub["NEE"].to_numpy()
        base = float(np.sqrt(np.mean((model.predict(sub) - obs) ** 2)))
        for group, cols in IMPORTANCE_GROUPS.items():
            here = [c for c in cols if c in model.features]
            if not here:
                continue
            stacked = []
            for _ in range(N_REPEATS):
                perm = sub.copy()
                perm[here] = sub[here].to_numpy()[rng.permutation(len(sub))]
                stacked.append(perm)
            pred = model.predict(pd.concat(stacked, ignore_index=True)).reshape(N_REPEATS, len(sub))
            rmse = np.sqrt(np.mean((pred - obs[None, :]) ** 2, axis=1))
            rows.append({"site": site, "group": group, "rmse_increase": float(rmse.mean() - base)})
    return pd.DataFrame(rows, columns=["site", "group", "rmse_increase"])


def driver_dependence(result: TowerModelResult) -> pd.DataFrame:
    """Partial dependence of NEE (gC m-2 d-1) on each driver, per held-out site, on a common grid.

    The grid spans the 2nd to 98th percentile of the driver over all sites' months; for each site the
    driver is set to each grid value on every one of the site's scored months and the held-out model's
    predictions are averaged. Returns ``site``, ``driver``, ``value``, ``nee``, ``inside`` (the value
    lies within the site's own observed range).
    """
    rows = []
    t = result.table
    for driver in DEPENDENCE_DRIVERS:
        if driver not in result.features or t[driver].notna().sum() < 2:
            continue
        grid = np.unique(np.nanpercentile(t[driver], np.linspace(2, 98, N_GRID)))
        for site, model in sorted(result.fold_models.items()):
            sub = _site_rows(result, site)
            if sub.empty:
                continue
            big = pd.concat([sub] * len(grid), ignore_index=True)
            big[driver] = np.repeat(grid, len(sub))
            pred = model.predict(big).reshape(len(grid), len(sub)).mean(axis=1)
            lo, hi = np.nanmin(sub[driver]), np.nanmax(sub[driver])
            for v, p in zip(grid, pred, strict=True):
                rows.append(
                    {
                        "site": site,
                        "driver": driver,
                        "value": float(v),
                        "nee": float(p),
                        "inside": bool(lo <= v <= hi),
                    }
                )
    return pd.DataFrame(rows, columns=["site", "driver", "value", "nee", "inside"])


# --------------------------------------------------------------------------------------------------
# Figures.
def _savefig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _grid(n: int, width: float = 3.2, height: float = 2.4) -> tuple[Any, np.ndarray]:
    import matplotlib.pyplot as plt

    ncol = min(n, 4)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _fig_skill(flags: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    f = flags.sort_values("nse")
    y = np.arange(len(f))
    lo = -3.0  # NSE below this is drawn at the axis edge, its value written next to it
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(f) + 1.2))
    ax.barh(y - 0.2, np.maximum(f["nse_plain_forest"], lo), 0.4, color="0.7", label="plain forest")
    ax.barh(y + 0.2, np.maximum(f["nse"], lo), 0.4, color="tab:blue", label="geoflux setup")
    for k, (_, r) in enumerate(f.iterrows()):
        if r["nse"] < lo:
            ax.text(lo, k + 0.2, f" {r['nse']:.1f}", va="center", fontsize=7)
        if r["nse_plain_forest"] < lo:
            ax.text(lo, k - 0.2, f" {r['nse_plain_forest']:.1f}", va="center", fontsize=7)
    labels = [
        f"{s} ({t}){'  [flagged]' if fl else ''}"
        for s, t, fl in zip(f["site"], f["IGBP"], f["flagged"], strict=True)
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(lo, 1)
    ax.set_xlabel("held-out monthly NSE (leave-one-site-out)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _savefig(fig, path)


def _fig_budget(budget: pd.DataFrame, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    sites = sorted(budget["site"].unique())
    fig, axes = _grid(len(sites))
    for ax, site in zip(axes, sites, strict=False):
        b = budget[budget["site"] == site]
        err = 2 * b["unc_total_gC_m2_yr"].fillna(0.0)
        ax.errorbar(b["year"], b["nee_gC_m2_yr"], yerr=err, fmt="o-", ms=3, lw=1, capsize=2)
        # Years mostly gap-filled (or without a stated uncertainty) are the least trustworthy: ringed
        weak = b[(b["gapfilled_share"] > GAPFILLED_WEAK) | b["unc_total_gC_m2_yr"].isna()]
        ax.plot(weak["year"], weak["nee_gC_m2_yr"], "o", ms=8, mfc="none", mec="tab:red")
        ax.axhline(b["nee_gC_m2_yr"].mean(), color="0.5", lw=0.8, ls="--")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(site, fontsize=9)
        ax.set_ylabel("NEE (gC m-2 yr-1)", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "Annual NEE per site-year, ± 2σ (random and u* uncertainty); dashed: site mean; "
        f"red ring: > {GAPFILLED_WEAK:.0%} gap-filled or no stated uncertainty",
        fontsize=9,
    )
    fig.tight_layout()
    _savefig(fig, path)


def _fig_attribution(annual: pd.DataFrame, groups: list[str], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    sites = sorted(annual["site"].unique())
    fig, axes = _grid(len(sites), width=3.6)
    width = 0.8 / max(len(groups), 1)
    for ax, site in zip(axes, sites, strict=False):
        a = annual[annual["site"] == site]
        for k, g in enumerate(groups):
            ax.bar(a["year"] - 0.4 + (k + 0.5) * width, a[f"attr_{g}"] * DAYS_PER_YEAR, width, label=g)
        ax.plot(a["year"], a["obs_anomaly"] * DAYS_PER_YEAR, "k.-", lw=1, label="observed")
        ax.plot(a["year"], a["pred_anomaly"] * DAYS_PER_YEAR, "r.--", lw=1, label="predicted")
        ax.axhline(0, color="k", lw=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(site, fontsize=9)
        ax.set_ylabel("anomaly (gC m-2 yr-1)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Annual NEE anomalies and their attribution to driver groups (held-out model)", fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)


def _fig_importance(imp: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    m = imp.pivot(index="site", columns="group", values="rmse_increase")
    fig, ax = plt.subplots(figsize=(1.1 * m.shape[1] + 2.5, 0.4 * m.shape[0] + 1.5))
    im = ax.imshow(m.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(m.shape[1]), m.columns, fontsize=8)
    ax.set_yticks(range(m.shape[0]), m.index, fontsize=8)
    for (i, j), v in np.ndenumerate(m.to_numpy()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="RMSE increase (gC m-2 d-1)")
    ax.set_title("Permutation importance per held-out site", fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)


def _fig_dependence(dep: pd.DataFrame, path: Path) -> None:
    drivers = list(dict.fromkeys(dep["driver"]))
    fig, axes = _grid(len(drivers))
    for ax, d in zip(axes, drivers, strict=False):
        for site, g in dep[dep["driver"] == d].groupby("site"):
            line = ax.plot(g["value"], g["nee"], lw=0.8, alpha=0.5)[0]
            ins = g[g["inside"]]  # bold over the site's own observed range
            ax.plot(ins["value"], ins["nee"], lw=2, color=line.get_color(), label=site)
        ax.set_xlabel(f"{d} ({DEPENDENCE_DRIVERS[d]})", fontsize=8)
        ax.set_ylabel("NEE (gC m-2 d-1)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle("Partial dependence per held-out site (bold: within the site's own range)", fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)


# --------------------------------------------------------------------------------------------------
# HTML.
def _table_html(df: pd.DataFrame, digits: int = 3) -> str:
    return df.round(digits).to_html(index=False, border=0, classes="t", na_rep="–", escape=True)


# The per-site table: held-out skill next to the extrapolation flags (columns a run lacks are skipped).
SITE_FLAG_COLUMNS = (
    "site",
    "IGBP",
    "nse",
    "nse_plain_forest",
    "chosen",
    "n_same_type_training",
    "type_flag",
    "type_inner_nse",
    "type_skill_flag",
    "pred_std",
    "expected_rmse",
    "signal_ratio",
    "signal_threshold",
    "low_signal_flag",
    "climate_di",
    "climate_threshold",
    "climate_flag",
    "flagged",
    "nearest_site",
)


def site_flag_columns(flags: pd.DataFrame) -> list[str]:
    """The :data:`SITE_FLAG_COLUMNS` that ``flags`` has, in that order."""
    return [c for c in SITE_FLAG_COLUMNS if c in flags.columns]


def write_report(result: TowerModelResult, out: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``figures/*.png`` and the report tables into the run folder ``out``.

    Parameters
    ----------
    result : a :class:`~geoflux.towers.modelling.TowerModelResult` (from ``model_towers``).
    out : the run's output folder (must exist).

    Returns
    -------
    Paths written, by name: ``report.html``, ``site_year_budget.csv``, ``driver_importance.csv``,
    ``driver_dependence.csv`` and each figure.
    """
    import matplotlib

    matplotlib.use("Agg")

    out = Path(out)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    budget = site_year_budget(result.table)
    imp = driver_importance(result)
    dep = driver_dependence(result)
    for name, frame in (
        ("site_year_budget.csv", budget),
        ("driver_importance.csv", imp),
        ("driver_dependence.csv", dep),
    ):
        paths[name] = write_csv(frame, out / name)
    groups = [c.removeprefix("attr_") for c in result.annual.columns if c.startswith("attr_")]
    made = []
    for name, fn, data in (
        ("skill.png", _fig_skill, (result.flags,)),
        ("site_year_budget.png", _fig_budget, (budget,)),
        ("attribution.png", _fig_attribution, (result.annual, groups)),
        ("importance.png", _fig_importance, (imp,)),
        ("dependence.png", _fig_dependence, (dep,)),
    ):
        if len(data[0]):
            fn(*data, figs / name)
            paths[name] = figs / name
            made.append(name)

    ann = result.annual.copy()
    attr_cols = {f"attr_{g}": f"attr_{g} (gC m-2 yr-1)" for g in groups}
    ann_view = pd.DataFrame(
        {
            "site": ann["site"],
            "year": ann["year"],
            "months scored": ann["n_months"],
            "obs anomaly (gC m-2 yr-1)": ann["obs_anomaly"] * DAYS_PER_YEAR,
            "pred anomaly (gC m-2 yr-1)": ann["pred_anomaly"] * DAYS_PER_YEAR,
            **{v: ann[k] * DAYS_PER_YEAR for k, v in attr_cols.items()},
        }
    )
    bud_view = budget.rename(
        columns={
            "nee_gC_m2_yr": "NEE (gC m-2 yr-1)",
            "unc_random_gC_m2_yr": "random unc. 1σ (gC m-2 yr-1)",
            "unc_ustar_gC_m2_yr": "u* unc. 1σ (gC m-2 yr-1)",
            "unc_total_gC_m2_yr": "total unc. 1σ (gC m-2 yr-1)",
            "gapfilled_share": "gap-filled share",
            "anomaly_gC_m2_yr": "anomaly (gC m-2 yr-1)",
            "anomaly_z": "anomaly / unc.",
        }
    )
    flag_cols = site_flag_columns(result.flags)
    imp_wide = imp.pivot(index="site", columns="group", values="rmse_increase").reset_index()
    sel = result.info.get("selection") or {}
    esc = html.escape

    def img(name: str, alt: str) -> str:
        return f'<p><img src="figures/{name}" alt="{esc(alt)}"></p>' if name in made else ""

    summary = result.flags.attrs.get("summary", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>geoflux towers model</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:2px 6px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}</style></head><body>",
        "<h1>Tower-only NEE model</h1>",
        f"<p>{result.info.get('n_scored_months', '')} scored months at "
        f"{len(result.flags)} sites; {esc(str(result.info.get('scheme', '')))}. NEE in gC m-2 d-1 "
        "(positive = source), annual values in gC m-2 yr-1. Setup: "
        f"<b>{esc(result.setup)}</b>; saved model: "
        f"<b>{esc(str(result.info.get('final_model', '')))}</b>.</p>",
    ]
    if sel:
        parts.append(
            f"<p>Selection: {esc(sel['method'])}; ranking score <code>{esc(sel['select_by'])}</code>. "
            "The <code>auto</code> row is the honest (nested) score; candidate rows are each candidate's "
            "own leave-one-site-out score, optimistic for whichever looks best.</p>"
        )
    parts += [
        "<h2>Skill (leave-one-site-out, monthly, gC m-2 d-1)</h2>",
        _table_html(comparison_table(result, "monthly")),
        "<h3>Per held-out site</h3>",
        "<p>A site is <code>flagged</code> when any flag is set. No flag uses the held-out site's NEE; "
        "thresholds come from the inner leave-site-out loop over the training sites (calibration: "
        f"{esc(str(summary.get('calibration', '?')))}). <code>type_flag</code> — ecosystem type with "
        f"fewer than {summary.get('min_type_sites', '?')} training site(s); <code>type_skill_flag</code> — "
        "the training sites of the same type, held out in the inner loop, have median NSE "
        "(<code>type_inner_nse</code>) below 0; <code>low_signal_flag</code> — the std of the site's "
        "predicted monthly NEE over the inner loop's RMSE (<code>signal_ratio</code>) is below the "
        "lowest ratio of any training site the inner loop predicted with NSE ≥ 0; "
        "<code>climate_flag</code> — dissimilarity in site climate (MAT, MAP, aridity, TA range) + "
        "ecosystem type above the largest of any training site the inner loop predicted with NSE ≥ 0. "
        f"Sites with NSE &lt; 0: {summary.get('negative_nse_sites', '?')}, flagged: "
        f"{summary.get('negative_nse_flagged', '?')}; sites with NSE &gt; 0.3: "
        f"{summary.get('nse_above_0.3_sites', '?')}, flagged: "
        f"{summary.get('nse_above_0.3_flagged', '?')}.</p>",
        _table_html(result.flags[flag_cols]),
        img("skill.png", "per-site NSE"),
        "<h2>Site-year NEE budgets (gC m-2 yr-1)</h2>",
        "<p>Years with 12 monthly values of the tower's gap-filled NEE: Σ monthly mean × days. Random "
        "uncertainty from the files' random-uncertainty column (months independent); u* uncertainty from "
        "NEE at the 25th/75th percentile u* thresholds (IQR / 1.349); total = both in quadrature; "
        "gap-filled share = 1 − day-weighted QC fraction. Anomaly: the year minus the site's mean year; "
        "anomaly / unc. uses the total.</p>",
        _table_html(bud_view, 2),
        img("site_year_budget.png", "annual NEE per site"),
        "<h2>Attribution of annual anomalies to drivers (gC m-2 yr-1)</h2>",
        "<p>Over the scored months of site-years with at least 10 of them. <code>attr_&lt;group&gt;</code> = "
        "predicted anomaly − predicted anomaly with that group's drivers replaced by the site's "
        "calendar-month climatology, by the model that never saw the site. Groups interact, so they need "
        "not add up to the predicted anomaly.</p>",
        _table_html(ann_view, 1),
        img("attribution.png", "anomaly attribution"),
        "<h2>Driver importance across sites</h2>",
        "<p>Increase of the held-out monthly RMSE (gC m-2 d-1) when a driver group is permuted among the "
        f"site's months ({N_REPEATS} permutations), by the site's held-out model.</p>",
        _table_html(imp_wide),
        img("importance.png", "driver importance"),
        "<h2>Driver dependence across sites</h2>",
        "<p>Partial dependence of NEE (gC m-2 d-1) by each site's held-out model on its own months; "
        "values are in <code>driver_dependence.csv</code>.</p>",
        img("dependence.png", "partial dependence"),
        "</body></html>",
    ]
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    paths["report.html"] = out / "report.html"
    return paths


def write_outputs(result: TowerModelResult, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write the model(s), cards, CV predictions, skill, flags and annual table into ``out``.

    Files: ``model.skops`` + ``model.json`` (or ``model_gpp``/``model_reco`` for a carbon-balance
    setup; skops format, see :func:`geoflux.model.save_model`), ``cv_predictions.csv`` (held-out monthly
    NEE of every variant, gC m-2 d-1), ``skill.json`` (scores per variant and time scale),
    ``comparison.csv``, ``site_flags.csv``, ``annual.csv`` (site-year budgets, anomalies, attribution),
    ``features.csv`` (the monthly feature table), and the report section of
    :func:`write_report` (``report.html``, ``figures/``, ``site_year_budget.csv``,
    ``driver_importance.csv``, ``driver_dependence.csv``).

    Raises
    ------
    OutputExistsError
        ``out`` exists and is not empty, and ``overwrite`` is False.
    """
    from geoflux.model import save_model

    out = check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # A previous run's model of another setup must not survive next to this run's skill.
    for stale in [*out.glob("model*.skops"), *out.glob("model*.json"), *out.glob("figures/*.png")]:
        stale.unlink()
    paths: dict[str, Path] = {}
    for target, model in result.models.items():
        name = "model.skops" if target == "NEE" else f"model_{target.lower()}.skops"
        paths[f"model_{target}"] = save_model(model, out / name)
    for name, frame in (
        ("cv_predictions.csv", result.predictions),
        ("site_flags.csv", result.flags),
        ("annual.csv", result.annual),
        ("comparison.csv", comparison_table(result)),
        ("features.csv", result.table),
    ):
        write_csv(frame, out / name)
    summary = {
        "setup": result.setup,
        "units": "gC m-2 d-1 (NEE, rmse, bias); annual *_gC_m2_yr columns gC m-2 yr-1",
        "skill": result.skill,
        "flags_summary": result.flags.attrs.get("summary", {}),
        **result.info,
    }
    with atomic_path(out / "skill.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    for name in ("cv_predictions.csv", "site_flags.csv", "annual.csv", "comparison.csv", "skill.json"):
        paths[name] = out / name
    paths.update(write_report(result, out))
    return paths
