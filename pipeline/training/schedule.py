"""Learning-rate schedules as pure functions of the step (and, under a wall-clock budget, of the time)."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, base_lr: float, kind: str, warmup_steps: int = 0,
                  time_fraction: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    1. Warm-up: linear from ``base_lr / warmup_steps`` to ``base_lr`` over the first ``warmup_steps``.
    2. Then the progress t in [0, 1] is the larger of the step fraction (step - warmup) / (total - warmup)
       and ``time_fraction`` (elapsed / usable wall-clock budget; 0 without a budget), so a budget
       compresses the whole decay into the time available.
    3. ``poly``: base * (1 - t)^0.9 (nnU-Net v2's PolyLRScheduler, which steps per epoch: at the first
       step of epoch e, t = e / epochs and both agree; in between this one decays per step instead of
       holding the epoch's value); ``cosine``: base * 0.5 * (1 + cos(pi * t)).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max((step - warmup_steps) / span, time_fraction))
    if kind == "poly":
        return base_lr * (1.0 - t) ** 0.9
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {kind!r}")
