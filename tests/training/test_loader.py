"""The training loader: one stream of batches over the whole run (worker processes start once, not once
per epoch), the same batches as epoch by epoch, and ``train.num_workers: auto``."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.config import AugmentConfig, SamplingConfig
from pipeline.training.data import PatchBatches, make_loader, resolve_num_workers
from pipeline.training.loop import train

from .tiny_data import LESION_LABEL, NO_AUGMENT


def _batches(data) -> PatchBatches:
    return PatchBatches(data.cases("train"), (16, 16, 8), 2, SamplingConfig(), AugmentConfig(**NO_AUGMENT),
                        [LESION_LABEL], seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_stream_gives_every_epochs_batches_in_order(tiny_train_data, workers):
    ds = _batches(tiny_train_data)
    expected = []
    for epoch in (1, 2, 3):  # epoch by epoch, as the loop did before
        ds.set_epoch(epoch, 3)
        expected += [ds.make_batch(s) for s in range(3)]
    ds.set_stream(3, 3 + 1, 12)  # global steps 4..11: epoch 1 from its step 1, then epochs 2 and 3
    got = list(make_loader(ds, workers, pin_memory=False))
    assert len(got) == 8
    for a, b in zip(got, expected[1:], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_loader_worker_process_is_reused_across_epochs(tiny_train_data, tmp_path, monkeypatch):
    """3 epochs with one worker: every batch comes from the same worker process (started once)."""
    log = tmp_path / "pids.txt"
    original = PatchBatches.make_batch

    def recording(self, step):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {self.epoch} {step}\n")
        return original(self, step)

    monkeypatch.setattr(PatchBatches, "make_batch", recording)  # workers are forked: they inherit it
    cfg = tiny_train_data.config(train={"epochs": 3, "steps_per_epoch": 2, "num_workers": 1,
                                        "augment": NO_AUGMENT})
    train(cfg, tiny_train_data.plan, tiny_train_data.cases("train"), [], tmp_path / "m", progress=False)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert [(int(e), int(s)) for _, e, s in rows] == [(e, s) for e in range(3) for s in range(2)]
    pids = {int(pid) for pid, _, _ in rows}
    assert len(pids) == 1 and os.getpid() not in pids


@pytest.mark.parametrize(("cores", "ranks", "expected"), [(1, 1, 0), (2, 1, 1), (4, 1, 3), (16, 1, 8),
                                                         (64, 1, 8), (8, 2, 3), (2, 4, 0)])
def test_auto_workers_leave_one_core_per_training_process(monkeypatch, cores, ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert resolve_num_workers("auto", ranks) == expected
    assert resolve_num_workers(5, ranks) == 5  # an explicit count is used as is
