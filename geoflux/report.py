"""Report stage: a run's outputs → ``report/index.html`` with PNG figures people read.

The report is one self-contained folder (HTML + PNGs, relative links, no scripts or remote assets) written
atomically: it is built in ``report.part/`` and renamed into place. It leads with what the maps are worth
where no tower was used to fit them, then shows what was fitted. Sections, each drawn from the files the
stages wrote under the output folder:

* held-out skill: the leave-site-out CV through the map path (``nse``, ``r2_pearson``, ``rmse``, ``bias``,
  band coverage) and, on generated worlds, the map against the known true field, before anything on training
  sites;
* per-site held-out skill (``validation/skill_site.csv``) and the map − truth error maps (generated worlds);
* towers over the region on the mean NEE map with each footprint's 80 % source area, lon/lat gridlines;
* predicted vs observed NEE (CV held-out and, marked in-sample, the maps at the training towers);
* time series at a few sites (tower, map through the footprint, CV prediction, uncertainty band, truth);
* skill tables: footprint validation by stratum, multi-scale skill, truth;
* NEE maps for chosen dates (per-step colour scales when one shared scale would flatten quiet steps), the
  uncertainty band width, the AOA and (generated worlds) the truth;
* the NEE budget over the mapped period, and ``budgets/budgets.json`` when ``geoflux budgets`` ran;
* driver importance, partial dependence and interactions when ``geoflux analyze`` ran (``analysis/``).

A figure that cannot be drawn (a missing optional input, a failure) is replaced by a visible note in the
HTML and a logged warning rather than failing the whole report.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is written on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import rasterio
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.ticker import MaxNLocator
from rasterio.enums import Resampling

import geoflux
from geoflux.atomic import atomic_path
from geoflux.config import RunConfig
from geoflux.errors import GeofluxError
from geoflux.metrics import skill

log = logging.getLogger("geoflux")

NEE_LABEL = "NEE (gC m-2 d-1)"
MAX_PIXELS = 600  # longest edge of map figures after decimation (average resampling)
ROLE_STYLE = {
    "training": {"color": "#1f77b4", "label": "training site"},
    "held-out": {"color": "#d62728", "label": "held-out site"},
    "independent": {"color": "#2ca02c", "label": "independent site"},
    "held-out (CV)": {"color": "#9467bd", "label": "held-out (site-grouped CV)"},
}
IGBP_MARKERS = {"ENF": "^", "DBF": "o", "EBF": "p", "MF": "D", "GRA": "s", "CRO": "P", "WSA": "v", "SAV": "<"}
DPI = 110


# --------------------------------------------------------------------------------------------------
# Inputs


class _Run:
    """The output folder of a run and lazily read pieces of it."""

    def __init__(self, cfg: RunConfig):
        from geoflux.run import (
            ANALYSIS_JSON,
            BUDGETS_JSON,
            METRICS,
            SITE_SKILL,
            VALIDATION_PAIRS,
            layout,
            load_sites,
        )

        self.cfg = cfg
        self.layout = layout(cfg)
        self.out = cfg.out_dir
        self.metrics = json.loads(self.layout.path(METRICS).read_text())
        self.maps = {p: f for p, f in self.layout.map_paths(cfg.periods()).items() if f.exists()}
        starts, ends = cfg.period_bounds()
        # true length of each period, days (a MODIS 8-day year ends with a 5-6 day period)
        self.period_days = {s: (e - s) / pd.Timedelta(days=1) for s, e in zip(starts, ends, strict=True)}
        self.period_end = dict(zip(starts, ends, strict=True))
        pairs = self.layout.path(VALIDATION_PAIRS)
        self.pairs = pd.read_parquet(pairs) if pairs.exists() else None
        self.card = self.layout.model_card()
        try:
            self.sites = load_sites(cfg)
        except GeofluxError:
            self.sites = None
        self.analysis = self.layout.optional_json(ANALYSIS_JSON)
        self.budgets = self.layout.optional_json(BUDGETS_JSON)
        self.site_skill = self.layout.optional_csv(SITE_SKILL)
        self.crs_wkt: str | None = None
        self.transform = None  # affine of the full-resolution maps
        if self.maps:
            with rasterio.open(next(iter(self.maps.values()))) as ds:
                self.crs_wkt = ds.crs.to_wkt() if ds.crs else None
                self.transform = ds.transform

    def band_path(self, stem: str, period: pd.Timestamp) -> Path | None:
        """``maps/<stem>_YYYYMMDD.tif`` when it exists (``nee_q05``, ``aoa``, ...)."""
        p = self.out / "maps" / f"{stem}_{period:%Y%m%d}.tif"
        return p if p.exists() else None

    def interval_stems(self) -> tuple[str, str] | None:
        """Stems of the lowest and highest quantile band files (``nee-q05`` or ``nee_q05`` style)."""
        first = next(iter(self.maps), None)
        if first is None:
            return None
        found = {}
        for p in (self.out / "maps").glob(f"nee[-_]q*_{first:%Y%m%d}.tif"):
            m = re.match(r"^(nee[-_]q(\d+))_", p.name)
            if m:
                found[int(m.group(2))] = m.group(1)
        return (found[min(found)], found[max(found)]) if len(found) >= 2 else None

    def truth_path(self, period: pd.Timestamp) -> Path | None:
        if not self.cfg.truth:
            return None
        p = self.cfg.path(str(Path(self.cfg.truth).parent / f"nee_{period:%Y%m%d}.tif"))
        return p if p.exists() else None


def _read_map(
    path: Path, max_px: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[float, float, float, float], str]:
    """Band 1 decimated to at most ``max_px`` on its long edge.

    Returns the array (NaN = no data), its extent (left, right, bottom, top in CRS units) and a CRS label.
    """
    with rasterio.open(path) as ds:
        f = max(1, int(np.ceil(max(ds.width, ds.height) / max_px)))
        shape = (max(1, ds.height // f), max(1, ds.width // f))
        a = ds.read(1, out_shape=shape, resampling=Resampling.average, masked=True).astype("float64")
        b = ds.bounds
        crs = ds.crs
    label = "?" if crs is None else (f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.to_string()[:30])
    return a.filled(np.nan), (b.left, b.right, b.bottom, b.top), label


def _axis_labels(ax: plt.Axes, crs_label: str) -> None:
    geographic = crs_label == "EPSG:4326"
    ax.set_xlabel("longitude (deg)" if geographic else f"easting (m, {crs_label})")
    ax.set_ylabel("latitude (deg)" if geographic else f"northing (m, {crs_label})")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)


def _nee_norm(arrays: Sequence[np.ndarray]) -> Normalize:
    """Linear norm symmetric about 0 (sink blue, source red) spanning the 2-98 % range of all arrays."""
    vals = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.array([])
    v = float(np.max(np.abs(np.percentile(vals, [2, 98])))) if vals.size else 1.0
    return Normalize(-max(v, 1e-3), max(v, 1e-3))


def _tower_xy(sites: pd.DataFrame, crs_wkt: str) -> tuple[np.ndarray, np.ndarray]:
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:4326", crs_wkt, always_xy=True)
    x, y = tr.transform(sites["LON"].to_numpy(float), sites["LAT"].to_numpy(float))
    return np.asarray(x), np.asarray(y)


def _save(fig: plt.Figure, folder: Path, name: str) -> str:
    fig.savefig(folder / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def _deg(v: float, pos: str, neg: str) -> str:
    return f"{np.format_float_positional(abs(v), precision=4, trim='-')}°{pos if v >= 0 else neg}"


def graticule(
    ax: plt.Axes, crs_wkt: str | None, extent: tuple[float, float, float, float], n: int = 4
) -> list[tuple[str, float]]:
    """Draw lon/lat lines over a map panel in a projected CRS, labelled at the bottom and left edges.

    The extent's border is transformed to lon/lat with pyproj to find the range, ``n`` or so round values
    are chosen per axis, and each meridian and parallel is densified (100 points) and transformed back into
    the grid CRS, so lines curve as they do in the projection. Axis limits are left unchanged.

    Returns
    -------
    The drawn lines as ``("lon", value)`` / ``("lat", value)`` pairs, degrees.
    """
    if not crs_wkt:
        return []
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(crs_wkt)
    if crs.is_geographic:  # the axes already are lon/lat
        return []
    left, right, bottom, top = extent
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_xy = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    t = np.linspace(0.0, 1.0, 64)
    bx = np.concatenate(
        [left + (right - left) * t, np.full_like(t, right), left + (right - left) * t, np.full_like(t, left)]
    )
    by = np.concatenate(
        [
            np.full_like(t, bottom),
            bottom + (top - bottom) * t,
            np.full_like(t, top),
            bottom + (top - bottom) * t,
        ]
    )
    lon, lat = (np.asarray(v) for v in to_ll.transform(bx, by))
    ok = np.isfinite(lon) & np.isfinite(lat)
    if ok.sum() < 4 or np.ptp(lon[ok]) > 180:  # outside the projection's domain or across the antimeridian
        return []
    lon0, lon1, lat0, lat1 = lon[ok].min(), lon[ok].max(), lat[ok].min(), lat[ok].max()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    style = {"color": "k", "lw": 0.5, "alpha": 0.45, "ls": (0, (3, 3)), "zorder": 2}
    text = {
        "fontsize": 6,
        "color": "#333",
        "zorder": 4,
        "bbox": {"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 0.5},
    }
    drawn: list[tuple[str, float]] = []
    for v in MaxNLocator(n, steps=[1, 2, 2.5, 5, 10]).tick_values(lon0, lon1):
        if not lon0 < v < lon1:
            continue
        x, y = (np.asarray(a) for a in to_xy.transform(np.full(100, v), np.linspace(lat0, lat1, 100)))
        ax.plot(x, y, **style)
        drawn.append(("lon", float(v)))
        xb = np.interp(bottom, y, x) if np.all(np.diff(y) > 0) else x[0]  # where it meets the bottom edge
        if left < xb < right:
            ax.text(xb, bottom, _deg(v, "E", "W"), ha="center", va="bottom", **text)
    for v in MaxNLocator(n, steps=[1, 2, 2.5, 5, 10]).tick_values(lat0, lat1):
        if not lat0 < v < lat1:
            continue
        x, y = (np.asarray(a) for a in to_xy.transform(np.linspace(lon0, lon1, 100), np.full(100, v)))
        ax.plot(x, y, **style)
        drawn.append(("lat", float(v)))
        yl = np.interp(left, x, y) if np.all(np.diff(x) > 0) else y[0]
        if bottom < yl < top:
            ax.text(left, yl, _deg(v, "N", "S"), ha="left", va="center", **text)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    return drawn


def source_area_level(weights: np.ndarray, fraction: float = 0.8) -> float:
    """Weight threshold of a footprint's ``fraction`` source area (dimensionless weight per pixel).

    The source area is the smallest set of pixels holding ``fraction`` of the footprint's total weight: the
    heaviest pixels, taken in order. The level returned lies halfway between the lightest pixel inside and
    the heaviest outside, so a contour at it encloses exactly that set.
    """
    v = np.sort(weights[np.isfinite(weights) & (weights > 0)].ravel())[::-1]
    if v.size == 0:
        raise GeofluxError("footprint has no positive weight")
    k = int(np.searchsorted(np.cumsum(v), fraction * v.sum() * (1 - 1e-12)))  # pixels 0..k hold the fraction
    k = min(k, v.size - 1)
    return float(v[k] if k + 1 == v.size else 0.5 * (v[k] + v[k + 1]))


def step_norms(arrays: Sequence[np.ndarray], ratio: float = 0.5) -> tuple[list[Normalize], bool]:
    """One symmetric colour scale per step, or one shared by all when that hides nothing.

    A step's scale is its 2-98 % |NEE| range. If the quietest step's range is under ``ratio`` times the
    busiest's (winter next to summer), a shared scale would show the quiet step as flat white, so each step
    gets its own. Returns the norms (one per array) and whether they are per step.
    """
    scales = [_nee_norm([a]).vmax for a in arrays]
    if not scales:
        return [], False
    if min(scales) < ratio * max(scales):
        return [Normalize(-v, v) for v in scales], True
    shared = max(scales)
    return [Normalize(-shared, shared) for _ in scales], False


def _footprint_contours(run: _Run, ax: plt.Axes, fraction: float = 0.8) -> int:
    """Draw each tower's ``fraction`` source-area contour (from ``towers/footprints.npz``); returns how "
    "many."""
    from geoflux.cube import target_grid

    if run.transform is None or run.sites is None:
        return 0
    fps = run.layout.footprints(run.sites.index, geobox=target_grid(run.cfg.grid))
    tr = run.transform
    drawn = 0
    for fw in fps.values():
        w = np.pad(np.asarray(fw.weights, float), 1)  # zero rim: contours close at the window's edge
        rows, cols = w.shape
        # pixel centres of the padded window in the grid CRS
        xs = tr.c + tr.a * (fw.col_off - 1 + np.arange(cols) + 0.5)
        ys = tr.f + tr.e * (fw.row_off - 1 + np.arange(rows) + 0.5)
        try:
            level = source_area_level(w, fraction)
        except GeofluxError:
            continue
        ax.contour(xs, ys, w, levels=[level], colors="k", linewidths=0.9, zorder=3)
        drawn += 1
    return drawn


