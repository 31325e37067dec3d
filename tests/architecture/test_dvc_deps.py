"""dvc.yaml's code deps cannot drift from the code: every ``pipeline`` module a stage's command imports
(directly or not, lazy imports included) lies under one of the stage's listed deps, and every listed
``pipeline`` dep holds at least one such module (no stale entry)."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tests.architecture.import_graph import PACKAGE, ROOT, import_graph, module_files, reachable

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imports(node: ast.AST) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("pipeline"):
            found.update(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in module_files() else n.module
                         for a in n.names)
        elif isinstance(n, ast.Import):
            found.update(a.name for a in n.names if a.name.startswith("pipeline"))
    return found


def stage_modules(command: str) -> set[str]:
    """The modules ``python -m pipeline <command>`` runs: the CLI's module level and its non-command
    functions (parser, error handling), the command's own ``cmd_*`` function, and all they import."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    name = "cmd_" + command.replace("-", "_")
    cli_imports: set[str] = set()
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_") and node.name != name):
            cli_imports |= _imports(node)
    graph = import_graph()
    graph["pipeline.cli"] = {m for m in cli_imports if m in graph}  # only this command's branch of the CLI
    return reachable(graph, "pipeline.__main__")


def covered(module: str, deps: list[str]) -> bool:
    path = module_files()[module].relative_to(ROOT).as_posix()
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_dvc_yaml_lists_every_module_the_stage_runs(stage):
    command = re.match(r"python -m pipeline ([\w-]+)", DVC[stage]["cmd"]).group(1)
    deps = [d for d in DVC[stage]["deps"] if isinstance(d, str) and d.startswith("pipeline")]
    modules = stage_modules(command)
    missing = sorted(module_files()[m].relative_to(ROOT).as_posix() for m in modules if not covered(m, deps))
    assert missing == [], f"dvc.yaml stage {stage!r} runs these files but does not list them in deps"
    stale = [d for d in deps if not any(covered(m, [d]) for m in modules)]
    assert stale == [], f"dvc.yaml stage {stage!r} lists deps its command never imports"


def test_the_check_sees_lazy_imports():
    """A function-level import counts: the evaluate stage exports lesion views from inside a function."""
    assert "pipeline.inspection.export" in stage_modules("evaluate")
