"""The pipeline key: the same for every stage of one execution, different when config, code or data change."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from pipeline.config import config_from_dict
from pipeline.tracking.run_key import code_hash, config_hash, pipeline_key

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


@pytest.fixture
def workspace(tmp_path):
    """A git repository with a 2-file package, a data folder, a splits file and a config pointing at them."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("y = 2\n")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "case.nii.gz").write_bytes(b"\1" * 10)
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"train": ["case"]}))
    subprocess.run([*GIT, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "add", "pkg"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "init"], cwd=tmp_path, check=True)
    return tmp_path


def _cfg(root, **over):
    doc = {"paths": {"raw": str(root / "data" / "raw"), "splits": str(root / "data" / "splits.json")}}
    for dotted, value in over.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(doc)


def _key(root, cfg):
    return pipeline_key(cfg, repo_dir=root, dvc_lock=root / "dvc.lock", package_dir=root / "pkg")


def test_same_execution_same_key_and_its_format(workspace):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout
    a, b = _key(workspace, _cfg(workspace)), _key(workspace, _cfg(workspace))
    assert a == b  # train and evaluate, two processes, same inputs
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{20}", a) and a.startswith(commit[:12])


def test_tracking_settings_do_not_change_the_key_but_a_parameter_does(workspace):
    base = _key(workspace, _cfg(workspace))
    assert _key(workspace, _cfg(workspace, tracking__experiment="other")) == base
    assert _key(workspace, _cfg(workspace, train__loss__gamma=0.0)) != base


def test_code_data_and_split_changes_give_a_new_key(workspace):
    cfg = _cfg(workspace)
    base = _key(workspace, cfg)
    (workspace / "pkg" / "a.py").write_text("x = 2\n")  # uncommitted edit: same commit, other code
    edited = _key(workspace, cfg)
    assert edited != base
    (workspace / "data" / "raw" / "case2.nii.gz").write_bytes(b"\2")
    more_data = _key(workspace, cfg)
    assert more_data != edited
    (workspace / "data" / "splits.json").write_text(json.dumps({"train": []}))
    assert _key(workspace, cfg) != more_data


def test_outside_git_the_key_says_so(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("")
    key = pipeline_key(_cfg(tmp_path), repo_dir=tmp_path, dvc_lock=tmp_path / "dvc.lock", package_dir=tmp_path / "pkg")
    assert key.startswith("nogit-")


def test_config_and_code_hash_helpers(tmp_path):
    assert config_hash({"seed": 0, "tracking": {"enabled": True}}) == config_hash({"seed": 0})
    assert config_hash({"seed": 0}) != config_hash({"seed": 1})
    (tmp_path / "x.py").write_text("a")
    first = code_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert code_hash(tmp_path) == first
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.py").write_text("b")
    assert code_hash(tmp_path) != first
