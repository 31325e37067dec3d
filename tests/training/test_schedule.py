"""pipeline/training/schedule.py: warm-up, poly and cosine learning rates at given steps."""

from __future__ import annotations

import math

import pytest

from pipeline.training.schedule import learning_rate

BASE = 0.01


@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_linear_warmup_reaches_base_lr(kind):
    # 4 warm-up steps of 20: base/4, 2 base/4, 3 base/4, base; then the decay starts at t = 0 (= base)
    assert [learning_rate(s, 20, BASE, kind, warmup_steps=4) for s in range(5)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01, 0.01]
    )


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, BASE), (5, BASE * 0.5**0.9), (8, BASE * 0.2**0.9), (9, BASE * 0.1**0.9), (10, 0.0), (15, 0.0)],
)
def test_poly_values(step, expected):
    assert learning_rate(step, 10, BASE, "poly") == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, BASE),
        (25, BASE * 0.5 * (1 + math.cos(math.pi / 4))),
        (50, BASE / 2),
        (75, BASE * 0.5 * (1 - math.cos(math.pi / 4))),
        (100, 0.0),
    ],
)
def test_cosine_values(step, expected):
    assert learning_rate(step, 100, BASE, "cosine") == pytest.approx(expected, abs=1e-15)


def test_decay_is_measured_from_the_end_of_warmup():
    # warm-up 10 of 110 steps: step 60 is half-way through the 100 decay steps
    assert learning_rate(60, 110, BASE, "cosine", warmup_steps=10) == pytest.approx(BASE / 2)
    assert learning_rate(60, 110, BASE, "poly", warmup_steps=10) == pytest.approx(BASE * 0.5**0.9)


@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_schedule_is_positive_and_non_increasing_after_warmup(kind):
    lrs = [learning_rate(s, 50, BASE, kind, warmup_steps=5) for s in range(50)]
    assert all(lr > 0 for lr in lrs)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate(3, 10, BASE, "step")
