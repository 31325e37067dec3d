"""pipeline/training/distributed.py and DDP training: ``torchrun --nproc_per_node=2 -m pipeline train`` on CPU
(gloo) on tiny data, and the same on two "nodes" of one machine; only rank 0 logs and writes checkpoints, every
rank validates its share of the validation scans (tests/training/test_validate.py checks the gathered metrics)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.model.checkpoint import load_checkpoint
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
    # only rank 0 logs (its epoch lines carry the gathered val_ metrics)
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


def test_process_group_timeout_comes_from_the_argument(monkeypatch):
    """``train.dist_timeout_min`` (default 30) reaches ``init_process_group(timeout=...)``."""
    from datetime import timedelta

    from pipeline.config import TrainConfig

    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert init_distributed("cpu", timeout_min=TrainConfig().dist_timeout_min) == DistInfo(1, 2, 0)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=30)}
    init_distributed("cpu", timeout_min=0.5)
    assert seen["timeout"] == timedelta(seconds=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _torchrun_env() -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _tensors(tree, prefix=""):
    """Every tensor of a checkpoint, by its path (``model/conv.weight``, ``optimizer/state/0/exp_avg``...)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}/{i}")


@pytest.mark.slow
def test_two_nodes_on_localhost_give_the_weights_of_one_node_with_two_processes(tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` (c10d rendezvous, gloo), both "nodes" on this machine,
    trains to exactly the checkpoint of ``torchrun --nproc-per-node 2``: every tensor equal (weights,
    optimiser moments, RNG state), same losses and validation metrics (3 validation scans: the ranks
    validate 2 and 1 and gather)."""
    data = write_tiny_preprocessed(tmp_path / "data", n_val=3)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = _torchrun_env()

    def command(models: Path, *launch: str) -> list[str]:
        params = data.write_params(tmp_path / f"{models.name}.yaml", models=models, **RUN)
        return [torchrun, *launch, "-m", "pipeline", "train", "--params", str(params)]

    one = subprocess.run(command(tmp_path / "one_node", "--standalone", "--nproc-per-node", "2"), cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]

    endpoint, run_id = f"localhost:{_free_port()}", f"test-{os.getpid()}"
    nodes = [
        subprocess.Popen(
            command(tmp_path / "two_nodes", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                    # two agents on one host: say which one serves the rendezvous store
                    "--rdzv-conf", f"is_host={int(node == 0)}"),
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "one_node" / name)
        b = load_checkpoint(tmp_path / "two_nodes" / name)
        ta, tb = dict(_tensors(a)), dict(_tensors(b))
        assert ta.keys() == tb.keys() and any(k.startswith("/model/") for k in ta)
        unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not unequal, unequal[:5]
        timing = ("patches_per_s", "data_wait_fraction", "epoch_time_s")
        assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
               [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
        assert a["best_metrics"] == b["best_metrics"] and a["operating_point"] == b["operating_point"]
    assert "val_cpm" in a["history"][-1] and a["best_metrics"]["lesions"] >= 3
