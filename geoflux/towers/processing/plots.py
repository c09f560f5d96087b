"""PNG plots of a site's carbon dynamics (matplotlib, Agg backend; every axis carries its unit)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

FLUX_UNIT = r"µmol CO$_2$ m$^{-2}$ s$^{-1}$"
DAY_UNIT = r"gC m$^{-2}$ d$^{-1}$"
COLORS = {
    "NEE_f": "k",
    "GPP_NT": "tab:green",
    "RECO_NT": "tab:red",
    "GPP_DT": "yellowgreen",
    "RECO_DT": "salmon",
}
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _save(fig: plt.Figure, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".part.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_diurnal(diurnal: pd.DataFrame, site: str, path: Path) -> Path:
    """Mean diurnal cycle of NEE, GPP and RECO for each month (3 × 4 panels)."""
    fig, axes = plt.subplots(3, 4, figsize=(13, 8), sharex=True, sharey=True)
    for m, ax in zip(range(1, 13), axes.flat, strict=True):
        d = diurnal[diurnal["month"] == m]
        for c in ("NEE_f", "GPP_NT", "RECO_NT"):
            if c in d:
                ax.plot(d["hour"], d[c], color=COLORS[c], label=c.replace("_f", ""))
        ax.plot(d["hour"], d["NEE_meas"], ".", color="0.5", ms=3, label="NEE measured")
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_title(MONTHS[m - 1], fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("hour of day (local standard time)")
        ax.set_xticks([0, 6, 12, 18, 24])
    for ax in axes[:, 0]:
        ax.set_ylabel(FLUX_UNIT)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{site}: mean diurnal cycle per month")
    return _save(fig, path)


def plot_seasonal(daily: pd.DataFrame, site: str, path: Path) -> Path:
    """Daily sums of NEE, GPP and RECO with their 15-day running means."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for c in ("GPP_NT", "RECO_NT", "NEE_f", "GPP_DT"):
        if c in daily:
            ax.plot(daily["date"], daily[c], color=COLORS[c], alpha=0.25, lw=0.8)
            ax.plot(
                daily["date"],
                daily[c].rolling(15, center=True, min_periods=5).mean(),
                color=COLORS[c],
                lw=2,
                label=c.replace("_f", "") + " (15-day mean)",
            )
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_ylabel(f"daily sum ({DAY_UNIT})")
    ax.set_xlabel("date")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"{site}: seasonal cycle (night-time partitioning; NEE < 0 is uptake)")
    return _save(fig, path)


def plot_fingerprint(fp: pd.DataFrame, site: str, path: Path) -> Path:
    """Fingerprint: NEE by day of year (x) and time of day (y), one panel per year."""
    years = fp.index.get_level_values("year").unique()
    fig, axes = plt.subplots(len(years), 1, figsize=(11, 3.6 * len(years)), squeeze=False)
    vals = fp.to_numpy()
    lim = np.nanpercentile(np.abs(vals), 99) if np.isfinite(vals).any() else 1.0
    for y, ax in zip(years, axes[:, 0], strict=True):
        sub = fp.xs(y, level="year")
        hours = sub.columns.to_numpy(float)
        step = hours[1] - hours[0] if hours.size > 1 else 0.5
        im = ax.imshow(
            sub.to_numpy().T,
            aspect="auto",
            origin="lower",
            cmap="RdBu_r",
            vmin=-lim,
            vmax=lim,
            extent=[sub.index.min() - 0.5, sub.index.max() + 0.5, hours[0], hours[-1] + step],
            interpolation="nearest",
        )
        ax.set_ylabel("hour of day")
        ax.set_yticks([0, 6, 12, 18, 24])
        ax.set_title(f"{site} {y}: gap-filled NEE fingerprint")
        fig.colorbar(im, ax=ax, label=f"NEE ({FLUX_UNIT})", pad=0.01)
    axes[-1, 0].set_xlabel("day of year")
    return _save(fig, path)


