"""Chunk-wise mapping to COGs: bands, schedulers, resume after a kill, georeferencing, graph size."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import rasterio
from test_mapping_helpers import VARIABLES, bands_model, cube, forest_model, grid, slow_model

from geoflux.cog import is_valid_cog
from geoflux.features import pixel_features
from geoflux.mapping import band_spec, predict_bands, redo_reason, write_maps
from geoflux.mapping.scheduler import Shared, open_scheduler
from geoflux.run import band_stem

HERE = Path(__file__).parent


def _outputs(folder: Path, model, nt: int) -> dict:
    return {
        t: [band_spec(b, folder / f"{band_stem(b)}_{t}.tif", "gC m-2 d-1", {"k": "v"}) for b in model.bands]
        for t in range(nt)
    }


def _finished(folder: Path) -> list[Path]:
    # names of finished outputs only (temporary names end in .part / .part-tiled)
    return sorted(p for p in folder.glob("*.tif") if ".part" not in p.name)


def _digest(folder: Path) -> dict[str, str]:
    """Per file, sha256 of its pixels, georeferencing and tags but ``created`` (the write time)."""
    out = {}
    for p in _finished(folder):
        with rasterio.open(p) as src:
            tags = {k: v for k, v in src.tags().items() if k != "created"}
            meta = repr((src.profile, tags, src.tags(1), src.descriptions, src.overviews(1)))
            out[p.name] = hashlib.sha256(src.read().tobytes() + meta.encode()).hexdigest()
    return out


def _expected(ds, model, t: int) -> np.ndarray:
    """Every band of time step t predicted pixel by pixel, outside dask: (bands, y, x), NaN = masked."""
    values = {v.name: (ds[v.name][t] if "time" in ds[v.name].dims else ds[v.name]).values for v in VARIABLES}
    feats = pixel_features(values, VARIABLES)
    flat = feats.reshape(-1, feats.shape[-1])
    ok = ~np.isnan(flat).any(axis=1)
    out = np.full((flat.shape[0], len(model.bands)), np.nan, np.float32)
    out[ok] = model.predict_bands(flat[ok])
    return out.T.reshape(len(model.bands), *feats.shape[:2])


@pytest.fixture(scope="module")
def gb():
    return grid()


@pytest.fixture(scope="module")
def ds(gb):
    return cube(gb, nt=2)


def test_all_bands_written_as_valid_georeferenced_cogs(tmp_path, gb, ds):
    model = bands_model()
    outputs = _outputs(tmp_path, model, 2)
    paths = write_maps(ds, model, VARIABLES, gb, outputs, "threads", workers=2)
    assert [p.name for p in paths[:5]] == [f"{s}_0.tif" for s in ("nee", "nee-q05", "nee-q95", "di", "aoa")]
    assert not list(tmp_path.glob("*.part*"))
    for t in range(2):
        want = _expected(ds, model, t)
        for k, spec in enumerate(outputs[t]):
            ok, problems = is_valid_cog(spec.path)
            assert ok, (spec.path, problems)
            with rasterio.open(spec.path) as src:
                if model.bands[k] == "AOA":  # a 0/1 mask: one byte, its own nodata
                    assert src.dtypes[0] == "uint8" and src.nodata == 255
                else:
                    assert src.dtypes[0] == "float32" and src.nodata == -9999
                assert src.crs.to_epsg() == 32632
                # 96 x 80 px: one 128-px COG tile (GDAL's smallest COG block), no overview needed
                assert src.block_shapes[0] == (128, 128) and not src.overviews(1)
                assert src.tags(1)["units"] == spec.units and src.tags()["band"] == model.bands[k]
                assert src.tags()["quantity"] and "created" in src.tags()
                assert src.descriptions[0].startswith(model.bands[k])
                a = src.read(1, masked=True).astype("float64")
                # world coordinate of a pixel centre equals the cube's coordinate of the same pixel
                assert src.xy(37, 61) == pytest.approx((float(ds.x[61]), float(ds.y[37])))
            np.testing.assert_array_equal(a.mask, np.isnan(want[k]))  # masked drivers → nodata
            np.testing.assert_allclose(a.filled(np.nan), want[k], rtol=1e-6, equal_nan=True)
    with rasterio.open(outputs[0][0].path) as src:
        assert src.units == ("gC m-2 d-1",)
        assert src.read(1)[5, 6] == -9999  # under the cloud
    with rasterio.open(outputs[0][3].path) as src:
        assert src.tags(1)["units"] == "1"


def test_schedulers_write_identical_bytes(tmp_path, gb, ds):
    model = bands_model()
    digests = {}
    for spec in ("threads", "processes", "local"):
        folder = tmp_path / spec
        if spec == "local":
            # a distributed LocalCluster (threads in this process keep the test light and closed)
            with open_scheduler("local", workers=2, processes=False) as sched:
                write_maps(ds, model, VARIABLES, gb, _outputs(folder, model, 2), sched)
        else:
            write_maps(ds, model, VARIABLES, gb, _outputs(folder, model, 2), spec, workers=2)
        digests[spec] = _digest(folder)
    assert len(digests["threads"]) == 10
    assert digests["threads"] == digests["processes"] == digests["local"]


def test_model_is_broadcast_not_in_graph(tmp_path, gb, ds):
    model = forest_model(n_trees=60)
    model_size = len(cloudpickle.dumps(model))
    with open_scheduler("threads", workers=2) as sched:
        handle = sched.broadcast(model)
        pred = predict_bands(ds, handle, VARIABLES, model.bands)
        graph = dict(pred.data.__dask_graph__())
        biggest = max(len(cloudpickle.dumps(v)) for v in graph.values())
        assert isinstance(handle, Shared) and biggest < model_size / 20
        predict_tasks = [
            k for k in graph if "predict_bands_block" in str(k[0] if isinstance(k, tuple) else k)
        ]
        assert len(predict_tasks) == pred.data.npartitions  # one task per output chunk
    # on distributed: no "Sending large graph" warning even with a threshold far below the model size
    import dask

    with (
        dask.config.set({"distributed.admin.large-graph-warning-threshold": f"{model_size // 4}B"}),
        warnings.catch_warnings(record=True) as caught,
        open_scheduler("local", workers=2, processes=False) as sched,
    ):
        warnings.simplefilter("always")
        write_maps(ds, model, VARIABLES, gb, _outputs(tmp_path, model, 2), sched)
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message) for w in caught]


def test_finished_files_are_skipped_unless_overwrite(tmp_path, gb, ds):
    model = bands_model()
    outputs = _outputs(tmp_path, model, 2)
    write_maps(ds, model, VARIABLES, gb, outputs, workers=2)
    mtimes = {s.path: s.path.stat().st_mtime_ns for specs in outputs.values() for s in specs}
    before = _digest(tmp_path)
    outputs[1][2].path.unlink()  # one band of one step lost
    write_maps(ds, model, VARIABLES, gb, outputs, workers=2)
    rewritten = [p for p, m in mtimes.items() if p.stat().st_mtime_ns != m]
    assert rewritten == [outputs[1][2].path]  # only the missing file is written again
    assert _digest(tmp_path) == before
    write_maps(ds, model, VARIABLES, gb, outputs, workers=2, overwrite=True)
    assert all(p.stat().st_mtime_ns != m for p, m in mtimes.items())


def test_outputs_with_other_provenance_are_redone(tmp_path, gb, ds):
    model = bands_model()
    outputs = _outputs(tmp_path, model, 2)
    write_maps(ds, model, VARIABLES, gb, outputs, workers=2)
    assert all(redo_reason(s) is None for specs in outputs.values() for s in specs)
    mtimes = {s.path: s.path.stat().st_mtime_ns for specs in outputs.values() for s in specs}
    # same specs: nothing is rewritten (resume)
    write_maps(ds, model, VARIABLES, gb, outputs, workers=2)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    # step 1 now comes from another model (its tag differs): only step 1 is redone, with the new tags
    new = dict(outputs)
    new[1] = [dataclasses.replace(s, tags={**s.tags, "model_sha256": "other"}) for s in outputs[1]]
    assert redo_reason(new[1][0]) == "model_sha256 differs"
    said: list[str] = []
    write_maps(ds, model, VARIABLES, gb, new, workers=2, echo=said.append)
    assert [p for p, m in mtimes.items() if p.stat().st_mtime_ns != m] == [s.path for s in outputs[1]]
    for s in new[1]:
        with rasterio.open(s.path) as src:
            assert src.tags()["model_sha256"] == "other"
    assert any("model_sha256 differs" in m and "nee_1.tif" in m for m in said), said
    # an unreadable file under the final name is redone too
    outputs[0][0].path.write_bytes(b"not a tiff")
    assert redo_reason(outputs[0][0]) == "unreadable"


_JOB = textwrap.dedent(
    """
    import pickle, sys
    sys.path.insert(0, {tests!r})
    from test_mapping_helpers import VARIABLES, cube, grid
    from test_mapping import _outputs
    from geoflux.mapping import write_maps
    from pathlib import Path
    model = pickle.loads(Path({model!r}).read_bytes())
    gb = grid(); out = Path({out!r})
    write_maps(cube(gb, nt={nt}), model, VARIABLES, gb, _outputs(out, model, {nt}), "threads", workers=2)
    """
)


def _job(tmp_path: Path, out: Path, nt: int) -> list[str]:
    import pickle

    mpath = tmp_path / "slow-model.pkl"
    if not mpath.exists():
        mpath.write_bytes(pickle.dumps(slow_model()))  # written here, read back by our own job only
    code = _JOB.format(tests=str(HERE), model=str(mpath), out=str(out), nt=nt)
    return [sys.executable, "-c", code]


def test_killed_run_resumes_to_identical_files(tmp_path, gb):
    nt = 4
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    model = slow_model()
    write_maps(cube(gb, nt=nt), model, VARIABLES, gb, _outputs(whole, model, nt), workers=2)
    proc = subprocess.Popen(_job(tmp_path, killed, nt))
    try:
        deadline = time.monotonic() + 100
        # SIGKILL once a step is finished and the next one is being written
        while time.monotonic() < deadline and proc.poll() is None:
            if _finished(killed) and list(killed.glob("*.part-tiled")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    finished = _finished(killed)
    assert 1 <= len(finished) < nt, finished
    assert list(killed.glob("*.part*")), "a killed run leaves its unfinished step under .part names"
    # no unfinished file matches a *.tif glob (as `geoflux validate --maps 'maps/nee_*.tif'` would use)
    assert sorted(killed.glob("*.tif")) == finished
    for p in finished:
        with rasterio.open(p) as src:
            src.read(1)
    # resume in this process: finished files are kept, the rest is redone, leftovers are replaced
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    write_maps(cube(gb, nt=nt), model, VARIABLES, gb, _outputs(killed, model, nt), workers=2)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert not list(killed.glob("*.part*"))
    assert _digest(killed) == _digest(whole)
