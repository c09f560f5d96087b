"""The run configuration: a typed, validated object loaded from YAML.

Unknown keys and wrong types are rejected with a one-line :class:`~geoflux.errors.ConfigError` that names
the key. Relative paths in the file are resolved against the folder that holds the file, so a config can
travel with its data.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from geoflux.catalog.variables import Strict, VariableSpec, format_validation_error, read_yaml
from geoflux.errors import ConfigError

__all__ = ["RunConfig", "VariableSpec", "format_validation_error", "load_config", "read_yaml"]


class _Strict(Strict):
    """Every config section: unknown keys rejected, values frozen."""


class TowersSpec(_Strict):
    """Tower inputs: FLUXNET-format files and the site table."""

    files: str = Field(description="glob of tower files, relative to the config file")
    sites: str = Field(description="site table CSV (SITE_ID, LAT, LON, IGBP, ...)")
    qc_max: int = Field(default=1, ge=0, le=3, description="keep half-hourly NEE_VUT_REF_QC <= qc_max")
    min_coverage: float = Field(
        default=0.5, ge=0.0, le=1.0, description="minimum fraction of good records in a time step"
    )


MIN_GRID_PIXELS = 4  # per axis: a smaller grid is a unit mistake (e.g. resolution in m on a km bbox)
MAX_GRID_PIXELS = 1e10  # default grid.max_pixels: 100 000 x 100 000 px, ~40 GB per float32 map band
_GEOGRAPHIC_LIMITS = (-180.0, -90.0, 180.0, 90.0)


def _grid_crs(crs: str) -> Any:
    """The pyproj CRS of a grid; ValueError (pydantic names it ``grid.crs``) when pyproj does not know it."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(crs)
    except CRSError:
        raise ValueError(
            f"{crs!r} is not a CRS pyproj knows (expected e.g. 'EPSG:32632', a PROJ string or WKT)"
        ) from None


def _crs_limits(crs: Any) -> tuple[float, float, float, float] | None:
    """Coordinates a grid on ``crs`` can plausibly have: lon/lat ranges for geographic CRSs; for projected
    ones the CRS's area of use projected to it, widened by its own width and height on every side (grids
    legitimately reach past a UTM zone's edge). None when the CRS declares no area of use."""
    if crs.is_geographic:
        return _GEOGRAPHIC_LIMITS
    aou = crs.area_of_use
    if aou is None:
        return None
    from pyproj import Transformer

    try:
        x0, y0, x1, y1 = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform_bounds(
            *aou.bounds, densify_pts=21
        )
    except Exception:  # pyproj raises ProjError/ValueError for areas it cannot project: skip the check
        return None
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        return None
    w, h = x1 - x0, y1 - y0
    return x0 - w, y0 - h, x1 + w, y1 + h


