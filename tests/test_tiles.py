"""Fixed tiling of the grid, per-tile maps and their VRT mosaic, tile runs from the command line."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import rasterio
from test_mapping_helpers import VARIABLES, cube, forest_model, grid

from geoflux.cog import RasterSpec, is_valid_cog, mosaic_to_cog
from geoflux.errors import GridError
from geoflux.mapping import band_spec, write_maps
from geoflux.mapping.tiles import TileScheme, tile_pixels, write_vrt


def test_tiling_numbering_edges_and_bbox():
    gb = grid(ny=100, nx=70)  # 250 m pixels
    scheme = TileScheme(gb, 32)
    assert scheme.shape == (4, 3)  # ceil(100/32) rows, ceil(70/32) columns
    t = scheme.tile(2, 3)  # last column, last row: cut at the grid edge
    assert (t.rows, t.cols) == (slice(96, 100), slice(64, 70))
    assert t.geobox.shape == (4, 6) and t.id == "x002_y003"
    # tile (1, 0) starts 32 px east of the grid's upper-left corner
    a, ta = gb.affine, scheme.tile(1, 0).geobox.affine
    assert (ta.c, ta.f) == (a.c + 32 * 250, a.f)
    assert len(scheme.tiles()) == 12
    # a box around one point picks the one tile holding it; a wider box the tiles it touches
    x, y = a.c + 40 * 250 + 10, a.f - 70 * 250 - 10  # pixel (row 70, col 40) → tile (1, 2)
    assert [(t.x, t.y) for t in scheme.tiles_in_bbox((x, y, x + 1, y + 1))] == [(1, 2)]
    got = scheme.tiles_in_bbox((a.c + 31 * 250, y - 100, a.c + 33 * 250, y + 9000))
    assert sorted((t.x, t.y) for t in got) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    with pytest.raises(GridError, match="outside the grid"):
        scheme.tile(3, 0)
    with pytest.raises(GridError, match="does not intersect"):
        scheme.tiles_in_bbox((0, 0, 1, 1))
    assert tile_pixels(128) == 2048 and tile_pixels(96, 1000) == 960
    with pytest.raises(GridError, match="smaller than the chunk"):
        tile_pixels(128, 100)


def test_tiles_mosaic_equals_whole_grid_map(tmp_path):
    gb = grid(ny=96, nx=80)
    ds = cube(gb, nt=1, chunk=16)
    model = forest_model()
    whole = band_spec("NEE", tmp_path / "whole.tif", "gC m-2 d-1", {})
    write_maps(ds, model, VARIABLES, gb, {0: [whole]}, workers=2)
    scheme = TileScheme(gb, tile_pixels(16, 48))
    sources = []
    for t in scheme.tiles():
        spec = band_spec("NEE", tmp_path / "tiles" / t.id / "nee.tif", "gC m-2 d-1", {})
        sub = ds.isel(y=t.rows, x=t.cols)
        write_maps(sub, model, VARIABLES, t.geobox, {0: [spec]}, workers=2)
        assert is_valid_cog(spec.path)[0]
        sources.append((spec.path, t.rows, t.cols))
    vrt = write_vrt(tmp_path / "nee.vrt", gb, sources, units="gC m-2 d-1", description="NEE")
    with rasterio.open(vrt) as m, rasterio.open(whole.path) as w:
        assert m.crs == w.crs and m.transform == w.transform and m.shape == w.shape
        np.testing.assert_array_equal(m.read(1), w.read(1))
        assert m.nodata == -9999
    # the complete mosaic as a COG: valid, tagged, same pixels
    cog = mosaic_to_cog(vrt, RasterSpec(tmp_path / "mosaic.tif", units="gC m-2 d-1", tags={"k": "v"}))
    assert is_valid_cog(cog)[0]
    with rasterio.open(cog) as c, rasterio.open(whole.path) as w:
        np.testing.assert_array_equal(c.read(1), w.read(1))
        assert c.tags()["k"] == "v" and c.tags(1)["units"] == "gC m-2 d-1"


def _digest(paths):
    """Per file, sha256 of pixels, profile and tags but ``created`` (the time the file was written)."""
    out = {}
    for p in paths:
        with rasterio.open(p) as src:
            meta = repr((src.profile, {k: v for k, v in src.tags().items() if k != "created"}, src.tags(1)))
            out[p.name] = hashlib.sha256(src.read().tobytes() + meta.encode()).hexdigest()
    return out


def test_cli_tiles_resume_overwrite_vrt_and_stac(tiny_run, tmp_path):
    import shutil

    import pystac
    from click.testing import CliRunner

    from cli.main import cli

    src, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("maps"))
    config = run / "config.yaml"
    # tiny world: 48 x 48 px, chunk 32 → tiles of 32 px: 2 x 2 tiles
    res = CliRunner().invoke(cli, ["map", str(config), "--tile", "1", "0", "--tile-size", "32"])
    assert res.exit_code == 0, res.output
    tile_dir = run / "maps" / "tiles-32" / "x001_y000"
    maps = sorted(tile_dir.glob("nee_*.tif"))
    assert len(maps) == 16 and all(is_valid_cog(p)[0] for p in maps[:2])
    with rasterio.open(maps[0]) as t, rasterio.open(src / "maps" / maps[0].name) as full:
        assert t.shape == (32, 16)
        # the tile sits at column 32 of the full grid: same world coordinates as the full map's pixel
        assert t.xy(0, 0) == full.xy(0, 32)
        np.testing.assert_allclose(t.read(1), full.read(1)[:32, 32:], rtol=1e-5)
    vrt = run / "maps" / maps[0].name.replace(".tif", ".vrt")
    with rasterio.open(vrt) as m:
        a = m.read(1, masked=True)
        assert m.shape == (48, 48) and a.mask[:, :32].all() and not a.mask[:32, 32:].all()
    items = list(pystac.read_file(str(run / "maps" / "catalog.json")).get_items(recursive=True))
    assert {i.id for i in items} >= {f"nee-{maps[0].name[4:12]}-x001_y000"}
    # the bbox of the lower-left corner selects tile (0, 1); the finished tile (1, 0) is not redone
    before = _digest(maps)
    mtimes = [p.stat().st_mtime_ns for p in maps]
    with rasterio.open(vrt) as m:
        x0, y0 = m.xy(40, 5)
    res = CliRunner().invoke(
        cli,
        [
            "map",
            str(config),
            "--tile-size",
            "32",
            "--tile",
            "1",
            "0",
            "--bbox",
            str(x0),
            str(y0),
            str(x0 + 1),
            str(y0 + 1),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (run / "maps" / "tiles-32" / "x000_y001" / maps[0].name).exists()
    assert [p.stat().st_mtime_ns for p in maps] == mtimes
    res = CliRunner().invoke(
        cli, ["map", str(config), "--tile-size", "32", "--tile", "1", "0", "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    assert [p.stat().st_mtime_ns for p in maps] != mtimes and _digest(maps) == before
    res = CliRunner().invoke(cli, ["map", str(config), "--tile", "5", "5", "--tile-size", "32"])
    assert res.exit_code == 1 and "error: tile (5, 5) is outside the grid" in res.output
