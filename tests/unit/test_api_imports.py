"""The API package's own import graph: no cycles (the app imports its routers, routers import
``deps``, nothing imports back), and one definition of the runtime dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "controller" / "api"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports, at module level or inside functions
    (a function-local import is a cycle postponed, not removed)."""
    modules = {_module(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                if target in modules and target != name and modules[target].name != "__init__.py":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once (depth-first search; the graph is small)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycle = path[path.index(nxt) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append([*cycle, nxt])
            else:
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_api_package_has_no_import_cycle() -> None:
    graph = import_graph(API)
    assert "controller.api.routes.ops" in graph["controller.api.app"]  # the finder reads imports
    assert cycles(graph) == []


def test_the_runtime_dependency_is_defined_once() -> None:
    readers = sorted(
        str(p.relative_to(ROOT))
        for p in [API / "app.py", *(API / "routes").glob("*.py")]
        if "app.state.runtime\n" in p.read_text() or "= request.app.state.runtime" in p.read_text()
    )
    assert readers == []
    assert "request.app.state.runtime" in (API / "deps.py").read_text()