def plot_cumulative(cum: pd.DataFrame, budgets: pd.DataFrame, site: str, path: Path) -> Path:
    """Cumulative NEE per year (x: day of year) with the annual budget and its uncertainty."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for y, g in cum.groupby("year"):
        doy = g["time"].dt.day_of_year + g["time"].dt.hour / 24.0
        b = budgets[budgets["year"] == y].iloc[0]
        ax.plot(doy, g["NEE_f"], label=f"{y}: {b['NEE']:.0f} ± {b['NEE_unc']:.0f} gC m$^{{-2}}$ yr$^{{-1}}$")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("day of year")
    ax.set_ylabel(r"cumulative NEE (gC m$^{-2}$)")
    ax.legend(fontsize=8)
    ax.set_title(f"{site}: cumulative NEE")
    return _save(fig, path)


def plot_budgets(budgets: pd.DataFrame, site: str, path: Path) -> Path:
    """Annual NEE, GPP and RECO (night-time; day-time where available) with uncertainty bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cols = [c for c in ("NEE", "GPP_NT", "RECO_NT", "GPP_DT", "RECO_DT") if c in budgets]
    x = np.arange(len(budgets))
    w = 0.8 / len(cols)
    for i, c in enumerate(cols):
        err = None
        if c == "NEE":
            err = budgets["NEE_unc"]
        elif c.endswith("_NT"):
            err = budgets[c.split("_")[0] + "_ustar"]
        color = COLORS.get(c, COLORS.get(c + "_f", "k")) if c != "NEE" else "0.3"
        ax.bar(x + i * w, budgets[c], w, yerr=err, capsize=3, color=color, label=c)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xticks(x + 0.4 - w / 2, budgets["year"].astype(str))
    ax.set_ylabel(r"annual sum (gC m$^{-2}$ yr$^{-1}$)")
    ax.legend(fontsize=8)
    ax.set_title(f"{site}: annual budgets (bars: random + u* uncertainty)")
    return _save(fig, path)


