"""Data flows one way: no import cycle between files or packages, the library never imports a stage or the
CLI, and the CLI's commands call stages only."""

from __future__ import annotations

import ast

from tests.architecture.import_graph import PACKAGE, cycles, import_graph, package_graph

# lower layers first; a package may import only packages listed before it (and top-level helpers)
LAYERS = [
    {"pipeline.config", "pipeline.progress", "pipeline.spacing"},
    {"pipeline.contracts"},  # contracts: the typed stage hand-offs
    {"pipeline.io"},
    {"pipeline.model", "pipeline.losses"},  # the plan (preprocessing) sizes patches for the network
    {"pipeline.preprocessing", "pipeline.data"},
    {"pipeline.evaluation"},
    {"pipeline.inference"},
    {"pipeline.training"},
    {"pipeline.tracking", "pipeline.dvc_metrics"},
    {"pipeline.inspection"},
    {"pipeline.stages"},
    {"pipeline.cli"},
    {"pipeline.__main__"},
]


def test_no_file_import_cycle():
    assert cycles(import_graph()) == []


def test_no_package_import_cycle():
    assert cycles(package_graph(import_graph())) == []


def test_every_package_has_a_layer():
    layered = set().union(*LAYERS) | {"pipeline"}
    assert set(package_graph(import_graph())) <= layered, "add the new package to LAYERS"


def test_packages_import_only_lower_layers():
    rank = {pkg: k for k, layer in enumerate(LAYERS) for pkg in layer}
    upward = [(a, b) for a, targets in package_graph(import_graph()).items() if a in rank
              for b in targets if b in rank and rank[b] >= rank[a] and a != b]
    assert upward == [], f"imports that go up or sideways across layers: {sorted(upward)}"


def test_cli_commands_call_stages_only():
    """Each ``cmd_*`` imports its work from ``pipeline.stages`` (plus the config and progress helpers)."""
    allowed = ("pipeline.stages", "pipeline.config", "pipeline.progress", "pipeline")
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    bad = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")):
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                if not node.module.startswith(allowed) or node.module == "pipeline" and \
                        any(a.name not in ("__version__", "stages") for a in node.names):
                    bad.append(f"{fn.name}: from {node.module} import ...")
    assert bad == []
