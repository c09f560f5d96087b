"""Catalog definitions (catalogs/*.yaml): schema check, conversion to VariableSpec, and every shipped
definition checked against the recorded items of its collection (../shared/realdata/stac)."""

from __future__ import annotations

import copy
import json

import pystac
import pytest
import yaml
from stac_server import read_cassette

from geoflux.catalog.definitions import (
    CATALOGS_DIR,
    QADef,
    check_items,
    definition_from_dict,
    expand_variables,
    load_definition,
    load_definitions,
    variable_specs,
)
from geoflux.config import VariableSpec
from geoflux.errors import CatalogError

REQUIRED = {
    ("https://planetarycomputer.microsoft.com/api/stac/v1", "modis-13A1-061"),
    ("https://planetarycomputer.microsoft.com/api/stac/v1", "modis-11A2-061"),
    ("https://planetarycomputer.microsoft.com/api/stac/v1", "modis-15A2H-061"),
    ("https://planetarycomputer.microsoft.com/api/stac/v1", "cop-dem-glo-30"),
    ("https://planetarycomputer.microsoft.com/api/stac/v1", "era5-pds"),
    ("https://earth-search.aws.element84.com/v1", "sentinel-2-l2a"),
    ("https://earth-search.aws.element84.com/v1", "landsat-c2-l2"),
}


@pytest.fixture(scope="module")
def recorded(realdata) -> dict[str, list[pystac.Item]]:
    """Recorded items by collection: stactools MODIS examples and the Earth Search cassette."""
    by: dict[str, list[pystac.Item]] = {}
    for f in sorted((realdata / "stac" / "modis-061").glob("*/*.json")):
        d = json.loads(f.read_text())
        if d.get("type") == "Feature":
            by.setdefault(d["collection"], []).append(pystac.Item.from_dict(d))
    for cassette in sorted((realdata / "stac" / "recorded-searches").glob("*.yaml")):
        for it in read_cassette(cassette):
            for f in it["json"].get("features", []):
                by.setdefault(f["collection"], []).append(pystac.Item.from_dict(f))
    return by


def test_shipped_definitions_load_and_cover_the_issue():
    defs = load_definitions()
    have = {(d.catalog, d.collection) for d in defs.values()}
    assert REQUIRED <= have
    assert any(d.collection in ("esa-worldcover", "io-lulc") for d in defs.values())
    for name, d in defs.items():
        specs = variable_specs(d)
        assert [s.name for s in specs] == list(d.variables), name
        for s in specs:
            assert isinstance(s, VariableSpec) and s.collection == d.collection and s.catalog == d.catalog
            if s.kind == "categorical":
                assert s.resampling in ("nearest", "mode"), f"{name}: {s.name} would be interpolated"
    lc = variable_specs(defs["pc-esa-worldcover"])[0]
    assert lc.static and lc.kind == "categorical" and 10 in lc.classes


def test_every_definition_checked_against_recorded_items(recorded):
    defs = load_definitions()
    checked = {}
    for name, d in defs.items():
        items = recorded.get(d.collection, [])
        if items:
            checked[name] = check_items(d, items)
            assert checked[name] == len(items) * len(d.variables)
    # every definition whose collection we hold recorded items of was checked (MODIS x3, S2, Landsat)
    assert set(checked) == {
        "pc-modis-13A1-061",
        "pc-modis-11A2-061",
        "pc-modis-15A2H-061",
        "earth-search-sentinel-2-l2a",
        "earth-search-landsat-c2-l2",
    }


