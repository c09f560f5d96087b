"""Catalog definitions (``catalogs/*.yaml``): which collection/asset of which catalog holds a driver.

A definition is data, one file per collection::

    catalog: https://planetarycomputer.microsoft.com/api/stac/v1   # STAC API URL, static catalog, parquet
    signing: planetary-computer                                     # optional
    collection: modis-13A1-061
    query: {platform: {eq: terra}}                                  # optional search filters
    variables:
      ndvi:
        asset: 500m_16_days_NDVI
        scale: 0.0001                                               # physical = raw * scale + offset
        convert: kgC_per_8d_to_gC_per_d                             # optional named unit conversion after it
        nodata: -3000
        units: "1"
        valid_range: [-0.2, 1.0]                                    # physical units; outside: masked
        physical_range: [-1.0, 1.0]                                 # outside (after masking): reported
        qa: {asset: 500m_16_days_VI_Quality, bits: {"0-1": [0, 1]}} # keep MODLAND QA 0 or 1
        aggregation: max
        resampling: bilinear
      nirv: {derive: nirv, inputs: {red: ..., nir: ...}, ...}

:func:`load_definition` schema-checks a file (one-line :class:`CatalogError` naming the file, key and
reason); :func:`variable_specs` turns it into :class:`geoflux.config.VariableSpec` objects;
:func:`check_items` checks a definition against real items of its collection (asset keys, raster
scale/offset, nodata against the data type, CRS present).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pystac
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoflux.catalog.search import is_gridded, item_crs
from geoflux.catalog.variables import VariableSpec, format_validation_error, read_yaml
from geoflux.errors import CatalogError

CATALOGS_DIR = Path(__file__).resolve().parents[2] / "catalogs"
# Roles each derived variable needs, in the order the first one names the variable's primary asset.
DERIVED_ROLES: dict[str, tuple[str, ...]] = {
    "ndvi": ("nir", "red"),
    "nirv": ("nir", "red"),
    "vpd": ("t", "td"),
}
_DTYPE_RANGE = {
    "int8": (-(2**7), 2**7 - 1),
    "uint8": (0, 2**8 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}
# keys a run-config entry naming a definition may set on top of it
_ENTRY_OVERRIDES = ("on_implausible", "missing_max", "physical_range")
KELVIN_OFFSET = -273.15  # K -> degC: a definition may convert a Kelvin product to degC


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QADef(_Strict):
    """A QA/cloud mask: which asset, and which values (or bit fields) mark a usable pixel."""

    asset: str
    bits: dict[str, list[int]] | None = Field(
        default=None, description="bit field 'first-last' (or 'n') -> field values to keep; all must pass"
    )
    values: list[int] | None = Field(default=None, description="whole QA values to keep (class layers, SCL)")

    @field_validator("bits")
    @classmethod
    def _fields(cls, v: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if v is None:
            return v
        used = 0
        for key, keep in v.items():
            first, last = _bit_range(key)
            width = last - first + 1
            mask = ((1 << width) - 1) << first
            if used & mask:
                raise ValueError(f"bit field '{key}' overlaps another field")
            used |= mask
            bad = [k for k in keep if not 0 <= k < (1 << width)]
            if bad or not keep:
                raise ValueError(f"bit field '{key}' ({width} bits) cannot hold values {bad or keep}")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> QADef:
        if (self.bits is None) == (self.values is None):
            raise ValueError("give exactly one of 'bits' (bit fields) or 'values' (whole QA values)")
        return self

    def compiled(self) -> tuple[int | None, list[int]]:
        """(mask, keep): a pixel is usable when ``qa & mask`` is in ``keep`` (mask None: the whole value)."""
        if self.values is not None:
            return None, sorted(set(self.values))
        mask = 0
        choices = []
        for key, keep in (self.bits or {}).items():
            first, last = _bit_range(key)
            mask |= ((1 << (last - first + 1)) - 1) << first
            choices.append([k << first for k in keep])
        return mask, sorted({sum(c) for c in itertools.product(*choices)})


def _bit_range(key: str) -> tuple[int, int]:
    try:
        a, _, b = str(key).partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        raise ValueError(f"bit field '{key}' is not 'n' or 'first-last'") from None
    if not 0 <= first <= last < 64:
        raise ValueError(f"bit field '{key}' must satisfy 0 <= first <= last < 64")
    return first, last


class VariableDef(_Strict):
    """One driver inside a definition (see the module docstring)."""

    asset: str | None = None
    derive: Literal["ndvi", "nirv", "vpd"] | None = None
    inputs: dict[str, str] | None = None
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    units: str = ""
    kind: Literal["continuous", "categorical"] = "continuous"
    classes: list[int] | None = None
    valid_range: tuple[float, float] | None = None
    physical_range: tuple[float, float] | None = Field(
        default=None, description="physically possible [min, max]; values left outside it are reported"
    )
    missing_max: float = Field(default=0.5, ge=0.0, le=1.0)
    qa: QADef | None = None
    aggregation: Literal["mean", "median", "max", "min", "sum", "daytime_mean"] = "mean"
    resampling: Literal["nearest", "mode", "bilinear", "cubic", "average", "min", "max", "med"] | None = None
    max_gap: int = Field(default=0, ge=0)
    convert: str | None = Field(
        default=None,
        description="named unit conversion after scale/offset (geoflux.catalog.variables.CONVERTERS)",
    )
    store_variable: str | None = Field(default=None, description="Zarr/NetCDF: variable inside the store")
    timestamp: Literal["instant", "end"] = Field(
        default="instant",
        description="Zarr/NetCDF: 'end' for values stamped at the end of their accumulation",
    )
    query: dict[str, dict[str, Any]] | None = Field(default=None, description="merged over the file's query")
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> VariableDef:
        if self.derive is None:
            if not self.asset:
                raise ValueError("needs 'asset' (or 'derive' with 'inputs')")
            if self.inputs is not None:
                raise ValueError("'inputs' only go with 'derive'")
        else:
            roles = set(DERIVED_ROLES[self.derive])
            if self.asset is not None:
                raise ValueError("a derived variable takes 'inputs', not 'asset'")
            if not self.inputs or set(self.inputs) != roles:
                raise ValueError(f"derive: {self.derive} needs inputs with roles {sorted(roles)}")
        if self.kind == "categorical":
            if not self.classes:
                raise ValueError("categorical needs 'classes' (list of class codes)")
            if self.resampling not in (None, "nearest", "mode"):
                raise ValueError(
                    f"categorical resampling must be nearest or mode, not {self.resampling} "
                    "(class codes must never be interpolated)"
                )
            if self.derive is not None:
                raise ValueError("a categorical variable cannot be derived")
        for key in ("valid_range", "physical_range"):
            rng = getattr(self, key)
            if rng is not None and not rng[0] <= rng[1]:
                raise ValueError(f"{key} must be [min, max]")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError("scale must be finite and non-zero")
        if self.convert is not None:
            from geoflux.catalog.variables import CONVERTERS

            if self.convert not in CONVERTERS:
                raise ValueError(
                    f"convert: unknown converter {self.convert!r} (expected one of {', '.join(CONVERTERS)})"
                )
            if self.kind == "categorical":
                raise ValueError("a categorical variable cannot be converted")
        return self

    @property
    def assets(self) -> list[str]:
        """Data assets this variable reads (inputs for derived variables), without the QA asset."""
        if self.derive is not None:
            return [self.inputs[r] for r in DERIVED_ROLES[self.derive]]  # type: ignore[index]
        return [self.asset]  # type: ignore[list-item]


class CatalogDef(_Strict):
    """A catalog definition file: one collection of one catalog and the drivers it provides."""

    catalog: str = Field(description="STAC API URL, static catalog.json path or stac-geoparquet path")
    collection: str
    description: str = ""
    signing: Literal["planetary-computer"] | None = None
    static: bool = Field(default=False, description="time-invariant collection (elevation, land cover)")
    query: dict[str, dict[str, Any]] | None = None
    filter: dict[str, Any] | None = None
    variables: dict[str, VariableDef]
    name: str = Field(default="", description="set from the file name on load")

    @field_validator("variables")
    @classmethod
    def _some(cls, v: dict[str, VariableDef]) -> dict[str, VariableDef]:
        if not v:
            raise ValueError("at least one variable is needed")
        return v

    @field_validator("query")
    @classmethod
    def _query_ops(cls, v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        return _check_query(v)


def _check_query(v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    from geoflux.catalog.search import _QUERY_OPS

    for prop, ops in (v or {}).items():
        bad = sorted(set(ops) - set(_QUERY_OPS))
        if bad:
            raise ValueError(f"query on '{prop}': unknown operator(s) {bad} (expected {sorted(_QUERY_OPS)})")
    return v


def definition_from_dict(data: Any, source: str = "<definition>", name: str = "") -> CatalogDef:
    """Schema-check a mapping into a :class:`CatalogDef`.

    Raises
    ------
    CatalogError
        ``<source>: <key>: <reason>`` for the first offending key.
    """
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "name" in data:
        raise CatalogError(f"{source}: name: unknown key (it is set from the file name)")
    for vname, vdef in (data.get("variables") or {}).items():
        if isinstance(vdef, dict) and "query" in vdef:
            try:
                _check_query(vdef["query"])
            except ValueError as exc:
                raise CatalogError(f"{source}: variables.{vname}.query: {exc}") from None
    try:
        return CatalogDef.model_validate({**data, "name": name})
    except ValidationError as err:
        raise CatalogError(format_validation_error(source, err)) from None


def load_definition(path: str | Path) -> CatalogDef:
    """Read and schema-check one ``catalogs/*.yaml`` file (named by its stem)."""
    path = Path(path)
    data = read_yaml(path, CatalogError, "catalog definition")
    return definition_from_dict(data, source=str(path), name=path.stem)


def load_definitions(folder: str | Path = CATALOGS_DIR) -> dict[str, CatalogDef]:
    """Every definition in ``folder`` (default: the shipped ``catalogs/``), by file stem."""
    paths = sorted(Path(folder).glob("*.yaml"))
    if not paths:
        raise CatalogError(f"{folder}: no catalog definitions (*.yaml)")
    return {p.stem: load_definition(p) for p in paths}


def find_definition(ref: str | Path) -> CatalogDef:
    """A definition by path or by the stem of a shipped file (e.g. ``pc-modis-13A1-061``)."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_definition(p)
    shipped = CATALOGS_DIR / f"{ref}.yaml"
    if not shipped.exists():
        have = ", ".join(sorted(q.stem for q in CATALOGS_DIR.glob("*.yaml")))
        raise CatalogError(f"{ref}: no such catalog definition (shipped: {have})")
    return load_definition(shipped)


def variable_specs(
    defn: CatalogDef,
    names: Sequence[str] | None = None,
    *,
    catalog: str | None = None,
    rename: Mapping[str, str] | None = None,
) -> list[VariableSpec]:
    """Driver specs for the run configuration from a definition.

    Parameters
    ----------
    defn : a loaded definition.
    names : variables to take (default: all, in file order).
    catalog : use this catalog instead of the definition's (e.g. a local mirror or a test server).
    rename : definition variable name -> feature name in the run.

    Raises
    ------
    CatalogError
        naming the definition and the unknown variable.
    """
    chosen = list(defn.variables) if names is None else list(names)
    unknown = [n for n in chosen if n not in defn.variables]
    if unknown:
        raise CatalogError(
            f"{defn.name or defn.collection}: no variable '{unknown[0]}' "
            f"(defined: {', '.join(defn.variables)})"
        )
    out = []
    for n in chosen:
        v = defn.variables[n]
        mask, keep = v.qa.compiled() if v.qa is not None else (None, None)
        query = {**(defn.query or {}), **(v.query or {})} or None
        out.append(
            VariableSpec(
                name=(rename or {}).get(n, n),
                collection=defn.collection,
                asset=v.assets[0],
                scale=v.scale,
                offset=v.offset,
                nodata=v.nodata,
                units=v.units,
                kind=v.kind,
                classes=v.classes,
                static=defn.static,
                catalog=catalog or defn.catalog,
                signing=defn.signing,
                query=query,
                filter=defn.filter,
                valid_range=v.valid_range,
                physical_range=v.physical_range,
                missing_max=v.missing_max,
                qa_asset=v.qa.asset if v.qa is not None else None,
                qa_mask=mask,
                qa_keep=keep,
                aggregation=v.aggregation,
                resampling=v.resampling,
                max_gap=v.max_gap,
                convert=v.convert,
                store_variable=v.store_variable,
                timestamp=v.timestamp,
                derive=v.derive,
                inputs=dict(v.inputs) if v.inputs else None,
            )
        )
    return out


def expand_variables(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Expand run-config variable entries that refer to a definition into plain variable mappings.

    An entry ``{definition: pc-modis-13A1-061, variable: ndvi, name: ndvi_modis, catalog: ...}`` becomes
    the full mapping of that variable (``name`` and ``catalog`` optional; ``on_implausible``,
    ``missing_max`` and ``physical_range`` override the definition's); other entries pass unchanged.
    Meant for a config loader: ``data["variables"] = expand_variables(data["variables"])``.
    """
    out: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        if "definition" not in e:
            out.append(dict(e))
            continue
        extra = set(e) - {"definition", "variable", "name", "catalog", *_ENTRY_OVERRIDES}
        if extra or "variable" not in e:
            why = f"unknown key '{sorted(extra)[0]}'" if extra else "'variable' is missing"
            raise CatalogError(
                f"variables.{i}: {why} (a definition entry takes definition, variable, name, catalog, "
                f"{', '.join(_ENTRY_OVERRIDES)})"
            )
        defn = find_definition(e["definition"])
        rename = {e["variable"]: e["name"]} if "name" in e else None
        (spec,) = variable_specs(defn, [e["variable"]], catalog=e.get("catalog"), rename=rename)
        # run-level choices on top of the definition; validated with the rest of the run config
        out.append({**spec.model_dump(mode="json"), **{k: e[k] for k in _ENTRY_OVERRIDES if k in e}})
    return out


# ------------------------------------------------------------------------------------------ item checks


def _raster_band(item: pystac.Item, asset: str) -> dict[str, Any]:
    bands = item.assets[asset].extra_fields.get("raster:bands") or []
    return bands[0] if bands else {}


def check_items(defn: CatalogDef, items: Iterable[pystac.Item]) -> int:
    """Check a definition against real items of its collection.

    Each item must belong to the collection, carry every asset a variable reads (data, derived inputs,
    QA) and declare a CRS; where an asset's ``raster:bands`` publish them, the definition's scale must
    match, its offset must match (or be the Kelvin -> degC conversion of it), and nodata must fit the
    band's data type.

    Returns
    -------
    The number of (item, variable) pairs checked.

    Raises
    ------
    CatalogError
        naming the definition, item, variable and asset.
    """
    n = 0
    for item in items:
        where = f"{defn.name or defn.collection}: item {item.id}"
        if item.collection_id and item.collection_id != defn.collection:
            raise CatalogError(f"{where}: belongs to '{item.collection_id}', not '{defn.collection}'")
        for vname, v in defn.variables.items():
            for key in [*v.assets, *([v.qa.asset] if v.qa else [])]:
                if key not in item.assets:
                    raise CatalogError(
                        f"{where}: variable '{vname}': no asset '{key}' "
                        f"(item has {', '.join(sorted(item.assets))})"
                    )
                if item_crs(item, key) is None and not is_gridded(item, key):
                    # Zarr/NetCDF stores carry lon/lat coordinates (CF); rasters must declare their CRS
                    raise CatalogError(f"{where}: asset '{key}': no CRS (proj:code/epsg/wkt2/projjson)")
            for key in v.assets:
                band = _raster_band(item, key)
                if "scale" in band and not math.isclose(band["scale"], v.scale, rel_tol=1e-6):
                    raise CatalogError(
                        f"{where}: variable '{vname}': asset '{key}' has scale {band['scale']}, "
                        f"definition says {v.scale} (expected the item's scale; put unit conversions in "
                        "'convert', e.g. convert: kgC_per_8d_to_gC_per_d)"
                    )
                off = band.get("offset", 0.0 if "scale" in band else None)
                if off is not None and not any(
                    math.isclose(v.offset, off + k, abs_tol=1e-6) for k in (0.0, KELVIN_OFFSET)
                ):
                    raise CatalogError(
                        f"{where}: variable '{vname}': asset '{key}' has offset {off}, definition says "
                        f"{v.offset} (only a Kelvin -> degC shift of {KELVIN_OFFSET} may be added)"
                    )
                dtype = band.get("data_type")
                if v.nodata is not None and dtype in _DTYPE_RANGE:
                    lo, hi = _DTYPE_RANGE[dtype]
                    if not lo <= v.nodata <= hi:
                        raise CatalogError(
                            f"{where}: variable '{vname}': nodata {v.nodata} does not fit asset '{key}' "
                            f"data type {dtype}"
                        )
                if "nodata" in band and v.nodata is not None and band["nodata"] != v.nodata:
                    raise CatalogError(
                        f"{where}: variable '{vname}': asset '{key}' nodata is {band['nodata']}, "
                        f"definition says {v.nodata}"
                    )
            n += 1
    return n