class GridSpec(_Strict):
    """The target grid: every driver is loaded onto it and every map is written on it.

    The bbox must be in the CRS's units (degrees within -180..180/-90..90 on a geographic CRS; on a
    projected CRS near its area of use), and the grid must have at least ``MIN_GRID_PIXELS`` pixels per
    axis and at most ``max_pixels`` pixels in all (a resolution or bbox typo otherwise makes a 1-pixel map
    or a grid no disk holds).
    """

    crs: str = Field(description="CRS of the grid, e.g. 'EPSG:32632' or a WKT string")
    resolution: float = Field(gt=0, description="pixel size in CRS units (m for UTM)")
    bbox: tuple[float, float, float, float] = Field(description="xmin, ymin, xmax, ymax in grid CRS units")
    chunk: int = Field(default=256, ge=16, le=8192, description="chunk edge in pixels")
    max_pixels: float = Field(
        default=MAX_GRID_PIXELS,
        gt=0,
        description="largest grid accepted (width x height, pixels); raise it deliberately for huge maps",
    )

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, v: str) -> str:
        _grid_crs(v)
        return v

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float, float], info: ValidationInfo) -> tuple[float, ...]:
        if not all(map(math.isfinite, v)):
            raise ValueError("bbox values must be finite numbers")
        if not (v[0] < v[2] and v[1] < v[3]):
            raise ValueError("bbox must be [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax")
        crs_text = info.data.get("crs")
        if crs_text is None:  # the crs itself was refused; that error is reported
            return v
        crs = _grid_crs(crs_text)
        limits = _crs_limits(crs)
        if limits is not None:
            lx0, ly0, lx1, ly1 = limits
            if v[0] < lx0 or v[2] > lx1 or v[1] < ly0 or v[3] > ly1:
                if crs.is_geographic:
                    raise ValueError(
                        f"{list(v)} are not degrees on {crs_text} (expected -180 <= x <= 180 and "
                        "-90 <= y <= 90; a bbox in metres needs a projected crs such as UTM)"
                    )
                raise ValueError(
                    f"{list(v)} lies far outside {crs_text}'s area of use ({crs.area_of_use.name[:60]}; "
                    f"expected x in {lx0:.0f}..{lx1:.0f}, y in {ly0:.0f}..{ly1:.0f} "
                    f"{crs.axis_info[0].unit_name})"
                )
        return v

    @model_validator(mode="after")
    def _size(self) -> GridSpec:
        x0, y0, x1, y1 = self.bbox
        # pixels as odc-geo counts them (a bbox edge within 1e-6 px of a pixel edge adds no pixel)
        nx = max(1, math.ceil((x1 - x0) / self.resolution - 1e-6))
        ny = max(1, math.ceil((y1 - y0) / self.resolution - 1e-6))
        extent = f"resolution {self.resolution:g} on a bbox of {x1 - x0:g} x {y1 - y0:g}"
        if min(nx, ny) < MIN_GRID_PIXELS:
            raise ValueError(
                f"{extent} gives {nx} x {ny} pixels (expected at least {MIN_GRID_PIXELS} x "
                f"{MIN_GRID_PIXELS}; are resolution and bbox in the crs's units?)"
            )
        if nx * ny > self.max_pixels:
            raise ValueError(
                f"{extent} gives {nx} x {ny} = {nx * ny:.3g} pixels (expected at most max_pixels="
                f"{self.max_pixels:.3g}; raise grid.max_pixels if that many is intended)"
            )
        return self


MODIS_8DAY = "MODIS8D"
"""``time.step`` of MODIS-style 8-day composites: periods start on day of year 1, 9, ..., 361 of every year
(restarting on 1 January), so the last period of a year is 5 days long (6 in a leap year)."""


def _is_modis_8day(step: str) -> bool:
    return step.upper() == MODIS_8DAY


def make_period_starts(start: str | pd.Timestamp, end: str | pd.Timestamp, step: str) -> pd.DatetimeIndex:
    """Start times of the periods of ``step`` from ``start`` to ``end`` (both inclusive).

    ``step`` is a pandas frequency (``8D``, ``1D``, ``MS``: one continuous range) or ``MODIS8D`` (8-day
    periods restarting every 1 January). The index is unnamed (xarray would take a name for a dimension):
    pass the true end of the last period (:func:`period_ends`) wherever it is needed.
    """
    start, end = pd.Timestamp(start), pd.Timestamp(end)
    if not _is_modis_8day(step):
        return pd.date_range(start, end, freq=step)
    starts = [
        t
        for year in range(start.year, end.year + 1)
        for t in pd.date_range(f"{year}-01-01", f"{year}-12-31", freq="8D")
        if start <= t <= end
    ]
    return pd.DatetimeIndex(starts)


def period_ends(starts: pd.DatetimeIndex, step: str) -> pd.DatetimeIndex:
    """The true (exclusive) end of each period starting at ``starts``: start + step, except that a MODIS
    8-day period never runs past the next 1 January."""
    starts = pd.DatetimeIndex(starts)
    if _is_modis_8day(step):
        nxt = starts + pd.Timedelta(days=8)
        new_year = pd.DatetimeIndex([pd.Timestamp(year=y + 1, month=1, day=1) for y in starts.year])
        return pd.DatetimeIndex(np.minimum(nxt.to_numpy(), new_year.to_numpy()))
    off = pd.tseries.frequencies.to_offset(step)
    return pd.DatetimeIndex([t + off for t in starts])


