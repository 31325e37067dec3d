"""pipeline/data/synthetic.py: deterministic CT-like scans with rare, small lesions, in the MSD layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data.synthetic import LABELS, generate_case, write_synthetic_dataset
from pipeline.io.dataset import load_msd
from pipeline.io.formats import read_volume
from pipeline.io.validate import check_dataset

SMALL = SyntheticConfig(n_cases=3, shape=(32, 32, 12))


@pytest.fixture(scope="module")
def default_cases():
    """The 30 scans of the default config (128 x 128 x 40 at 0.8 x 0.8 x 2.5 mm), generated in memory."""
    cfg = SyntheticConfig()
    assert cfg.n_cases == 30 and cfg.shape == (128, 128, 40)
    return [generate_case(cfg, i) for i in range(cfg.n_cases)]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = _files(write_synthetic_dataset(tmp_path / "a", SMALL, progress=False))
    b = _files(write_synthetic_dataset(tmp_path / "b", SMALL, progress=False))
    assert sorted(a) == ["dataset.json"] + [
        f"{d}/synth_{i:03d}.nii.gz" for d in ("imagesTr", "labelsTr") for i in range(3)
    ]
    assert a == b


def test_another_seed_gives_other_scans(tmp_path):
    a = _files(write_synthetic_dataset(tmp_path / "a", SMALL, progress=False))
    b = _files(write_synthetic_dataset(tmp_path / "b", SMALL.model_copy(update={"seed": 1}), progress=False))
    assert a["imagesTr/synth_000.nii.gz"] != b["imagesTr/synth_000.nii.gz"]


def test_a_case_does_not_depend_on_the_number_of_cases():
    image_a, label_a, _ = generate_case(SMALL, 2)
    image_b, label_b, _ = generate_case(SMALL.model_copy(update={"n_cases": 10}), 2)
    np.testing.assert_array_equal(image_a.data, image_b.data)
    np.testing.assert_array_equal(label_a.data, label_b.data)


def test_written_dataset_is_a_valid_msd_dataset(tmp_path):
    root = write_synthetic_dataset(tmp_path / "raw", SMALL, progress=False)
    ds = load_msd(root)
    assert ds.labels == {0: "background", 1: "liver", 2: "lesion"} == LABELS
    assert ds.channel_names == ("CT",)
    assert len(ds.training) == 3
    check_dataset(ds, lesion_labels=(2,), progress=False)  # raises on any problem
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["synthetic_config"]["shape"] == [32, 32, 12]
    image = read_volume(root / "imagesTr" / "synth_000.nii.gz")
    expected_image, _, _ = generate_case(SMALL, 0)
    np.testing.assert_array_equal(image.data, expected_image.data)
    np.testing.assert_allclose(image.affine, expected_image.affine, atol=1e-9)


def test_rewriting_replaces_the_folder(tmp_path):
    root = write_synthetic_dataset(tmp_path / "raw", SMALL, progress=False)
    (root / "imagesTr" / "stale.nii.gz").write_bytes(b"old")
    write_synthetic_dataset(root, SMALL, progress=False)
    assert not (root / "imagesTr" / "stale.nii.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_image_and_label_types_and_geometry(default_cases):
    for image, label, _ in default_cases:
        assert image.data.shape == label.data.shape == (1, 128, 128, 40)
        assert image.data.dtype == np.int16 and label.data.dtype == np.uint8
        assert -1024 <= image.data.min() and image.data.max() <= 3071  # HU
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(image.spacing, (0.8, 0.8, 2.5), atol=1e-9)  # anisotropic


def test_labels_are_background_liver_lesion(default_cases):
    for _, label, _ in default_cases:
        values = set(np.unique(label.data).tolist())
        assert {0, 1} <= values <= {0, 1, 2}


def test_some_scans_are_oblique_and_some_are_not(default_cases):
    oblique = [not np.allclose(image.direction, np.eye(3)) for image, _, _ in default_cases]
    assert 0 < sum(oblique) < len(oblique)


def test_lesion_free_scans_exist_and_lesions_match_the_label(default_cases):
    has_lesion = [bool(lesions) for _, _, lesions in default_cases]
    assert 0 < has_lesion.count(False) < len(has_lesion)
    for (_, label, lesions), flag in zip(default_cases, has_lesion, strict=True):
        assert bool((label.data == 2).any()) == flag
        assert len(lesions) <= SyntheticConfig().max_lesions


def test_lesions_are_small_and_rare(default_cases):
    diameters = [les.diameter_mm for _, _, lesions in default_cases for les in lesions]
    assert diameters and min(diameters) >= 4.0 and max(diameters) <= 20.0
    assert np.median(diameters) < 12.0  # most are drawn from the small range (4-10 mm)
    lesion = sum(int((label.data == 2).sum()) for _, label, _ in default_cases)
    total = sum(label.data.size for _, label, _ in default_cases)
    assert 0 < lesion / total < 0.01
    assert max(float((label.data == 2).mean()) for _, label, _ in default_cases) < 0.01


def test_lesions_are_darker_than_the_liver(default_cases):
    for image, label, lesions in default_cases:
        if lesions:
            assert image.data[label.data == 2].mean() < image.data[label.data == 1].mean() - 20  # HU
