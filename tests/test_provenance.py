"""Map outputs always match their provenance: tags vs. the run that made them, STAC items vs. the files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pystac
import pytest
import rasterio

from geoflux import pipeline
from geoflux.config import load_config


def _sha(run: Path) -> str:
    return json.loads((run / "model" / "model.json").read_text())["sha256"]


def _catalog_vs_files(run: Path) -> list[tuple[str, str, str]]:
    """(asset file, item's model_sha256, file's model_sha256) for every asset of every map STAC item."""
    cat = pystac.read_file(str(run / "maps" / "catalog.json"))
    rows = []
    for item in cat.get_items(recursive=True):
        for asset in item.assets.values():
            path = asset.get_absolute_href()
            with rasterio.open(path) as src:
                tags = src.tags()
            assert item.properties["geoflux:input_items"] == tags["input_items"].split(",")
            rows.append((path, item.properties["geoflux:model_sha256"], tags["model_sha256"]))
    return rows


def _retrained(run: Path):
    """The run's config with another model seed, and the model retrained with it."""
    cfg = load_config(run / "config.yaml")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"seed": cfg.model.seed + 1})})
    old = _sha(run)
    pipeline.stage_train(cfg)
    assert _sha(run) != old, "retraining with another seed should give another model"
    return cfg, old


@pytest.fixture()
def run(tiny_run, tmp_path) -> Path:
    src, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_map_after_retrain_redoes_maps_and_catalog_describes_files(run):
    maps = sorted((run / "maps").glob("*.tif"))
    assert maps and all(sha == tag for _, sha, tag in _catalog_vs_files(run))
    cfg, old = _retrained(run)
    new = _sha(run)
    said: list[str] = []
    pipeline.stage_map(cfg, progress=False, echo=said.append)  # no --overwrite: resume semantics
    rows = _catalog_vs_files(run)
    assert len(rows) == len(maps)  # every band of every period is in the catalog
    assert all(sha == tag == new for _, sha, tag in rows), {r for r in rows if r[2] != new}
    for p in maps:
        with rasterio.open(p) as src:
            assert src.tags()["model_sha256"] == new, p
    assert any("model_sha256 differs" in m for m in said)
    # a second run with the same model is a pure resume: nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in maps}
    pipeline.stage_map(cfg, progress=False)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert old != new


def test_interrupted_remap_never_leaves_a_catalog_naming_another_model(run, monkeypatch):
    from geoflux.cog import COGStream

    cfg, _ = _retrained(run)
    finish = COGStream.finish
    calls = []

    def finish_then_die(self):
        if calls:
            self.abort()  # as if the user stopped the run after the first redone step
            raise KeyboardInterrupt
        calls.append(1)
        return finish(self)

    monkeypatch.setattr(COGStream, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.stage_map(cfg, progress=False, workers=1)
    monkeypatch.undo()
    # some maps are new, the others old: no catalog is better than one that describes the replaced files
    shas = set()
    for p in (run / "maps").glob("nee_*.tif"):
        with rasterio.open(p) as src:
            shas.add(src.tags()["model_sha256"])
    assert len(shas) == 2
    catalog = run / "maps" / "catalog.json"
    assert not catalog.exists() or all(sha == tag for _, sha, tag in _catalog_vs_files(run))
    for p in (run / "maps").glob("*.tif"):  # whatever a *.tif glob finds is a finished map
        with rasterio.open(p) as src:
            src.read(1)
    pipeline.stage_map(cfg, progress=False)
    assert all(sha == tag == _sha(run) for _, sha, tag in _catalog_vs_files(run))


def test_input_items_are_the_items_the_cube_loaded(tiny_world):
    """A driver's own query drops a scene: ``input_items`` must not name it (no second, broader search)."""
    from geoflux.cube import cube_from_config
    from geoflux.mapping.products import input_item_ids

    cfg = load_config(tiny_world / "config.yaml")
    dropped = pd.Timestamp("2021-03-14")
    variables = [
        v.model_copy(update={"query": {"datetime": {"neq": f"{dropped:%Y-%m-%dT%H:%M:%SZ}"}}})
        if v.name == "ndvi"
        else v
        for v in cfg.variables
    ]
    cfg = cfg.model_copy(update={"variables": variables})
    ids = input_item_ids(cube_from_config(cfg), cfg.periods(), cfg.time.step)
    # expected, independently: every item of every driver collection in the world catalog by its own time
    cat = pystac.read_file(str(tiny_world / "world" / "catalog.json"))
    step = pd.Timedelta(cfg.time.step)
    for p in cfg.periods():
        want = set()
        for v in cfg.variables:
            for item in cat.get_child(v.collection).get_items():
                t = pd.Timestamp(item.datetime).tz_localize(None)
                if v.static or (p <= t < p + step and not (v.name == "ndvi" and t == dropped)):
                    want.add(item.id)
        assert set(ids[p].split(",")) == want, p
    assert "ndvi-20210314" not in ids[dropped] and "sw-20210314" in ids[dropped]


def test_demo_refuses_a_non_empty_folder(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own config\n")
    before = {p: p.read_bytes() for p in out.rglob("*")}
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--size", "tiny"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines == [f"error: {out}: folder is not empty (expected a new or empty folder, or --overwrite)"]
    assert {p: p.read_bytes() for p in out.rglob("*")} == before  # nothing written, nothing replaced
