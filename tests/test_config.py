"""Run configuration: validated, unknown keys and wrong types named, paths resolved against the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geoflux.config import config_from_dict, dump_config, load_config
from geoflux.errors import ConfigError

BASE = {
    "catalog": "world/catalog.json",
    "variables": [{"name": "ta", "collection": "c", "asset": "data"}],
    "towers": {"files": "t/*.csv", "sites": "sites.csv"},
    "grid": {"crs": "EPSG:32632", "resolution": 100, "bbox": [0, 0, 1000, 1000]},
    "time": {"start": "2021-01-01", "end": "2021-12-31", "step": "8D"},
}


def _with(path: str, value):
    import copy

    data = copy.deepcopy(BASE)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def test_valid_config_and_periods():
    cfg = config_from_dict(BASE, base_dir="/data/run")
    assert cfg.path(cfg.catalog) == Path("/data/run/world/catalog.json")
    periods = cfg.periods()
    assert periods[0].day_of_year == 1 and periods[1].day_of_year == 9 and len(periods) == 46


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("grid.resolution", "fine", "grid.resolution"),
        ("grid.bbox", [10, 0, 0, 10], "grid.bbox"),
        ("towers.qc_max", 7, "towers.qc_max"),
        ("time.step", "eight days", "time"),
        ("model.kind", "magic_forest", "model.kind"),
        ("grid.colour", "red", "grid.colour"),
    ],
)
def test_bad_values_name_the_key(path, value, named):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(path, value), source="run.yaml")
    msg = str(err.value)
    assert msg.startswith("run.yaml: ") and named in msg and "\n" not in msg


def test_missing_key_and_categorical_without_classes():
    data = dict(BASE)
    del data["grid"]
    with pytest.raises(ConfigError, match="grid: required key is missing"):
        config_from_dict(data)
    bad = _with("variables", [{"name": "lc", "collection": "c", "asset": "a", "kind": "categorical"}])
    with pytest.raises(ConfigError, match="classes"):
        config_from_dict(bad)


def test_roundtrip_through_yaml(tmp_path):
    cfg = config_from_dict(BASE, base_dir=tmp_path)
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert "base_dir" not in yaml.safe_load(path.read_text())
    again = load_config(path)
    assert again.model_dump(exclude={"base_dir"}) == cfg.model_dump(exclude={"base_dir"})
    assert again.base_dir == str(tmp_path.resolve())


def test_variables_from_shipped_catalog_definitions():
    data = _with("variables", [{"definition": "pc-modis-13A1-061", "variable": "ndvi", "name": "ndvi_modis"}])
    cfg = config_from_dict(data)
    (v,) = cfg.variables
    assert v.name == "ndvi_modis" and v.collection == "modis-13A1-061"
    assert v.asset == "500m_16_days_NDVI" and v.scale == pytest.approx(1e-4) and v.nodata == -3000
    assert v.signing == "planetary-computer" and v.aggregation == "max"
    bad = [{"definition": "pc-modis-13A1-061", "variable": "ndvi", "x": 1}]
    with pytest.raises(ConfigError, match=r"variables\.0"):
        config_from_dict(_with("variables", bad))
    with pytest.raises(ConfigError, match="no-such-def"):
        config_from_dict(_with("variables", [{"definition": "no-such-def", "variable": "ndvi"}]))