# --------------------------------------------------------------------------------------------------
# Figures (each returns the PNG name written into ``folder``)


def fig_towers(
    run: _Run, folder: Path, mean: np.ndarray, extent: tuple, crs_label: str, fraction: float = 0.8
) -> str:
    """Towers over the region on the mean NEE map, each with its footprint's ``fraction`` source area."""
    from matplotlib.lines import Line2D

    if run.sites is None:
        raise GeofluxError("no site table")
    crs_wkt = run.crs_wkt
    sites = run.sites
    x, y = _tower_xy(sites, crs_wkt)
    training = set(run.card["provenance"].get("sites", [])) if run.card else None
    roles = np.array(
        [
            "independent" if training is None else ("training" if s in training else "held-out")
            for s in sites.index
        ]
    )
    igbp = (
        sites["IGBP"].astype(str) if "IGBP" in sites.columns else pd.Series("?", index=sites.index)
    ).to_numpy()
    fig, ax = plt.subplots(figsize=(7.5, 7.0))
    im = ax.imshow(mean, extent=extent, cmap="RdBu_r", norm=_nee_norm([mean]), interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"mean {NEE_LABEL} over {len(run.maps)} steps")
    handles = []
    try:
        n_contours = _footprint_contours(run, ax, fraction)
    except GeofluxError as exc:  # footprints from another grid or not written: the map is still worth showing
        log.warning("report: footprint contours not drawn: %s", exc)
        n_contours = 0
    if n_contours:
        handles.append(Line2D([], [], color="k", lw=0.9, label=f"{fraction:.0%} footprint source area"))
    for cls in sorted(set(igbp)):
        for role in ("training", "held-out", "independent"):
            sel = (igbp == cls) & (roles == role)
            if sel.any():
                handles.append(
                    ax.scatter(
                        x[sel],
                        y[sel],
                        marker=IGBP_MARKERS.get(cls, "o"),
                        s=60,
                        facecolor="white",
                        edgecolor=ROLE_STYLE[role]["color"],
                        linewidth=1.8,
                        label=f"{cls} ({ROLE_STYLE[role]['label']})",
                        zorder=5,
                    )
                )
    for sid, xi, yi in zip(sites.index, x, y, strict=True):
        ax.annotate(str(sid), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=6, zorder=6)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    graticule(ax, crs_wkt, extent)
    _axis_labels(ax, crs_label)
    ax.set_title(f"{len(sites)} towers over the mapped region")
    # below the axes, never over the map
    ax.legend(
        handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False
    )
    return _save(fig, folder, "towers.png")


