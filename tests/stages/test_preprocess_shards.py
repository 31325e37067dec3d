"""Sharded preprocessing: plan once, N shards as separate concurrent processes, merge == one unsharded run,
byte for byte; a missing shard is named by case id; shards share the lock, never with an exclusive run."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.stages.preprocess import (
    PreprocessError,
    merge_preprocess,
    plan_preprocess,
    preprocess_shard,
    run_preprocess,
)
from pipeline.stages.shard import Shard
from tests.stages.test_preprocess import files, make_dataset, temp_files

REPO = Path(__file__).resolve().parents[2]
# sorted ids case_00..case_07 -> shard 0/3: 00 03 06, 1/3: 01 04 07, 2/3: 02 05
SHARD_1_OF_3 = ["case_01", "case_04", "case_07"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    ds, splits = make_dataset(root / "raw")
    (root / "splits.json").write_text(json.dumps(splits))
    return ds, splits, root


def cli(root: Path, *args: str) -> subprocess.Popen:
    """``python -m pipeline preprocess`` on the fixture's data set, in an empty working directory (so no
    params.yaml is found: built-in defaults, as ``config_from_dict({})``)."""
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUTF8": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "preprocess", "--workers", "1",
         "--set", f"paths.raw={root / 'raw'}", "--set", f"paths.splits={root / 'splits.json'}", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def test_three_concurrent_shard_processes_equal_one_unsharded_run(data):
    _, _, root = data
    ref, out = root / "unsharded", root / "sharded"
    code, err = finish(cli(root, "--output", str(ref)))
    assert code == 0, err
    code, err = finish(cli(root, "--plan-only", "--output", str(out)))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".preprocess.lock", "fingerprint.json", "plan.json"]
    shards = [cli(root, "--shard", f"{k}/3", "--output", str(out)) for k in range(3)]  # all at once
    results = [finish(p) for p in shards]
    for k, (code, err) in enumerate(results):
        assert code == 0, err
        assert f"shard {k}/3: {[3, 3, 2][k]} case(s) preprocessed" in err  # 8 cases, sorted[k::3]
    code, err = finish(cli(root, "--merge", "--num-parts", "3", "--output", str(out)))
    assert code == 0, err
    assert "all 8 case(s) present" in err
    sharded = files(out)
    assert len(sharded) == 2 + 8 * 3  # fingerprint, plan; per case image, label, record
    assert sharded == files(ref)
    assert temp_files(out) == []


def test_missing_shard_is_named_by_case_id_and_shard(data, tmp_path):
    ds, splits, root = data
    cfg = config_from_dict({})
    plan_preprocess(cfg, ds, splits, tmp_path, workers=1)
    for k, expected in ((0, ["case_00", "case_03", "case_06"]), (2, ["case_02", "case_05"])):  # 1/3 never ran
        summary = preprocess_shard(cfg, ds, splits, Shard(k, 3), tmp_path, workers=1)
        assert summary["shard"] == f"{k}/3" and summary["processed"] == expected
    with pytest.raises(PreprocessError) as err:
        merge_preprocess(cfg, ds, splits, tmp_path, workers=1, num_parts=3)
    message = str(err.value)
    assert "3 of 8 case(s) missing" in message
    for cid in SHARD_1_OF_3:
        assert f"{cid} (shard 1/3)" in message
    assert "case_00" not in message and "--shard for 1/3" in message
    # through the CLI: a non-zero exit naming the cases; without --num-parts the ids alone
    code, err = finish(cli(root, "--merge", "--output", str(tmp_path)))
    assert code == 1 and all(cid in err for cid in SHARD_1_OF_3) and "(shard" not in err, err
    # the missing shard runs; the merge passes
    preprocess_shard(cfg, ds, splits, Shard(1, 3), tmp_path, workers=1)
    assert merge_preprocess(cfg, ds, splits, tmp_path, workers=1, num_parts=3)["n_cases"] == 8


def test_shard_without_plan_refuses_and_names_the_file(data, tmp_path):
    _, _, root = data
    code, err = finish(cli(root, "--shard", "0/2", "--output", str(tmp_path / "out")))
    assert code == 3, err
    assert f"{tmp_path / 'out' / 'plan.json'}: not found" in err and "--plan-only" in err
    assert not (tmp_path / "out" / "cases").exists()


def test_shard_refuses_a_plan_of_another_split(data, tmp_path):
    ds, splits, _ = data
    cfg = config_from_dict({})
    plan_preprocess(cfg, ds, splits, tmp_path, workers=1)
    moved = {**splits, "train": splits["train"][1:], "test": [*splits["test"], splits["train"][0]]}
    with pytest.raises(PreprocessError, match=r"fingerprint.json: planned on other cases.*--plan-only"):
        preprocess_shard(cfg, ds, moved, Shard(0, 2), tmp_path, workers=1)


def test_shards_share_the_lock_but_never_with_an_exclusive_run(data, tmp_path):
    ds, splits, _ = data
    cfg = config_from_dict({})
    plan_preprocess(cfg, ds, splits, tmp_path, workers=1)
    with open(tmp_path / ".preprocess.lock") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)  # another shard is running
        summary = preprocess_shard(cfg, ds, splits, Shard(1, 4), tmp_path, workers=1)
        assert summary["processed"] == ["case_01", "case_05"]
        for exclusive in (run_preprocess, plan_preprocess, merge_preprocess):
            with pytest.raises(PreprocessError, match="another preprocess run"):
                exclusive(cfg, ds, splits, tmp_path, workers=1)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fcntl.flock(fh, fcntl.LOCK_EX)  # a plan / merge / unsharded run is writing
        with pytest.raises(PreprocessError, match="another preprocess run.*plan, merge or unsharded"):
            preprocess_shard(cfg, ds, splits, Shard(0, 4), tmp_path, workers=1)


def test_a_shard_removes_only_its_own_cases_temp_files(data, tmp_path):
    """Debris of a killed shard 0 is cleaned by its re-run; shard 1's temp files (it may be writing them
    right now) are left alone; the merge removes what is left."""
    ds, splits, _ = data
    cfg = config_from_dict({})
    plan_preprocess(cfg, ds, splits, tmp_path, workers=1)
    cases = tmp_path / "cases"
    cases.mkdir()
    own = cases / ".case_00_image.npy.ab12.tmp.npy"
    neighbour = cases / ".case_01_image.npy.cd34.tmp.npy"
    prefix_twin = cases / ".case_0_image.npy.ef56.tmp.npy"  # not case_00's, though a prefix of its name
    for path in (own, neighbour, prefix_twin):
        path.write_bytes(b"half")
    preprocess_shard(cfg, ds, splits, Shard(0, 2), tmp_path, workers=1)
    assert not own.exists() and neighbour.exists() and prefix_twin.exists()
    preprocess_shard(cfg, ds, splits, Shard(1, 2), tmp_path, workers=1)
    assert not neighbour.exists()
    merge_preprocess(cfg, ds, splits, tmp_path, workers=1)
    assert temp_files(tmp_path) == []
