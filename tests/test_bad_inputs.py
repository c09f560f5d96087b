"""The bad-input suite: mutations of a small demo world through the command line.

Every case must end with exit status 1 and exactly one ``error: ...`` line that names the culprit (file,
key, column or site), no traceback, no exception escaping the CLI, and no new file in the output folder.

One shrunk tiny world is generated (and its towers stage run, so later stages have their inputs) once per
module; each case works on a private copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli

Mutation = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    """One bad input: ``mutate`` breaks a copy of the world, ``argv`` runs a command on it.

    ``{w}`` in ``argv`` and ``culprit`` stands for the copy's folder; ``culprit`` must appear in the error.
    """

    kind: str
    name: str
    argv: tuple[str, ...]
    mutate: Mutation
    culprit: str


# ---------------------------------------------------------------------------------------------- mutations


def _node(data: dict, dotted: str) -> tuple[dict | list, str | int]:
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = data
    for k in keys[:-1]:
        node = node[k]
    return node, keys[-1]


def cfg_set(dotted: str, value) -> Mutation:
    """Set a (dotted) key of config.yaml."""

    def m(w: Path) -> None:
        data = yaml.safe_load((w / "config.yaml").read_text())
        node, key = _node(data, dotted)
        node[key] = value
        (w / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    return m


def cfg_del(dotted: str) -> Mutation:
    def m(w: Path) -> None:
        data = yaml.safe_load((w / "config.yaml").read_text())
        node, key = _node(data, dotted)
        del node[key]
        (w / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    return m


def write(rel: str, content: bytes | str) -> Mutation:
    """Replace (or create) a file of the world with ``content``."""

    def m(w: Path) -> None:
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return m


def remove(rel: str) -> Mutation:
    def m(w: Path) -> None:
        p = w / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return m


def truncate(rel: str, keep: int) -> Mutation:
    def m(w: Path) -> None:
        p = w / rel
        p.write_bytes(p.read_bytes()[:keep])

    return m


def edit_text(rel: str, fn: Callable[[str], str]) -> Mutation:
    def m(w: Path) -> None:
        p = w / rel
        p.write_text(fn(p.read_text()))

    return m


def edit_json(rel: str, fn: Callable[[dict], object]) -> Mutation:
    def m(w: Path) -> None:
        p = w / rel
        data = json.loads(p.read_text())
        p.write_text(json.dumps(fn(data) or data))

    return m


def edit_sites(fn: Callable[[pd.DataFrame], pd.DataFrame | None]) -> Mutation:
    def m(w: Path) -> None:
        p = w / "world" / "sites.csv"
        df = pd.read_csv(p)
        out = fn(df)
        (df if out is None else out).to_csv(p, index=False)

    return m


def both(*ms: Mutation) -> Mutation:
    def m(w: Path) -> None:
        for f in ms:
            f(w)

    return m


def item_collection(w: Path, drop: str | None = None) -> dict:
    """The world's items as one STAC ItemCollection (FeatureCollection) with absolute hrefs."""
    import pystac

    cat = pystac.read_file(str(w / "world" / "catalog.json"))
    feats = []
    for item in cat.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        d = item.to_dict(include_self_link=False, transform_hrefs=False)
        d["links"] = []
        if drop:
            d.pop(drop, None)
        feats.append(d)
    return {"type": "FeatureCollection", "features": feats}


def as_item_collection(drop: str | None = None, only: str | None = None) -> Mutation:
    """Write world/items.json (an ItemCollection) and point the config's catalog at it."""

    def m(w: Path) -> None:
        ic = item_collection(w, drop)
        if only:
            ic["features"] = [f for f in ic["features"] if f.get("collection") == only]
        (w / "world" / "items.json").write_text(json.dumps(ic))
        cfg_set("catalog", "world/items.json")(w)

    return m


