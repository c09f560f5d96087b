"""Extraction: footprint-weighted drivers at the towers, joined with tower observations.

The table this stage writes (``training.parquet``) is what the model stage trains on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pandas as pd
import xarray as xr
from odc.geo.geobox import GeoBox

from geoflux.config import FootprintSpec, VariableSpec
from geoflux.errors import FootprintError
from geoflux.features import class_groups, feature_names, harden_class_fractions, pixel_features
from geoflux.footprint import FootprintWeights, tower_footprint
from geoflux.footprint.sites import DISPLACEMENT_FRACTION, footprint_records


def site_footprint(
    spec: FootprintSpec, geobox: GeoBox, row: pd.Series, records: pd.DataFrame | None
) -> FootprintWeights:
    """One tower's footprint weights on ``geobox``, as :func:`tower_footprints` computes each, on the
    calling thread (``row``: the site-table row, its name the site id; ``records``: the site's
    half-hourly records, or None for the disk)."""
    return tower_footprint(
        geobox,
        row,
        records,
        method=spec.method,
        radius=spec.radius,
        max_records=spec.max_records,
        boundary_layer_height=spec.boundary_layer_height,
        seed=spec.seed,
    )


def tower_footprints(
    sites: pd.DataFrame, geobox: GeoBox, spec: FootprintSpec, records: pd.DataFrame | None = None
) -> dict[str, FootprintWeights]:
    """Footprint weights of every site on the grid.

    Parameters
    ----------
    sites : site table indexed by SITE_ID with LAT/LON (degrees), HEIGHT_MEAS/HEIGHT_CANOPY (m) for FFP.
    geobox : target grid.
    spec : footprint method and parameters.
    records : tidy half-hourly records of the sites (wind, u*) for FFP climatologies; None → disks.

    Raises
    ------
    GridError
        naming the site if a tower lies outside the grid.
    """
    by_site = dict(tuple(records.groupby("site", sort=False))) if records is not None else {}
    jobs = []
    for site, row in sites.iterrows():
        recs = by_site.get(site)
        if recs is not None:
            recs.attrs = dict(records.attrs)
        jobs.append((row, recs))

    def one(job: tuple[pd.Series, pd.DataFrame | None]) -> FootprintWeights:
        return site_footprint(spec, geobox, *job)

    # Towers are independent and their footprints are numpy/scipy work that releases the GIL (FFP sums,
    # sub-pixel interpolation): threads overlap them. Each tower's result is the same as computed alone,
    # and the first failing tower (in table order) raises, as in a plain loop.
    with ThreadPoolExecutor(max_workers=_footprint_workers(len(jobs))) as ex:
        fps = list(ex.map(one, jobs))
    return {str(site): fw for site, fw in zip(sites.index, fps, strict=True)}


def _footprint_workers(n_jobs: int) -> int:
    """Threads for per-tower footprints: the CPUs this process may use, at most 4 (each holds ~100 MB of
    sub-pixel samples at a time), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus, n_jobs))


def fallback_reason(site: pd.Series, records: pd.DataFrame | None, spec: FootprintSpec) -> str:
    """Why the FFP climatology cannot be computed for a site ('' when nothing stands in its way).

    Mirrors the conditions of :func:`geoflux.footprint.tower_footprint` so that a disk fallback is always
    reported with its cause (a missing height column, no half-hourly records, no usable wind records).
    """
    if spec.method != "ffp":
        return ""
    if records is None or records.empty:
        return "no half-hourly/hourly records in its tower file"
    height = pd.to_numeric(pd.Series([site.get("HEIGHT_MEAS", np.nan)]), errors="coerce").iloc[0]
    if not np.isfinite(height):
        return "no measurement height (site table column HEIGHT_MEAS) for it"
    canopy = pd.to_numeric(pd.Series([site.get("HEIGHT_CANOPY", np.nan)]), errors="coerce").iloc[0]
    zm = height - DISPLACEMENT_FRACTION * (canopy if np.isfinite(canopy) else 0.0)
    if zm <= 0:
        return (
            f"measurement height {height:g} m is below the displacement height (HEIGHT_CANOPY {canopy:g} m)"
        )
    resolution = records.attrs.get("resolution", "HH")
    if resolution not in ("HH", "HR"):
        return f"its records are {resolution}, FFP needs half-hourly or hourly records"
    if footprint_records(records, spec.max_records, spec.seed).empty:
        return "no daytime record with USTAR, WS and WD"
    return "no record with usable FFP inputs (u*, wind, stability)"


