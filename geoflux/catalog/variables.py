"""Driver definitions as data: :class:`VariableSpec`, named unit conversions, and the YAML reader.

The one place both the run configuration (:mod:`geoflux.config`) and the shipped catalog definitions
(:mod:`geoflux.catalog.definitions`) take a driver's description from, so neither imports the other's
internals: config → catalog.definitions → catalog.variables, never back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from geoflux.errors import GeofluxError


class Converter(NamedTuple):
    """A linear unit conversion: ``out = value * factor + offset``."""

    factor: float
    offset: float
    source_units: str
    units: str


CONVERTERS: dict[str, Converter] = {
    "K_to_degC": Converter(1.0, -273.15, "K", "degC"),
    # an accumulation over one hour divided by the 3600 s it accumulates: mean flux over the hour
    "J_m2_per_hour_to_W_m2": Converter(1.0 / 3600.0, 0.0, "J m-2 (per 1 h accumulation)", "W m-2"),
    # an hour's precipitation depth in m; x 1000 mm/m x 24 h/d: the mean of the hours is a daily rate
    "m_per_hour_to_mm_per_day": Converter(24_000.0, 0.0, "m (per 1 h accumulation)", "mm d-1"),
    "m_per_day_to_mm_per_day": Converter(1000.0, 0.0, "m d-1", "mm d-1"),
    "Pa_to_hPa": Converter(0.01, 0.0, "Pa", "hPa"),
    "kPa_to_hPa": Converter(10.0, 0.0, "kPa", "hPa"),
    # MODIS 17A2H GPP / PsnNet: kg C m-2 summed over the 8-day composite -> daily mean in g C m-2 d-1
    "kgC_per_8d_to_gC_per_d": Converter(1000.0 / 8.0, 0.0, "kg C m-2 (8-day sum)", "gC m-2 d-1"),
    "kgC_per_day_to_gC_per_day": Converter(1000.0, 0.0, "kg C m-2 d-1", "gC m-2 d-1"),
}


def convert(values: Any, name: str | None) -> Any:
    """``values`` in the converter's output units (``name`` None: unchanged); works on numpy and xarray."""
    if name is None:
        return values
    c = CONVERTERS[name]
    out = values * np.float32(c.factor) if c.factor != 1.0 else values
    return out + np.float32(c.offset) if c.offset != 0.0 else out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariableSpec(Strict):
    """One driver: which STAC collection/asset holds it and how to decode it.

    Physical value = raw * ``scale`` + ``offset``; raw == ``nodata`` (or the file's or the STAC item's
    nodata, or outside the raster) is missing. ``valid_range`` masks values silently (a product's fill
    codes); ``physical_range`` is what the quantity can physically be: anything left outside it is
    reported, as is a scene leaving more than ``missing_max`` of the region missing.
    """

    name: str = Field(description="driver name used as model feature")
    collection: str
    asset: str
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    units: str = ""
    kind: Literal["continuous", "categorical"] = "continuous"
    classes: list[int] | None = Field(
        default=None, description="class codes of a categorical driver (one feature per class fraction)"
    )
    static: bool = Field(default=False, description="one item for all times (e.g. elevation, land cover)")
    # Optional fields below come from catalog definitions (catalogs/*.yaml, geoflux.catalog.definitions);
    # their defaults reproduce the plain behaviour (one asset, no QA, mean composite, no gap filling).
    catalog: str | None = Field(
        default=None,
        description="this driver's catalog (static catalog path or STAC API URL); default: run's",
    )
    signing: Literal["planetary-computer"] | None = Field(
        default=None, description="sign asset hrefs at read time (only the provider's own storage hrefs)"
    )
    query: dict[str, dict[str, Any]] | None = Field(
        default=None, description="STAC API query-extension filter, e.g. {'eo:cloud_cover': {'lt': 60}}"
    )
    filter: dict[str, Any] | None = Field(default=None, description="CQL2-JSON filter for STAC API searches")
    valid_range: tuple[float, float] | None = Field(
        default=None, description="physical values outside [min, max] (after scale/offset) are missing"
    )
    physical_range: tuple[float, float] | None = Field(
        default=None,
        description="physically possible [min, max] in the driver's units; a value outside it (after "
        "nodata, QA and valid_range masking) means mis-decoding and is reported",
    )
    missing_max: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="largest share of the region a scene may leave missing (nodata or outside the raster)",
    )
    on_implausible: Literal["error", "warn"] = Field(
        default="error",
        description="values outside physical_range or too much missing: stop (error) or warn (values "
        "outside physical_range then become missing)",
    )
    qa_asset: str | None = Field(
        default=None, description="asset of the same item holding the QA/cloud layer"
    )
    qa_mask: int | None = Field(
        default=None, ge=0, description="bits of the QA value that are tested (None: the whole value)"
    )
    qa_keep: list[int] | None = Field(
        default=None, description="values of (QA & qa_mask) that mark a usable pixel; others are masked"
    )
    aggregation: Literal["mean", "median", "max", "min", "sum", "daytime_mean"] = Field(
        default="mean",
        description="how scenes (or hourly fields) within one model time step are combined; daytime_mean "
        "(gridded hourly drivers only): mean over the hours when the sun is above the horizon",
    )
    resampling: Literal["nearest", "mode", "bilinear", "cubic", "average", "min", "max", "med"] | None = (
        Field(default=None, description="resampling onto the grid; default nearest (categorical) / bilinear")
    )
    max_gap: int = Field(
        default=0, ge=0, description="fill runs of up to this many missing time steps by linear interpolation"
    )
    derive: Literal["ndvi", "nirv", "vpd"] | None = Field(
        default=None, description="compute the driver from several assets of the same item (see inputs)"
    )
    inputs: dict[str, str] | None = Field(
        default=None,
        description="role -> asset for derived drivers: ndvi/nirv need red, nir; vpd needs t, td (degC)",
    )

    convert: str | None = Field(
        default=None,
        description="named unit conversion applied after scale/offset (to each input of a derived driver), "
        "e.g. K_to_degC, kgC_per_8d_to_gC_per_d; see geoflux.catalog.variables.CONVERTERS",
    )
    store_variable: str | None = Field(
        default=None,
        description="Zarr/NetCDF assets: the variable inside the store (default: the asset key, else the "
        "store's only data variable)",
    )
    timestamp: Literal["instant", "end"] = Field(
        default="instant",
        description="Zarr/NetCDF hourly fields: 'end' when a value is stamped at the end of the interval it "
        "accumulates (ERA5 accumulations), so it is binned by the interval's start",
    )

    @field_validator("convert")
    @classmethod
    def _known_convert(cls, v: str | None) -> str | None:
        if v is not None and v not in CONVERTERS:
            raise ValueError(f"unknown converter {v!r} (expected one of {', '.join(CONVERTERS)})")
        return v

    @model_validator(mode="after")
    def _categorical_needs_classes(self) -> VariableSpec:
        if self.kind == "categorical" and not self.classes:
            raise ValueError(
                f"variable '{self.name}' is categorical and needs 'classes' (list of class codes)"
            )
        return self

    @model_validator(mode="after")
    def _consistent_options(self) -> VariableSpec:
        if self.kind == "categorical" and self.resampling not in (None, "nearest", "mode"):
            raise ValueError(
                f"variable '{self.name}' is categorical: resampling must be nearest or mode, "
                f"not {self.resampling} (class codes must never be interpolated)"
            )
        if (self.qa_asset is None) != (self.qa_keep is None):
            raise ValueError(f"variable '{self.name}': qa_asset and qa_keep go together")
        if self.valid_range is not None and self.valid_range[0] > self.valid_range[1]:
            raise ValueError(f"variable '{self.name}': valid_range must be [min, max]")
        if self.physical_range is not None and self.physical_range[0] > self.physical_range[1]:
            raise ValueError(f"variable '{self.name}': physical_range must be [min, max]")
        if self.derive is not None:
            roles = {"ndvi": {"red", "nir"}, "nirv": {"red", "nir"}, "vpd": {"t", "td"}}[self.derive]
            if not self.inputs or set(self.inputs) != roles:
                raise ValueError(
                    f"variable '{self.name}': derive={self.derive} needs inputs with roles {sorted(roles)}"
                )
            if self.asset not in self.inputs.values():
                raise ValueError(f"variable '{self.name}': asset must be one of the derived inputs")
        elif self.inputs is not None:
            raise ValueError(f"variable '{self.name}': inputs need derive")
        return self


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line for a pydantic error: ``<source>: <dotted key>: <reason> (+N more)``."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def read_yaml(path: Path, error: type[GeofluxError], what: str) -> Any:
    """``yaml.safe_load`` of a file; an unreadable file or bad YAML raises ``error`` naming the file."""
    try:
        text = path.read_text()
    except IsADirectoryError:
        raise error(f"{path}: is a folder (expected a YAML {what} file)") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a text file (byte {exc.start} is not UTF-8; expected YAML)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
