"""pipeline/stages/train.py: the train stage's outputs (checkpoints, per-epoch CSV, summary JSON), resuming
a run killed mid-epoch, and refusing checkpoints from another config or code version."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.model.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from pipeline.stages.train import run as run_training
from tests.training.tiny_data import write_tiny_preprocessed

# 3 epochs of 3 steps, validation every epoch, one loader worker (the default), default augmentation
RUN = {"train": {"epochs": 3, "steps_per_epoch": 3, "val_every": 1, "num_workers": 1}}
TIMING = {"patches_per_s", "data_wait_fraction", "epoch_time_s", "gpu_mem_gb"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted run: (data, config, summary, models folder)."""
    data = write_tiny_preprocessed(tmp_path_factory.mktemp("stage") / "data")
    cfg = data.config(**RUN)
    summary = run_training(cfg, progress=False)
    return data, cfg, summary, data.models


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def copy_models(models: Path, tmp_path: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(models, out)
    return out


def test_stage_writes_its_outputs(finished_run):
    _, _, _, models = finished_run
    assert sorted(p.name for p in models.iterdir()) == [
        "best.pt",
        "last.pt",
        "mlflow_run.json",
        "train_log.csv",
        "train_summary.json",
        "training_curves.png",
    ]
    assert (models / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_epoch_csv(finished_run):
    _, _, _, models = finished_run
    rows = read_csv(models / "train_log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for key in (
        "loss",
        "focal",
        "dice_loss",
        "lr",
        "patches_per_s",
        "data_wait_fraction",
        "epoch_time_s",
        "val_cpm",
        "val_dice_lesion",
        "val_lesions",
        "val_sens_at_0.125fp",
        "val_sens_at_8fp",
    ):
        assert key in rows[0], key
    for r in rows:
        assert 0.0 <= float(r["data_wait_fraction"]) <= 1.0
        assert float(r["patches_per_s"]) > 0 and float(r["epoch_time_s"]) > 0
        assert float(r["loss"]) == pytest.approx(float(r["focal"]) + float(r["dice_loss"]), rel=1e-4)
        assert 0.0 <= float(r["val_cpm"]) <= 1.0 and float(r["val_lesions"]) == 1
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True)  # cosine decay, no warm-up in these tests


def test_summary_json(finished_run):
    _, _, summary, models = finished_run
    on_disk = json.loads((models / "train_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    rows = read_csv(models / "train_log.csv")
    best = rows[summary["best_epoch"] - 1]
    assert summary["best_val_cpm"] == pytest.approx(float(best["val_cpm"]), rel=1e-5)
    # the best epoch has the highest (CPM, lesion Dice) of all epochs, the earliest on a tie
    keys = [(round(float(r["val_cpm"]), 5), round(float(r["val_dice_lesion"]), 5)) for r in rows]
    assert keys.index(max(keys)) == summary["best_epoch"] - 1
    assert summary["final_train_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    assert summary["mean_patches_per_s"] > 0
    assert 0.0 <= summary["mean_data_wait_fraction"] <= 1.0
    assert summary["train_cases"] == 3 and summary["val_cases"] == 1 and summary["train_time_s"] > 0
    assert set(summary["operating_point"]) == {"target_fp_rate", "threshold", "sensitivity", "fps_per_scan"}


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_checkpoints_load_with_weights_only(finished_run, name):
    data, cfg, summary, models = finished_run
    state = torch.load(models / name, map_location="cpu", weights_only=True)
    assert state["format_version"] == FORMAT_VERSION
    assert (
        state["config"] == cfg.to_dict() and state["config_flat"] == cfg.flat() and state["plan"] == data.plan.to_dict()
    )
    assert {
        "model",
        "optimizer",
        "scaler",
        "epoch",
        "torch_rng",
        "history",
        "best_key",
        "best_epoch",
        "best_metrics",
        "operating_point",
    } <= set(state)
    assert state["best_epoch"] == summary["best_epoch"]
    if name == "last.pt":
        assert state["epoch"] == 2 and len(state["history"]) == 3
    else:
        assert state["epoch"] == summary["best_epoch"] - 1


def test_best_checkpoint_rebuilds_the_model_for_inference(finished_run):
    from pipeline.inference.loaded_model import load_model

    _, _, summary, models = finished_run
    loaded = load_model(models / "best.pt", "cpu")
    assert loaded.patch_size == (16, 16, 8) and loaded.lesion_labels == [2]
    assert loaded.operating_point.to_dict() == summary["operating_point"]  # the JSON and the checkpoint agree
    out = loaded.model(torch.zeros(1, 1, 16, 16, 8))
    assert out.shape == (1, 3, 16, 16, 8)


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(finished_run, tmp_path, monkeypatch):
    import pipeline.training.loop as loop
    from pipeline.training.schedule import learning_rate

    data, cfg, summary, models = finished_run
    out = tmp_path / "models"
    cfg_b = data.config(models=out, **RUN)
    with pytest.raises(KeyboardInterrupt, match="stopped after 5 steps"):
        run_training(cfg_b, progress=False, stop_after_steps=5)  # killed in epoch 2 (steps 4-6)
    # no temporary or partial files
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "train_log.csv"]
    assert load_checkpoint(out / "last.pt")["epoch"] == 0

    steps: list[int] = []  # global steps the resumed run trains: epochs 2 and 3 only, not a silent restart

    def counting_lr(step, *args, **kwargs):
        steps.append(step)
        return learning_rate(step, *args, **kwargs)

    monkeypatch.setattr(loop, "learning_rate", counting_lr)
    params = data.write_params(tmp_path / "params.yaml", models=out, **RUN)
    assert cli_main(["train", "--params", str(params), "--resume", "-q"]) == 0  # `train --resume`
    assert steps == [3, 4, 5, 6, 7, 8]

    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(models / name), load_checkpoint(out / name)
        assert a["epoch"] == b["epoch"] and a["best_key"] == b["best_key"], name
        assert a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
        assert torch.equal(a["torch_rng"], b["torch_rng"])
    rows_a, rows_b = read_csv(models / "train_log.csv"), read_csv(out / "train_log.csv")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rows_b
    ]
    resumed = json.loads((out / "train_summary.json").read_text())
    for key, value in summary.items():
        if key not in {"mean_patches_per_s", "mean_data_wait_fraction", "train_time_s", "elapsed_s"}:
            assert resumed[key] == value, key


def test_resume_with_a_changed_loss_fails_listing_the_key(finished_run, tmp_path):
    data, _, _, models = finished_run
    out = copy_models(models, tmp_path)
    changed = data.config(models=out, train={**RUN["train"], "loss": {"gamma": 1.0}})
    with pytest.raises(
        CheckpointError,
        match=r"last\.pt: checkpoint was written with a different config; cannot "
        r"resume:\n  train\.loss\.gamma: checkpoint 2\.0 != config 1\.0$",
    ):
        run_training(changed, resume=True, progress=False)


def test_resume_with_a_checkpoint_of_another_format_version_fails_naming_the_file(
    finished_run, tmp_path, capsys
):
    data, _, _, models = finished_run
    out = copy_models(models, tmp_path)
    state = torch.load(out / "last.pt", weights_only=True)
    torch.save({**state, "format_version": 999}, out / "last.pt")
    params = data.write_params(tmp_path / "params.yaml", models=out, **RUN)
    assert cli_main(["train", "--params", str(params), "--resume", "-q"]) == 1
    err = capsys.readouterr().err
    assert (
        f"{out / 'last.pt'}: checkpoint format version 999 does not match this code's version "
        f"{FORMAT_VERSION}" in err
    )


def test_patch_larger_than_every_scan_fails_with_a_clear_message(finished_run, tmp_path, capsys):
    data, _, _, _ = finished_run
    params = data.write_params(
        tmp_path / "params.yaml", models=tmp_path / "models", train={"patch_size": [48, 48, 24]}
    )
    assert cli_main(["train", "--params", str(params), "-q"]) == 1
    err = capsys.readouterr().err
    assert (
        "patch size [48, 48, 24] is larger than every preprocessed scan (largest extent [32, 32, 16] voxels)"
        in err
    )
    assert not (tmp_path / "models" / "last.pt").exists()
