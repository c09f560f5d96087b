"""The map product as users load it: one Zarr cube, VRT stacks, STAC that tools read, typed COGs, CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor the CF checks use)
import xarray as xr
from click.testing import CliRunner

from cli.main import cli
from geoflux.config import load_config

BANDS = {"NEE": "nee", "NEE_q05": "nee-q05", "NEE_q95": "nee-q95", "DI": "di", "AOA": "aoa"}


def _cog(run: Path, band: str, p: pd.Timestamp) -> np.ndarray:
    """A map COG read with rasterio alone: float64, NaN where the file's nodata is."""
    with rasterio.open(run / "maps" / f"{BANDS[band]}_{p:%Y%m%d}.tif") as src:
        return src.read(1, masked=True).astype("float64").filled(np.nan)


@pytest.fixture()
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run that a test may change."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run[0], dst)
    return dst


def test_zarr_cube_is_one_cf_dataset_equal_to_the_cogs(tiny_run):
    out, _ = tiny_run
    periods = load_config(out / "config.yaml").periods()
    ds = xr.open_zarr(out / "maps" / "nee.zarr")
    assert set(ds.data_vars) >= set(BANDS) and ds.sizes["time"] == len(periods) == 16
    assert list(ds.time.values) == list(periods.values)
    # time_bnds: each period's start and end (8 days later)
    bnds = ds.time_bnds.values
    assert ds.time.attrs["bounds"] == "time_bnds"
    assert (bnds[:, 0] == periods.values).all() and (bnds[:, 1] - bnds[:, 0] == np.timedelta64(8, "D")).all()
    assert ds.NEE.attrs["units"] == "gC m-2 d-1" and ds.DI.attrs["units"] == "1"
    assert ds.NEE.encoding["_FillValue"] == -9999 and ds.AOA.encoding["_FillValue"] == 255
    assert ds.AOA.encoding["dtype"] == np.uint8
    assert ds.NEE.attrs["grid_mapping"] == "spatial_ref" and ds.rio.crs.to_epsg() == 32632
    with rasterio.open(out / "maps" / f"nee_{periods[0]:%Y%m%d}.tif") as src:
        tags = src.tags()
        x0, y0 = src.xy(0, 0)
    assert float(ds.x[0]) == pytest.approx(x0) and float(ds.y[0]) == pytest.approx(y0)
    assert ds.attrs["model_sha256"] == tags["model_sha256"] and ds.attrs["Conventions"].startswith("CF-")
    for t in (0, 7, 15):
        for band in BANDS:
            np.testing.assert_array_equal(
                ds[band].isel(time=t).values.astype("float64"), _cog(out, band, periods[t])
            )
    # chunked one time step at a time
    assert ds.NEE.data.chunksize[0] == 1


def test_time_stacked_vrt_has_one_band_per_period(tiny_run):
    out, _ = tiny_run
    periods = load_config(out / "config.yaml").periods()
    with rasterio.open(out / "maps" / "nee.vrt") as v:
        assert v.count == 16 and v.descriptions == tuple(f"{p:%Y-%m-%d}" for p in periods)
        assert v.nodata == -9999 and v.units[0] == "gC m-2 d-1"
        np.testing.assert_array_equal(
            v.read(5, masked=True).astype("float64").filled(np.nan), _cog(out, "NEE", periods[4])
        )
    with rasterio.open(out / "maps" / "aoa.vrt") as v:
        assert v.dtypes[0] == "uint8" and v.nodata == 255


def test_cogs_are_typed_and_tagged_honestly(tiny_run):
    out, _ = tiny_run
    cfg = load_config(out / "config.yaml")
    p = cfg.periods()[2]
    quantities = set()
    for band, stem in BANDS.items():
        with rasterio.open(out / "maps" / f"{stem}_{p:%Y%m%d}.tif") as src:
            tags = src.tags()
            if band == "AOA":
                assert src.dtypes[0] == "uint8" and src.nodata == 255
                assert set(np.unique(src.read(1))) <= {0, 1, 255}
            else:
                assert src.dtypes[0] == "float32" and src.nodata == -9999
        quantities.add(tags["quantity"])
        assert tags["band"] == band and tags["period_start"] == f"{p:%Y-%m-%d}"
        assert tags["period_end"] == f"{p + pd.Timedelta('8D'):%Y-%m-%d}"
        assert pd.Timestamp(tags["created"]).tzinfo is not None
        # the config hash, recomputed here from the config file
        assert tags["config_sha256"] == hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()
        assert tags["catalog"].startswith("file://")
        assert Path(tags["catalog"][len("file://") :]) == (out / "world" / "catalog.json").resolve()
    assert len(quantities) == 5  # DI and AOA are not tagged as NEE
    assert not any("net ecosystem exchange" in q for q in quantities if q.startswith(("dissim", "area")))


