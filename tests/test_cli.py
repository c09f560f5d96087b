"""The command line: help texts, and one-line errors for bad input with nothing half-written."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli

SUBCOMMANDS = ["demo", "run", "towers", "cube", "extract", "train", "map", "validate"]
TOWER_VERBS = ["aggregate", "summary", "analyze"]


@pytest.mark.parametrize("cmd", [[], *[[c] for c in SUBCOMMANDS], *[["towers", v] for v in TOWER_VERBS]])
def test_help_explains(cmd):
    res = CliRunner().invoke(cli, [*cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage:" in res.output
    if cmd in (["map"], ["towers", "aggregate"], []):
        assert "gC m-2 d-1" in res.output  # units are stated where outputs are described


def _edit_config(world, change):
    path = world / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(res):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]


def test_unknown_key_is_named(tiny_world):
    path = _edit_config(tiny_world, lambda c: c["grid"].update(resolutoin=10))
    msg = _one_line_error(CliRunner().invoke(cli, ["run", str(path)]))
    assert "grid.resolutoin" in msg and "unknown key" in msg
    assert not (tiny_world / "maps").exists()


def test_wrong_type_is_named(tiny_world):
    path = _edit_config(tiny_world, lambda c: c["grid"].update(resolution="fine"))
    msg = _one_line_error(CliRunner().invoke(cli, ["run", str(path)]))
    assert "grid.resolution" in msg


def test_missing_tower_file_is_named(tiny_world):
    path = _edit_config(tiny_world, lambda c: c["towers"].update(files="world/towers/FLX_NONE_*.csv"))
    msg = _one_line_error(CliRunner().invoke(cli, ["run", str(path)]))
    assert "FLX_NONE_" in msg
    assert not (tiny_world / "maps").exists()


def test_tower_outside_grid_is_named_and_nothing_written(tiny_world):
    sites = pd.read_csv(tiny_world / "world" / "sites.csv")
    sites.loc[3, "LAT"] += 1.0  # ~110 km north of the tiny world
    sites.to_csv(tiny_world / "world" / "sites.csv", index=False)
    res = CliRunner().invoke(cli, ["run", str(tiny_world / "config.yaml")])
    msg = _one_line_error(res)
    assert sites.loc[3, "SITE_ID"] in msg and "outside the grid" in msg
    for stage in ("towers", "training", "model", "maps", "validation"):
        assert not (tiny_world / stage).exists(), stage


def test_stage_order_is_explained(tiny_world):
    msg = _one_line_error(CliRunner().invoke(cli, ["train", str(tiny_world / "config.yaml")]))
    assert "geoflux extract" in msg


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("catalog: [unclosed\n")
    msg = _one_line_error(CliRunner().invoke(cli, ["run", str(bad)]))
    assert str(bad) in msg and "YAML" in msg


def test_towers_summary_and_analyze_on_real_detha(realdata, tmp_path):
    import json

    detha = realdata / "towers" / "Example_DETha98.txt"
    res = CliRunner().invoke(cli, ["towers", "summary", str(detha)])
    assert res.exit_code == 0, res.output
    assert "1998" in res.output
    out = tmp_path / "detha"
    res = CliRunner().invoke(
        cli,
        [
            "towers",
            "analyze",
            str(detha),
            "--out",
            str(out),
            "--site",
            "DE-Tha",
            "--no-daytime",
            "--csv",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    printed = json.loads(res.stdout)
    nee = printed["budgets"][0]["NEE"]
    assert -800 < nee < -450  # DE-Tha 1998 is a strong sink (hesseflux reference: -644 gC m-2 yr-1)
    assert 0.2 < printed["ustar_threshold"] < 0.5
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 5 and any("fingerprint" in p for p in pngs)
    assert json.loads((out / "summary.json").read_text())["site"] == "DE-Tha"


def test_towers_analyze_bad_ustar_is_one_line(realdata, tmp_path):
    detha = realdata / "towers" / "Example_DETha98.txt"
    res = CliRunner().invoke(cli, ["towers", "analyze", str(detha), "--out", str(tmp_path), "--ustar", "x"])
    assert res.exit_code == 2 and "--ustar" in res.stderr


def test_cube_command_writes_zarr(tiny_world):
    import xarray as xr

    res = CliRunner().invoke(cli, ["cube", str(tiny_world / "config.yaml")])
    assert res.exit_code == 0, res.stderr
    ds = xr.open_zarr(tiny_world / "cube.zarr")
    assert set(ds.data_vars) >= {"ta", "ndvi", "landcover"}
    assert ds["ta"].dims == ("time", "y", "x") and ds.sizes["time"] == 16
    assert float(ds["ndvi"].max()) <= 1.0  # decoded (raw int16 would be thousands)