def period_edges(starts: pd.DatetimeIndex, step: str) -> pd.DatetimeIndex:
    """``starts`` followed by the end of the last period: the bin edges of contiguous periods (a scene at
    time t belongs to period k when edges[k] <= t < edges[k + 1])."""
    starts = pd.DatetimeIndex(starts)
    return starts.append(period_ends(starts[-1:], step))


class TimeSpec(_Strict):
    """Map time steps: periods of length ``step`` starting at ``start`` up to ``end`` (inclusive).

    ``step`` is a pandas frequency (``8D``: a continuous 8-day range from ``start``; ``1D``; ``MS``:
    calendar months) or ``MODIS8D``: 8-day periods restarting every 1 January as MODIS 8-day products are
    dated (46 a year, the last 5 or 6 days long). Over several years use ``MODIS8D``, not ``8D``: a
    continuous 8-day range drifts from the products' dates from the second year on.

    Dates may be quoted strings or YAML dates (``start: 2021-01-01`` unquoted); the latter are kept as ISO
    strings.
    """

    start: str
    end: str
    step: str = Field(
        default="8D",
        description="pandas frequency of the model time step ('1D', '8D', 'MS') or 'MODIS8D' (8-day periods "
        "restarting every 1 January)",
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _yaml_dates(cls, v: Any) -> Any:
        # YAML turns an unquoted 2021-01-01 into a date; it means the same as the quoted string
        if isinstance(v, (dt.date, dt.datetime)):
            return v.isoformat()
        return v

    @field_validator("step", mode="before")
    @classmethod
    def _modis_spelling(cls, v: Any) -> Any:
        return MODIS_8DAY if isinstance(v, str) and _is_modis_8day(v) else v

    @model_validator(mode="after")
    def _parse(self) -> TimeSpec:
        try:
            start, end = pd.Timestamp(self.start), pd.Timestamp(self.end)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot parse start/end as dates ({exc}; expected e.g. 2021-01-01)") from None
        if end < start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        if _is_modis_8day(self.step):
            if not len(make_period_starts(start, end, self.step)):
                raise ValueError(
                    f"{self.start}..{self.end} holds no MODIS8D period start (expected a range containing "
                    "day of year 1, 9, ..., 361)"
                )
            return self
        try:
            step = pd.tseries.frequencies.to_offset(self.step)
        except (ValueError, TypeError):
            raise ValueError(
                f"step {self.step!r} is not a pandas frequency (expected e.g. '1D', '8D', 'MS' or 'MODIS8D')"
            ) from None
        if step.n <= 0:
            raise ValueError(f"step {self.step!r} must be a positive period (expected e.g. '1D', '8D', 'MS')")
        return self


class FootprintSpec(_Strict):
    """How a tower's source area is weighted onto the grid.

    ``ffp``: the Kljun et al. (2015) footprint climatology of the tower's own half-hourly records (u*, wind
    speed and direction, Obukhov length and sigma_v where the file has them, neutral estimates where not),
    measurement height and canopy height from the site table; ``disk``: a uniform disk of ``radius``. A site
    without usable records or heights falls back to the disk; the method used is recorded per site.
    """

    method: Literal["ffp", "disk"] = "ffp"
    radius: float = Field(default=300.0, gt=0, description="disk radius (and FFP fallback), m")
    max_records: int = Field(default=200, ge=10, description="records sampled for a site's FFP climatology")
    boundary_layer_height: float = Field(default=1000.0, gt=0, description="h for FFP when not measured, m")
    seed: int = Field(default=0, description="seed of the record sample")
    fallback: Literal["warn", "error", "disk"] = Field(
        default="warn",
        description="a site whose FFP cannot be computed (no records or heights): warn (use the disk and "
        "say so per site), error (stop before anything is written) or disk (use the disk, reported in "
        "outputs only)",
    )
    pixel_mass: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="footprint pixels kept as training rows: the heaviest pixels holding this share of the "
        "footprint weight (weights renormalized over them)",
    )
    max_pixels: int = Field(default=100, ge=1, description="at most this many footprint pixels per tower")
    hedge_radius: float = Field(
        default=600.0,
        ge=0.0,
        description="radius (m) of the disk the footprint is convolved with for the broadened footprint "
        "that footprint-consistent training may blend in (model.hedge_shares); 0 = no broadened footprint",
    )
    hedge_pixels: int = Field(
        default=150, ge=1, description="pixels of the broadened footprint kept per tower (weighted sample)"
    )


