"""pipeline/stages/data.py: the data stage validates before it writes, then writes the split."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.io.validate import DataValidationError
from pipeline.stages.data import run as prepare_data


def test_prepare_data_on_an_msd_dataset_writes_a_stratified_split(tiny_msd_dataset, tmp_path):
    root = tiny_msd_dataset(n_cases=4)
    splits_path = tmp_path / "out" / "splits.json"
    cfg = load_config(None, ["data.source=msd", f"data.dataset={root}", f"paths.splits={splits_path}"])
    summary = prepare_data(cfg, progress=False)
    assert json.loads(splits_path.read_text()) == summary
    assert summary["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert summary["lesion_labels"] == [2]
    assert summary["cases_with_lesions"] == ["case_000", "case_002"]  # the fixture's even cases
    train, val, test = (set(summary[k]) for k in ("train", "val", "test"))
    assert train | val | test == {f"case_{i:03d}" for i in range(4)}
    assert not (train & val or train & test or val & test)
    assert len(test) == 1 and len(val) == 1  # 4 cases: the tiny-data-set rule gives each split one


def test_prepare_data_writes_nothing_when_validation_fails(bad_msd_dataset, tmp_path):
    bad = bad_msd_dataset("nan_voxel")
    splits_path = tmp_path / "out" / "splits.json"
    cfg = load_config(None, ["data.source=msd", f"data.dataset={bad.root}", f"paths.splits={splits_path}"])
    with pytest.raises(DataValidationError, match="NaN/Inf"):
        prepare_data(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_data_synthesises_the_default_dataset(tmp_path):
    cfg = load_config(
        None,
        [
            f"paths.raw={tmp_path / 'raw'}",
            f"paths.splits={tmp_path / 'splits.json'}",
            "data.synthetic.n_cases=4",
            "data.synthetic.shape=[32,32,12]",
        ],
    )
    summary = prepare_data(cfg, progress=False)
    assert summary["dataset"] == "SyntheticRareLesionsCT"
    assert sorted(summary["train"] + summary["val"] + summary["test"]) == [f"synth_{i:03d}" for i in range(4)]
    assert len(list((tmp_path / "raw" / "imagesTr").iterdir())) == 4