def _scatter_panel(ax: plt.Axes, df: pd.DataFrame, title: str, color_by_role: bool = True) -> None:
    lim = [np.nanmin([df["obs"].min(), df["pred"].min()]), np.nanmax([df["obs"].max(), df["pred"].max()])]
    pad = 0.05 * (lim[1] - lim[0] or 1.0)
    lim = [lim[0] - pad, lim[1] + pad]
    for role, g in df.groupby("role", sort=True):
        style = ROLE_STYLE.get(str(role), {"color": "grey", "label": str(role)})
        ax.scatter(
            g["obs"], g["pred"], s=10, alpha=0.6, color=style["color"], label=f"{style['label']} (n={len(g)})"
        )
    ax.plot(lim, lim, color="k", lw=0.8, label="1:1")
    s = skill(df["obs"].to_numpy(), df["pred"].to_numpy())
    if np.isfinite(s["rma_slope"]):
        xs = np.array(lim)
        ax.plot(
            xs, s["rma_intercept"] + s["rma_slope"] * xs, color="orange", lw=1.2, ls="--", label="RMA fit"
        )
    ax.text(
        0.03,
        0.97,
        f"n {s['n']}\nNSE {s['nse']:.2f}   r² (Pearson) {s['r2_pearson']:.2f}\n"
        f"RMSE {s['rmse']:.2f}   bias {s['bias']:+.2f}\n"
        f"RMA slope {s['rma_slope']:.2f}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
    )
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel(f"observed {NEE_LABEL}")
    ax.set_ylabel(f"predicted {NEE_LABEL}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)


def fig_scatter(
    run: _Run, folder: Path, sources: Sequence[str] = ("cv", "map"), name: str = "scatter.png"
) -> str:
    """Held-out CV predictions and (``"map"``) footprint-weighted maps against tower observations."""
    if run.pairs is None:
        raise GeofluxError("validation/pairs.parquet not found (run 'geoflux validate')")
    titles = {
        "cv": "held-out sites: site-grouped CV",
        "map": "map through footprints (in-sample at training sites)",
    }
    panels = [(run.pairs.loc[run.pairs["source"] == s], titles[s]) for s in sources]
    panels = [(d, t) for d, t in panels if len(d)]
    if not panels:
        raise GeofluxError(f"validation/pairs.parquet has no {' or '.join(sources)} pairs")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False)
    for ax, (d, t) in zip(axes[0], panels, strict=True):
        _scatter_panel(ax, d, t)
    return _save(fig, folder, name)


def _footprint_truth(run: _Run) -> pd.DataFrame | None:
    """Footprint-weighted true NEE at the towers (generated worlds), via the validation module."""
    from geoflux.cube import target_grid
    from geoflux.footprint.regrid import footprints_on_grid
    from geoflux.validate import footprint_values, open_geotiff_series

    truths = {p: run.truth_path(p) for p in run.maps}
    if not truths or any(v is None for v in truths.values()) or run.sites is None:
        return None
    series = open_geotiff_series(truths)
    try:
        fps = run.layout.footprints(run.sites.index, geobox=target_grid(run.cfg.grid))
        fps = footprints_on_grid(
            run.sites, series.geobox, footprints=fps, footprint_geobox=target_grid(run.cfg.grid)
        )
    except GeofluxError:
        fps = footprints_on_grid(run.sites, series.geobox, run.cfg.footprint.radius)
    return footprint_values(series, fps)[["site", "time", "map"]].rename(columns={"map": "truth"})


def pick_sites(pairs: pd.DataFrame, n: int = 4) -> list[str]:
    """Up to ``n`` sites for time series: one per land-cover class (held-out first, most data), then more."""
    mp = pairs.loc[pairs["source"] == "map"]
    if mp.empty:
        mp = pairs
    counts = mp.groupby(["role", "igbp", "site"]).size().rename("n").reset_index()
    counts["held"] = counts["role"] != "training"
    counts = counts.sort_values(["held", "n"], ascending=[False, False])
    chosen: list[str] = []
    for _, g in counts.groupby("igbp", sort=True):
        chosen.append(str(g.iloc[0]["site"]))
    rest = [str(s) for s in counts["site"] if str(s) not in chosen]
    return sorted((chosen + rest)[:n])


