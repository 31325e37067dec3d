"""Cross-validation through the train stage: ``train.fold`` picks fold k of the folds file (made once from
the split's train + val scans), and ``train-folds`` trains folds into ``<paths.models>/fold_<k>``."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as cli_main
from pipeline.data.splits import FoldsError
from pipeline.stages.train import training_case_ids

from .tiny_data import write_tiny_preprocessed


@pytest.fixture
def fold_data(tmp_path):
    """4 scans (3 train + 1 val in the split), 2 of them with lesions per the data stage's record."""
    data = write_tiny_preprocessed(tmp_path / "data", n_train=3, n_val=1)
    splits_path = data.root / "splits.json"
    splits = json.loads(splits_path.read_text())
    splits["cases_with_lesions"] = ["case_000", "case_003"]
    splits_path.write_text(json.dumps(splits))
    folds_path = tmp_path / "folds.json"
    data.params["paths"]["folds"] = str(folds_path)
    return data, folds_path


def test_fold_replaces_the_split_and_the_folds_file_is_made_once(fold_data):
    data, folds_path = fold_data
    assert training_case_ids(data.config()) == (["case_000", "case_001", "case_002"], ["case_003"])
    assert not folds_path.exists()  # no fold asked: no folds file
    train0, val0 = training_case_ids(data.config(train={"fold": 0, "n_folds": 2}))
    train1, val1 = training_case_ids(data.config(train={"fold": 1, "n_folds": 2}))
    assert sorted(val0 + val1) == ["case_000", "case_001", "case_002", "case_003"]
    assert set(train0) == set(val1) and set(train1) == set(val0)
    assert sorted(c in ("case_000", "case_003") for c in val0) == [False, True]  # one lesion scan per fold
    assert json.loads(folds_path.read_text()) == [{"train": train0, "val": val0}, {"train": train1, "val": val1}]
    with pytest.raises(FoldsError, match="holds 2 folds but train.n_folds is 3"):
        training_case_ids(data.config(train={"fold": 0, "n_folds": 3}))


def test_train_folds_command_trains_a_fold_into_its_own_folder(fold_data, capsys):
    data, folds_path = fold_data
    params = data.write_params(data.root / "params.yaml", train={"n_folds": 2, "epochs": 1, "steps_per_epoch": 2})
    assert cli_main(["train-folds", "--params", str(params), "--folds", "1", "-q"]) == 0
    out = data.models / "fold_1"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["fold"] == 1 and summary["n_folds"] == 2
    assert summary["train_cases"] == 2 and summary["val_cases"] == 2
    assert (out / "best.pt").is_file() and folds_path.is_file()
    assert f"inference.checkpoints=[{out / 'best.pt'}]" in capsys.readouterr().out
