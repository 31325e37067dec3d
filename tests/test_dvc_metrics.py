"""pipeline/dvc_metrics.py: the small numeric metrics and plot tables that DVC experiments commit."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from pipeline.dvc_metrics import (
    evaluation_summary,
    froc_step_rows,
    rate_key,
    training_summary,
    validation_rows,
    write_evaluation_metrics,
    write_training_metrics,
)
from pipeline.evaluation.froc import froc_curve

RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@pytest.mark.parametrize("rate, key", [(0.125, "1/8"), (0.25, "1/4"), (0.5, "1/2"), (1.0, "1"), (8.0, "8"),
                                       (0.3, "3/10"), (1 / 3, "1/3"), (0.1234567, "0.123457")])
def test_rate_key(rate, key):
    assert rate_key(rate) == key


def test_froc_step_rows_keep_the_top_of_each_jump_and_extend_to_the_last_rate():
    # 13 lesions, 12 found before any false positive (0.923 at 0 FP/scan), the 13th at 1 FP/scan
    c = froc_curve(np.r_[np.linspace(0.9, 0.99, 12), 0.2], np.array([0.5, 0.4, 0.3, 0.1]), n_scans=3)
    rows = froc_step_rows(c.fps_per_scan, c.sensitivity, x_max=8.0)
    xs, ys = zip(*rows)
    assert xs == (0.0, 1 / 3, 2 / 3, 1.0, 4 / 3, 8.0)
    assert ys == pytest.approx((12 / 13, 12 / 13, 12 / 13, 1.0, 1.0, 1.0))


def test_froc_step_rows_of_an_empty_curve():
    assert froc_step_rows([], [], 8.0) == []
    assert froc_step_rows([0.0], [np.nan], 8.0) == []  # no lesions: sensitivity undefined


def _detailed() -> dict:
    return {"cpm": 0.75, "cpm_ci95": [0.5, 0.9],
            "sensitivity_at_fp": {k: 0.75 for k in ("0.125", "0.25", "0.5", "1", "2", "4", "8")},
            "sensitivity_at_fp_ci95": {"0.125": [0.1, 0.2]}, "lesions_total": 8, "lesions_detected": 6,
            "false_positives_total": 3, "scans_total": 4, "dice": {"liver": 0.95, "lesion": 0.7},
            "hd95_mm": {"liver": 1.5, "lesion": None}, "settings": {"score": "max"},
            "operating_point": {"threshold": 0.3}, "extraction": {"mode": "dynamic", "factor": 2.5}}


def test_evaluation_summary_is_small_and_numeric():
    out = evaluation_summary(_detailed(), RATES, ["lesion"])
    assert out == {
        "cpm": 0.75, "cpm_ci95": {"low": 0.5, "high": 0.9},
        "sensitivity_at_fp": {k: 0.75 for k in ("1/8", "1/4", "1/2", "1", "2", "4", "8")},
        "dice": {"lesion": 0.7},  # lesion classes only; HD95 undefined (None) is left out
        "lesions": 8, "lesions_detected": 6, "false_positives": 3, "scans": 4,
        "extraction": {"factor": 2.5},  # numbers only
    }


def test_evaluation_summary_per_class_cpm():
    detailed = {**_detailed(), "per_class": {"edema": {"cpm": 0.5}, "core": {"cpm": 0.25}}}
    assert evaluation_summary(detailed, RATES, ["edema", "core"])["cpm_by_class"] == {"edema": 0.5, "core": 0.25}


HISTORY = [
    {"epoch": 1, "loss": 1.5, "focal": 0.5, "dice_loss": 1.0, "lr": 0.002, "patches_per_s": 10.0},
    {"epoch": 2, "loss": 1.25, "focal": 0.25, "dice_loss": 1.0, "lr": 0.001, "val_cpm": 0.5, "val_dice_lesion": 0.4},
    {"epoch": 3, "loss": 1.0, "focal": 0.25, "dice_loss": 0.75, "lr": 0.0005},
    {"epoch": 4, "loss": 0.75, "focal": 0.25, "dice_loss": 0.5, "lr": 0.0, "val_cpm": 0.75, "val_dice_lesion": 0.5},
]


def test_validation_rows_only_for_validated_epochs():
    columns, rows = validation_rows(HISTORY)
    assert columns == ["epoch", "val_cpm", "val_dice_lesion"]
    assert rows == [[2, 0.5, 0.4], [4, 0.75, 0.5]]


def test_training_summary_leaves_out_timings():
    summary = {"best_epoch": 4, "best_val_cpm": 0.75, "best_val_dice_lesion": 0.5, "best_val_lesions": 9,
               "final_train_loss": 0.75, "train_time_s": 12.3, "mean_patches_per_s": 10.0,
               "operating_point": {"threshold": 0.4}}
    assert training_summary(summary) == {"best_epoch": 4, "best_val_cpm": 0.75, "best_val_dice_lesion": 0.5,
                                         "final_train_loss": 0.75}


def test_writers(tmp_path):
    write_training_metrics(tmp_path, {"best_epoch": 4, "best_val_cpm": 0.75}, HISTORY)
    assert json.loads((tmp_path / "train.json").read_text()) == {"best_epoch": 4, "best_val_cpm": 0.75}
    loss = list(csv.DictReader(io.StringIO((tmp_path / "train_loss.csv").read_text())))
    assert [r["epoch"] for r in loss] == ["1", "2", "3", "4"] and loss[1]["loss"] == "1.25"
    assert (tmp_path / "validation.csv").read_text() == "epoch,val_cpm,val_dice_lesion\n2,0.5,0.4\n4,0.75,0.5\n"

    write_evaluation_metrics(tmp_path, _detailed(), RATES, ["lesion"], [0.0, 0.0, 0.5], [0.0, 0.5, 0.5])
    assert json.loads((tmp_path / "metrics.json").read_text())["cpm"] == 0.75
    assert (tmp_path / "froc.csv").read_text() == "fps_per_scan,sensitivity\n0,0.5\n0.5,0.5\n8,0.5\n"