def test_check_items_names_item_and_asset(recorded):
    d = load_definition(CATALOGS_DIR / "pc-modis-13A1-061.yaml")
    item = recorded["modis-13A1-061"][0].clone()
    wrong = definition_from_dict(
        {
            **d.model_dump(exclude={"name"}),
            "variables": {"ndvi": {**d.variables["ndvi"].model_dump(), "scale": 0.01}},
        },
        name="wrong-scale",
    )
    with pytest.raises(CatalogError, match=rf"wrong-scale: item {item.id}: variable 'ndvi'.*scale 0.0001"):
        check_items(wrong, [item])
    del item.assets["500m_16_days_VI_Quality"]
    with pytest.raises(
        CatalogError, match=rf"item {item.id}: variable 'ndvi': no asset '500m_16_days_VI_Quality'"
    ):
        check_items(d, [item])
    crsless = recorded["modis-13A1-061"][0].clone()
    for k in ("proj:wkt2", "proj:epsg", "proj:code", "proj:projjson"):
        crsless.properties.pop(k, None)
    with pytest.raises(CatalogError, match=rf"item {crsless.id}: asset '500m_16_days_NDVI': no CRS"):
        check_items(d, [crsless])
    s2 = load_definition(CATALOGS_DIR / "earth-search-sentinel-2-l2a.yaml")
    with pytest.raises(CatalogError, match="belongs to 'modis-13A1-061'"):
        check_items(s2, [recorded["modis-13A1-061"][0]])


def _base() -> dict:
    return yaml.safe_load((CATALOGS_DIR / "earth-search-sentinel-2-l2a.yaml").read_text())


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    keys = path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("colection", "x", r"colection: unknown key"),
        ("collection", _DELETE, r"collection: required key is missing"),
        ("variables", {}, r"variables: at least one variable"),
        ("variables.red.scale", "tiny", r"variables\.red\.scale: Input should be a valid number"),
        ("variables.red.aggregation", "mode", r"variables\.red\.aggregation: Input should be"),
        ("variables.red.qa", {"asset": "scl"}, r"variables\.red\.qa: give exactly one of 'bits'"),
        (
            "variables.red.qa",
            {"asset": "q", "bits": {"0-1": [4]}},
            r"variables\.red\.qa\.bits: bit field '0-1' \(2 bits\) cannot hold values \[4\]",
        ),
        (
            "variables.red.qa",
            {"asset": "q", "bits": {"0-2": [0], "2": [0]}},
            r"variables\.red\.qa\.bits: bit field '2' overlaps",
        ),
        (
            "variables.red.qa",
            {"asset": "q", "bits": {"a-b": [0]}},
            r"variables\.red\.qa\.bits: bit field 'a-b' is not 'n' or 'first-last'",
        ),
        ("variables.ndvi.inputs", {"red": "red"}, r"variables\.ndvi: derive: ndvi needs inputs with roles"),
        ("variables.red.asset", _DELETE, r"variables\.red: needs 'asset'"),
        ("variables.red.valid_range", [1.0, 0.0], r"variables\.red: valid_range must be \[min, max\]"),
        ("variables.red.physical_range", [1.0, 0.0], r"variables\.red: physical_range must be \[min, max\]"),
        (
            "variables.red.missing_max",
            1.5,
            r"variables\.red\.missing_max: Input should be less than or equal",
        ),
        ("query", {"eo:cloud_cover": {"less": 5}}, r"query: .*unknown operator"),
        ("signing", "aws", r"signing: Input should be 'planetary-computer'"),
        (
            "variables.lc",
            {"asset": "map", "kind": "categorical", "classes": [1, 2], "resampling": "bilinear"},
            r"variables\.lc: categorical resampling must be nearest or mode, not bilinear",
        ),
    ],
)
def test_malformed_definition_names_key_and_reason(path, value, pattern):
    with pytest.raises(CatalogError, match=r"^bad\.yaml: " + pattern):
        definition_from_dict(_set(_base(), path, value), source="bad.yaml")


