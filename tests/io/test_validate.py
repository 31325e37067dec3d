"""pipeline/io/validate.py: every problem in a data set, each line naming case id, file and problem."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from pipeline.io.dataset import DatasetError, load_msd
from pipeline.io.formats import write_volume
from pipeline.io.validate import CaseSummary, DataValidationError, check_dataset
from pipeline.io.volume import Volume

BAD_INPUTS = [
    "truncated_nii_gz",
    "not_an_image",
    "image_2d",
    "label_grid_mismatch",
    "undeclared_label",
    "nan_voxel",
    "missing_file",
    "empty_training",
    "invalid_json",
    "path_escape",
]


def _problems(root, **kwargs) -> list[str]:
    """All problems reported for the data set at ``root`` (loading and validation), [] when valid."""
    try:
        check_dataset(load_msd(root), progress=False, **kwargs)
    except (DatasetError, DataValidationError) as exc:
        return exc.problems
    return []


def test_a_valid_dataset_passes_and_is_summarised(tiny_msd_dataset):
    ds = load_msd(tiny_msd_dataset(n_cases=3))
    summaries = check_dataset(ds, lesion_labels=(2,), progress=False)
    assert [s.case_id for s in summaries] == ["case_000", "case_001", "case_002"]
    assert summaries[0] == CaseSummary("case_000", (16, 16, 16), pytest.approx((0.8, 1.1, 2.5)), (0, 1, 2))
    assert summaries[1].label_values == (0, 1)  # odd cases are lesion-free


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_each_bad_input_is_reported_with_its_file_and_problem(bad_msd_dataset, kind):
    bad = bad_msd_dataset(kind)
    problems = _problems(bad.root, lesion_labels=(2,))
    assert len(problems) == 1, problems
    line = problems[0]
    prefix = f"case {bad.case_id}: {bad.file}: " if bad.case_id else f"{bad.file}: "
    assert line.startswith(prefix), line
    assert re.search(bad.problem, line), line


def test_several_problems_are_reported_at_once(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=4)
    image, label = make_case_arrays((16, 16, 16), lesion=True, seed=0)
    image[0, 0, 0] = np.inf
    write_volume(root / "imagesTr" / "case_000.nii.gz", Volume(image[None], oblique_affine))
    label[1, 1, 1] = 5
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(label[None], oblique_affine))
    (root / "imagesTr" / "case_002.nii.gz").unlink()
    _, label = make_case_arrays((16, 16, 16), lesion=False, seed=3)
    shifted = oblique_affine.copy()
    shifted[:3, 3] += 1.0  # 1 mm off
    write_volume(root / "labelsTr" / "case_003.nii.gz", Volume(label[None], shifted))

    with pytest.raises(DataValidationError) as info:
        check_dataset(load_msd(root), progress=False)
    assert str(info.value).startswith("4 problem(s) in the data set:\n")
    img, lab = root / "imagesTr", root / "labelsTr"
    p = info.value.problems
    assert p[0] == f"case case_000: {img / 'case_000.nii.gz'}: 1 NaN/Inf voxel(s)"
    assert p[1] == (
        f"case case_001: {lab / 'case_001.nii.gz'}: label value(s) [5] not declared in dataset.json "
        "(declared: [0, 1, 2])"
    )
    assert p[2] == f"case case_002: {img / 'case_002.nii.gz'}: file not found"
    assert p[3].startswith(
        f"case case_003: {lab / 'case_003.nii.gz'}: label grid does not match image "
        f"{img / 'case_003.nii.gz'}: origin "
    )


def test_label_on_another_direction_or_spacing(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=2)
    _, label = make_case_arrays((16, 16, 16), lesion=False, seed=1)
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(label[None], np.diag([0.8, 1.1, 2.5, 1.0])))
    (line,) = _problems(root)
    assert "label grid does not match" in line and "direction differs" in line

    coarse = oblique_affine.copy()
    coarse[:3, 2] *= 1.2  # 3.0 mm slices instead of 2.5
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(label[None], coarse))
    (line,) = _problems(root)
    assert "spacing [0.8, 1.1, 2.5] != [0.8, 1.1, 3.0] mm" in line


def test_grid_differences_within_tolerance_are_accepted(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=2)
    _, label = make_case_arrays((16, 16, 16), lesion=False, seed=1)
    nudged = oblique_affine.copy()
    nudged[:3, 3] += 1e-5  # 10 nm: rounding in another tool's header
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(label[None], nudged))
    assert _problems(root) == []


def test_float_label_maps(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=2)
    _, label = make_case_arrays((16, 16, 16), lesion=False, seed=1)
    as_float = label.astype(np.float32)
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(as_float[None], oblique_affine))
    assert _problems(root) == []  # whole-number floats are fine
    as_float[2, 2, 2] = 0.5
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(as_float[None], oblique_affine))
    assert _problems(root) == [
        f"case case_001: {root / 'labelsTr' / 'case_001.nii.gz'}: label map has non-integer values"
    ]
    as_float[2, 2, 2] = np.nan
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(as_float[None], oblique_affine))
    assert _problems(root) == [
        f"case case_001: {root / 'labelsTr' / 'case_001.nii.gz'}: NaN/Inf in label map"
    ]


def test_label_remap_applies_before_the_declared_label_check(
    tiny_msd_dataset, oblique_affine, make_case_arrays
):
    root = tiny_msd_dataset(n_cases=2)
    _, label = make_case_arrays((16, 16, 16), lesion=False, seed=1)
    label[label == 1] = 9
    write_volume(root / "labelsTr" / "case_001.nii.gz", Volume(label[None], oblique_affine))
    assert len(_problems(root)) == 1
    assert _problems(root, remap={9: 1}) == []


def test_channel_count_must_match_the_declared_channels(tiny_msd_dataset):
    root = tiny_msd_dataset(n_cases=2, channels=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1", "2": "T2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = _problems(root)
    assert problems == [
        f"case case_00{i}: {root / 'imagesTr' / f'case_00{i}.nii.gz'}: 2 channel(s), the data set declares 3 "
        "(FLAIR, T1, T2)"
        for i in (0, 1)
    ]


def test_multichannel_label_map_is_rejected(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=2)
    write_volume(
        root / "labelsTr" / "case_001.nii.gz", Volume(np.zeros((2, 16, 16, 16), np.uint8), oblique_affine)
    )
    assert _problems(root) == [
        f"case case_001: {root / 'labelsTr' / 'case_001.nii.gz'}: label map has 2 channels, expected 1"
    ]


def test_lesion_labels_must_be_declared(tiny_msd_dataset):
    root = tiny_msd_dataset(n_cases=2)
    assert _problems(root, lesion_labels=(3,)) == [
        f"{root / 'dataset.json'}: lesion label(s) [3] are not declared labels [0, 1, 2]"
    ]


def test_test_cases_are_checked_too(tiny_msd_dataset, oblique_affine, make_case_arrays):
    root = tiny_msd_dataset(n_cases=2)
    image, _ = make_case_arrays((16, 16, 16), lesion=False, seed=5)
    image[1, 2, 3] = np.nan
    write_volume(root / "imagesTs" / "new_001.nii.gz", Volume(image[None], oblique_affine))
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/new_001.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert _problems(root) == [f"case new_001: {root / 'imagesTs' / 'new_001.nii.gz'}: 1 NaN/Inf voxel(s)"]


def test_a_dataset_without_training_cases(tiny_msd_dataset):
    ds = load_msd(tiny_msd_dataset(n_cases=2))
    with pytest.raises(DataValidationError, match=r"dataset\.json: no training cases"):
        check_dataset(replace(ds, training=()), progress=False)



def test_a_declared_class_that_no_case_holds_after_remapping_is_warned_about(tiny_msd_dataset, caplog):
    """Remapping 2 -> 1 while the manifest still declares class 2 would give an empty output channel. Warned
    by the whole-data-set validation only: a preprocessing shard checks a subset, which may lack a class."""
    from pipeline.config import DataConfig
    from pipeline.io.validate import validated_dataset

    root = tiny_msd_dataset(n_cases=3)
    plain = DataConfig(source="msd", dataset=str(root / "dataset.json"), lesion_labels=(2,))
    with caplog.at_level("WARNING", logger="pipeline.io.validate"):
        validated_dataset(plain, root, progress=False)
        check_dataset(load_msd(root), remap={2: 1}, progress=False)  # a shard's check: no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="pipeline.io.validate"):
        ds, _ = validated_dataset(plain.model_copy(update={"label_remap": {2: 1}, "lesion_labels": (1,)}), root,
                                  progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert str(ds.manifest) in warnings[0] and f"{{2: {ds.labels[2]!r}}}" in warnings[0]
    assert "after data.label_remap" in warnings[0] and "data.labels" in warnings[0]
