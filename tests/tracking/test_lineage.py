"""Lineage tags: git commit and dirty flag, DVC experiment and data hash, versions, device."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from pipeline.tracking import lineage_tags
from pipeline.tracking.lineage import stat_hash

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


def _git(repo, *args):
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("data/\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    data = tmp_path / "data" / "preprocessed"
    data.mkdir(parents=True)
    (data / "case_000.npy").write_bytes(b"\0" * 10)
    (data / "case_001.npy").write_bytes(b"\1" * 20)
    return tmp_path


def test_git_commit_and_dirty_flag(repo):
    head = _git(repo, "rev-parse", "HEAD").strip()
    tags = lineage_tags(repo_dir=repo)
    assert tags["git.commit"] == head
    assert tags["mlflow.source.git.commit"] == head
    assert tags["git.dirty"] == "false"  # ignored data does not count
    (repo / "train.py").write_text("print(2)\n")
    assert lineage_tags(repo_dir=repo)["git.dirty"] == "true"


def test_no_git_repository_is_tolerated(tmp_path):
    tags = lineage_tags(repo_dir=tmp_path)
    assert "git.commit" not in tags
    assert tags["version.python"]


def test_dvc_lock_md5_is_used_for_the_data_dir(repo):
    (repo / "dvc.lock").write_text(
        textwrap.dedent(
            """\
            schema: '2.0'
            stages:
              preprocess:
                cmd: python -m pipeline.stages.preprocess
                deps:
                - path: data/raw
                  md5: 1111.dir
                outs:
                - path: data/preprocessed
                  md5: 0123456789abcdef0123456789abcdef.dir
                  size: 30
                  nfiles: 2
            """
        )
    )
    tags = lineage_tags(repo / "data" / "preprocessed", repo / "dvc.lock", repo_dir=repo)
    assert tags["data.dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert "stage preprocess" in tags["data.hash_source"]
    assert tags["data.stat_hash"] == stat_hash(repo / "data" / "preprocessed")
    # a deps entry is never used (it may be stale while its stage runs)
    tags = lineage_tags(repo / "data" / "raw", repo / "dvc.lock", repo_dir=repo)
    assert "data.dvc_md5" not in tags


def test_dvc_file_and_stat_only_fallback(repo):
    data = repo / "data" / "preprocessed"
    tags = lineage_tags(data, repo / "dvc.lock", repo_dir=repo)
    assert "data.dvc_md5" not in tags and tags["data.hash_source"].startswith("stat-only")
    (repo / "data" / "preprocessed.dvc").write_text("outs:\n- md5: feed.dir\n  path: preprocessed\n")
    tags = lineage_tags(data, repo / "dvc.lock", repo_dir=repo)
    assert tags["data.dvc_md5"] == "feed.dir"
    assert tags["data.hash_source"].endswith("preprocessed.dvc")


def test_stat_hash_changes_with_the_files(repo):
    data = repo / "data" / "preprocessed"
    before = stat_hash(data)
    assert stat_hash(data) == before
    (data / "case_001.npy").write_bytes(b"\1" * 21)
    assert stat_hash(data) != before
    after = stat_hash(data)
    os.utime(data / "case_000.npy", ns=(1, 1))
    assert stat_hash(data) != after


def test_dvc_experiment_env_and_versions(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "zesty-bear")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc")
    monkeypatch.setenv("DVC_STAGE", "train")
    tags = lineage_tags(repo_dir=repo, device="cpu")
    assert tags["dvc.exp_name"] == "zesty-bear"
    assert tags["dvc.exp_baseline"] == "abc"
    assert tags["dvc.stage"] == "train"
    for pkg in ("torch", "monai", "numpy", "mlflow", "pipeline", "python"):
        assert tags[f"version.{pkg}"], pkg
    assert tags["device"] == "cpu"


def test_dvc_own_files_and_untracked_files_do_not_make_a_clone_dirty(repo):
    """A fresh clone after `dvc init` + `dvc repro`: untracked .dvc/ and dvc.lock, DVC-edited .gitignore."""
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[core]\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "notes.txt").write_text("scratch\n")  # untracked, not ignored
    assert lineage_tags(repo_dir=repo)["git.dirty"] == "false"
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-q", "-m", "lock")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # rewritten by the next repro
    (repo / ".gitignore").write_text("data/\n/models\n")  # DVC adds its outputs
    tags = lineage_tags(repo_dir=repo)
    assert tags["git.dirty"] == "false" and "git.dirty_files" not in tags
    (repo / "train.py").write_text("print(3)\n")
    tags = lineage_tags(repo_dir=repo)
    assert tags["git.dirty"] == "true" and tags["git.dirty_files"] == "train.py"


def test_dirty_paths_parses_porcelain():
    from pipeline.tracking.lineage import dirty_paths

    out = " M a.py\nR  old.py -> new.py\n?? x.py\n!! ignored\n M sub/.gitignore\nD  .dvc/config\n"
    assert dirty_paths(out) == ["a.py", "new.py"]
