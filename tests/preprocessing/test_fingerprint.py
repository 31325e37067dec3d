"""compute_fingerprint on hand-built cases with known geometry, intensities, class counts and lesions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.io.dataset import load_msd
from pipeline.io.volume import Volume, make_affine
from pipeline.preprocessing import fingerprint as fp_module
from pipeline.preprocessing.fingerprint import compute_fingerprint

from .phantoms import write_msd

SPACING = (0.8, 0.9, 2.0)
# array axis 0 -> A, 1 -> S, 2 -> R: canonical (RAS) order of the axes is (2, 0, 1)
PERMUTED = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def known_case(direction=None) -> tuple[Volume, Volume]:
    """24 x 20 x 12 voxels: organ block 6^3 = 216 voxels (60 HU), lesions of 8 and 27 voxels (10 HU)."""
    label = np.zeros((24, 20, 12), np.uint8)
    label[2:8, 2:8, 2:8] = 1
    label[12:14, 4:6, 4:6] = 2
    label[17:20, 10:13, 5:8] = 2
    image = np.select([label == 1, label == 2], [60, 10], -1000).astype(np.int16)
    affine = make_affine(SPACING, (5.0, -3.0, 7.0), direction)
    return Volume(image[None], affine), Volume(label[None], affine)


@pytest.fixture
def known_dataset(tmp_path):
    cases = [("a", *known_case()), ("b", *known_case(PERMUTED)), ("c", *known_case())]
    return load_msd(write_msd(tmp_path / "known", cases))


def test_per_case_entries(known_dataset):
    fp = compute_fingerprint(known_dataset, ["c", "a", "b"], DataConfig(), workers=1)
    assert fp["case_ids"] == ["a", "b", "c"]
    a, b = fp["cases"]["a"], fp["cases"]["b"]
    assert a["shape"] == [24, 20, 12] and a["spacing_mm"] == pytest.approx(SPACING)
    assert a["direction"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] and a["axcodes"] == "RAS"
    assert b["direction"] == PERMUTED.tolist() and b["axcodes"] == "ASR"
    assert b["spacing_ras_mm"] == pytest.approx([2.0, 0.8, 0.9]) and b["shape_ras"] == [12, 24, 20]
    assert a["shape_after_crop"] == [24, 20, 12]  # -1000 HU air is not zero: nothing to crop
    assert a["voxels_per_class"] == {"0": 24 * 20 * 12 - 216 - 35, "1": 216, "2": 35}
    voxel = 0.8 * 0.9 * 2.0
    assert a["lesions"]["2"]["count"] == 2
    assert a["lesions"]["2"]["volumes_mm3"] == pytest.approx([27 * voxel, 8 * voxel])
    values = np.array([60.0] * 216 + [10.0] * 35)  # the foreground (label > 0) voxels
    stats = a["foreground"][0]
    assert stats["n"] == 251
    assert stats["mean"] == pytest.approx((216 * 60 + 35 * 10) / 251)
    assert stats["std"] == pytest.approx(values.std())
    assert stats["percentile_00_5"] == pytest.approx(10.0) and stats["percentile_99_5"] == pytest.approx(60.0)
    assert stats["min"] == 10.0 and stats["max"] == 60.0


def test_pooled_statistics_and_lesion_summary(known_dataset):
    fp = compute_fingerprint(known_dataset, ["a", "b", "c"], DataConfig(), workers=1)
    pooled = fp["foreground_intensity"][0]
    assert pooled["n"] == 3 * 251 and pooled["mean"] == pytest.approx((216 * 60 + 35 * 10) / 251)
    assert (
        len(pooled["quantiles"]) == 201 and pooled["quantiles"][0] == 10.0 and pooled["quantiles"][-1] == 60.0
    )
    assert fp["lesions"]["2"]["count"] == 6 and fp["lesions"]["2"]["cases_with_lesions"] == 3
    assert fp["median_spacing_ras_mm"] == pytest.approx([0.8, 0.9, 2.0])
    assert fp["labels"] == {"0": "background", "1": "organ", "2": "lesion"} and fp["channel_names"] == ["CT"]


def test_deterministic_across_worker_counts_and_sampling(known_dataset, monkeypatch):
    """Sampling 10 foreground voxels per case (seeded by case id): the same JSON with 1 or 2 workers."""
    monkeypatch.setattr(fp_module, "FG_SAMPLES_TOTAL", 30)
    one = compute_fingerprint(known_dataset, ["a", "b", "c"], DataConfig(), workers=1)
    again = compute_fingerprint(known_dataset, ["c", "b", "a"], DataConfig(), workers=1)
    assert one["foreground_intensity"][0]["n"] == 30
    assert json.dumps(one) == json.dumps(again)
    monkeypatch.undo()
    full_one = compute_fingerprint(known_dataset, ["a", "b", "c"], DataConfig(), workers=1)
    full_two = compute_fingerprint(known_dataset, ["a", "b", "c"], DataConfig(), workers=2)
    assert json.dumps(full_one) == json.dumps(full_two)


def test_undeclared_label_value_names_case_and_file(tmp_path):
    image, label = known_case()
    bad = Volume(np.where(label.data == 2, 5, label.data).astype(np.uint8), label.affine)
    ds = load_msd(write_msd(tmp_path / "bad", [("ok", image, label), ("broken", image, bad)]))
    with pytest.raises(ValueError, match=r"case broken: .*labelsTr/broken.nii.gz.*0..5.*label_remap"):
        compute_fingerprint(ds, ["ok", "broken"], DataConfig(), workers=1)


def test_label_grid_mismatch_names_case_and_file(tmp_path):
    image, label = known_case()
    shifted = Volume(label.data, make_affine(SPACING, (9.0, -3.0, 7.0)))
    ds = load_msd(write_msd(tmp_path / "bad", [("ok", image, label), ("moved", image, shifted)]))
    with pytest.raises(
        ValueError, match=r"case moved: .*labelsTr/moved.nii.gz.*label grid does not match.*origin"
    ):
        compute_fingerprint(ds, ["ok", "moved"], DataConfig(), workers=1)