def fig_timeseries(run: _Run, folder: Path, n_sites: int = 4) -> str:
    """Tower NEE, the map through the footprint, the CV prediction, band and truth at a few sites."""
    if run.pairs is None:
        raise GeofluxError("validation/pairs.parquet not found (run 'geoflux validate')")
    sites = pick_sites(run.pairs, n_sites)
    truth = _footprint_truth(run)
    fig, axes = plt.subplots(len(sites), 1, figsize=(10, 2.3 * len(sites)), sharex=True, squeeze=False)
    for ax, site in zip(axes[:, 0], sites, strict=True):
        p = run.pairs.loc[run.pairs["site"] == site]
        mp = p.loc[p["source"] == "map"].sort_values("time")
        cv = p.loc[p["source"] == "cv"].sort_values("time")
        obs = (
            pd.concat([mp[["time", "obs"]], cv[["time", "obs"]]]).drop_duplicates("time").sort_values("time")
        )
        if {"lo", "hi"} <= set(mp.columns) and mp["lo"].notna().any():
            ax.fill_between(
                mp["time"],
                mp["lo"],
                mp["hi"],
                color="#1f77b4",
                alpha=0.15,
                step="post",
                label="map uncertainty band",
            )
        if truth is not None:
            t = truth.loc[truth["site"] == site].sort_values("time")
            ax.step(
                t["time"], t["truth"], where="post", color="k", lw=1.0, ls=":", label="true NEE (footprint)"
            )
        ax.step(
            mp["time"], mp["pred"], where="post", color="#1f77b4", lw=1.5, label="map (footprint-weighted)"
        )
        if len(cv):
            ax.step(
                cv["time"], cv["pred"], where="post", color="#9467bd", lw=1.2, ls="--", label="CV held-out"
            )
        ax.plot(obs["time"], obs["obs"], "o", ms=3.5, color="#d62728", label="tower (QC-filtered)")
        role = mp["role"].iloc[0] if len(mp) else "?"
        igbp = p["igbp"].iloc[0] if len(p) else "?"
        ax.set_title(f"{site} ({igbp}, {role} site)", fontsize=9, loc="left")
        ax.set_ylabel("NEE\n(gC m-2 d-1)", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
    # above the first panel, outside the data
    axes[0, 0].legend(fontsize=7, ncol=3, loc="lower right", bbox_to_anchor=(1.0, 1.12), frameon=False)
    axes[-1, 0].set_xlabel("period start")
    fig.autofmt_xdate()
    return _save(fig, folder, "timeseries.png")


def choose_dates(means: pd.Series, n: int = 3) -> list[pd.Timestamp]:
    """First step, the step of strongest regional uptake (lowest mean NEE) and the last step."""
    if means.empty:
        return []
    picks = [means.index[0], means.idxmin(), means.index[-1]]
    out = sorted(dict.fromkeys(picks))
    return out[:n]


def fig_maps(run: _Run, folder: Path, dates: Sequence[pd.Timestamp]) -> tuple[str, bool]:
    """NEE for chosen dates, plus rows for the truth, the uncertainty band width and the AOA when present.

    NEE and truth of one date share a colour scale; dates get their own scales when one shared scale would
    flatten the quiet ones (:func:`step_norms`). Returns the PNG name and whether scales are per step.
    """
    stems = run.interval_stems()
    rows: list[tuple[str, list[np.ndarray]]] = []
    nee, extent, crs_label = [], None, ""
    for d in dates:
        a, extent, crs_label = _read_map(run.maps[d])
        nee.append(a)
    rows.append(("NEE", nee))
    truth_paths = [run.truth_path(d) for d in dates]
    truth = [_read_map(p)[0] for p in truth_paths] if all(truth_paths) else None
    if truth is not None:
        rows.append(("truth", truth))
    if stems:
        lo = [run.band_path(stems[0], d) for d in dates]
        hi = [run.band_path(stems[1], d) for d in dates]
        if all(lo) and all(hi):
            rows.append(("width", [_read_map(h)[0] - _read_map(l_)[0] for l_, h in zip(lo, hi, strict=True)]))
    aoa = [run.band_path("aoa", d) for d in dates]
    if all(aoa):
        rows.append(("aoa", [_read_map(p)[0] for p in aoa]))
    both = [np.concatenate([n.ravel(), t.ravel()]) for n, t in zip(nee, truth or nee, strict=True)]
    norms, per_step = step_norms(both)
    fig, axes = plt.subplots(
        len(rows), len(dates), figsize=(3.8 * len(dates) + 1.6, 3.4 * len(rows)), squeeze=False
    )
    fig.subplots_adjust(wspace=0.45 if per_step else 0.1)  # room for each panel's own colour bar
    for r, (kind, arrays) in enumerate(rows):
        for c, (d, a) in enumerate(zip(dates, arrays, strict=True)):
            ax = axes[r, c]
            if kind in ("NEE", "truth"):
                im = ax.imshow(a, extent=extent, cmap="RdBu_r", norm=norms[c], interpolation="nearest")
                label = NEE_LABEL if kind == "NEE" else f"true {NEE_LABEL}"
            elif kind == "width":
                im = ax.imshow(
                    a,
                    extent=extent,
                    cmap="viridis",
                    vmin=0,
                    vmax=np.nanpercentile(np.concatenate([x[np.isfinite(x)] for x in arrays]), 98),
                    interpolation="nearest",
                )
                label = f"band width {stems[1][4:]}−{stems[0][4:]} (gC m-2 d-1)"
            else:
                im = ax.imshow(
                    np.where(np.isfinite(a), (a > 0.5).astype(float), np.nan),
                    extent=extent,
                    cmap=ListedColormap(["#bdbdbd", "#31a354"]),
                    vmin=-0.5,
                    vmax=1.5,
                    interpolation="nearest",
                )
                label = "area of applicability"
            ax.set_title(f"{kind if kind != 'width' else 'uncertainty'} {d:%Y-%m-%d}", fontsize=9)
            graticule(ax, run.crs_wkt, extent, n=3)
            _axis_labels(ax, crs_label)
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            if c:  # panels of a row share the extent: label the first only
                ax.set_ylabel("")
                ax.set_yticklabels([])
            if r < len(rows) - 1:
                ax.set_xlabel("")
            if per_step and kind in ("NEE", "truth"):  # beside the panel, without shrinking it
                cax = ax.inset_axes([1.03, 0.1, 0.04, 0.8])
                fig.colorbar(im, cax=cax, label=label if c == len(dates) - 1 else None)
                cax.tick_params(labelsize=7)
        if per_step and kind in ("NEE", "truth"):
            continue
        cax = axes[r, -1].inset_axes([1.03, 0.1, 0.04, 0.8])  # panels of every row keep one size
        cb = fig.colorbar(im, cax=cax, label=label)
        if kind == "aoa":
            cb.set_ticks([0, 1])
            cb.set_ticklabels(["outside", "inside"])
    return _save(fig, folder, "maps.png"), per_step


def fig_error(
    run: _Run,
    folder: Path,
    dates: Sequence[pd.Timestamp],
    mean_error: np.ndarray,
    extent: tuple,
    crs_label: str,
) -> str:
    """Map − truth (gC m-2 d-1): the mean over all steps, then each chosen date (generated worlds).

    Each panel has its own symmetric scale (errors differ between seasons by far more than a factor of 2);
    titles give the RMSE and bias of the pixels shown.
    """
    panels = [("mean over all steps", mean_error)]
    for d in dates:
        t = run.truth_path(d)
        if t is None:
            raise GeofluxError(f"no truth raster for {d:%Y-%m-%d}")
        panels.append((f"{d:%Y-%m-%d}", _read_map(run.maps[d])[0] - _read_map(t)[0]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.3), squeeze=False)
    for c, (ax, (title, err)) in enumerate(zip(axes[0], panels, strict=True)):
        v = _nee_norm([err]).vmax
        im = ax.imshow(err, extent=extent, cmap="PuOr_r", vmin=-v, vmax=v, interpolation="nearest")
        ok = np.isfinite(err)
        rmse = float(np.sqrt(np.mean(err[ok] ** 2))) if ok.any() else float("nan")
        bias = float(np.mean(err[ok])) if ok.any() else float("nan")
        ax.set_title(f"map − truth, {title}\nRMSE {rmse:.2f}  bias {bias:+.2f}", fontsize=9)
        if c == 0 and run.sites is not None and run.crs_wkt:
            x, y = _tower_xy(run.sites, run.crs_wkt)
            ax.scatter(x, y, s=12, marker="x", color="k", lw=0.8, zorder=4)
        graticule(ax, run.crs_wkt, extent, n=3)
        _axis_labels(ax, crs_label)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        if c:
            ax.set_ylabel("")
            ax.set_yticklabels([])
        fig.colorbar(
            im, ax=ax, shrink=0.8, orientation="horizontal", pad=0.14, label="map − truth (gC m-2 d-1)"
        )
    return _save(fig, folder, "error.png")


def mean_error(run: _Run) -> np.ndarray:
    """Mean of map − truth over all steps per pixel, gC m-2 d-1 (NaN where any step lacks either)."""
    acc = cnt = None
    for p, path in run.maps.items():
        t = run.truth_path(p)
        if t is None:
            raise GeofluxError(f"no truth raster for {p:%Y-%m-%d} (generated worlds only)")
        e = _read_map(path)[0] - _read_map(t)[0]
        if acc is None:
            acc, cnt = np.zeros_like(e), np.zeros_like(e)
        acc += np.where(np.isfinite(e), e, 0.0)
        cnt += np.isfinite(e)
    if acc is None:
        raise GeofluxError("no maps")
    return np.where(cnt == len(run.maps), acc / np.maximum(cnt, 1), np.nan)


def budget(run: _Run) -> tuple[np.ndarray, tuple, str, dict]:
    """NEE summed over the mapped periods (gC m-2) per pixel and its regional summary."""
    if not run.maps:
        raise GeofluxError(f"{run.out / 'maps'}: no NEE maps")
    acc = cnt = None
    means = {}
    for p, path in run.maps.items():
        a, extent, crs_label = _read_map(path)
        if acc is None:
            acc, cnt, dsum = np.zeros_like(a), np.zeros_like(a), np.zeros_like(a)
        ok = np.isfinite(a)
        acc += np.where(ok, a, 0.0) * run.period_days[p]
        cnt += ok
        dsum += ok * run.period_days[p]
        means[p] = float(np.nanmean(a)) if ok.any() else np.nan
    n = len(run.maps)
    total = np.where(cnt == n, acc, np.nan)  # only pixels mapped in every step have a complete budget
    days = float(sum(run.period_days[p] for p in run.maps))
    # mean NEE, gC m-2 d-1, over the periods each pixel was mapped in, weighted by period length
    mean_map = np.where(cnt > 0, acc / np.maximum(dsum, 1e-9), np.nan)
    with rasterio.open(next(iter(run.maps.values()))) as ds:
        px_area = abs(ds.transform.a * ds.transform.e) * (ds.width * ds.height) / total.size
        projected = ds.crs is not None and ds.crs.is_projected
    mean = float(np.nanmean(total)) if np.isfinite(total).any() else float("nan")
    info = {
        "days": days,
        "start": f"{min(run.maps):%Y-%m-%d}",
        "end": f"{run.period_end[max(run.maps)] - pd.Timedelta(days=1):%Y-%m-%d}",
        "mean_gC_m2": mean,
        "sink_fraction": float(np.nanmean(total < 0)) if np.isfinite(total).any() else float("nan"),
        "annual": days >= 365,
        "means": pd.Series(means),
        "mean_map": mean_map,
    }
    if projected:
        info["total_GgC"] = mean * np.isfinite(total).sum() * px_area / 1e9
    return total, extent, crs_label, info


def fig_budget(run: _Run, folder: Path, total: np.ndarray, extent: tuple, crs_label: str, info: dict) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(total, extent=extent, cmap="RdBu_r", norm=_nee_norm([total]), interpolation="nearest")
    what = "annual" if info["annual"] else f"{info['days']:.0f}-day"
    fig.colorbar(im, ax=ax, shrink=0.85, label=f"{what} NEE budget (gC m-2)")
    ax.set_title(
        f"NEE summed {info['start']} .. {info['end']}\nregional mean {info['mean_gC_m2']:.0f} gC m-2",
        fontsize=10,
    )
    graticule(ax, run.crs_wkt, extent)
    _axis_labels(ax, crs_label)
    return _save(fig, folder, "budget.png")


def _importance_table(run: _Run) -> pd.DataFrame | None:
    if run.analysis is not None and run.analysis.get("importance"):
        return pd.DataFrame(run.analysis["importance"])
    csv = run.out / "analysis" / "importance.csv"
    return pd.read_csv(csv) if csv.exists() else None


def fig_importance(run: _Run, folder: Path) -> str:
    imp = _importance_table(run)
    if imp is None or imp.empty:
        raise GeofluxError("no driver importance (run the analysis: geoflux.analysis.analyze)")
    imp = imp.sort_values("importance")
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(imp) + 1.2))
    err = imp["importance_std"] if "importance_std" in imp.columns else None
    ax.barh(imp["driver"], imp["importance"], xerr=err, color="#1f77b4", alpha=0.85)
    ax.set_xlabel("increase of held-out MSE when permuted ((gC m-2 d-1)²)")
    ax.set_title("driver importance (site-grouped permutation)", fontsize=10)
    return _save(fig, folder, "importance.png")


