"""supervised_loss on deep-supervision heads at their own resolution (nnU-Net): labels downsampled by
nearest neighbour to each head, losses weighted 2^-i / sum."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LossConfig, ModelConfig
from pipeline.losses import build_loss
from pipeline.model.factory import build_model
from pipeline.training.loop import supervised_loss


def test_heads_at_lower_resolution_use_downsampled_labels():
    torch.manual_seed(0)
    loss_fn = build_loss(LossConfig(), n_classes=3)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 4))
    full, half, quarter = torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)
    total, focal, dice = supervised_loss(loss_fn, [full, half, quarter], labels)
    # nearest neighbour: output voxel j <- input voxel floor(j * in / out)
    half_labels = labels[:, :, ::2, ::2, :]
    quarter_labels = labels[:, :, ::4, ::4, ::2]
    parts = [loss_fn.parts(full, labels), loss_fn.parts(half, half_labels), loss_fn.parts(quarter, quarter_labels)]
    w = [4 / 7, 2 / 7, 1 / 7]  # nnU-Net, 5 stages: (1, 1/2, 1/4, 0) / 1.75
    assert total == pytest.approx(float(sum(wi * p.total for wi, p in zip(w, parts))), rel=1e-6)
    assert focal == pytest.approx(float(sum(wi * p.focal for wi, p in zip(w, parts))), rel=1e-6)
    assert dice == pytest.approx(float(sum(wi * p.dice for wi, p in zip(w, parts))), rel=1e-6)


def test_a_dynunet_step_with_deep_supervision_reaches_every_head():
    plan = {"network": {"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
                        "kernel_sizes": [[3, 3, 1]] + [[3, 3, 3]] * 4}}
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_filters=4, max_filters=16), plan["network"], 1, 3).train()
    labels = torch.zeros(2, 1, 32, 32, 16, dtype=torch.long)
    labels[:, :, 8:16, 8:16, 4:8] = 2
    total, _, _ = supervised_loss(build_loss(LossConfig(), 3), model(torch.randn(2, 1, 32, 32, 16)), labels)
    total.backward()
    heads = [model.output_block.conv.conv, *(h.conv.conv for h in model.deep_supervision_heads)]
    assert len(heads) == 3
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in heads)
