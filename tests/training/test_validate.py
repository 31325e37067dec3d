"""pipeline/training/validate.py: per-scan results, their summary (CPM, Dice, operating point), and
distributed validation (each rank its share of the scans, results gathered) equal to single-process
validation, with 2 gloo processes on CPU."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import EvaluationConfig
from pipeline.contracts import Plan
from pipeline.training.distributed import DistInfo, gather_shards, shard
from pipeline.training.validate import ScanResult, summarize, validate, validate_distributed, validate_scan

from .tiny_data import write_tiny_preprocessed

NAN = float("nan")


class DarkSpotModel(nn.Module):
    """A pointwise stand-in for a trained network: lesion logit ``4 - 8 (x + 1.7)^2`` peaks at the lesions'
    normalised intensity (about -1.7; liver 0, air -10.5), so it finds the lesions and, where tissue meets
    air, some false positives; scores vary with the image noise. (N, 1, ...) -> (N, 3, ...) logits."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # a parameter, as predict expects a real module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lesion = 4.0 - 8.0 * (x + 1.7) ** 2 + self.dummy
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x), lesion], dim=1)


# --------------------------------------------------------------------------------------------------
# pure parts


def test_shard_is_round_robin_and_gather_restores_the_order_without_a_group():
    items = list("abcde")
    assert shard(items, DistInfo(0, 2)) == ["a", "c", "e"]
    assert shard(items, DistInfo(1, 2)) == ["b", "d"]
    assert shard(items, DistInfo(2, 3)) == ["c"]
    assert shard(items, DistInfo(3, 4)) == ["d"] and shard(["a"], DistInfo(1, 2)) == []
    assert gather_shards(items, DistInfo()) == items  # one process: nothing to gather


def test_summary_of_hand_built_scans():
    """Two scans, three lesions: scan a hits lesion 1 at 0.9, misses lesion 2, FPs at 0.8 and 0.3; scan b
    hits its lesion at 0.5 and has no FP.

    Thresholds (decreasing): 0.9 -> 1 TP 0 FP; 0.8 -> 1 TP 1 FP (0.5 FP/scan); 0.5 -> 2 TP 1 FP;
    0.3 -> 2 TP 2 FP (1 FP/scan). Sensitivity at 1/8, 1/4: 1/3 (before the first FP); at 1/2: 2/3 (the
    best reached at 0.5 FP/scan); at 1, 2, 4, 8: 2/3. CPM = (2 * 1/3 + 5 * 2/3) / 7 = 4/7.
    At 1 FP/scan the operating threshold is 0.3 (2 of 3 lesions, 1 FP per scan).
    Dice: scan a 0.5, scan b None (no lesion voxel anywhere) -> mean 0.5.
    """
    scans = [ScanResult("a", np.array([0.9, NAN]), np.array([0.8, 0.3]), 0.5),
             ScanResult("b", np.array([0.5]), np.zeros(0), None)]
    result = summarize(scans, EvaluationConfig())
    assert result.metrics["cpm"] == pytest.approx(4 / 7)
    assert result.metrics["lesions"] == 3.0 and result.metrics["dice_lesion"] == 0.5
    assert result.metrics["sens_at_0.125fp"] == pytest.approx(1 / 3)
    assert result.metrics["sens_at_0.5fp"] == pytest.approx(2 / 3)
    op = result.operating_point
    assert (op.target_fp_rate, op.fps_per_scan) == (1.0, 1.0)
    assert op.threshold == pytest.approx(0.3) and op.sensitivity == pytest.approx(2 / 3)


def test_a_scan_without_lesions_or_candidates_gives_zero_cpm_and_no_threshold():
    result = summarize([ScanResult("empty", np.zeros(0), np.zeros(0), None)], EvaluationConfig())
    assert result.metrics["cpm"] == 0.0 and result.metrics["lesions"] == 0.0
    assert result.metrics["dice_lesion"] == 1.0  # no scan with a lesion voxel: nothing to miss
    assert result.operating_point.score_threshold is None  # no candidate: prediction applies no filter


# --------------------------------------------------------------------------------------------------
# on scans


@pytest.fixture
def val_scans(tmp_path):
    """5 validation scans (an odd count: the two ranks' shares differ in length) and their config."""
    data = write_tiny_preprocessed(tmp_path / "data", n_train=1, n_val=5)
    return data, data.cases("val"), data.config()


def test_validate_is_the_summary_of_its_scans(val_scans):
    data, cases, cfg = val_scans
    model, device = DarkSpotModel(), torch.device("cpu")
    result = validate(model, cases, data.plan, cfg, device, data.plan.patch_size)
    scans = [validate_scan(model, c, data.plan, cfg, device, data.plan.patch_size) for c in cases]
    assert result == summarize(scans, cfg.evaluation)
    # the stand-in finds lesions and false positives: the CPM says something
    assert result.metrics["lesions"] >= 5 and 0.0 < result.metrics["cpm"] <= 1.0
    assert sum(len(s.fp_scores) for s in scans) > 0


REPO = Path(__file__).resolve().parents[2]


def validate_on_rank(rank: int, world: int, root: str) -> None:
    """One gloo rank (run in its own process by the test below): validate its share of the tiny data set's
    validation scans and gather; write the result and the scans this rank ran itself to ``root``."""
    import json

    import pipeline.training.validate as validation
    from tests.training.tiny_data import TinyTrainData

    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    try:
        tree = json.loads(Path(root, "data.json").read_text())
        root_dir = Path(tree["root"])
        data = TinyTrainData(root_dir, Plan.load(root_dir / "pre" / "plan.json"), tree["splits"], tree["params"])
        ran: list[str] = []
        per_scan = validation.validate_scan

        def counting(model, case, *args):
            ran.append(case.case_id)
            return per_scan(model, case, *args)

        validation.validate_scan = counting  # what validate_distributed calls for each of its scans
        result = validate_distributed(DarkSpotModel(), data.cases("val"), data.plan, data.config(),
                                      torch.device("cpu"), data.plan.patch_size, DistInfo(rank, world))
        Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps((result, ran)))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_give_the_cpm_and_operating_point_of_one_process(val_scans, tmp_path):
    import json
    import os
    import subprocess
    import sys

    data, cases, cfg = val_scans
    alone = validate(DarkSpotModel(), cases, data.plan, cfg, torch.device("cpu"), data.plan.patch_size)
    tree = {"root": str(data.root), "splits": data.splits, "params": data.params}
    (tmp_path / "data.json").write_text(json.dumps(tree))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = ("import sys; from tests.training.test_validate import validate_on_rank as v; "
            "v(int(sys.argv[1]), 2, sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ids = [c.case_id for c in cases]
    for rank in (0, 1):
        result, ran = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert ran == ids[rank::2]  # each rank ran its share only (3 and 2 scans)
        assert result.metrics == alone.metrics  # exactly: same scans, same order, same arithmetic
        assert result.operating_point == alone.operating_point
    assert alone.metrics["cpm"] > 0.0