def fig_dependence(run: _Run, folder: Path) -> str:
    """Partial dependence of NEE on each driver (``analysis/partial_dependence.csv``), one panel per "
    "driver."""
    from geoflux.run import ANALYSIS

    pdp = run.layout.optional_csv(f"{ANALYSIS}/partial_dependence.csv")
    if pdp is None or pdp.empty:
        raise GeofluxError("no partial dependence (run 'geoflux analyze')")
    drivers = list(dict.fromkeys(pdp["driver"]))
    ncol = min(4, len(drivers))
    nrow = -(-len(drivers) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False, sharey=True)
    units = {v.name: v.units for v in run.cfg.variables} if run.cfg.variables else {}
    for ax, drv in zip(axes.ravel(), drivers, strict=False):
        g = pdp.loc[pdp["driver"] == drv].sort_values("value")
        ax.plot(g["value"], g["nee"], color="#1f77b4", lw=1.5)
        ax.axhline(0, color="grey", lw=0.5)
        unit = units.get(drv)
        ax.set_xlabel(f"{drv} ({unit})" if unit else drv, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(drivers) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"partial dependence\n{NEE_LABEL}", fontsize=8)
    fig.suptitle("NEE as the model responds to one driver, the others at their observed values", fontsize=10)
    fig.tight_layout()
    return _save(fig, folder, "dependence.png")


def _analysis_section(run: _Run, folder: Path) -> str:
    """Importance, partial dependence, interactions and scenarios from ``analysis/`` (when it exists)."""
    if run.analysis is None and _importance_table(run) is None:
        return _note(
            "no analysis in this run folder (run 'geoflux analyze CONFIG' to add importance, "
            "dependence and interactions here)"
        )
    parts: list[str] = []
    _try(
        parts,
        "driver importance",
        lambda: _figure(
            fig_importance(run, folder),
            "Permutation importance on held-out folds (the land-cover class fractions permuted together).",
        ),
    )
    _try(
        parts,
        "partial dependence",
        lambda: _figure(fig_dependence(run, folder), "Partial dependence (analysis/partial_dependence.csv)."),
    )
    inter = ((run.analysis or {}).get("dependence") or {}).get("interactions") or []
    if inter:
        df = pd.DataFrame(
            {
                "drivers": [" × ".join(map(str, r["pair"])) for r in inter],
                "h2 (Friedman)": [r["h2"] for r in inter],
            }
        )
        parts.append(
            "<h3>Interactions</h3><p>Friedman's H² of each driver pair: the share of the pair's joint "
            "partial "
            "dependence not explained by the two one-driver effects (0 = additive).</p>" + _table(df)
        )
        for png in run.layout.analysis_files("pd2_*.png"):
            name = f"analysis-{png.name}"
            shutil.copyfile(png, folder / name)
            parts.append(_figure(name, f"Two-driver partial dependence ({png.name}, from geoflux analyze)."))
    sc = (run.analysis or {}).get("scenarios")
    if isinstance(sc, list) and sc:
        df = pd.DataFrame(sc)
        keep = [
            c for c in ("scenario", "region", "nee_base", "nee_scenario", "delta_nee", "left_aoa") if c in df
        ]
        df = df.loc[df.get("region", pd.Series("all", index=df.index)) == "all", keep]
        parts.append(
            "<h3>Scenarios</h3><p>Regional mean NEE (gC m-2 d-1) under each scenario; <b>left_aoa</b> is the "
            "share "
            "of pixels the scenario moves outside the area of applicability.</p>" + _table(df)
        )
    return "\n".join(parts)


def _budgets_section(run: _Run) -> str:
    """The ``geoflux budgets`` table (budgets/budgets.csv) with its interval assumption."""
    from geoflux.run import BUDGETS_CSV

    df = run.layout.optional_csv(BUDGETS_CSV)
    if run.budgets is None or df is None:
        return _note("no budgets/budgets.json (run 'geoflux budgets CONFIG' for budgets with intervals)")
    text = (
        f"<h3>Budgets with intervals (geoflux "
        f"budgets)</h3><p>{html.escape(str(run.budgets.get('units', '')))}; "
        f"{html.escape(str(run.budgets.get('interval', '')))}; "
        f"{html.escape(str(run.budgets.get('sign', '')))}. "
        "q05/q95 bound the 90 % interval; <b>covered</b> says whether it holds the true budget (generated "
        "worlds).</p>"
    )
    return text + _table(df)