def check_footprint_methods(
    footprints: Mapping[str, FootprintWeights],
    sites: pd.DataFrame,
    records: pd.DataFrame | None,
    spec: FootprintSpec,
) -> pd.DataFrame:
    """The footprint method of every site and, for each disk fallback, the reason.

    Parameters
    ----------
    footprints : footprints as computed (their ``method`` says what was used).
    sites, records, spec : what they were computed from.

    Returns
    -------
    DataFrame ``site, method, reason`` (reason empty unless the configured FFP fell back to the disk).

    Raises
    ------
    FootprintError
        with ``spec.fallback == 'error'``, naming every site that fell back and why.
    """
    by_site = dict(tuple(records.groupby("site", sort=False))) if records is not None else {}
    rows = []
    for site, fw in footprints.items():
        reason = ""
        if spec.method == "ffp" and fw.method == "disk":
            recs = by_site.get(site)
            if recs is not None:
                recs.attrs = dict(records.attrs)
            reason = fallback_reason(sites.loc[site], recs, spec)
        rows.append({"site": site, "method": fw.method, "reason": reason})
    table = pd.DataFrame(rows, columns=["site", "method", "reason"])
    fell = table.loc[table["reason"] != ""]
    if spec.fallback == "error" and len(fell):
        first = "; ".join(f"{r.site}: {r.reason}" for r in fell.itertuples())
        raise FootprintError(
            f"footprint.fallback=error: {len(fell)} site(s) cannot use FFP ({first}); fix the site table or "
            "tower files, or set footprint.fallback: warn"
        )
    return table


def _union_window(*windows: tuple[slice, slice]) -> tuple[slice, slice]:
    """Smallest (row, column) window holding every non-empty given window (the first if all are empty)."""
    full = [w for w in windows if w[0].stop > w[0].start and w[1].stop > w[1].start] or windows[:1]
    rows = slice(min(w[0].start for w in full), max(w[0].stop for w in full))
    cols = slice(min(w[1].start for w in full), max(w[1].stop for w in full))
    return rows, cols


def _read_windows(
    cube: xr.Dataset, windows: Mapping[str, tuple[slice, slice]], variables: Sequence[VariableSpec]
) -> dict[str, dict[str, np.ndarray]]:
    """Per site and driver, the driver values of a grid window ((time, rows, cols); static: (rows, cols)).

    One dask computation for all sites with one task per cube chunk that any window touches: it reads the
    chunk once and cuts every window's part out of it (slicing each window separately would add a task per
    site, driver, time step and chunk, ~20,000 for 30 towers, whose scheduling costs more than the reads).
    """
    import dask.array as da

    pieces: list[tuple[str, tuple[slice, ...], list[tuple[str, tuple[slice, slice]]]]] = []
    tasks = []
    for v in variables:
        arr = cube[v.name].data
        if not isinstance(arr, da.Array):  # an in-memory cube: one chunk
            arr = da.from_array(arr, chunks=-1)
        bounds = [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks]
        blocks = arr.to_delayed(optimize_graph=True)
        for bi in range(len(bounds[-2]) - 1):
            y0, y1 = bounds[-2][bi], bounds[-2][bi + 1]
            for bj in range(len(bounds[-1]) - 1):
                x0, x1 = bounds[-1][bj], bounds[-1][bj + 1]
                cuts, dests = [], []
                for site, (rs, cs) in windows.items():
                    r0, r1 = max(rs.start, y0), min(rs.stop, y1)
                    c0, c1 = max(cs.start, x0), min(cs.stop, x1)
                    if r0 < r1 and c0 < c1:
                        cuts.append((r0 - y0, r1 - y0, c0 - x0, c1 - x0))
                        dests.append(
                            (site, (slice(r0 - rs.start, r1 - rs.start), slice(c0 - cs.start, c1 - cs.start)))
                        )
                if not cuts:
                    continue
                # an int array, not a list of slices: dask.delayed walks lists looking for collections
                cuts = np.asarray(cuts, dtype=np.int64)
                if arr.ndim == 2:
                    tasks.append(dask.delayed(_cut)(blocks[bi, bj], cuts))
                    pieces.append((v.name, (), dests))
                    continue
                for bt in range(len(bounds[0]) - 1):
                    tasks.append(dask.delayed(_cut)(blocks[bt, bi, bj], cuts))
                    pieces.append((v.name, (slice(bounds[0][bt], bounds[0][bt + 1]),), dests))
    (results,) = dask.compute(tasks)
    out: dict[str, dict[str, np.ndarray]] = {}
    for site, (rs, cs) in windows.items():
        out[site] = {}
        for v in variables:
            arr = cube[v.name]
            shape = (*arr.shape[:-2], rs.stop - rs.start, cs.stop - cs.start)
            out[site][v.name] = np.full(shape, np.nan, dtype=arr.dtype)
    for (name, tsl, dests), parts in zip(pieces, results, strict=True):
        for (site, (rsl, csl)), part in zip(dests, parts, strict=True):
            out[site][name][(*tsl, rsl, csl)] = part
    return out


