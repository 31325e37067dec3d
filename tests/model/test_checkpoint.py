"""pipeline/model/checkpoint.py: atomic writes, safe loads, format-version and config checks.

Checkpoints written by a real training run are checked in ``test_stage.py``.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.config import Config
from pipeline.model.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    check_resume_compatible,
    load_checkpoint,
    save_checkpoint,
)


def small_state(value: float = 1.0) -> dict:
    return {
        "model": {"w": torch.full((2, 3), value)},
        "epoch": 3,
        "history": [{"loss": 0.5}],
        "plan": {"a": [1, 2]},
        "operating_point": {"threshold": None},
    }


def test_save_then_load_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(2.0))
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((2, 3), 2.0))
    assert (
        state["epoch"] == 3
        and state["history"] == [{"loss": 0.5}]
        and state["operating_point"] == {"threshold": None}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(1.0))
    before = path.read_bytes()

    def killed_mid_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_state(5.0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2, 3))


def test_other_format_version_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({**small_state(), "format_version": FORMAT_VERSION + 41}, path)
    with pytest.raises(
        CheckpointError,
        match=rf"old\.pt: checkpoint format version {FORMAT_VERSION + 41} does not "
        rf"match this code's version {FORMAT_VERSION}",
    ):
        load_checkpoint(path)


def test_file_without_format_version_is_rejected(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: checkpoint format version None"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would run code: a safe loader must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_holding_arbitrary_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "x": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a loadable checkpoint"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a loadable checkpoint"):
        load_checkpoint(junk)


def flat(**train) -> dict:
    return Config.model_validate({"train": train}).flat()


def test_resume_check_lists_every_changed_training_key(tmp_path):
    old = flat(loss={"gamma": 2.0}, optim={"lr": 0.01})
    new = flat(loss={"gamma": 1.0}, optim={"lr": 0.02})
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(tmp_path / "last.pt", old, new)
    msg = str(err.value)
    assert "last.pt: checkpoint was written with a different config; cannot resume" in msg
    assert "train.loss.gamma: checkpoint 2.0 != config 1.0" in msg
    assert "train.optim.lr: checkpoint 0.01 != config 0.02" in msg


def test_resume_check_allows_more_epochs_and_non_training_sections(tmp_path):
    old = Config.model_validate({"train": {"epochs": 2}}).flat()
    new = Config.model_validate(
        {
            "train": {"epochs": 5},
            "evaluation": {"bootstrap": 10},
            "tracking": {"enabled": False},
            "paths": {"models": "elsewhere"},
        }
    ).flat()
    check_resume_compatible(tmp_path / "last.pt", old, new)  # no error
