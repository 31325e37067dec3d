"""The ``pipeline`` package's import graph, read from the source (every import, lazy ones inside functions
included, since they run too): module name -> the ``pipeline`` modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """``pipeline.a.b.symbol`` -> the longest prefix that is a module (``pipeline.a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _with_parents(name: str) -> list[str]:
    """Importing ``pipeline.a.b`` runs ``pipeline/__init__.py`` and ``pipeline/a/__init__.py`` first."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import (the package uses absolute ones)")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target == "pipeline" or target.startswith("pipeline."):
                    resolved = _resolve(target, modules)
                    if resolved:
                        own = set(_with_parents(name))  # a module's own packages are initialised already
                        graph[name].update(m for m in _with_parents(resolved) if m in modules and m not in own)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module importing ``start`` runs (``start`` included)."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted; [] = acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """``pipeline.evaluation.froc`` -> ``pipeline.evaluation``; top-level modules are their own package."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> packages it imports. An import of a package's own ``__init__`` by a module inside it does
    not count (importing ``pipeline.x.y`` always runs ``pipeline/x/__init__.py``; only a real edge does)."""
    packages: dict[str, set[str]] = {}
    for src, targets in graph.items():
        a = package_of(src)
        packages.setdefault(a, set())
        for t in targets:
            b = package_of(t)
            if a != b and t != "pipeline":
                packages[a].add(b)
    return packages