def _target_note(run: _Run) -> str:
    """What the run's model learns, and what that means for a scenario's change."""
    target = ((run.card or {}).get("provenance") or {}).get("target", "nee")
    if target == "partitioned":
        return (
            "This run's model learns RECO and GPP apart (model.target: partitioned): on the demo's "
            "multi-year worlds that brought the total change under warming close to the truth's, though "
            "not its split between drivers (README 'Learning respiration and photosynthesis apart')."
        )
    return (
        "This run's model learns NEE alone: on the demo's multi-year worlds such a model gave well under "
        "the truth's change under warming, and model.target: partitioned came much closer (README "
        "'Learning respiration and photosynthesis apart')."
    )


def _years_section(run: _Run) -> str:
    """Why budgets differ between years (``geoflux attribute``) and scenarios (``geoflux project``)."""
    from geoflux.run import ATTRIBUTION_YEARS, SCENARIO_BUDGETS

    parts = []
    attr = run.layout.optional_json(ATTRIBUTION_YEARS)
    table = run.layout.optional_csv(ATTRIBUTION_YEARS.replace(".json", ".csv"))
    if attr is not None and table is not None:
        region = table.loc[table["region"] == "region"].drop(columns="region")
        groups = attr.get("groups") or {}
        note = (
            " Collinear drivers at the towers (|r| &gt; "
            f"{html.escape(str((attr.get('collinearity') or {}).get('threshold', '')))}): "
            + ", ".join(html.escape(g) for g in groups)
            + " — their separate contributions are not identifiable; read the grouped column."
            if groups
            else ""
        )
        shares = [c for c in region.columns if c.startswith("outside_aoa")]
        parts.append(
            "<h3>Why the budget differs between years</h3><p>Each year's regional NEE anomaly "
            f"({html.escape(str(attr.get('units', '')))}) split into driver contributions through the model "
            "(the driver held at its climatology); <b>interaction</b> is what the single contributions "
            f"do not explain.{note}</p>" + _table(region.drop(columns=shares))
        )
        if shares:
            flagged = (attr.get("extrapolation") or {}).get("flagged") or []
            parts.append(
                "<p>Holding one driver at its climatology while the others keep their anomaly asks the model "
                "about combinations of drivers the towers may never have seen. Share of each year's "
                "pixel-days whose inputs are outside the area of applicability: the run's own drivers "
                "(<b>outside_aoa</b>) and each counterfactual. A contribution whose counterfactual leaves "
                "the AOA much more often than the run is an extrapolation of the model, and its rank with it"
                + (
                    ": " + "; ".join(html.escape(f["message"]) for f in flagged) + "."
                    if flagged
                    else " (none flagged)."
                )
                + "</p>"
                + _table(region[["year", *shares]])
            )
    folder = run.layout.path(SCENARIO_BUDGETS)
    rows = []
    for proj in sorted(folder.glob("*/projection.json")) if folder.is_dir() else []:
        d = json.loads(proj.read_text())
        for year, b in (d.get("budgets") or {}).items():
            rows.append(
                {
                    "scenario": d["scenario"]["name"],
                    "year": year,
                    "budget": b.get("nee"),
                    "q05": (b.get("interval") or [None, None])[0],
                    "q95": (b.get("interval") or [None, None])[1],
                    "change": b.get("change"),
                    "outside AOA": (d.get("aoa") or {}).get("outside_share"),
                    "outside AOA (run)": (d.get("aoa") or {}).get("base_outside_share"),
                }
            )
    if rows:
        parts.append(
            "<h3>Scenarios (geoflux project)</h3><p>Regional budget under each scenario and its change "
            "against the run's own maps (gC m-2 yr-1; NEE &gt; 0 is a source), with the share of "
            "pixel-periods outside the area of applicability. A scenario's change is the model's response "
            "to the perturbed drivers: where drivers are collinear the model may share one driver's effect "
            "with others, so read it as a sensitivity, not a projection. "
            + _target_note(run)
            + "</p>"
            + _table(pd.DataFrame(rows))
        )
    if not parts:
        return _note(
            "no year-to-year attribution or scenarios (run 'geoflux attribute CONFIG' on a multi-year run, "
            "'geoflux project CONFIG --scenario NAME')"
        )
    return "\n".join(parts)


def site_skill_table(run: _Run) -> pd.DataFrame:
    """Per-site held-out skill (``validation/skill_site.csv``), worst ``nse`` first, with the in-sample nse.

    Columns: site, igbp, n, nse, r2_pearson, rmse, bias (gC m-2 d-1), band coverage of the held-out
    predictions, and ``nse in-sample`` (the map at the site, fitted with it).
    """
    if run.site_skill is None:
        raise GeofluxError("validation/skill_site.csv not found (run 'geoflux validate')")
    t = run.site_skill
    cv = t.loc[t["source"] == "cv"]
    if cv.empty:
        raise GeofluxError("validation/skill_site.csv has no held-out (cv) rows")
    out = cv[[c for c in ("site", "n", "nse", "r2_pearson", "rmse", "bias", "interval_coverage") if c in cv]]
    out = out.rename(columns={"interval_coverage": "band coverage"})
    mp = t.loc[t["source"] == "map", ["site", "nse"]].rename(columns={"nse": "nse in-sample"})
    out = out.merge(mp, on="site", how="left") if len(mp) else out
    if run.sites is not None and "IGBP" in run.sites.columns:
        out.insert(1, "igbp", out["site"].map(run.sites["IGBP"].astype(str)).fillna("?"))
    return out.sort_values("nse", kind="stable").reset_index(drop=True)


