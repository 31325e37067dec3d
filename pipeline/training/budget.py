"""A wall-clock training budget (``train.time_budget_min``): how much of it is used, and when it is spent.

The budget covers the whole of ``train()``: start-up, training steps and validation passes. The training
steps get the budget minus a reserve for the final validation (the duration of the last validation pass,
once one has run), so that the final validation, model selection and checkpoint end close to the budget.
The fraction used drives the LR schedule (:func:`pipeline.training.schedule.learning_rate`): the whole
decay is compressed into the budget, and training ends when the fraction reaches 1.
"""

from __future__ import annotations

import time


class WallClockBudget:
    """Fraction of a wall-clock budget used so far; never decreases (the LR never goes back up).

    Args:
        minutes: the budget; ``None``: no budget (``fraction()`` is always 0).
        elapsed_before_s: seconds already spent by an earlier, resumed part of the same run.
        clock: seconds from an arbitrary origin (``time.perf_counter``; tests pass a fake one).
    """

    def __init__(self, minutes: float | None, elapsed_before_s: float = 0.0, clock=time.perf_counter):
        self.budget_s = None if minutes is None else 60.0 * minutes
        self.elapsed_before_s = elapsed_before_s
        self.reserve_s = 0.0  # kept for the final validation: the last validation's duration
        self._clock = clock
        self._start = clock()
        self._max_fraction = 0.0

    @property
    def enabled(self) -> bool:
        return self.budget_s is not None

    def elapsed_s(self) -> float:
        """Seconds spent, including the resumed part."""
        return self.elapsed_before_s + self._clock() - self._start

    def fraction(self) -> float:
        """elapsed / (budget - reserve), clipped to [0, 1] and non-decreasing; 0 without a budget."""
        if self.budget_s is None:
            return 0.0
        # the reserve never takes more than half: a validation pass slower than the rest of the budget
        # still leaves training some time (set val_every higher, or lower inference cost, then)
        usable = self.budget_s - min(self.reserve_s, 0.5 * self.budget_s)
        self._max_fraction = max(self._max_fraction, min(1.0, self.elapsed_s() / usable))
        return self._max_fraction

    def spent(self) -> bool:
        return self.budget_s is not None and self.fraction() >= 1.0
