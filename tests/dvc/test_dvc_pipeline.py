"""dvc.yaml's structure, checked statically (fast): outputs that a failed stage cannot lose, metrics
where experiments commit them, no default plots. The pipeline itself runs in test_fresh_clone.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _resolve(text: str) -> str:
    """``${paths.models}/best.pt`` -> ``models/best.pt`` (DVC's templating, for the keys dvc.yaml uses)."""

    def value(m: re.Match) -> str:
        node = PARAMS
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _outputs() -> list[tuple[str, str, bool]]:
    """(stage, path, cached) of every output, metric and plot declared by a stage."""
    out = []
    for name, stage in DVC_YAML["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                out.append((name, _resolve(path), (opts or {}).get("cache", kind == "outs")))
    return out


def _git_ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0


@pytest.mark.parametrize("stage, path, cached", _outputs())
def test_every_output_survives_a_failed_stage(stage, path, cached):
    # DVC deletes a stage's outputs before running it: a git-ignored output must be in the DVC cache,
    # an uncached one must be git-tracked (git restores it)
    if _git_ignored(path):
        assert cached, f"{stage}: {path} is git-ignored and uncached: a failed run would lose it"
    else:
        assert not cached and path.startswith(PARAMS["paths"]["metrics"] + "/"), (stage, path)


def test_metrics_are_small_files_in_the_git_tracked_metrics_folder():
    metrics = [p for s in DVC_YAML["stages"].values() for e in s.get("metrics", []) for p in
               ([e] if isinstance(e, str) else e)]
    assert sorted(_resolve(p) for p in metrics) == ["metrics/metrics.json", "metrics/train.json"]
    assert not _git_ignored("metrics/metrics.json")


def test_no_stage_level_plots_and_top_level_plots_come_from_stage_outputs():
    assert not [name for name, s in DVC_YAML["stages"].items() if "plots" in s]  # no default plots
    produced = {path for _, path, _ in _outputs()}
    for plot in DVC_YAML["plots"]:
        files = [plot] if isinstance(plot, str) else list(next(iter(plot.values()))["y"])
        for f in files:  # the file itself, or inside a directory output
            assert any(f == p or f.startswith(p + "/") for p in produced), f
    froc = next(p for p in DVC_YAML["plots"] if isinstance(p, dict) and "FROC on the test scans" in p)
    assert froc["FROC on the test scans"]["template"] == "step"
    assert "step-after" in (REPO / ".dvc" / "plots" / "step.json").read_text()


def test_params_come_from_the_real_root_params_file():
    assert (REPO / "params.yaml").is_file() and not (REPO / "params.yaml").is_symlink()
    for stage in DVC_YAML["stages"].values():
        for entry in stage.get("params", []):
            assert isinstance(entry, dict) and list(entry) == ["params.yaml"], entry
    assert re.search(r"^\s*python -m pipeline ", DVC_YAML["stages"]["train"]["cmd"])


def test_dvc_setup_is_committed_with_scm_on():
    config = (REPO / ".dvc" / "config").read_text()
    assert "no_scm" not in config
    assert (REPO / ".dvcignore").is_file()
    assert not _git_ignored(".dvc/config") and _git_ignored(".dvc/cache")
    assert "--no-scm -q 2>/dev/null ||" not in (REPO / "Makefile").read_text()