def test_malformed_file_errors(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("catalog: [unclosed\n")
    with pytest.raises(CatalogError, match=r"broken\.yaml: not valid YAML"):
        load_definition(p)
    p.write_text("- just a list\n")
    with pytest.raises(CatalogError, match=r"broken\.yaml: expected a mapping"):
        load_definition(p)
    with pytest.raises(CatalogError, match=r"no\.yaml: cannot read"):
        load_definition(tmp_path / "no.yaml")


def test_qa_bit_fields_compile_to_mask_and_values():
    mask, keep = QADef(asset="q", bits={"0": [0], "3-4": [0], "5-7": [0, 1]}).compiled()
    assert mask == 0b11111001 and keep == [0, 0b00100000]
    mask, keep = QADef(asset="q", bits={"0-1": [0, 1], "15": [0]}).compiled()
    assert mask == 0x8003 and keep == [0, 1]
    assert QADef(asset="scl", values=[6, 4, 5]).compiled() == (None, [4, 5, 6])


def test_variable_specs_options_and_expand_variables():
    d = load_definition(CATALOGS_DIR / "pc-era5-pds.yaml")
    (vpd,) = variable_specs(d, ["vpd"], catalog="http://127.0.0.1:9/api", rename={"vpd": "vpd_era5"})
    assert vpd.name == "vpd_era5" and vpd.derive == "vpd" and vpd.catalog == "http://127.0.0.1:9/api"
    assert vpd.inputs == {"t": "air_temperature_at_2_metres", "td": "dew_point_temperature_at_2_metres"}
    assert vpd.asset == "air_temperature_at_2_metres" and vpd.query == {"era5:kind": {"eq": "an"}}
    with pytest.raises(CatalogError, match=r"pc-era5-pds: no variable 'rh'"):
        variable_specs(d, ["rh"])
    s2 = load_definition(CATALOGS_DIR / "earth-search-sentinel-2-l2a.yaml")
    (red,) = variable_specs(s2, ["red"])
    assert red.query == {"eo:cloud_cover": {"lt": 80}} and red.qa_keep == [4, 5, 6, 7] and red.qa_mask is None
    out = expand_variables(
        [
            {"name": "ta", "collection": "demo-ta", "asset": "data"},
            {"definition": "pc-modis-13A1-061", "variable": "ndvi", "name": "ndvi_modis"},
        ]
    )
    assert out[0] == {"name": "ta", "collection": "demo-ta", "asset": "data"}
    again = VariableSpec.model_validate(out[1])
    assert (
        again.name == "ndvi_modis"
        and again.asset == "500m_16_days_NDVI"
        and again.signing == "planetary-computer"
    )
    with pytest.raises(CatalogError, match=r"variables\.0: unknown key 'asset'"):
        expand_variables([{"definition": "pc-modis-13A1-061", "variable": "ndvi", "asset": "x"}])
    with pytest.raises(CatalogError, match=r"nope: no such catalog definition"):
        expand_variables([{"definition": "nope", "variable": "ndvi"}])


def test_shipped_physical_ranges_hold_the_valid_ranges():
    """Every shipped continuous driver has a physical range; a valid range inside it (values the product
    marks valid are never reported as implausible)."""
    for name, d in load_definitions().items():
        for vname, v in d.variables.items():
            if v.kind != "continuous":
                continue
            assert v.physical_range is not None, f"{name}: {vname}"
            lo, hi = v.physical_range
            if v.valid_range is not None:
                assert lo <= v.valid_range[0] <= v.valid_range[1] <= hi, f"{name}: {vname}"
    (spec,) = variable_specs(load_definitions()["pc-modis-11A2-061"], ["lst_day"])
    assert spec.physical_range == (-95.0, 95.0) and spec.missing_max == 0.5 and spec.on_implausible == "error"
    (entry,) = expand_variables(
        [
            {
                "definition": "pc-modis-11A2-061",
                "variable": "lst_day",
                "on_implausible": "warn",
                "missing_max": 0.8,
            }
        ]
    )
    spec = VariableSpec.model_validate(entry)
    assert spec.on_implausible == "warn" and spec.missing_max == 0.8 and spec.physical_range == (-95.0, 95.0)
