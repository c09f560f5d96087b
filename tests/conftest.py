"""Shared fixtures: a tiny generated world (built once per session) and the shared real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """../shared/realdata (files written by others); tests skip if it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"shared real data not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def tiny_world_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated world with its config.yaml; do not modify (copy it with `tiny_world`)."""
    from geoflux.demo import write_world

    out = tmp_path_factory.mktemp("tiny")
    write_world(out, "tiny")
    return out


@pytest.fixture()
def tiny_world(tiny_world_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny world that a test may change."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_world_pristine, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tiny_world_pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The whole pipeline run once on a copy of the tiny world: (output folder, metrics)."""
    from geoflux import pipeline
    from geoflux.config import load_config

    dst = tmp_path_factory.mktemp("tinyrun") / "run"
    shutil.copytree(tiny_world_pristine, dst)
    metrics = pipeline.run(load_config(dst / "config.yaml"), progress=False)
    return dst, metrics