def plot_light_response(lr: pd.DataFrame, site: str, path: Path) -> Path:
    """Monthly light-response parameters: α, GPP at saturation and day-time respiration."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = pd.to_datetime(dict(year=lr["year"], month=lr["month"], day=15))
    labels = (
        r"quantum efficiency α (µmol CO$_2$ J$^{-1}$)",
        f"GPP at saturation β ({FLUX_UNIT})",
        f"day-time respiration γ ({FLUX_UNIT})",
    )
    for ax, c, lab in zip(axes, ("alpha", "gpp_sat", "resp_day"), labels, strict=True):
        ax.plot(x, lr[c], "o-")
        ax.set_ylabel(lab, fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(f"{site}: monthly light response (rectangular hyperbola on measured day-time NEE)")
    return _save(fig, path)


def plot_temperature_response(
    bins: pd.DataFrame, params: pd.DataFrame, df: pd.DataFrame, site: str, path: Path, day_sw: float = 10.0
) -> Path:
    """Measured night-time NEE against air temperature with the fitted Lloyd–Taylor curve."""
    from geoflux.towers.processing.partition import lloyd_taylor

    p = params.iloc[0]
    night = (df["NEE_fqc"] == 0) & (df["SW_IN_f"] <= day_sw)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(df.loc[night, "TA_f"], df.loc[night, "NEE"], ".", color="0.75", ms=2, label="night NEE, measured")
    ax.errorbar(
        bins["ta"],
        bins["nee_mean"],
        yerr=bins["nee_sd"] / np.sqrt(bins["n"].clip(lower=1)),
        fmt="o",
        color="k",
        ms=4,
        label="bin mean ± s.e.",
    )
    t = np.linspace(df["TA_f"].min(), df["TA_f"].max(), 100)
    ax.plot(
        t,
        lloyd_taylor(t, p["rref_mean"], p["e0"]),
        color="tab:red",
        label=f"Lloyd–Taylor: E0 = {p['e0']:.0f} ± {p['e0_se']:.0f} K, "
        f"R$_{{ref}}$ = {p['rref_mean']:.2f}, Q$_{{10}}$ = {p['q10']:.2f}",
    )
    lo, hi = np.nanpercentile(df.loc[night, "NEE"], [1, 99])
    ax.set_ylim(min(lo, 0) - 1, hi + 1)
    ax.set_xlabel("air temperature (°C)")
    ax.set_ylabel(f"night-time NEE ({FLUX_UNIT})")
    ax.legend(fontsize=8)
    ax.set_title(f"{site}: temperature sensitivity of night-time NEE")
    return _save(fig, path)


def plot_vpd(vpd: pd.DataFrame, site: str, path: Path) -> Path:
    """Mean high-light uptake (−NEE) by VPD class."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = vpd["n"] > 0
    ax.errorbar(
        vpd.loc[ok, "vpd_mean"],
        -vpd.loc[ok, "nee_mean"],
        yerr=vpd.loc[ok, "nee_sd"] / np.sqrt(vpd.loc[ok, "n"]),
        fmt="o-",
        color="tab:green",
    )
    for _, r in vpd[ok].iterrows():
        ax.annotate(
            f"n={r['n']}, {r['ta_mean']:.0f}°C",
            (r["vpd_mean"], -r["nee_mean"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set_xlabel("vapour-pressure deficit (hPa)")
    ax.set_ylabel(f"uptake −NEE at SW_IN ≥ 500 W m$^{{-2}}$ ({FLUX_UNIT})")
    ax.set_title(f"{site}: VPD limitation of day-time uptake (measured, TA ≥ 5 °C)")
    return _save(fig, path)


def site_plots(result: Any, tables: dict[str, pd.DataFrame], fp: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write every site plot; returns the paths."""
    site = result.site
    out = [
        plot_diurnal(tables["diurnal_by_month"], site, out_dir / "diurnal_by_month.png"),
        plot_seasonal(tables["daily"], site, out_dir / "seasonal_cycle.png"),
        plot_fingerprint(fp, site, out_dir / "fingerprint.png"),
        plot_cumulative(tables["cumulative"], tables["budgets"], site, out_dir / "cumulative_nee.png"),
        plot_budgets(tables["budgets"], site, out_dir / "budgets.png"),
        plot_light_response(tables["light_response"], site, out_dir / "light_response.png"),
        plot_temperature_response(
            tables["temperature_bins"],
            tables["temperature_response"],
            result.records,
            site,
            out_dir / "temperature_response.png",
        ),
        plot_vpd(tables["vpd_limitation"], site, out_dir / "vpd_limitation.png"),
    ]
    return out


def plot_compare_sites(table: pd.DataFrame, path: Path) -> Path:
    """Across-site comparison: annual NEE (± uncertainty) against E0 and α, coloured by IGBP class."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    groups = table.groupby(table["IGBP"].fillna("?")) if "IGBP" in table else [("all", table)]
    for name, g in groups:
        axes[0].errorbar(g["site"], g["NEE"], yerr=g["NEE_unc"], fmt="o", label=name)
        axes[1].plot(g["e0"], g["NEE"], "o", label=name)
        axes[2].plot(g["alpha_max"], g["GPP"], "o", label=name)
    axes[0].set_ylabel(r"annual NEE (gC m$^{-2}$ yr$^{-1}$)")
    axes[0].tick_params(axis="x", labelrotation=45)
    axes[1].set_xlabel("E0 (K)")
    axes[1].set_ylabel(r"annual NEE (gC m$^{-2}$ yr$^{-1}$)")
    axes[2].set_xlabel(r"max monthly α (µmol CO$_2$ J$^{-1}$)")
    axes[2].set_ylabel(r"annual GPP (gC m$^{-2}$ yr$^{-1}$)")
    axes[0].legend(fontsize=8, title="IGBP")
    fig.suptitle("Across sites: budgets and response parameters")
    return _save(fig, path)
