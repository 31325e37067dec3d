"""End to end: `dvc repro` of the real dvc.yaml on a tiny config in a temporary git repository.

Checks that every stage runs and writes its metrics, that a second `dvc repro` does nothing, that a
loss parameter invalidates only train and evaluate, and that `dvc exp run -S train.loss.gamma=...`
(which edits the root params.yaml link) runs an experiment.
"""

from __future__ import annotations

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
pytestmark = pytest.mark.slow

TINY = {
    "data": {"synthetic": {"n_cases": 6, "shape": [48, 48, 16], "max_lesions": 2}},
    "train": {"epochs": 1, "steps_per_epoch": 3, "val_every": 1, "num_workers": 0,
              "model": {"base_filters": 4, "max_filters": 16}},
    "inference": {"overlap": 0.25},
    "evaluation": {"bootstrap": 20},
}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dvcrepo")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    (root / "configs").mkdir()
    params = yaml.safe_load((REPO / "configs" / "params.yaml").read_text())
    (root / "configs" / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    os.symlink("configs/params.yaml", root / "params.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_SITE_CACHE_DIR": str(root / ".dvc-site"), "PYTHONPATH": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny pipeline"], root, env)
    _run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env


def test_repro_runs_every_stage_and_writes_metrics(dvc_repo):
    root, env = dvc_repo
    metrics = json.loads((root / "results/evaluation/metrics.json").read_text())
    assert set(metrics["sensitivity_at_fp"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert metrics["scans_total"] >= 1 and 0.0 <= metrics["cpm"] <= 1.0
    assert (root / "models/best.pt").is_file() and (root / "models/train_summary.json").is_file()
    assert (root / "results/evaluation/lesion_views/index.md").is_file()
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], root, env).stdout
    assert "cpm" in shown and "best_val_cpm" in shown
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(root / "plots_html")], root, env)
    assert (root / "plots_html" / "index.html").is_file()


def test_second_repro_does_nothing(dvc_repo):
    root, env = dvc_repo
    out = _run([sys.executable, "-m", "dvc", "repro"], root, env).stdout
    assert "Running stage" not in out


def test_loss_param_invalidates_only_train_and_evaluate(dvc_repo):
    root, env = dvc_repo
    params_file = root / "configs" / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["loss"]["gamma"] = 1.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], root, env).stdout or "{}")
        out = _run([sys.executable, "-m", "dvc", "repro"], root, env).stdout
    finally:
        params_file.write_text(original)
    assert set(changed) == {"train"}, changed  # the param is a direct dependency of train only
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"train", "evaluate"}, out  # evaluate follows from the new model; data/preprocess do not


def test_exp_run_with_set_param(dvc_repo):
    root, env = dvc_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock"], root, env)
    _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.loss.gamma=0", "-n", "gamma0"], root, env)
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], root, env).stdout)
    assert "gamma0" in json.dumps(shown)