def cog_rewrite(rel: str, bands: int = 1, dtype: str | None = None) -> Mutation:
    """Rewrite a driver COG on the same grid with another band count or data type."""

    def m(w: Path) -> None:
        import numpy as np
        import rasterio

        p = w / rel
        with rasterio.open(p) as src:
            data, profile = src.read(1), src.profile
        profile.update(count=bands, dtype=dtype or profile["dtype"], driver="GTiff")
        for key in ("blockxsize", "blockysize", "tiled", "compress", "interleave"):
            profile.pop(key, None)
        with rasterio.open(p, "w", **profile) as dst:
            dst.write(np.stack([data] * bands).astype(profile["dtype"]))

    return m


TOWER = "world/towers/FLX_XX-D02_FLUXNET2015_FULLSET_HH_2021-2021_1-4.csv"
MAP = "maps/nee_20210306.tif"
NO_CHANGE: Mutation = lambda w: None  # noqa: E731


def garbage(n: int = 4096) -> bytes:
    return bytes((i * 7919 + 13) % 256 for i in range(n))


RUN = ("run", "{w}/config.yaml")  # configs are refused while loading, before any stage runs
# --overwrite: the world already holds these verbs' outputs, which they refuse to replace without it
TOWERS = ("towers", "aggregate", "{w}/config.yaml", "--overwrite")
EXTRACT = ("extract", "{w}/config.yaml", "--overwrite")  # towers outputs in place: next comes the catalog
TRAIN = ("train", "{w}/config.yaml")
ANALYZE = ("analyze", "{w}/config.yaml")
MAPS, TOWER_GLOB, SITES = "{w}/maps/*.tif", "{w}/world/towers/*.csv", "{w}/world/sites.csv"


def validate_maps(maps: str = MAPS, towers: str = TOWER_GLOB) -> tuple[str, ...]:
    return ("validate", "--maps", maps, "--towers", towers, "--sites", SITES)


COG = "world/cogs/ta/ta_20210314.tif"
STATIC_COG = "world/cogs/landcover/landcover_20000101.tif"
IN_2019 = both(cfg_set("time.start", "2019-01-01"), cfg_set("time.end", "2019-02-01"))
IN_2030 = both(cfg_set("time.start", "2030-01-01"), cfg_set("time.end", "2030-02-01"))
A_FILE = write("some_file.txt", "x")
D02_NORTH = edit_sites(lambda s: s.assign(LAT=s.LAT.where(s.SITE_ID != "XX-D02", s.LAT + 1)))
C = Case

