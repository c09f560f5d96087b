"""COG writing: valid COGs from memory and streamed from dask, georeferencing, atomic output."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import rasterio
from odc.geo.geobox import GeoBox

from geoflux.cog import RasterSpec, is_valid_cog, write_cog, write_cogs


@pytest.fixture()
def grid() -> GeoBox:
    # a UTM grid far from the origin, 700 x 600 px at 30 m: several COG tiles and overview levels
    return GeoBox.from_bbox(
        (300_000, 4_000_000, 300_000 + 700 * 30, 4_000_000 + 600 * 30), "EPSG:32633", resolution=30
    )


def test_write_cog_in_memory(tmp_path, grid):
    data = np.arange(grid.shape[0] * grid.shape[1], dtype="float32").reshape(grid.shape)
    path = write_cog(data, grid, RasterSpec(tmp_path / "a.tif", units="gC m-2 d-1", tags={"k": "v"}))
    ok, problems = is_valid_cog(path)
    assert ok, problems
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32633
        assert ds.tags()["k"] == "v" and ds.units == ("gC m-2 d-1",)
        assert ds.overviews(1)
        np.testing.assert_array_equal(ds.read(1), data)
        # the world coordinate of a pixel centre matches the grid's
        x, y = ds.xy(123, 456)
        gx, gy = grid.affine.c + 30 * (456 + 0.5), grid.affine.f - 30 * (123 + 0.5)
        assert (x, y) == pytest.approx((gx, gy))


def test_write_cogs_streams_dask_chunks(tmp_path, grid):
    calls = []

    def make(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        (r0, _), (c0, _) = block_info[None]["array-location"]
        rows = np.arange(block.shape[0])[:, None] + r0
        cols = np.arange(block.shape[1])[None, :] + c0
        return (rows * 1000 + cols).astype("float32")

    arrays = [
        da.zeros(tuple(grid.shape), chunks=128, dtype="float32").map_blocks(make, dtype="float32") + k
        for k in range(2)
    ]
    specs = [RasterSpec(tmp_path / f"m{k}.tif", units="u") for k in range(2)]
    with dask.config.set(scheduler="threads"):
        write_cogs(arrays, grid, specs)
    # both outputs share the base array: each of its chunks is computed exactly once, not once per output
    assert len(calls) == arrays[0].npartitions
    for k, spec in enumerate(specs):
        assert is_valid_cog(spec.path)[0]
        with rasterio.open(spec.path) as ds:
            a = ds.read(1)
        assert a[599, 699] == 599 * 1000 + 699 + k and a[0, 0] == k
    assert not list(tmp_path.glob("*.part*"))


def test_failed_write_leaves_nothing(tmp_path, grid):
    def boom(block):
        raise RuntimeError("disk on fire")

    arr = da.zeros(tuple(grid.shape), chunks=128, dtype="float32").map_blocks(boom, dtype="float32")
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_cogs([arr], grid, [RasterSpec(tmp_path / "x.tif")])
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, grid):
    spec = RasterSpec(tmp_path / "s.tif")
    write_cogs([da.ones(tuple(grid.shape), chunks=256, dtype="float32")], grid, [spec])
    mtime = spec.path.stat().st_mtime_ns
    write_cogs([da.zeros(tuple(grid.shape), chunks=256, dtype="float32")], grid, [spec])
    assert spec.path.stat().st_mtime_ns == mtime
    write_cogs([da.zeros(tuple(grid.shape), chunks=256, dtype="float32")], grid, [spec], overwrite=True)
    with rasterio.open(spec.path) as ds:
        assert ds.read(1).max() == 0


def test_cog_stream_blocks_nodata_and_abort(tmp_path, grid):
    from geoflux.cog import COGStream

    specs = [RasterSpec(tmp_path / "a.tif", units="u", description="A"), RasterSpec(tmp_path / "b.tif")]
    stream = COGStream(grid, specs, chunk=128)
    ny, nx = grid.shape
    for r in range(0, ny, 128):
        for c in range(0, nx, 128):
            h, w = min(128, ny - r), min(128, nx - c)
            block = np.stack([np.full((h, w), r + c, "float32"), np.full((h, w), np.nan, "float32")])
            stream.write(slice(r, r + h), slice(c, c + w), block)
    assert not specs[0].path.exists()  # nothing under the final name before finish
    stream.finish()
    assert not list(tmp_path.glob("*.part*"))
    with rasterio.open(specs[0].path) as a, rasterio.open(specs[1].path) as b:
        assert a.read(1)[130, 260] == 128 + 256 and a.descriptions == ("A",)
        assert b.nodata == -9999 and (b.read(1) == -9999).all()  # NaN is written as the nodata value
    assert all(is_valid_cog(s.path)[0] for s in specs)
    aborted = COGStream(grid, [RasterSpec(tmp_path / "c.tif")])
    aborted.abort()
    assert not list(tmp_path.glob("c.tif*"))


def test_cog_stream_never_shows_an_output_beside_its_intermediate(tmp_path, grid, monkeypatch):
    """A run killed at any moment must not leave a finished output with its intermediate beside it (a
    resume skips finished outputs, so the intermediate would stay): at the rename into place, it is gone."""
    import os

    from geoflux import atomic
    from geoflux.cog import COGStream, tiled_path

    specs = [RasterSpec(tmp_path / "a.tif"), RasterSpec(tmp_path / "b.tif")]
    seen = []
    replace = os.replace

    def watched(src, dst):
        seen.append((Path(dst).name, tiled_path(Path(dst)).exists()))
        return replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", watched)
    stream = COGStream(grid, specs, chunk=128)
    ny, nx = grid.shape
    stream.write(slice(0, ny), slice(0, nx), np.zeros((2, ny, nx), "float32"))
    stream.finish()
    assert seen == [("a.tif", False), ("b.tif", False)]
