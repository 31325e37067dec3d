"""pipeline/io/atomic.py: outputs appear whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.atomic import atomic_dir, atomic_path, write_json, write_npy


def test_atomic_path_keeps_the_compound_suffix_and_renames_on_success(tmp_path):
    with atomic_path(tmp_path / "sub" / "out.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path / "sub"
        tmp.write_text("x")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.nii.gz"]


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    (tmp_path / "out.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert (tmp_path / "out.json").read_text() == "old"


def test_atomic_dir_replaces_a_folder_only_on_success(tmp_path):
    target = tmp_path / "raw"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_write_json_and_npy_handle_numpy_and_paths(tmp_path):
    write_json(
        tmp_path / "m.json", {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2), "p": Path("a/b")}
    )
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 3, "x": 0.5, "a": [0, 1], "p": "a/b"}
    write_npy(tmp_path / "a.npy", np.eye(2))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.eye(2))
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(tmp_path / "bad.json", {"o": object()})
    assert not (tmp_path / "bad.json").exists()
