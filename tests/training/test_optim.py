"""Optimisers of pipeline/training/loop.py: nnU-Net's SGD (Nesterov, momentum 0.99, lr 1e-2, weight decay
3e-5, poly 0.9, no warm-up) and AdamW + cosine, each with its per-optimiser defaults."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config, OptimConfig
from pipeline.training.loop import build_optimizer
from pipeline.training.schedule import learning_rate


def _optimizer(**optim) -> torch.optim.Optimizer:
    cfg = Config.model_validate({"train": {"optim": optim}})
    return build_optimizer(cfg, torch.nn.Linear(3, 2))


def test_sgd_is_nnunets_nesterov_sgd_with_its_defaults():
    opt = _optimizer(name="sgd")
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.99
    assert group["lr"] == 1e-2 and group["weight_decay"] == 3e-5
    preset = OptimConfig.model_validate({"name": "sgd"})
    assert (preset.schedule, preset.warmup_epochs) == ("poly", 0)


def test_adamw_defaults_and_explicit_values_win_over_presets():
    opt = _optimizer(name="adamw")
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[0]["weight_decay"] == 1e-5
    assert (OptimConfig().schedule, OptimConfig().warmup_epochs) == ("cosine", 1)
    mixed = OptimConfig.model_validate({"name": "sgd", "lr": 0.05, "schedule": "cosine", "weight_decay": None})
    assert (mixed.lr, mixed.schedule, mixed.weight_decay, mixed.warmup_epochs) == (0.05, "cosine", 3e-5, 0)


def test_sgd_step_follows_the_nesterov_formula():
    """Two steps on p = (1, -2) with loss sum(p^2): g = 2p + wd p; v = mu v + g; p -= lr (g + mu v)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    cfg_opt = _optimizer(name="sgd").param_groups[0]
    assert {k: cfg_opt[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        k: opt.param_groups[0][k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    expected, v = p.detach().clone(), torch.zeros(2, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
        g = 2 * expected + 3e-5 * expected
        v = 0.99 * v + g
        expected = expected - 1e-2 * (g + 0.99 * v)
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("epoch", range(0, 10))
def test_poly_equals_nnunets_poly_lr_at_each_epoch_start(epoch):
    """nnU-Net v2's PolyLRScheduler: lr = lr0 * (1 - epoch / max_epochs)^0.9, set at each epoch's start."""
    epochs, steps_per_epoch, lr0 = 10, 25, 1e-2
    got = learning_rate(epoch * steps_per_epoch, epochs * steps_per_epoch, lr0, "poly")
    assert got == pytest.approx(lr0 * (1 - epoch / epochs) ** 0.9, rel=1e-12)


def test_time_fraction_compresses_the_schedule():
    base = 1e-2
    # half the budget used at step 10 of 1000: the time fraction (0.5) wins over the step fraction (0.01)
    assert learning_rate(10, 1000, base, "poly", time_fraction=0.5) == pytest.approx(base * 0.5**0.9)
    assert learning_rate(10, 1000, base, "cosine", time_fraction=0.5) == pytest.approx(base / 2)
    # the step fraction wins when it is ahead; warm-up is step-based; the budget's end gives 0
    assert learning_rate(900, 1000, base, "poly", time_fraction=0.5) == pytest.approx(base * 0.1**0.9)
    assert learning_rate(1, 1000, base, "poly", warmup_steps=4, time_fraction=0.9) == pytest.approx(base / 2)
    assert learning_rate(10, 1000, base, "cosine", time_fraction=1.0) == pytest.approx(0.0, abs=1e-18)
