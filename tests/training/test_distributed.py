"""pipeline/training/distributed.py and DDP training: ``torchrun --nproc_per_node=2 -m pipeline train`` on CPU
(gloo) on tiny data; only rank 0 logs, validates and writes checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.distributed import DistInfo, barrier, init_distributed

from .tiny_data import write_tiny_preprocessed

REPO = Path(__file__).resolve().parents[2]
RUN = {"train": {"epochs": 2, "steps_per_epoch": 2, "val_every": 1, "num_workers": 0}}


def test_single_process_is_not_distributed():
    info = init_distributed("cpu")  # no WORLD_SIZE in the environment (see conftest)
    assert info == DistInfo() and info.is_main and not info.enabled and info.world_size == 1
    barrier(info)  # a no-op without a process group
    assert not torch.distributed.is_initialized()


def test_rank_properties():
    assert not DistInfo(rank=1, world_size=2).is_main
    assert DistInfo(rank=0, world_size=2).enabled and DistInfo(rank=0, world_size=2).is_main


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(tmp_path):
    data = write_tiny_preprocessed(tmp_path / "data")
    models = tmp_path / "models"
    params = data.write_params(tmp_path / "params.yaml", models=models, **RUN)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    }
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipeline",
            "train",
            "--params",
            str(params),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    # exactly one best.pt and one last.pt, nothing half-written, nothing from rank 1
    written = sorted(
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_relative_to(tmp_path / "data")
    )
    assert written == [
        "models/best.pt",
        "models/last.pt",
        "models/mlflow_run.json",
        "models/train_log.csv",
        "models/train_summary.json",
        "models/training_curves.png",
        "params.yaml",
    ]
    # only rank 0 logs (and validates: its epoch lines carry the val_ metrics)
    for epoch in (1, 2):
        lines = re.findall(rf"INFO pipeline\.training\.loop: epoch {epoch}: .*", output)
        assert len(lines) == 1, output[-4000:]
        assert "val_cpm=" in lines[0]

    last = load_checkpoint(models / "last.pt")
    assert last["epoch"] == 1 and len(last["history"]) == 2
    assert "val_cpm" in last["history"][-1]

    # rank 1's gradients were averaged in: rank 0 alone (same seed, same rank-0 batches) ends elsewhere
    from pipeline.training.loop import train

    alone = tmp_path / "alone"
    train(data.config(models=alone, **RUN), data.plan, data.cases("train"), [], alone, progress=False)
    single = load_checkpoint(alone / "last.pt")["model"]
    diff = max(float((last["model"][k].float() - single[k].float()).abs().max()) for k in single)
    assert diff > 1e-4, diff