class ModelSpec(_Strict):
    """The regressor and how it is validated (always grouped by site)."""

    kind: Literal["random_forest", "hist_gradient_boosting", "lightgbm", "xgboost"] = Field(
        default="hist_gradient_boosting",
        description="regressor; the default, shallow histogram boosting (200 iterations, depth 6), maps as "
        "accurately as a 200-tree random forest at a fraction of its prediction cost (README 'Choosing the "
        "model')",
    )
    params: dict[str, int | float | str | bool | None] = Field(
        default_factory=dict, description="estimator parameters, overriding geoflux's defaults for the kind"
    )
    target: Literal["nee", "partitioned"] = Field(
        default="nee",
        description="what the point model learns: nee (tower NEE) or partitioned (two models, of RECO and "
        "GPP from the towers' night-time partitioning, NEE = RECO - GPP: responses that cancel in NEE, "
        "e.g. to warming, are learnt separately; README 'Why budgets differ between years, and "
        "projection')",
    )
    monotonic: dict[str, Literal[-1, 0, 1]] = Field(
        default_factory=dict,
        description="optional sign constraints of the point model, feature -> +1 (NEE never falls as it "
        "rises), -1 (never rises) or 0; e.g. {sw: -1, ndvi: -1, vpd: 1} (more light and greenness, more "
        "uptake; drier air, less). Collinear drivers then cannot cancel each other's effects, which a "
        "scenario moving one of them relies on (README 'Why budgets differ between years, and projection')",
    )
    cv_folds: int = Field(
        default=0, ge=0, description="0 = leave-one-group-out; k > 1 = GroupKFold(k) over the cv groups"
    )
    seed: int = 0
    cv: Literal["site", "spatial_block", "climate", "temporal"] = Field(
        default="site",
        description="validation groups: site (default), spatial_block (square blocks of cv_block_km), "
        "climate (sites binned by their mean cv_climate_var: the extreme bins are extrapolation), "
        "temporal (alternate blocks of cv_block_days; a within-site hold-out, not a test of new sites)",
    )
    cv_block_km: float = Field(default=50.0, gt=0, description="spatial block edge, km")
    cv_block_days: int = Field(default=8, ge=1, description="temporal block length, days")
    cv_climate_var: str = Field(default="ta", description="feature whose site mean orders the climate split")
    uncertainty: Literal["quantile", "residual", "none"] = Field(
        default="residual",
        description="quantile: conformalized quantile regression band from two quantile models (lower, "
        "upper); residual: one model of the absolute residual's interval-quantile, band = NEE +- it (half "
        "the band's prediction cost); both calibrated on the grouped CV",
    )
    interval: float = Field(default=0.9, gt=0.0, lt=1.0, description="nominal coverage of the band")
    band_contrast: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="footprint training: share of the model's own within-footprint contrast trusted when "
        "the band is calibrated on held-out pixels (a pixel's pseudo-truth = tower NEE + share x (its "
        "prediction - the footprint-weighted prediction)); 0 = every pixel scored against the tower's "
        "NEE (too wide in mixed footprints), 1 = against the tower's residual (too narrow: pixel errors "
        "do not average out). README 'The band at pixel level'",
    )
    aoa: bool = Field(default=True, description="dissimilarity index and area of applicability bands")
    training: Literal["iterative", "pixel", "averaged"] = Field(
        default="iterative",
        description="how towers become training rows: iterative (footprint-consistent refit: per-pixel "
        "predictions whose footprint-weighted sum matches each tower), pixel (each footprint pixel a row "
        "with the tower's NEE, weighted by footprint weight) or averaged (one row of footprint-averaged "
        "drivers per tower and step, land-cover hardened to the dominant class; for comparison)",
    )
    refit_iterations: int = Field(
        default=2, ge=1, le=20, description="iterative training: refits after the pixel-expansion start"
    )
    hedge_shares: list[float] = Field(
        default=[0.0, 0.5, 1.0],
        min_length=1,
        description="footprint-consistent training: candidate shares of the broadened footprint "
        "(footprint.hedge_radius) in the footprint towers are fitted and predicted with; an inner "
        "site-grouped CV through the map path chooses one ([0] = always the modelled footprint)",
    )

    averaged_share: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="footprint-consistent training: share of an averaged-driver model's per-pixel "
        "prediction blended into the per-pixel targets, a hedge against a mis-modelled footprint that "
        "tower NEE cannot reveal (README 'Hedging the footprint'); 0 = none",
    )

    @field_validator("hedge_shares")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"hedge_shares {bad} (expected shares between 0 and 1)")
        return sorted(set(v))


