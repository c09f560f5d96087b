"""The import structure: no circle among geoflux's modules, and no stage imports the pipeline.

Imports are read from the source with :mod:`ast` (module-level and inside functions alike: an import inside a
function is still a dependency), so the test sees what a reader sees, without importing anything.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "geoflux"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    """The geoflux module an imported name lives in (``geoflux.a.b`` may be a module or a name in ``a``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module → the geoflux modules it imports (package ``__init__`` re-exports resolved to the package)."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    prefix = f"{base}.{node.module}" if node.module else base
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own parents
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_geoflux_imports_have_no_circle():
    graph = import_graph()
    assert graph.get("geoflux.pipeline"), "the reader found no imports"
    assert _cycles(graph) == []


@pytest.mark.parametrize("stage", sorted(m for m in _modules() if m not in ("geoflux.pipeline", "geoflux")))
def test_no_stage_imports_the_pipeline(stage):
    assert "geoflux.pipeline" not in import_graph()[stage], f"{stage} imports geoflux.pipeline"