def _core_validator(kind: str):
    """jsonschema validator of the STAC 1.1 core schema shipped in pystac (no network).

    Extension schemas (projection, raster) are not shipped with pystac; they are not validated here.
    """
    from jsonschema import Draft7Validator
    from pystac.validation.local_validator import get_local_schema_cache
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    cache = get_local_schema_cache()
    reg = Registry().with_resources(
        [(u, Resource.from_contents(s, default_specification=DRAFT7)) for u, s in cache.items()]
    )
    return Draft7Validator(
        cache[f"https://schemas.stacspec.org/v1.1.0/{kind}-spec/json-schema/{kind}.json"], registry=reg
    )


def test_stac_validates_and_describes_bands_roles_and_extent(tiny_run):
    out, _ = tiny_run
    cat = pystac.read_file(str(out / "maps" / "catalog.json"))
    coll = cat.get_child("geoflux-nee")
    items = sorted(coll.get_items(), key=lambda i: i.datetime)
    item_v, coll_v = _core_validator("item"), _core_validator("collection")
    for item in items:
        assert not list(item_v.iter_errors(item.to_dict())), item.id
    assert not list(coll_v.iter_errors(coll.to_dict()))
    bad = json.loads(json.dumps(items[0].to_dict()))  # to_dict shares nested lists with the item
    bad["assets"]["data"]["bands"][0]["data_type"] = "float99"
    assert list(item_v.iter_errors(bad))  # the validator does check band fields
    a = items[0].assets
    assert (
        a["data"].roles == ["data"]
        and a["nee-q05"].roles == ["uncertainty"]
        and a["aoa"].roles == ["quality"]
    )
    assert a["data"].extra_fields["bands"][0] | {"description": ""} == {
        "name": "NEE",
        "description": "",
        "data_type": "float32",
        "nodata": -9999,
        "unit": "gC m-2 d-1",
    }
    assert a["aoa"].extra_fields["raster:bands"][0]["data_type"] == "uint8"
    assert a["aoa"].extra_fields["raster:bands"][0]["nodata"] == 255
    assert set(coll.item_assets) == {"data", *list(BANDS.values())[1:]}
    assert coll.license == "CC-BY-4.0" and coll.get_single_link("license") is not None
    assert coll.providers and coll.summaries.get_list("geoflux:bands") == sorted(BANDS)
    # the temporal extent ends where the last period ends, not where it starts
    last = load_config(out / "config.yaml").periods()[-1] + pd.Timedelta("8D")
    assert pd.Timestamp(coll.extent.temporal.intervals[0][1]).tz_localize(None) == last
    zarr = coll.assets["zarr"]
    assert Path(zarr.get_absolute_href()) == (out / "maps" / "nee.zarr").resolve()


def test_odc_stac_loads_the_maps_with_nodata_and_units(tiny_run):
    import odc.stac

    out, _ = tiny_run
    items = list(pystac.read_file(str(out / "maps" / "catalog.json")).get_child("geoflux-nee").get_items())
    ds = odc.stac.load(items, chunks={})
    assert ds["data"].attrs["nodata"] == -9999 and ds["aoa"].attrs["nodata"] == 255
    assert ds["aoa"].dtype == np.uint8 and ds["data"].dtype == np.float32
    # odc-stac parses the asset's unit (odc-loader 0.6 does not copy units into .attrs)
    parsed = next(iter(odc.stac.parse_items(items[:1])))
    units = {k[0]: b.units for k, b in parsed.collection.bands.items()}
    assert units["data"] == "gC m-2 d-1" and units["di"] == "1"
    p = pd.Timestamp(ds.time.values[3])
    got = ds["data"].isel(time=3).values.astype("float64")
    np.testing.assert_array_equal(np.where(got == -9999, np.nan, got), _cog(out, "NEE", p))


