"""pipeline/training/budget.py and ``train.time_budget_min``: the fraction of the budget used (fake clock),
and a real run that the budget ends cleanly: checkpoints, final validation, summary."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.model.checkpoint import load_checkpoint
from pipeline.stages.train import run as run_training
from pipeline.training.budget import WallClockBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fraction_counts_elapsed_time_against_the_budget_minus_the_reserve():
    clock = FakeClock()
    budget = WallClockBudget(1.0, clock=clock)  # 60 s
    assert budget.enabled and budget.fraction() == 0.0 and not budget.spent()
    clock.now += 30
    assert budget.fraction() == pytest.approx(0.5) and budget.elapsed_s() == pytest.approx(30)
    budget.reserve_s = 12.0  # a validation pass took 12 s: steps get 48 s
    assert budget.fraction() == pytest.approx(30 / 48)
    budget.reserve_s = 0.0  # a smaller reserve never moves the fraction back (the LR never rises)
    assert budget.fraction() == pytest.approx(30 / 48)
    budget.reserve_s = 45.0  # the reserve takes at most half the budget
    assert budget.fraction() == pytest.approx(30 / 30) and budget.spent()
    clock.now += 100
    assert budget.fraction() == 1.0


def test_resumed_runs_count_the_earlier_part_and_no_budget_is_never_spent():
    clock = FakeClock()
    resumed = WallClockBudget(2.0, elapsed_before_s=90.0, clock=clock)
    clock.now += 15
    assert resumed.elapsed_s() == pytest.approx(105) and resumed.fraction() == pytest.approx(105 / 120)
    off = WallClockBudget(None, clock=clock)
    clock.now += 1e6
    assert not off.enabled and off.fraction() == 0.0 and not off.spent()


def test_budget_ends_training_cleanly_with_checkpoints_a_final_validation_and_a_summary(tiny_train_data):
    budget_min = 0.05  # 3 s; 1000 epochs of 3 steps would take minutes
    cfg = tiny_train_data.config(train={"epochs": 1000, "steps_per_epoch": 3, "val_every": 1000,
                                        "time_budget_min": budget_min, "optim": {"lr": 0.01}})
    t0 = time.perf_counter()
    summary = run_training(cfg, progress=False)
    wall = time.perf_counter() - t0
    models = tiny_train_data.models

    assert summary["stopped_by"] == "time_budget" and summary["time_budget_min"] == budget_min
    assert 1 <= summary["steps"] < 3000
    assert summary["elapsed_s"] == pytest.approx(60 * budget_min, abs=3.0)  # ends at the budget, not far past
    assert wall < 60 * budget_min + 20  # start-up, MLflow-free summary and plots included
    on_disk = json.loads((models / "train_summary.json").read_text())
    assert on_disk["stopped_by"] == "time_budget" and on_disk["steps"] == summary["steps"]

    last, best = load_checkpoint(models / "last.pt"), load_checkpoint(models / "best.pt")
    history = last["history"]
    assert last["stopped_by"] == "time_budget" and last["steps"] == summary["steps"]
    assert sum(row["steps"] for row in history) == summary["steps"]
    assert last["epoch"] == len(history) - 1 < 999
    # model selection ran: the epoch the budget ended was validated, although val_every is 1000
    assert "val_cpm" in history[-1] and best["best_epoch"] == summary["best_epoch"] >= 1
    # the cosine decay was compressed into the budget: the last step's LR is well below the base
    assert history[-1]["lr"] < 0.5 * 0.01
    assert [r["lr"] for r in history] == sorted((r["lr"] for r in history), reverse=True)


def test_resuming_a_run_whose_budget_is_spent_trains_nothing_more(tiny_train_data, tmp_path):
    cfg = tiny_train_data.config(models=tmp_path / "m", train={"epochs": 1000, "steps_per_epoch": 2,
                                                              "val_every": 1000, "time_budget_min": 0.02})
    first = run_training(cfg, progress=False)
    again = run_training(cfg, resume=True, progress=False)
    assert again["stopped_by"] == "time_budget" and again["steps"] == first["steps"]
