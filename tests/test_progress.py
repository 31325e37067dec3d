"""pipeline/progress.py: the run-level ETA added to the training loop's epoch lines, and durations."""

from __future__ import annotations

import logging

import pytest

from pipeline.progress import EPOCH_LOGGER, EpochEta, epoch_eta, eta_seconds, format_duration


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (4.4, "4s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (7384, "2h03m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_is_the_mean_epoch_time_times_the_epochs_left():
    assert eta_seconds(4, 10, 20.0) == 30.0  # 5 s per epoch, 6 left
    assert eta_seconds(10, 10, 50.0) == 0.0
    with pytest.raises(ValueError):
        eta_seconds(0, 10, 1.0)


def _record(epoch: int) -> logging.LogRecord:
    return logging.LogRecord(EPOCH_LOGGER, logging.INFO, __file__, 1, "epoch %d: %s", (epoch, "loss=1"), None)


def test_epoch_lines_get_the_run_eta_including_after_a_resume():
    now = [100.0]
    f = EpochEta(epochs_total=10, clock=lambda: now[0])
    now[0] = 110.0  # resumed: the first epoch this process runs is 7, and it took 10 s
    rec = _record(7)
    assert f.filter(rec)
    assert rec.getMessage() == "epoch 7: loss=1 [epoch 7/10, elapsed 10s, ETA 30s]"
    now[0] = 130.0  # epoch 8 took 20 s: mean 15 s, 2 left
    rec = _record(8)
    f.filter(rec)
    assert rec.getMessage().endswith("[epoch 8/10, elapsed 30s, ETA 30s]")


def test_other_records_are_untouched():
    f = EpochEta(epochs_total=3)
    rec = logging.LogRecord(EPOCH_LOGGER, logging.INFO, __file__, 1, "resumed from %s at epoch %d", ("x", 2), None)
    f.filter(rec)
    assert rec.getMessage() == "resumed from x at epoch 2"


def test_context_manager_installs_and_removes_the_filter(caplog):
    logger = logging.getLogger(EPOCH_LOGGER)
    with caplog.at_level(logging.INFO, logger=EPOCH_LOGGER), epoch_eta(5):
        logger.info("epoch %d: %s", 1, "loss=0.5")
    assert "[epoch 1/5, elapsed" in caplog.records[-1].getMessage()
    assert not [f for f in logger.filters if isinstance(f, EpochEta)]
