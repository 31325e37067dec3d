"""Run-level progress for the CLI: an overall ETA on the training loop's per-epoch log lines, and the
duration format of the end-of-run summary line.

The per-epoch progress bar shows the ETA of one epoch only; :class:`EpochEta` adds the run's: after epoch
``e`` of ``E`` (``s`` = the first epoch of this process, > 1 after a resume), with ``t`` seconds since the
filter was installed, ``ETA = t / (e - s + 1) * (E - e)`` (the mean epoch time so far, validation
included, times the epochs left).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EPOCH_LOGGER = "pipeline.training.loop"  # its "epoch %d: ..." INFO line closes every epoch


def format_duration(seconds: float) -> str:
    """``4`` -> ``"4s"``, ``185`` -> ``"3m05s"``, ``7384`` -> ``"2h03m"``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(epochs_done: int, epochs_total: int, elapsed_s: float) -> float:
    """Seconds left after ``epochs_done`` of ``epochs_total`` epochs took ``elapsed_s`` (mean epoch time)."""
    if epochs_done <= 0:
        raise ValueError("no epoch done yet")
    return elapsed_s / epochs_done * max(epochs_total - epochs_done, 0)


class EpochEta(logging.Filter):
    """Appends ``[epoch e/E, elapsed ..., ETA ...]`` to the training loop's end-of-epoch log line.

    Install on the loop's logger for the duration of one training run (:func:`epoch_eta`).
    """

    def __init__(self, epochs_total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.epochs_total = epochs_total
        self.clock = clock
        self.t0 = clock()
        self.first_epoch: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if isinstance(record.msg, str) and record.msg.startswith("epoch %d:") and args and isinstance(args[0], int):
            epoch = args[0]
            if self.first_epoch is None:
                self.first_epoch = epoch
            done = epoch - self.first_epoch + 1
            elapsed = self.clock() - self.t0
            eta = eta_seconds(done, self.epochs_total - self.first_epoch + 1, elapsed)
            record.msg = f"{record.msg} [epoch %d/%d, elapsed %s, ETA %s]"
            record.args = (*args, epoch, self.epochs_total, format_duration(elapsed), format_duration(eta))
        return True


class epoch_eta:  # noqa: N801 - used as a context manager, like contextlib's
    """``with epoch_eta(cfg.train.epochs): ...``: :class:`EpochEta` on the training loop's logger."""

    def __init__(self, epochs_total: int) -> None:
        self.filter = EpochEta(epochs_total)
        self.logger = logging.getLogger(EPOCH_LOGGER)

    def __enter__(self) -> EpochEta:
        self.logger.addFilter(self.filter)
        return self.filter

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self.filter)