# fmt: off
CASES: list[Case] = [
    # --- configs
    C("config", "binary", RUN, write("config.yaml", garbage()), "config.yaml"),
    C("config", "empty", RUN, write("config.yaml", ""), "config.yaml"),
    C("config", "list-not-mapping", RUN, write("config.yaml", "- a\n- b\n"), "config.yaml"),
    C("config", "scalar-not-mapping", RUN, write("config.yaml", "just some text\n"), "config.yaml"),
    C("config", "malformed-yaml", RUN, write("config.yaml", "catalog: [unclosed\n"), "config.yaml"),
    C("config", "missing-file", ("run", "{w}/nope.yaml"), NO_CHANGE, "nope.yaml"),
    C("config", "unknown-top-key", RUN, cfg_set("colour", "red"), "colour"),
    C("config", "unknown-grid-key", RUN, cfg_set("grid.resolutoin", 10), "grid.resolutoin"),
    C("config", "base-dir-given", RUN, cfg_set("base_dir", "/tmp"), "base_dir"),
    C("config", "resolution-not-number", RUN, cfg_set("grid.resolution", "fine"), "grid.resolution"),
    C("config", "resolution-negative", RUN, cfg_set("grid.resolution", -500), "grid.resolution"),
    C("config", "crs-unknown-code", RUN, cfg_set("grid.crs", "EPSG:999999"), "grid.crs"),
    C("config", "crs-garbage", RUN, cfg_set("grid.crs", "not a crs"), "grid.crs"),
    C("config", "bbox-order", RUN, cfg_set("grid.bbox", [452000, 5568000, 440000, 5580000]), "grid.bbox"),
    C("config", "bbox-three-values", RUN, cfg_set("grid.bbox", [440000, 5568000, 452000]), "grid.bbox"),
    C("config", "bbox-not-finite", RUN, cfg_set("grid.bbox", [440000, 5568000, float("inf"), 5580000]),
      "grid.bbox"),
    C("config", "bbox-metres-on-4326", RUN, cfg_set("grid.crs", "EPSG:4326"), "grid.bbox"),
    C("config", "bbox-far-off-utm", RUN, cfg_set("grid.bbox", [4.4e8, 5.5e9, 4.5e8, 5.6e9]), "grid.bbox"),
    C("config", "grid-one-pixel", RUN, cfg_set("grid.resolution", 1e6), "grid"),
    C("config", "grid-degrees-on-utm", RUN, cfg_set("grid.bbox", [8.15, 50.26, 8.33, 50.37]), "grid"),
    C("config", "grid-too-large", RUN, cfg_set("grid.resolution", 0.001), "grid"),
    C("config", "grid-over-max-pixels", RUN, cfg_set("grid.max_pixels", 100), "grid"),
    C("config", "chunk-too-small", RUN, cfg_set("grid.chunk", 4), "grid.chunk"),
    C("config", "start-not-a-date", RUN, cfg_set("time.start", "yesterday"), "time"),
    C("config", "end-before-start", RUN, cfg_set("time.end", "2020-01-01"), "time"),
    C("config", "step-words", RUN, cfg_set("time.step", "eight days"), "time"),
    C("config", "step-zero", RUN, cfg_set("time.step", "0D"), "time"),
    C("config", "step-negative", RUN, cfg_set("time.step", "-8D"), "time"),
    C("config", "time-not-mapping", RUN, cfg_set("time", 2021), "time"),
    C("config", "missing-catalog-key", RUN, cfg_del("catalog"), "catalog"),
    C("config", "missing-towers-key", RUN, cfg_del("towers"), "towers"),
    C("config", "unknown-model-kind", RUN, cfg_set("model.kind", "magic_forest"), "model.kind"),
    C("config", "model-params-list", RUN, cfg_set("model.params", [1, 2]), "model.params"),
    C("config", "cv-folds-negative", RUN, cfg_set("model.cv_folds", -1), "model.cv_folds"),
    C("config", "qc-max-out-of-range", RUN, cfg_set("towers.qc_max", 7), "towers.qc_max"),
    C("config", "no-variables", RUN, cfg_set("variables", []), "variables"),
    C("config", "duplicate-variable", RUN, cfg_set("variables.1.name", "sw"), "variables"),
    C("config", "variable-not-mapping", RUN, cfg_set("variables.0", "sw"), "variables.0"),
    C("config", "categorical-without-classes", RUN, cfg_set("variables.7.classes", None), "variables.7"),
    C("config", "unknown-footprint-method", RUN, cfg_set("footprint.method", "ellipse"), "footprint.method"),
    # --- model parameters (checked when the estimator is made, before any fit)
    C("model", "unknown-param", TRAIN, cfg_set("model.params", {"n_trees": 5}), "model.params"),
    C("model", "param-bad-value", TRAIN, cfg_set("model.params", {"max_iter": -5}), "max_iter"),
    C("model", "param-bad-type", TRAIN, cfg_set("model.params", {"max_features": "many"}), "max_features"),
    # --- tower files
    C("towers", "glob-matches-nothing", TOWERS, cfg_set("towers.files", "world/towers/FLX_NONE_*.csv"),
      "FLX_NONE_"),
    C("towers", "empty-file", TOWERS, write(TOWER, ""), "XX-D02"),
    C("towers", "header-only", TOWERS, edit_text(TOWER, lambda t: t.splitlines()[0] + "\n"), "XX-D02"),
    C("towers", "binary-file", TOWERS, write(TOWER, garbage()), "XX-D02"),
    C("towers", "no-nee-column", TOWERS, edit_text(TOWER, lambda t: t.replace("NEE_VUT_REF,", "XYZ,", 1)),
      "XX-D02"),
    C("towers", "no-timestamp-column", TOWERS,
      edit_text(TOWER, lambda t: t.replace("TIMESTAMP_START", "WHEN", 1)), "XX-D02"),
    C("towers", "truncated-last-line", TOWERS, edit_text(TOWER, lambda t: t.rstrip("\n")[:-40]), "XX-D02"),
    C("towers", "nee-not-numeric", TOWERS, edit_text(TOWER, lambda t: t.replace(",-0.", ",abc", 3)),
      "XX-D02"),
    C("towers", "timestamps-go-back", TOWERS,
      edit_text(TOWER, lambda t: t + "\n".join(t.splitlines()[1:4]) + "\n"), "XX-D02"),
    C("towers", "site-not-in-table", TOWERS, edit_sites(lambda s: s[s.SITE_ID != "XX-D02"]), "XX-D02"),
    C("towers", "outside-grid", TOWERS, D02_NORTH, "XX-D02"),
    C("towers", "no-period-in-time-range", TOWERS, IN_2019, "world/towers"),
    # --- site tables
    C("sites", "missing", TOWERS, remove("world/sites.csv"), "sites.csv"),
    C("sites", "empty", TOWERS, write("world/sites.csv", ""), "sites.csv"),
    C("sites", "binary", TOWERS, write("world/sites.csv", garbage()), "sites.csv"),
    C("sites", "no-lat-column", TOWERS, edit_sites(lambda s: s.drop(columns="LAT")), "LAT"),
    C("sites", "lat-not-number", TOWERS, edit_sites(lambda s: s.assign(LAT=["north", *s.LAT[1:]])), "LAT"),
    C("sites", "lat-empty", TOWERS, edit_sites(lambda s: s.assign(LAT=[None, *s.LAT[1:]])), "LAT"),
    C("sites", "lat-out-of-range", TOWERS, edit_sites(lambda s: s.assign(LAT=s.LAT + 60)), "LAT"),
    C("sites", "duplicate-site", TOWERS, edit_sites(lambda s: pd.concat([s, s.iloc[:1]])), "XX-D01"),
    # --- catalogs
    C("catalog", "missing", EXTRACT, cfg_set("catalog", "world/nope.json"), "nope.json"),
    C("catalog", "folder", EXTRACT, cfg_set("catalog", "world"), "world"),
    C("catalog", "binary", EXTRACT, write("world/catalog.json", garbage()), "catalog.json"),
    C("catalog", "empty", EXTRACT, write("world/catalog.json", ""), "catalog.json"),
    C("catalog", "json-not-stac", EXTRACT, write("world/catalog.json", '{"hello": 1}'), "catalog.json"),
    C("catalog", "json-list", EXTRACT, write("world/catalog.json", "[1, 2]"), "catalog.json"),
    C("catalog", "child-link-missing", EXTRACT, remove("world/demo-ta/collection.json"), "demo-ta"),
    C("catalog", "item-link-missing", EXTRACT, remove("world/demo-sw/sw-20210314"), "sw-20210314"),
    C("catalog", "item-json-truncated", EXTRACT, truncate("world/demo-sw/sw-20210314/sw-20210314.json", 100),
      "demo-sw"),
    C("catalog", "missing-collection", EXTRACT, cfg_set("variables.0.collection", "demo-nope"), "demo-nope"),
    C("catalog", "missing-asset", EXTRACT, cfg_set("variables.0.asset", "nope"), "nope"),
    C("catalog", "no-items-in-time", EXTRACT, IN_2030, "demo-sw"),
    C("catalog", "url-bad-scheme", EXTRACT, cfg_set("catalog", "ftp://example.invalid/catalog.json"), "ftp://"),
    C("catalog", "item-collection-truncated", EXTRACT,
      both(as_item_collection(), truncate("world/items.json", 500)), "items.json"),
    C("catalog", "item-collection-feature-not-item", EXTRACT, as_item_collection(drop="stac_version"),
      "items.json"),
    C("catalog", "item-collection-lacks-collection", EXTRACT, as_item_collection(only="demo-ta"), "demo-sw"),
    C("catalog", "geoparquet-missing", EXTRACT, cfg_set("catalog", "world/items.parquet"), "items.parquet"),
    C("catalog", "geoparquet-garbage", EXTRACT,
      both(write("world/items.parquet", garbage()), cfg_set("catalog", "world/items.parquet")),
      "items.parquet"),
    # --- driver rasters
    C("raster", "cog-missing", EXTRACT, remove(COG), "ta_20210314.tif"),
    C("raster", "cog-garbage", EXTRACT, write(COG, garbage()), "ta_20210314.tif"),
    C("raster", "cog-empty", EXTRACT, write(COG, b""), "ta_20210314.tif"),
    C("raster", "cog-is-folder", EXTRACT, both(remove(COG), write(COG + "/x", "")), "ta_20210314.tif"),
    C("raster", "static-cog-garbage", EXTRACT, write(STATIC_COG, garbage()), "landcover_20000101.tif"),
    # --- output folders
    C("output", "under-a-file", RUN, both(A_FILE, cfg_set("output", "some_file.txt/out")), "some_file.txt"),
    C("output", "deep-under-a-file", TOWERS, both(A_FILE, cfg_set("output", "some_file.txt/a/b")),
      "some_file.txt"),
    C("output", "is-a-file", TOWERS, both(A_FILE, cfg_set("output", "some_file.txt")), "some_file.txt"),
    C("output", "under-proc", RUN, cfg_set("output", "/proc/geoflux-out"), "/proc/geoflux-out"),
    C("output", "analyze-out-under-a-file", (*ANALYZE, "--out", "{w}/some_file.txt/analysis"), A_FILE,
      "some_file.txt"),
    C("output", "validate-out-under-a-file", (*validate_maps(), "--out", "{w}/some_file.txt/v"), A_FILE,
      "some_file.txt"),
    # --- stages run before their prerequisite
    C("rerun", "extract-before-towers", EXTRACT, remove("towers"), "geoflux towers"),
    C("rerun", "train-before-extract", TRAIN, remove("training"), "geoflux extract"),
    C("rerun", "map-before-train", ("map", "{w}/config.yaml"), NO_CHANGE, "geoflux train"),
    C("rerun", "validate-before-train", ("validate", "{w}/config.yaml"), NO_CHANGE, "model.skops"),
    C("rerun", "report-before-validate", ("report", "{w}/config.yaml"), NO_CHANGE, "geoflux validate"),
    C("rerun", "analyze-before-extract", ANALYZE, remove("training"), "geoflux extract"),
    C("rerun", "analyze-before-train", ANALYZE, NO_CHANGE, "geoflux train"),
    # --- validate --maps on maps made elsewhere (the world's truth maps stand in for a product)
    C("validate", "no-match", validate_maps(maps="{w}/maps/none_*.tif"), NO_CHANGE, "none_*.tif"),
    C("validate", "truncated-tif", validate_maps(), truncate(MAP, 2000), "nee_20210306.tif"),
    C("validate", "text-as-tif", validate_maps(), write(MAP, "not a raster\n"), "nee_20210306.tif"),
    C("validate", "garbage-as-tif", validate_maps(), write(MAP, garbage()), "nee_20210306.tif"),
    C("validate", "empty-tif", validate_maps(), write(MAP, b""), "nee_20210306.tif"),
    C("validate", "folder-as-tif", validate_maps(), both(remove(MAP), write(MAP + "/x", "")),
      "nee_20210306.tif"),
    C("validate", "no-date-in-name", validate_maps(maps="{w}/maps/*"), write("maps/readme.txt", "hi"),
      "readme.txt"),
    C("validate", "towers-no-match", validate_maps(towers="{w}/world/towers/none_*.csv"), NO_CHANGE,
      "none_*.csv"),
    C("validate", "sites-no-lon", validate_maps(), edit_sites(lambda s: s.drop(columns="LON")), "LON"),
]