def _cut(block: np.ndarray, cuts: np.ndarray) -> list[np.ndarray]:
    """The windows ``cuts`` (rows ``(k, 4)``: row start, row stop, column start, column stop) of one chunk
    (copies, so that the chunk itself can be freed)."""
    return [np.array(block[..., r0:r1, c0:c1]) for r0, r1, c0, c1 in cuts.tolist()]


def _window_features(
    values: Mapping[str, np.ndarray],
    read: tuple[slice, slice],
    fw: FootprintWeights,
    variables: Sequence[VariableSpec],
    times: int,
) -> np.ndarray:
    """Per-pixel features (time, r, c, f) of footprint ``fw``'s window, cut from driver values read over
    the window ``read`` that holds it. Features come from :func:`geoflux.features.pixel_features`, the
    function mapping applies to every map pixel."""
    (rows, cols), (nr, nc) = fw.window, fw.weights.shape
    r0, c0 = rows.start - read[0].start, cols.start - read[1].start
    vals = {}
    for v in variables:
        a = values[v.name][..., r0 : r0 + nr, c0 : c0 + nc]
        vals[v.name] = np.broadcast_to(a, (times, nr, nc)) if a.ndim == 2 else a
    return pixel_features(vals, variables)


def extract_drivers(
    cube: xr.Dataset,
    footprints: Mapping[str, FootprintWeights],
    variables: Sequence[VariableSpec],
    *,
    pixel_mass: float = 0.95,
    max_pixels: int = 100,
    hedge_radius: float = 0.0,
    hedge_pixels: int = 150,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Footprint-weighted features per site and time step, and the footprint pixels they come from.

    Pixels with a missing driver are left out and the remaining weights renormalized; ``fp_valid`` is the
    footprint fraction that had all drivers.

    Parameters
    ----------
    cube : lazy driver cube on the grid the footprints were computed on.
    footprints : weights per site.
    variables : driver definitions (feature order).
    pixel_mass : the pixel table keeps each footprint's heaviest pixels up to this share of its weight.
    max_pixels : and at most this many pixels per footprint.
    hedge_radius : > 0 adds the pixels of a *broadened* footprint, the footprint convolved with a uniform
        disk of this radius (m), as a second kernel (``fp_kernel`` 1) that training may blend in when the
        towers say the modelled footprint is too narrow (:func:`geoflux.footprint_fit.choose_hedge`).
    hedge_pixels : pixels of the broadened footprint kept per tower, a systematic sample with probability
        ∝ weight (each kept pixel then carries an equal share: an unbiased estimate of the broad sum).
    seed : offset of the systematic sample.

    Returns
    -------
    averaged : ``site``, ``time``, one column per feature (footprint-weighted mean; see
        :mod:`geoflux.features`), ``fp_coverage`` (footprint fraction inside the grid), ``fp_valid`` and
        ``fp_method``.
    pixels : one row per kept footprint pixel and time step: ``site``, ``time``, ``row``, ``col`` (grid
        pixel), ``fp_weight`` (weight renormalized to sum to 1 per site and time over pixels with every
        driver) and the pixel's own features, exactly as the map sees that pixel; ``fp_kernel`` says
        which footprint the pixel belongs to (0 the modelled footprint, 1 the broadened one; the weights
        sum to 1 per site, time and kernel).
    """
    names = feature_names(variables)
    broad = {}
    if hedge_radius > 0:
        shape = (cube.sizes["y"], cube.sizes["x"])
        px = _pixel_size_m(cube)
        broad = {
            site: broadened(fw, hedge_radius / px[0], hedge_radius / px[1], shape)
            for site, fw in footprints.items()
        }
    times = pd.DatetimeIndex(cube["time"].to_numpy())
    # One read per site covering both kernels (the broadened window holds the footprint's): the drivers
    # are read once, not once per kernel.
    reads = {
        site: _union_window(fw.window, *([broad[site].window] if site in broad else []))
        for site, fw in footprints.items()
    }
    values = _read_windows(cube, reads, variables)
    nt = len(times)
    frames, pixel_frames = [], []
    for site, fw in footprints.items():
        feats = _window_features(values[site], reads[site], fw, variables, nt)
        ok = ~np.isnan(feats).any(axis=-1)
        w = np.where(ok, fw.weights[None], 0.0)
        wsum = w.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.einsum("trc,trcf->tf", w, np.nan_to_num(feats)) / wsum[:, None]
        df = pd.DataFrame(mean, columns=names)
        df.insert(0, "time", times)
        df.insert(0, "site", site)
        df["fp_coverage"] = fw.coverage
        df["fp_valid"] = wsum
        df["fp_method"] = fw.method
        frames.append(df.loc[wsum > 0])
        keep = _heaviest(fw.weights.ravel(), pixel_mass, max_pixels)
        pixel_frames.append(_kept_pixels(site, fw, feats, ok, times, names, keep, fw.weights.ravel()[keep]))
    for k, (site, bw) in enumerate(broad.items()):
        feats = _window_features(values[site], reads[site], bw, variables, nt)
        ok = ~np.isnan(feats).any(axis=-1)
        keep, w = _systematic_sample(bw.weights.ravel(), hedge_pixels, seed + k)
        pixel_frames.append(_kept_pixels(site, bw, feats, ok, times, names, keep, w, kernel=1))
    return pd.concat(frames, ignore_index=True), pd.concat(pixel_frames, ignore_index=True)


def _pixel_size_m(cube: xr.Dataset) -> tuple[float, float]:
    """(row, column) pixel size of the cube's grid in metres (on a geographic grid, at its centre)."""
    gb = cube.odc.geobox
    ry, rx = abs(gb.resolution.y), abs(gb.resolution.x)
    if gb.crs.geographic:
        lat = float(np.deg2rad(gb.extent.centroid.coords[0][1]))
        return ry * 111_320.0, rx * 111_320.0 * max(np.cos(lat), 1e-6)
    return ry, rx


def broadened(fw: FootprintWeights, ry: float, rx: float, shape: tuple[int, int]) -> FootprintWeights:
    """The footprint convolved with a uniform disk of radii ``ry`` × ``rx`` pixels, clipped to the grid.

    A hedge against a modelled footprint that is too narrow (the true source area of a tower is rarely
    known better than to a factor of two): the same shape, smeared over a wider area. Weights outside the
    grid are dropped (``coverage`` says how much is left).
    """
    from scipy.signal import fftconvolve

    py, px = int(np.ceil(ry)), int(np.ceil(rx))
    yy, xx = np.mgrid[-py : py + 1, -px : px + 1]
    disk = ((yy / max(ry, 1e-9)) ** 2 + (xx / max(rx, 1e-9)) ** 2 <= 1.0).astype(np.float64)
    w = fftconvolve(fw.weights, disk / disk.sum(), mode="full")
    w[w < 1e-12 * w.max(initial=0.0)] = 0.0  # FFT round-off (±1e-19) where the true weight is 0
    r0, c0 = fw.row_off - py, fw.col_off - px
    r_lo, c_lo = max(0, -r0), max(0, -c0)
    r_hi, c_hi = min(w.shape[0], shape[0] - r0), min(w.shape[1], shape[1] - c0)
    w = w[r_lo:r_hi, c_lo:c_hi]
    return FootprintWeights(r0 + r_lo, c0 + c_lo, w, float(w.sum()), f"{fw.method}-broadened")


def _heaviest(flat_w: np.ndarray, pixel_mass: float, max_pixels: int) -> np.ndarray:
    # The heaviest pixels of the footprint: FFP tails never reach zero, and thousands of pixels each
    # holding 1e-5 of the weight add rows (and cost) without information.
    order = np.argsort(-flat_w, kind="stable")
    total = flat_w.sum()
    n_keep = int(np.searchsorted(np.cumsum(flat_w[order]), pixel_mass * total) + 1) if total > 0 else 0
    return order[: min(n_keep, max_pixels, int(np.count_nonzero(flat_w)))]


def _systematic_sample(flat_w: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` draws ∝ weight, evenly spaced along the raster-order cumulative weight (one random offset):
    the unique pixels drawn and their draw counts. A broad footprint has thousands of light pixels; this
    keeps ``k`` of them, spread over its whole area, with an unbiased weighted sum."""
    cum = np.cumsum(flat_w)
    if not cum.size or cum[-1] <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    u = (np.random.default_rng(seed).random() + np.arange(k)) / k * cum[-1]
    idx = np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)
    keep, counts = np.unique(idx, return_counts=True)
    return keep, counts.astype(np.float64)


def _kept_pixels(
    site: str,
    fw: FootprintWeights,
    feats: np.ndarray,
    ok: np.ndarray,
    times: pd.DatetimeIndex,
    names: list[str],
    keep: np.ndarray,
    keep_w: np.ndarray,
    kernel: int = 0,
) -> pd.DataFrame:
    """Pixel-table rows of the kept pixels ``keep`` (flat window indices) with weights ``keep_w``."""
    nt = len(times)
    x = feats.reshape(nt, -1, feats.shape[-1])[:, keep]  # (time, k, f)
    valid = ok.reshape(nt, -1)[:, keep]
    w = np.where(valid, keep_w[None], 0.0)
    wsum = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = w / wsum
    t_idx, k_idx = np.nonzero(valid & (wsum > 0))
    r, c = np.divmod(keep[k_idx], fw.weights.shape[1])
    out = pd.DataFrame(x[t_idx, k_idx], columns=names)
    out.insert(0, "fp_weight", w[t_idx, k_idx])
    out.insert(0, "col", (c + fw.col_off).astype(np.int32))
    out.insert(0, "row", (r + fw.row_off).astype(np.int32))
    out.insert(0, "time", times[t_idx])
    out.insert(0, "site", site)
    out["fp_kernel"] = np.int8(kernel)
    return out


def training_table(drivers: pd.DataFrame, observations: pd.DataFrame) -> pd.DataFrame:
    """Join footprint-weighted drivers with aggregated tower NEE on (site, time); rows lacking either drop.

    The same join serves the pixel table (:func:`extract_drivers`' second output): every footprint pixel
    of a tower and step gets that tower's NEE. Partitioned ``RECO`` and ``GPP`` (gC m-2 d-1) come along
    when the observations have them.
    """
    partitioned = [c for c in ("RECO", "GPP") if c in observations.columns]
    obs = observations[["site", "time", "NEE", "NEE_coverage", *partitioned]]
    table = drivers.merge(obs, on=["site", "time"], how="inner")
    return table.dropna(subset=["NEE"]).reset_index(drop=True)


def harden_classes(table: pd.DataFrame, variables: Sequence[VariableSpec]) -> pd.DataFrame:
    """Footprint class fractions → one-hot of the footprint's dominant class (a copy); see
    :func:`geoflux.features.harden_class_fractions`."""
    return harden_class_fractions(table, class_groups(variables))