class RunConfig(_Strict):
    """Everything one run needs; see README 'Configuration'."""

    catalog: str = Field(description="path to a static STAC catalog.json or a STAC API URL")
    variables: list[VariableSpec]
    towers: TowersSpec
    grid: GridSpec
    time: TimeSpec
    footprint: FootprintSpec = FootprintSpec()
    model: ModelSpec = ModelSpec()
    output: str = Field(default=".", description="output folder")
    truth: str | None = Field(default=None, description="glob of true-NEE COGs (generated worlds only)")
    base_dir: str = Field(default=".", description="folder relative paths are resolved against (set on load)")

    @field_validator("variables")
    @classmethod
    def _unique(cls, v: list[VariableSpec]) -> list[VariableSpec]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variable names {dup}")
        if not v:
            raise ValueError("at least one variable is needed")
        return v

    def path(self, p: str) -> Path:
        """Resolve ``p`` against :attr:`base_dir` unless it is absolute or a URL."""
        if "://" in p:
            return Path(p)
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    @property
    def out_dir(self) -> Path:
        return self.path(self.output)

    def periods(self) -> pd.DatetimeIndex:
        """Start times of the map time steps (see :class:`TimeSpec` for ``MODIS8D``)."""
        return make_period_starts(self.time.start, self.time.end, self.time.step)

    def period_bounds(self) -> tuple[pd.DatetimeIndex, pd.DatetimeIndex]:
        """(starts, ends) of the map time steps; ends are exclusive and true (a MODIS8D period ends at the
        next 1 January when that comes first). Every period end in geoflux comes from here."""
        starts = self.periods()
        return starts, period_ends(starts, self.time.step)

    def period_days(self) -> np.ndarray:
        """Length of each map time step in days (float): the weight of its NEE (gC m-2 d-1) in budgets."""
        starts, ends = self.period_bounds()
        return ((ends - starts) / pd.Timedelta(days=1)).to_numpy(dtype=float)


def config_from_dict(data: dict, source: str = "<config>", base_dir: str | Path = ".") -> RunConfig:
    """Validate a mapping into a :class:`RunConfig`.

    Raises
    ------
    ConfigError
        naming ``source`` and the first offending key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    if "base_dir" in data:
        raise ConfigError(f"{source}: base_dir: unknown key (it is set from the file's location)")
    if isinstance(data.get("variables"), list) and any(
        isinstance(v, dict) and "definition" in v for v in data["variables"]
    ):
        # entries naming a shipped catalog definition (catalogs/*.yaml) expand to full variable specs
        from geoflux.catalog.definitions import expand_variables
        from geoflux.errors import CatalogError

        try:
            data = {**data, "variables": expand_variables(data["variables"])}
        except CatalogError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        return RunConfig.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration; relative paths resolve against its folder."""
    path = Path(path)
    data = read_yaml(path, ConfigError, "config")
    if data is None:
        raise ConfigError(f"{path}: config is empty (expected keys catalog, variables, towers, grid, time)")
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (without ``base_dir``), atomically."""
    from geoflux.atomic import atomic_path

    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
