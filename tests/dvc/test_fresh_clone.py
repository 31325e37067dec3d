"""DVC as a user meets it: `git clone`, then the README's commands, on a tiny budget.

The working tree (uncommitted changes included) is committed into a temporary repository with a tiny
params.yaml, cloned, and driven with the README's commands: `make repro` (the existing venv stands in
for the install: `STAMP=` skips it), commit the baseline, `dvc exp run -S train.loss.gamma=0`, then
`dvc exp show`, `dvc params diff`, `dvc metrics diff` and `dvc plots show`. A stage command that fails
(`python` not the pipeline's) must leave every output restorable with `dvc checkout`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
pytestmark = pytest.mark.slow

# about 1.5 minutes for the whole module on 2 cores
TINY = {
    "data": {"synthetic": {"n_cases": 6, "shape": [48, 48, 16], "max_lesions": 2}},
    "train": {"epochs": 2, "steps_per_epoch": 2, "val_every": 2, "num_workers": 0,
              "model": {"base_filters": 4, "max_filters": 16}},
    "inference": {"overlap": 0.25, "tta_mirror": False},
    "evaluation": {"bootstrap": 20},
}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def _run(cmd: list[str] | str, cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          shell=isinstance(cmd, str))
    if ok:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_working_tree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the repository, symlinks kept as links."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if not os.path.lexists(src):  # deleted in the working tree
            continue
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("fresh")
    origin, clone = base / "origin", base / "clone"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_SITE_CACHE_DIR": str(base / "dvc-site"), "HOME": str(base),
           # an activated venv, as the README asks before the dvc commands
           "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "DVC_NO_SCM"):
        env.pop(key, None)
    _copy_working_tree(origin)
    params = yaml.safe_load((origin / "params.yaml").read_text())
    (origin / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    _run(["git", "init", "-q"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "tiny pipeline"], origin, env)
    _run(["git", "clone", "-q", str(origin), str(clone)], base, env)
    os.symlink(VENV, clone / ".venv")  # the install `make` would do, already done
    _run(["make", "repro", "STAMP="], clone, env)
    return clone, env


def test_clone_needs_no_dvc_init_and_has_scm(clone):
    root, env = clone
    assert (root / ".dvc" / "config").is_file()
    config = _run(["dvc", "config", "--list"], root, env).stdout
    assert "no_scm" not in config  # `dvc init --no-scm` would break every git-backed command


def test_repro_writes_small_numeric_metrics_to_a_git_tracked_folder(clone):
    root, env = clone
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    assert set(metrics["sensitivity_at_fp"]) == {"1/8", "1/4", "1/2", "1", "2", "4", "8"}
    assert 0.0 <= metrics["cpm"] <= 1.0 and metrics["scans"] >= 1 and metrics["lesions"] >= 1
    # (HD95 is left out when it is undefined: no predicted lesion voxels after 4 training steps)
    assert {"cpm", "cpm_ci95", "dice", "lesions", "lesions_detected", "false_positives", "scans"} <= set(metrics)

    def leaves(tree):
        for v in tree.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(metrics))
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["best_epoch"] == 2 and "best_val_cpm" in train and "train_time_s" not in train
    # not git-ignored: `git status` lists them, so experiments commit them
    ignored = _run(["git", "check-ignore", "metrics/metrics.json", "metrics/train.json"], root, env, ok=False)
    assert ignored.returncode == 1, ignored.stdout
    # validation rows only for validated epochs (epoch 2 of 2 with val_every 2)
    rows = list(csv.DictReader(io.StringIO((root / "metrics" / "validation.csv").read_text())))
    assert [r["epoch"] for r in rows] == ["2"]
    assert len((root / "metrics" / "train_loss.csv").read_text().splitlines()) == 3  # header + 2 epochs
    # the detailed outputs stay in the git-ignored folders
    assert (root / "results/evaluation/metrics.json").is_file() and (root / "models/best.pt").is_file()
    assert (root / "results/evaluation/lesion_views/index.md").is_file()


def test_froc_plot_is_a_step_curve_and_no_default_plots(clone):
    root, env = clone
    rows = list(csv.DictReader(io.StringIO((root / "metrics" / "froc.csv").read_text())))
    xs = [float(r["fps_per_scan"]) for r in rows]
    ys = [float(r["sensitivity"]) for r in rows]
    assert xs == sorted(set(xs)) and ys == sorted(ys) and xs[0] == 0.0 and xs[-1] >= 8.0
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], root, env).stdout)
    ids = set(shown.get("data", shown))
    assert ids == {"FROC on the test scans", "Training loss", "Validation (validated epochs only)",
                   "results/evaluation/froc.png", "models/training_curves.png"}, ids
    assert "step-after" in json.dumps(shown["data"]["FROC on the test scans"] if "data" in shown
                                      else shown["FROC on the test scans"])
    _run(["dvc", "plots", "show", "-o", str(root.parent / "plots_html")], root, env)
    assert (root.parent / "plots_html" / "index.html").is_file()


def test_failed_stage_leaves_restorable_outputs(clone):
    root, env = clone
    fake = root.parent / "broken-bin"
    fake.mkdir(exist_ok=True)
    (fake / "python").write_text("#!/bin/sh\necho 'python: not the pipeline venv' >&2\nexit 127\n")
    (fake / "python").chmod(0o755)
    broken = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"}
    failed = _run([str(VENV / "bin" / "dvc"), "repro", "-f", "-s", "data"], root, broken, ok=False)
    assert failed.returncode != 0
    _run(["dvc", "checkout"], root, env)
    assert (root / "data" / "splits.json").is_file()
    status = _run(["dvc", "status", "--json"], root, env).stdout
    assert json.loads(status or "{}") == {}, status
    assert "Running stage" not in _run(["dvc", "repro"], root, env).stdout  # nothing to redo


def test_experiment_shows_changed_param_beside_cpm(clone):
    root, env = clone
    # the README's commands after `make repro`
    _run("git add dvc.lock metrics && git commit -qm 'baseline run'", root, env)
    out = _run(["dvc", "exp", "run", "-S", "train.loss.gamma=0"], root, env).stdout
    # a loss parameter is a dependency of train only; evaluate follows from the new model
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"train", "evaluate"}, out

    diff = json.loads(_run(["dvc", "params", "diff", "--json"], root, env).stdout)
    assert diff["params.yaml"]["train.loss.gamma"] == {"old": 2.0, "new": 0, "diff": -2.0}, diff
    assert set(diff["params.yaml"]) == {"train.loss.gamma"}, diff
    mdiff = json.loads(_run(["dvc", "metrics", "diff", "--all", "--json"], root, env).stdout)
    assert "cpm" in mdiff["metrics/metrics.json"] and "best_val_cpm" in mdiff["metrics/train.json"], mdiff

    # the README's table: changed columns, CPM kept even when unchanged, dependency hashes dropped
    table = _run(["dvc", "exp", "show", "--only-changed", "--keep", "^cpm", "--drop", "^models/", "--csv"],
                 root, env).stdout
    header = next(csv.reader(io.StringIO(table)))
    assert {"train.loss.gamma", "cpm", "cpm_ci95.low", "cpm_ci95.high"} <= set(header), header
    assert len(header) < 20 and not [h for h in header if h.startswith("models/")], header

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env).stdout)
    found = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = (data.get("metrics") or {}).get("metrics/metrics.json", {}).get("data", {})
            if params and metrics:
                found.append((params["train"]["loss"]["gamma"], metrics.get("cpm"), node.get("name")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    gammas = {g for g, cpm, _ in found if isinstance(cpm, (int, float))}
    assert {0, 2.0} <= gammas, found  # the experiment's commit and the baseline both hold a CPM
