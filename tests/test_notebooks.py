"""The notebooks run top to bottom on a tiny world (nbclient, kernel 'python3').

Their run time is printed, not asserted: wall-clock budgets belong in bench/, not in tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, workdir: Path) -> tuple[object, float]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb, time.perf_counter() - t0


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            text.append(o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {})))
    return "\n".join(text)


def test_notebooks_run_on_a_tiny_world(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "walk"
    monkeypatch.setenv("GEOFLUX_WORLD_SIZE", "tiny")
    monkeypatch.setenv("GEOFLUX_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb1, t1 = _execute("01_walkthrough.ipynb", tmp_path)
    text1 = _outputs(nb1)
    assert "map vs towers (footprint-weighted)" in text1 and "held-out (CV)" in text1
    assert (out / "report" / "index.html").exists() and (out / "validation" / "metrics.json").exists()
    monkeypatch.setenv("GEOFLUX_RUN", str(out))  # the science notebook reuses the walkthrough's run
    nb2, t2 = _execute("02_science.ipynb", tmp_path)
    assert "dNEE_mean" in _outputs(nb2)
    print(f"notebooks: walkthrough {t1:.0f} s, science {t2:.0f} s")
