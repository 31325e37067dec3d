"""``predict --shard K/N``: three shard processes, run at the same time into one folder, write exactly the files
(byte for byte) of one unsharded run; each shard predicts sorted(scans)[K::N]."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.io import Volume, make_affine, write_volume
from tests.inference.tiny_model import random_checkpoint, tiny_plan

REPO = Path(__file__).resolve().parents[2]
TINY = {"data": {"synthetic": {"n_cases": 4, "shape": [40, 36, 12], "lesion_free_fraction": 0.0}},
        "train": {"model": {"base_filters": 4, "max_filters": 16}}, "tracking": {"enabled": False}}
SCANS = ["a.nii.gz", "b.nii.gz", "c.mha", "d.nii.gz", "e.nii.gz"]  # shard 0/3: a d, 1/3: b e, 2/3: c


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict_shards")
    cfg = config_from_dict({**TINY, "paths": {"raw": str(root / "raw")}})
    model = random_checkpoint(root / "best.pt", cfg, tiny_plan(cfg))
    rng = np.random.default_rng(0)
    for k, name in enumerate(SCANS):
        data = rng.normal(40, 30, size=(1, 30 + k, 28, 10)).astype(np.int16)
        write_volume(root / "in" / name, Volume(data, make_affine((0.8, 0.9, 2.5), (k * 3.0, -5.0, 12.0))))
    return root, model


def predict(root: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen:
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)  # no params.yaml there: built-in defaults
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUTF8": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "predict", "--model", str(model), "--input", str(root / "in"),
         "--output", str(out), "--set", "inference.overlap=0.25", "--set", "inference.device=cpu", *extra],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_three_concurrent_shards_write_the_unsharded_files(setup):
    root, model = setup
    whole = predict(root, model, root / "whole")
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    shards = [predict(root, model, root / "sharded", "--shard", f"{k}/3") for k in range(2)]
    shards.append(predict(root, model, root / "sharded", "--part-id", "2", "--num-parts", "3"))  # nnU-Net's
    for k, proc in enumerate(shards):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert f"shard {k}/3: {[2, 2, 1][k]} scan(s) predicted" in err
    expected = tree(root / "whole")
    stems = [name.split(".")[0] for name in SCANS]
    assert sorted(expected) == sorted(f"{kind}/{name}" for kind in ("labels", "probabilities") for name in SCANS)
    assert stems == sorted(stems)
    assert tree(root / "sharded") == expected  # byte-identical, nothing extra, nothing missing