# Cases whose fix lives on another engineer's branch: they fail (or pass silently) here. After merging that
# branch, move them into CASES (and adjust the expected culprit to the message the fix chose).
CASES += [
    # raster checks: garbage/truncated raster, band count, dtype; configured nodata
    C("raster", "cog-truncated", EXTRACT, truncate(COG, 1500), "ta_20210314.tif"),  # GDAL names no file
    C("raster", "cog-two-bands", EXTRACT, cog_rewrite(COG, bands=2), "ta_20210314.tif"),  # accepted silently
    C("raster", "nodata-outside-dtype", EXTRACT, cfg_set("variables.1.nodata", -99999.0), "nodata"),
    # site table heights: negative heights refused
    C("sites", "height-negative", TOWERS, edit_sites(lambda s: s.assign(HEIGHT_MEAS=-s.HEIGHT_MEAS)),
      "HEIGHT_MEAS"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo world shrunk (24x24 px, 3 steps, 5 towers) with its towers stage run; do not modify."""
    from geoflux import pipeline
    from geoflux.config import load_config
    from geoflux.demo import WORLD_SIZES, write_world

    out = tmp_path_factory.mktemp("badinput") / "world0"
    write_world(out, replace(WORLD_SIZES["tiny"], nx=24, ny=24, n_steps=3, n_towers=5))
    cfg = load_config(out / "config.yaml")
    pipeline.stage_towers(cfg)
    pipeline.stage_extract(cfg)
    # the truth COGs stand in for a map product made elsewhere (validate --maps)
    shutil.copytree(out / "world" / "truth", out / "maps")
    return out


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check(case: Case, world: Path, tmp_path: Path) -> str:
    w = tmp_path / "w"
    shutil.copytree(world, w)
    case.mutate(w)
    before = _snapshot(w)
    argv = [a.replace("{w}", str(w)) for a in case.argv]
    res = CliRunner().invoke(cli, argv)
    out = res.output  # stdout and stderr interleaved
    assert "Traceback" not in out, out
    # an exception object escaping the command (anything but sys.exit) is a crash, not a clean refusal
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 1, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert errors[0] in res.stderr.splitlines()
    assert "internal error" not in errors[0], errors[0]
    assert case.culprit.replace("{w}", str(w)) in errors[0], errors[0]
    new = sorted(_snapshot(w) - before)
    assert not new, f"new files after a refused input: {new}"
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{c.name}" for c in CASES])
def test_bad_input_is_one_line(case: Case, small_world: Path, tmp_path: Path) -> None:
    _check(case, small_world, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(small_world: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    case = Case("output", "read-only", RUN, cfg_set("output", str(ro / "out")), str(ro))
    try:
        _check(case, small_world, tmp_path)
    finally:
        ro.chmod(0o700)


def test_case_list_is_large_and_unique() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(set(ids)) == len(ids)
    assert len(CASES) >= 60


# ------------------------------------------------------------------------------ what is accepted, not refused


def test_item_collection_is_searched_like_the_static_catalog(small_world: Path, tmp_path: Path) -> None:
    from geoflux.catalog import search_items
    from geoflux.errors import CatalogError

    ic = item_collection(small_world)
    for f in ic["features"]:  # relative hrefs resolve against the file's folder
        for a in f["assets"].values():
            a["href"] = os.path.relpath(a["href"], small_world / "world")
    path = small_world / "world" / "items.json"
    tmp = tmp_path / "world"
    shutil.copytree(small_world / "world", tmp)
    (tmp / "items.json").write_text(json.dumps(ic))
    bbox = (8.15, 50.26, 8.33, 50.37)
    kw = {"bbox": bbox, "start": "2021-03-06", "end": "2021-03-29"}
    static = search_items(str(tmp / "catalog.json"), "demo-ta", **kw)
    found = search_items(str(tmp / "items.json"), "demo-ta", **kw)
    assert [i.id for i in found] == [i.id for i in static] and len(found) == 3
    assert all(i.collection_id == "demo-ta" for i in found)
    assert Path(found[0].assets["data"].href).is_file()
    one = search_items(str(tmp / "items.json"), "demo-ta", bbox=bbox, start="2021-03-15", end="2021-03-16")
    assert [i.id for i in one] == ["ta-20210314"]
    static_one = search_items(str(tmp / "items.json"), "demo-elevation", static=True, **kw)
    assert len(static_one) == 1
    with pytest.raises(CatalogError, match="no items intersect"):
        search_items(str(tmp / "items.json"), "demo-ta", bbox=(100.0, 10.0, 101.0, 11.0))
    assert not path.exists()


def test_extract_runs_on_an_item_collection(small_world: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(small_world, w)
    remove("training")(w)
    as_item_collection()(w)
    res = CliRunner().invoke(cli, ["extract", str(w / "config.yaml")])
    assert res.exit_code == 0, res.output
    assert (w / "training" / "training.parquet").is_file()


def test_unquoted_yaml_dates_are_accepted(small_world: Path, tmp_path: Path) -> None:
    from geoflux.config import load_config

    w = tmp_path / "w"
    w.mkdir()
    text = (small_world / "config.yaml").read_text()
    for key, day in (("start", "2021-03-06"), ("end", "2021-03-29")):
        text = text.replace(f"{key}: '{day}'", f"{key}: {day}")
    assert "start: 2021-03-06\n" in text
    (w / "config.yaml").write_text(text)
    cfg = load_config(w / "config.yaml")
    assert (cfg.time.start, cfg.time.end) == ("2021-03-06", "2021-03-29")
    assert len(cfg.periods()) == 3


@pytest.mark.parametrize(
    ("grid", "ok"),
    [
        ({"crs": "EPSG:32632", "resolution": 250, "bbox": [0, 0, 1000, 1000]}, True),  # 4 x 4: the smallest
        ({"crs": "EPSG:32632", "resolution": 250, "bbox": [0, 0, 750, 1000]}, False),  # 3 x 4
        ({"crs": "EPSG:4326", "resolution": 0.01, "bbox": [-180, -90, 180, 90]}, True),  # the whole globe
        ({"crs": "EPSG:4326", "resolution": 0.01, "bbox": [-181, -10, 10, 10]}, False),
        ({"crs": "EPSG:32632", "resolution": 100, "bbox": [-4e5, 0, 1.4e6, 9e6]}, True),  # past the zone edge
        ({"crs": "EPSG:32632", "resolution": 1, "bbox": [0, 0, 100, 100], "max_pixels": 10_000}, True),
        ({"crs": "EPSG:32632", "resolution": 1, "bbox": [0, 0, 100, 101], "max_pixels": 10_000}, False),
        ({"crs": "EPSG:32632", "resolution": 1, "bbox": [0, 0, 100, 100], "max_pixels": "1e4"}, True),
    ],
)
def test_grid_limits(grid: dict, ok: bool) -> None:
    from geoflux.config import GridSpec

    if ok:
        GridSpec.model_validate(grid)
    else:
        with pytest.raises(ValueError, match=r"pixels|degrees"):
            GridSpec.model_validate(grid)