def held_out_section(run: _Run) -> str:
    """The report's lead: held-out CV skill, then (generated worlds) the map against the known truth."""
    m = run.metrics
    cv = m.get("cv") or {}
    parts = ["<section id='held-out-skill'>", "<h2>Held-out skill</h2>"]
    if "nse" not in cv:
        parts.append(_note("metrics.json has no held-out cross-validation (cv) scores"))
    else:
        unc = cv.get("uncertainty") or {}
        nominal = unc.get("nominal")
        parts.append(
            f"<p>How well the maps predict towers they never saw: "
            f"{html.escape(str(cv.get('scheme', 'grouped')))} "
            "cross-validation through the map path (each tower's NEE predicted as the footprint-weighted sum "
            "of "
            "per-pixel predictions by a model fitted without its site). gC m-2 d-1; <b>nse</b> = 1 − "
            "SSE/SST, "
            "<b>r2_pearson</b> = squared correlation.</p>"
        )
        row = {
            "sites": cv.get("n_sites"),
            "n": cv.get("n"),
            "nse": cv.get("nse"),
            "r2_pearson": cv.get("r2_pearson"),
            "rmse": cv.get("rmse"),
            "bias": cv.get("bias"),
            (f"{nominal:.0%} band coverage" if nominal else "band coverage"): unc.get("coverage"),
            "median site nse": cv.get("nse_site_median"),
            "10th pct site nse": cv.get("nse_site_p10"),
        }
        parts.append(_table(pd.DataFrame([row])))
        if unc.get("margin_di_scaled") is not None:
            contrast = unc.get("band_contrast")
            parts.append(
                "<p class='meta'>The maps' band: the band model's half-width plus a conformal margin of "
                f"{unc['margin_di_scaled']:.3f} gC m-2 d-1 × (1 + {unc.get('margin_di_slope', 0.0):.2f} × "
                "DI / AOA threshold), calibrated on the cross-validation's held-out "
                + (
                    f"footprint pixels (each scored against its tower's NEE plus {contrast:g} × the "
                    "model's contrast between the pixel and its footprint)"
                    if contrast is not None
                    else "rows"
                )
                + ". The band coverage above is that of the towers' held-out predictions"
                + (
                    " under the same rule (with a flat margin it would be "
                    f"{unc['flat_margin']['coverage']:.3f})"
                    if isinstance(unc.get("flat_margin"), dict)
                    else ""
                )
                + ".</p>"
            )
    truth = m.get("truth")
    if truth and "nse" in truth:
        ta = m.get("truth_aoa") or {}
        row = {
            "pixel-steps": truth.get("n"),
            "nse": truth.get("nse"),
            "rmse": truth.get("rmse"),
            "bias": truth.get("bias"),
            "band covers truth": (ta.get("all") or {}).get("band_covers_truth"),
            "nse inside AOA": (ta.get("inside") or {}).get("nse"),
            "nse outside AOA": (ta.get("outside") or {}).get("nse"),
        }
        parts.append("<h3>Map vs the known true field (generated world, every pixel and step)</h3>")
        parts.append(_table(pd.DataFrame([row])))
    n_train = len(run.card["provenance"].get("sites", [])) if run.card else None
    if n_train:
        parts.append(
            f"<p class='meta'>The final model is fitted on all {n_train} training towers: comparisons of the "
            "maps with those towers further down (marked <i>in-sample</i>) measure fit, not skill.</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1em}
th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em;max-height:28em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{color:#a15c00;font-size:.9em}.meta{color:#666;font-size:.9em}
"""


COUNT_COLUMNS = re.compile(r"^(n|n_.*|sites|pixels|periods|pixel-steps)$")


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    """HTML table; count columns (``n``, ``n_sites``, ``pixels``, ...) printed as integers, not "
    "``1341.000``."""
    df = df.copy()
    for c in df.columns:
        if COUNT_COLUMNS.match(str(c)):
            v = pd.to_numeric(df[c], errors="coerce")
            if (v.dropna() % 1 == 0).all():
                df[c] = [("–" if pd.isna(x) else str(int(x))) for x in v]
    return df.to_html(
        index=False,
        border=0,
        na_rep="–",
        float_format=lambda v: f"{v:.{digits}f}",
        classes="skill",
        escape=True,
    )


def _figure(name: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _try(parts: list[str], what: str, fn: Callable[[], str]) -> None:
    """Append ``fn()``'s HTML, or a visible note when it cannot be drawn."""
    try:
        parts.append(fn())
    except Exception as exc:  # a report shows what it can; the note says what is missing and why
        log.warning("report: %s not drawn: %s", what, exc)
        parts.append(
            _note(f"{what} not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        )


def _provenance(run: _Run) -> str:
    import yaml

    data = run.cfg.model_dump(mode="json", exclude={"base_dir"})
    parts = ["<h3>Configuration</h3>", f"<pre>{html.escape(yaml.safe_dump(data, sort_keys=False))}</pre>"]
    rows = []
    if run.card:
        prov = run.card.get("provenance", {})
        rows += [
            ("model", f"{prov.get('kind', '?')} {json.dumps(prov.get('params', {}))}"),
            (
                "learns",
                "RECO and GPP (night-time partitioned at the towers); NEE = RECO − GPP"
                if prov.get("target") == "partitioned"
                else "tower NEE",
            ),
            ("training samples / sites", f"{prov.get('n_samples', '?')} / {len(prov.get('sites', []))}"),
            ("model file sha256", str(run.card.get("sha256", "?"))),
            ("model bands", ", ".join(run.card.get("bands", ["NEE"]))),
            ("trained with", f"geoflux {prov.get('geoflux_version', '?')}"),
        ]
    if run.maps:
        first = next(iter(run.maps.values()))
        with rasterio.open(first) as ds:
            tags = ds.tags()
            rows += [
                (
                    "maps",
                    f"{len(run.maps)} × {ds.width}×{ds.height} px, "
                    f"{ds.crs.to_string()[:40] if ds.crs else '?'}",
                ),
                ("map software", tags.get("software", "?")),
                ("map model sha256", tags.get("model_sha256", "?")),
            ]
    rows.append(
        (
            "report written by",
            f"geoflux {geoflux.__version__}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        )
    )
    parts.append("<h3>Provenance</h3>")
    parts.append(_table(pd.DataFrame(rows, columns=["item", "value"])))
    return "\n".join(parts)


HEADLINE_COLUMNS = ("comparison", "n", "NSE (1-SSE/SST)", "r² (Pearson)", "RMSE", "bias")
HEADLINE_KEYS = ("n", "nse", "r2_pearson", "rmse", "bias")  # metrics.json keys behind HEADLINE_COLUMNS[1:]


def headline(metrics: dict) -> pd.DataFrame:
    """The report's summary table: one row per comparison in metrics.json, its values copied unchanged.

    Rows: ``truth`` (map vs true field), ``cv`` (held-out), ``towers`` (map vs towers through footprints);
    columns :data:`HEADLINE_COLUMNS` (RMSE and bias in gC m-2 d-1; None where metrics.json has no value).
    """
    rows = []
    for key, label in (
        ("truth", "map vs true field (every pixel and step)"),
        ("cv", f"{metrics.get('cv', {}).get('scheme', 'grouped')} CV (held-out)"),
        ("towers", "map vs towers through footprints"),
    ):
        d = metrics.get(key)
        if d and "nse" in d:
            rows.append((label, *(d.get(k) for k in HEADLINE_KEYS)))
    return pd.DataFrame(rows, columns=list(HEADLINE_COLUMNS))


def _skill_tables(run: _Run) -> str:
    parts = []
    m = run.metrics
    summary = headline(m)
    if len(summary):
        parts.append("<h3>Summary</h3>")
        parts.append(_table(summary))
    for key in ("truth", "cv", "towers"):
        if isinstance(m.get(key), dict) and m[key].get("n", 0) > 1 and "nse" not in m[key]:
            # a metrics.json written before the nse / r2_pearson names: say so rather than show nothing
            why = f"metrics.json '{key}' has no 'nse' (older geoflux?): rerun 'geoflux validate'"
            parts.append(_note(why))
    fv = m.get("footprint_validation")
    if fv:
        parts.append(
            "<h3>Footprint validation</h3><p>Map value Σw·M/Σw over each tower's footprint (valid pixels) "
            "against the tower's QC-filtered NEE per time step, gC m-2 d-1. <b>nse</b> is 1 − SSE/SST "
            "(Nash–Sutcliffe), <b>r2_pearson</b> the squared Pearson correlation, <b>RMA slope</b> the "
            "reduced-major-axis slope. Rows never "
            "pool training sites (in-sample for the map) with held-out sites or the cross-validation's "
            "held-out predictions.</p>"
        )
        cols = [
            "source",
            "role",
            "n_sites",
            "n",
            "bias",
            "rmse",
            "nse",
            "r2_pearson",
            "rma_slope",
            "interval_coverage",
        ]
        titles = {
            "overall": "overall",
            "igbp": "by land cover (IGBP)",
            "representativeness": "by representativeness index",
            "aoa": "inside / outside the area of applicability",
        }
        for key, title in titles.items():
            t = fv.get("tables", {}).get(key)
            if not t:
                continue
            df = pd.DataFrame(t)
            lead = [c for c in df.columns if c not in cols and c not in ("mae", "rma_intercept")]
            df = df[[c for c in ["source", "role", *lead, *cols[2:]] if c in df.columns]]
            parts.append(f"<h4>{html.escape(title)}</h4>" + _table(df))
    ms = m.get("multiscale") or (run.analysis or {}).get("multiscale")
    if ms and ms.get("scales"):
        parts.append(
            "<h3>Multi-scale skill (held-out, native step "
            f"{html.escape(str(ms.get('native_step', '?')))})</h3>"
        )
        df = pd.DataFrame(ms["scales"]).T.rename_axis("scale").reset_index()
        keep = [
            c
            for c in [
                *("scale", "n", "nse", "r2_pearson", "rmse", "bias"),
                *("n_sites", "nse_site_median", "nse_site_p10"),
            ]
            if c in df.columns
        ]
        parts.append(_table(df[keep]))
        for name, why in ms.get("skipped", {}).items():
            parts.append(_note(f"{name}: skipped ({why})"))
    return "\n".join(parts) or _note("no skill tables in metrics.json")


def write_report(cfg: RunConfig, dates: Sequence[str] | None = None, n_sites: int = 4) -> Path:
    """Write ``<output>/report/index.html`` and its PNGs from a run's outputs; returns the HTML path.

    Parameters
    ----------
    cfg : the run configuration (the report reads the files its stages wrote).
    dates : map dates to show (YYYY-MM-DD, matched to the period starting then or containing it); default
        the first step, the step of strongest regional uptake and the last step.
    n_sites : sites with time series.
    """
    run = _Run(cfg)
    wanted = _match_dates(run, dates) if dates else None  # a bad --date is the user's error, not a note
    final = run.out / "report"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        parts = [
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>geoflux report</title>"
            f"<style>{_CSS}</style></head><body>",
            "<h1>geoflux NEE report</h1>",
            f"<p class='meta'>output folder {html.escape(str(run.out))} · created "
            f"{html.escape(str(run.metrics.get('created', '?')))} · units gC m-2 d-1 "
            "(positive = CO2 source)</p>",
        ]
        # the lead: what the maps are worth where no tower was used to fit them
        _try(parts, "held-out skill", lambda: held_out_section(run))
        info: dict = {}
        try:
            total, extent, crs_label, b = budget(run)
            info.update(b, total=total, extent=extent, crs_label=crs_label)
        except Exception as exc:  # no readable maps: the sections that need them say so
            log.warning("report: maps not read: %s", exc)
            info["error"] = str(exc)

        def need_maps() -> None:
            if "total" not in info:
                raise GeofluxError(info.get("error", "no maps"))

        chosen: list[pd.Timestamp] = []
        if "total" in info:
            chosen = wanted or choose_dates(info["means"])

        parts.append("<h2>Held-out skill per site</h2>")

        def per_site() -> str:
            fig = _figure(
                fig_scatter(run, tmp, sources=("cv",), name="scatter_cv.png"),
                "Held-out predictions of the site-grouped cross-validation against tower NEE (each site "
                "predicted by a model that never saw it). Orange: reduced-major-axis fit.",
            )
            table = site_skill_table(run)
            return (
                fig + "<p>Per site, worst held-out <b>nse</b> first (validation/skill_site.csv); <b>band "
                "coverage</b> is the share of held-out observations inside the 90 % band; <b>nse "
                "in-sample</b> "
                "is the map at the same site, fitted with it.</p>" + _table(table)
            )

        _try(parts, "per-site skill", per_site)
        if run.cfg.truth:
            parts.append("<h2>Map vs truth (generated world)</h2>")

            def error_section() -> str:
                need_maps()
                return _figure(
                    fig_error(run, tmp, chosen, mean_error(run), info["extent"], info["crs_label"]),
                    "Map minus the true NEE the world was generated from (purple: map too low, i.e. too much "
                    "uptake; orange: too high). Each panel has its own colour scale; crosses mark the "
                    "towers.",
                )

            _try(parts, "error map", error_section)

        parts.append("<h2>Towers over the region</h2>")

        def towers_section() -> str:
            need_maps()
            name = fig_towers(run, tmp, info["mean_map"], info["extent"], info["crs_label"])
            return _figure(
                name,
                "Towers on the mean NEE map; marker = land cover, edge colour = role (training/held-out); "
                "black "
                "outline = the 80 % source area of each tower's footprint (towers/footprints.npz); dashed: "
                "longitude/latitude.",
            )

        _try(parts, "tower map", towers_section)
        parts.append("<h2 class='in-sample'>Map at the training towers (in-sample)</h2>")
        _try(
            parts,
            "scatter",
            lambda: _figure(
                fig_scatter(run, tmp, sources=("map",)),
                "The maps through each tower's footprint against the tower's NEE. The model was fitted on "
                "these "
                "towers, so this measures fit, not skill (see the held-out skill above). Orange: "
                "reduced-major-axis fit.",
            ),
        )
        parts.append("<h2>Time series at selected sites</h2>")
        _try(
            parts,
            "time series",
            lambda: _figure(
                fig_timeseries(run, tmp, n_sites),
                "Tower NEE per period, the footprint-weighted map, the CV held-out prediction and, when "
                "present, the band and the truth.",
            ),
        )
        parts.append("<h2>Skill</h2>")
        from geoflux.metrics import summarize_metrics

        parts.append(f"<pre>{html.escape(summarize_metrics(run.metrics))}</pre>")
        _try(parts, "skill tables", lambda: _skill_tables(run))
        parts.append("<h2>Maps</h2>")

        def maps_section() -> str:
            need_maps()
            shown = ", ".join(f"{d:%Y-%m-%d}" for d in chosen)
            name, per_step = fig_maps(run, tmp, chosen)
            scale = (
                "each date has its own colour scale (a shared one would show the quieter dates flat)"
                if per_step
                else "one colour scale for all dates"
            )
            return _figure(
                name,
                f"NEE maps for the periods starting {shown} (blue = uptake, red = release; {scale}; NEE and "
                "truth of a date share a scale), with the truth, the uncertainty band width and the area of "
                "applicability when the run has them.",
            )

        _try(parts, "maps", maps_section)
        parts.append("<h2>NEE budget</h2>")

        def budget_section() -> str:
            need_maps()
            what = "Annual" if info["annual"] else f"{info['days']:.0f}-day (not a full year)"
            text = (
                f"<p>{what} NEE budget {info['start']} .. {info['end']}: regional mean "
                f"<b>{info['mean_gC_m2']:.1f} gC m-2</b>"
                + (f", total <b>{info['total_GgC']:.2f} Gg C</b>" if "total_GgC" in info else "")
                + f"; {100 * info['sink_fraction']:.0f} % of the pixels are net sinks.</p>"
            )
            return text + _figure(
                fig_budget(run, tmp, info["total"], info["extent"], info["crs_label"], info),
                "NEE summed over the mapped periods (period length × daily mean NEE); pixels missing in any "
                "step are blank.",
            )

        _try(parts, "budget", budget_section)
        _try(parts, "budgets table", lambda: _budgets_section(run))
        _try(parts, "year-to-year and scenarios", lambda: _years_section(run))
        parts.append("<h2>Driver analysis</h2>")
        _try(parts, "driver analysis", lambda: _analysis_section(run, tmp))
        parts.append("<h2>Run configuration and provenance</h2>")
        _try(parts, "provenance", lambda: _provenance(run))
        parts.append("</body></html>")
        (tmp / "index.html").write_text("\n".join(parts), encoding="utf-8")
    return final / "index.html"


def _match_dates(run: _Run, dates: Sequence[str]) -> list[pd.Timestamp]:
    periods = sorted(run.maps)
    if not periods:
        raise GeofluxError(f"{run.out / 'maps'}: no NEE maps to show")
    out = []
    for d in dates:
        t = pd.Timestamp(d)
        inside = [p for p in periods if p <= t < run.period_end[p]]
        if not inside:
            raise GeofluxError(
                f"date {d}: no map period contains it ({periods[0]:%Y-%m-%d}..{periods[-1]:%Y-%m-%d})"
            )
        out.append(inside[0])
    return sorted(dict.fromkeys(out))