def test_cube_is_kept_when_cogs_are_unchanged_and_rebuilt_when_they_change(run):
    from geoflux import pipeline

    cfg = load_config(run / "config.yaml")
    cube = run / "maps" / "nee.zarr"
    said: list[str] = []
    fp = xr.open_zarr(cube).attrs["geoflux_sources_sha256"]
    pipeline.stage_map(cfg, progress=False, echo=said.append)  # resume: nothing to redo
    assert (
        not any("time cube" in m for m in said) and xr.open_zarr(cube).attrs["geoflux_sources_sha256"] == fp
    )
    victim = run / "maps" / f"nee_{cfg.periods()[1]:%Y%m%d}.tif"
    victim.unlink()  # as if killed before this map was renamed into place
    pipeline.stage_map(cfg, progress=False, echo=said.append)
    assert any("time cube" in m for m in said)
    ds = xr.open_zarr(cube)
    assert ds.attrs["geoflux_sources_sha256"] != fp
    np.testing.assert_array_equal(
        ds.NEE.isel(time=1).values.astype("float64"), _cog(run, "NEE", cfg.periods()[1])
    )
    assert not list((run / "maps").glob("*.part*"))


def test_tiny_cogs_write_without_gdal_blocksize_warnings(tmp_path, caplog):
    from odc.geo.geobox import GeoBox

    from geoflux.cog import RasterSpec, is_valid_cog, write_cog

    gb = GeoBox.from_bbox((0, 0, 48 * 30, 40 * 30), "EPSG:32633", resolution=30)
    data = np.where(np.arange(48 * 40).reshape(40, 48) % 7 == 0, np.nan, 1.0)
    with caplog.at_level(logging.WARNING):
        path = write_cog(data, gb, RasterSpec(tmp_path / "a.tif", dtype="uint8", nodata=255))
    assert not [r for r in caplog.records if "BLOCKSIZE" in r.getMessage()]
    assert is_valid_cog(path)[0]
    with rasterio.open(path) as src:
        a = src.read(1)
    np.testing.assert_array_equal(a == 255, np.isnan(data))  # NaN → the integer nodata, not garbage
    assert (a[~np.isnan(data)] == 1).all()


# ---------------------------------------------------------------------------------------------- CLI

WRITERS = [
    (["towers", "aggregate"], "towers/observations.parquet"),
    (["extract"], "training/training.parquet"),
    (["train"], "model/model.skops"),
    (["validate"], "validation/metrics.json"),
    (["report"], "report/index.html"),
    (["run"], "towers/observations.parquet"),
]


@pytest.mark.parametrize(("verb", "existing"), WRITERS)
def test_verbs_refuse_existing_outputs_without_overwrite(run, verb, existing):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    res = CliRunner().invoke(cli, [*verb, str(run / "config.yaml")])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {run / existing}: exists (expected a new output, or --overwrite to replace it)"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_every_writing_verb_has_overwrite_and_documents_config():
    for verb in (
        ["run"],
        ["towers", "aggregate"],
        ["cube"],
        ["extract"],
        ["train"],
        ["map"],
        ["validate"],
        ["report"],
        ["analyze"],
        ["towers", "analyze"],
        ["towers", "model"],
        ["demo"],
    ):
        text = CliRunner().invoke(cli, [*verb, "--help"]).output
        assert "--overwrite" in text, verb
        if "CONFIG" in text.split("\n")[0]:
            assert "CONFIG is the run configuration" in " ".join(text.split()), verb
    top = CliRunner().invoke(cli, ["--help"]).output
    for verb in (
        "demo",
        "run",
        "towers aggregate",
        "towers summary",
        "towers analyze",
        "towers model",
        "cube",
        "extract",
        "train",
        "map",
        "validate",
        "report",
        "analyze",
    ):
        assert re.search(rf"^ +{verb} {{2,}}\S", top, re.M), verb  # the overview names and explains it
    assert "-q, --quiet" in top


def test_quiet_map_prints_nothing_on_stderr_and_train_summary_is_short(run):
    res = CliRunner().invoke(cli, ["-q", "map", str(run / "config.yaml"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # no progress bar, no info lines
    assert res.stdout.strip().startswith("80 maps in")
    loud = CliRunner().invoke(cli, ["map", str(run / "config.yaml")])
    assert "map: " in loud.stderr  # without -q the stage says what it does
    from cli.main import _cv_summary

    cv = json.loads((run / "model" / "cv_metrics.json").read_text())
    text = _cv_summary(cv)
    assert len(text.splitlines()) == 2 and f"NSE {cv['nse']:.3f}" in text and "gC m-2 d-1" in text
