"""preprocess_case / invert_case and their parts: orientation, crop, normalisation, resampling."""

from __future__ import annotations

import json

import cc3d
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from pipeline.config import PreprocessConfig
from pipeline.contracts import CaseRecord
from pipeline.io.volume import Volume, make_affine
from pipeline.preprocessing.crop import nonzero_box
from pipeline.preprocessing.normalize import normalize_, resolve_schemes
from pipeline.preprocessing.orient import canonical_ornt, from_canonical, to_canonical
from pipeline.preprocessing.resample import interp_matrix, resample_array, resample_labels
from pipeline.preprocessing.transform import invert_case, preprocess_case
from tests.contract_examples import plan_with

from .phantoms import dice, oblique_affine, phantom

CT = {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}


def plan_for(target, n_channels=1, scheme=CT):
    return plan_with(n_classes=3, target_spacing_mm=list(target), intensity=[dict(scheme)] * n_channels)


# ------------------------------------------------------------------------------------------ exact inverse


@pytest.mark.parametrize(("target", "min_dice"), [((0.8, 0.8, 2.5), 0.99), ((1.0, 1.0, 2.5), 0.98)])
def test_label_round_trip_oblique_anisotropic(target, min_dice):
    """LPS-stored oblique scan at (0.9, 0.85, 3.0) mm with a zero border: preprocess -> inverse gives the
    original shape and affine exactly, and Dice >= 0.99 for organ and lesion (r = 10 mm) when the target grid
    is finer (the usual case: a data set median of (0.8, 0.8, 2.5)). Through a *coarser* in-plane grid a
    boundary can move by up to half a coarse voxel, so there Dice is >= 0.98 (measured 0.994 / 0.986)."""
    affine = oblique_affine()
    image, label = phantom((64, 60, 24), affine, zero_border=2)
    _, lab, record = preprocess_case(image, label, plan_for(target), PreprocessConfig())
    record = CaseRecord.from_json(json.dumps(record.to_dict()))  # through JSON, as the stage stores it
    assert record.original.axcodes != "RAS" and record.orientation.axcodes == "RAS"
    assert record.crop.box != tuple((0, n) for n in record.orientation.shape)  # the border was cropped
    assert record.resample.lowres_axis == 2 and record.resample.image_orders == (3, 3, 1)
    back = invert_case(lab, record, "label")
    assert back.shape == image.shape and back.data.dtype == np.uint8
    np.testing.assert_allclose(back.affine, image.affine, rtol=0, atol=1e-6)
    assert np.array_equal(back.affine, image.affine)  # bit for bit, through the JSON record too
    for k in (1, 2):
        assert dice(back.data[0] == k, label.data[0] == k) >= min_dice, k


def test_label_round_trip_is_exact_on_the_scan_own_spacing():
    """Target = the scan's own spacing: reorientation + crop only, and the inverse gives the label back
    voxel for voxel (the geometry bookkeeping loses nothing)."""
    affine = oblique_affine()
    image, label = phantom((64, 60, 24), affine, zero_border=2)
    _, lab, record = preprocess_case(image, label, plan_for((0.9, 0.85, 3.0)), PreprocessConfig())
    assert record.resample.shape == record.crop.shape
    back = invert_case(lab, record, "label")
    assert np.array_equal(back.data, label.data) and np.array_equal(back.affine, affine)


def test_probability_round_trip_multichannel():
    """Softmax-like (3, x, y, z) probabilities go back as float32 (3, X, Y, Z) summing to 1, background 1
    outside the crop box, and their argmax matches the original label (Dice >= 0.99 per class); a single
    lesion-probability channel is 0 outside the box."""
    affine = oblique_affine()
    image, label = phantom((64, 60, 24), affine, zero_border=3)
    _, lab, record = preprocess_case(image, label, plan_for((0.8, 0.8, 2.5)), PreprocessConfig())
    probs = np.stack([lab.data[0] == k for k in range(3)]).astype(np.float32)
    back = invert_case(probs, record, "prob")
    assert back.data.shape == (3, *image.shape) and back.data.dtype == np.float32
    assert np.array_equal(back.affine, image.affine)
    np.testing.assert_allclose(back.data.sum(axis=0), 1.0, atol=1e-5)
    box_mask = np.zeros(record.orientation.shape, bool)
    box_mask[tuple(slice(lo, hi) for lo, hi in record.crop.box)] = True
    outside = ~from_canonical(box_mask[None], np.asarray(record.orientation.ornt))[0]
    assert outside.any() and np.all(back.data[0][outside] == 1) and np.all(back.data[1:, outside] == 0)
    for k in (1, 2):
        assert dice(back.data.argmax(0) == k, label.data[0] == k) >= 0.99
    single = invert_case(probs[2], record, "prob")
    assert single.data.shape == (1, *image.shape) and np.all(single.data[0][outside] == 0)


def test_multichannel_image_zscore_round_trip():
    """Two MR-like channels (z-score over the nonzero mask): shape (2, ...), each ~N(0, 1) inside the mask."""
    affine = oblique_affine((1.0, 1.0, 1.0))
    image, label = phantom((40, 40, 40), affine, organ_radii_mm=(12, 10, 14), zero_border=4)
    second = image.data.astype(np.float32) * 2 + np.where(image.data != 0, 7, 0)
    two = Volume(np.concatenate([image.data.astype(np.float32), second]), affine)
    plan = plan_for((1.5, 1.5, 1.5), 2, {"scheme": "zscore", "clip": None, "mean": None, "std": None})
    img, lab, record = preprocess_case(two, label, plan, PreprocessConfig())
    assert img.n_channels == 2 and img.data.dtype == np.float32 and img.data.flags.c_contiguous
    assert [p.masked for p in record.intensity] == [True, True]
    back = invert_case(lab, record, "label")
    assert np.array_equal(back.affine, affine)
    assert dice(back.data[0] > 0, label.data[0] > 0) >= 0.97  # 1.5x coarser, organ r = 10-14 mm


def test_geometry_of_preprocessed_grid():
    """The new grid covers the crop box's field of view exactly (same world centre, spacing x shape equal),
    and the lesion centroid stays put in RAS mm (within a quarter of the 2.5 mm slice)."""
    affine = oblique_affine()
    image, label = phantom((64, 60, 24), affine, zero_border=2)
    _, lab, record = preprocess_case(image, label, plan_for((1.0, 1.0, 2.5)), PreprocessConfig())
    new_affine = record.affine_array
    crop_affine = np.asarray(record.crop.affine)

    def centre(aff, shape):
        return (np.asarray(shape) - 1) / 2 @ aff[:3, :3].T + aff[:3, 3]

    np.testing.assert_allclose(
        centre(new_affine, record.shape), centre(crop_affine, record.crop.shape), atol=1e-9
    )
    np.testing.assert_allclose(
        np.asarray(record.spacing_mm) * record.shape,
        np.asarray(record.orientation.spacing_mm) * record.crop.shape,
        atol=1e-9,
    )
    assert np.allclose(np.linalg.norm(new_affine[:3, :3], axis=0), record.spacing_mm)
    np.testing.assert_array_equal(lab.affine, new_affine)  # the label Volume carries the new grid
    before = np.argwhere(label.data[0] == 2).mean(0) @ affine[:3, :3].T + affine[:3, 3]
    after = np.argwhere(lab.data[0] == 2).mean(0) @ new_affine[:3, :3].T + new_affine[:3, 3]
    assert np.linalg.norm(before - after) < 2.5 / 4


def test_invert_rejects_wrong_shape():
    image, label = phantom((32, 30, 12), oblique_affine())
    _, lab, record = preprocess_case(image, label, plan_for((1.0, 1.0, 2.5)), PreprocessConfig())
    with pytest.raises(ValueError, match="does not fit the preprocessed grid"):
        invert_case(lab.data[0][:-1], record, "label")


# ------------------------------------------------------------------------------------- small lesions


def _components(label: np.ndarray, value: int = 2) -> int:
    return int(cc3d.connected_components(label == value, connectivity=26).max())


@pytest.mark.parametrize("offset", [(8, 8, 8), (9, 9, 9), (8, 9, 10), (11, 10, 9)])
@pytest.mark.parametrize("inside_organ", [False, True])
def test_three_voxel_lesion_survives_2x_downsampling(offset, inside_organ):
    """A 3x3x3-voxel lesion at 1 mm, at any voxel phase, is still one component at 2 mm (32^3 -> 16^3)."""
    label = np.zeros((32, 32, 32), np.uint8)
    if inside_organ:
        label[4:28, 4:28, 4:28] = 1
    x, y, z = offset
    label[x : x + 3, y : y + 3, z : z + 3] = 2
    small = resample_labels(label, (16, 16, 16), 3)
    assert _components(small) == 1
    assert np.count_nonzero(small == 1) > 0 if inside_organ else np.count_nonzero(small == 1) == 0


def test_three_voxel_lesion_survives_through_preprocess_case():
    """Same through the whole transform (1 mm -> 2 mm spacing, oblique): one lesion before, one after."""
    affine = make_affine((1.0, 1.0, 1.0), (0, 0, 0), np.diag([-1.0, -1.0, 1.0]))
    label = np.zeros((32, 32, 32), np.uint8)
    label[13:16, 14:17, 15:18] = 2
    image = Volume(np.where(label > 0, 50, -1000).astype(np.int16)[None], affine)
    _, lab, _ = preprocess_case(
        image, Volume(label[None], affine), plan_for((2.0, 2.0, 2.0)), PreprocessConfig()
    )
    assert lab.shape == (16, 16, 16) and _components(lab.data[0]) == 1


@pytest.mark.parametrize(
    ("noise", "new_shape"),
    [
        (True, (98, 20, 9)),
        (True, (51, 37, 12)),
        (True, (100, 40, 5)),
        (True, (13, 20, 30)),
        (False, (87, 20, 9)),
    ],
)
def test_label_resampling_equals_full_one_hot_argmax(noise, new_shape):
    """The bounding-box shortcut gives exactly the argmax of the full one-hot linear resampling
    (background = 1 - sum of the others, ties to the lower label). With 100 -> 87 voxels the 12-voxel box
    maps onto 12 output rows: the axis must still be resampled."""
    label = np.zeros((100, 20, 9), np.uint8)
    label[40:52, 5:15, 2:7] = 1
    label[44:47, 8:11, 3:6] = 2
    if noise:
        label[60:70, 3:6, 1:4] = np.random.default_rng(3).integers(0, 3, size=(10, 3, 3))
    fg = np.stack([label == k for k in (1, 2)]).astype(np.float32)
    probs = resample_array(fg, new_shape, [1, 1, 1])
    expected = np.concatenate([1 - probs.sum(0, dtype=np.float32)[None], probs]).argmax(0)
    assert np.array_equal(resample_labels(label, new_shape, 3), expected)


@pytest.mark.parametrize("start", [6, 7])
@pytest.mark.parametrize("gap", [3, 4])
def test_close_lesions_stay_separate(start, gap):
    """Two 3-voxel lesions ``gap`` voxels apart (3 voxels = 1.5 coarse voxels) stay two components."""
    label = np.zeros((32, 32, 32), np.uint8)
    label[start : start + 3, 10:13, 10:13] = 2
    second = start + 3 + gap
    label[second : second + 3, 10:13, 10:13] = 2
    assert _components(label) == 2
    assert _components(resample_labels(label, (16, 16, 16), 3)) == 2


# --------------------------------------------------------------------------------------- intensities


def test_ct_clip_then_zscore_hand_computed():
    """clip to [-100, 200] HU, then (x - 50) / 25: -1000 -> -6, -100 -> -6, 0 -> -2, 50 -> 0, 300 -> 6."""
    data = np.array([-1000, -100, 0, 50, 300, 125], np.float32).reshape(1, 6, 1, 1)
    applied = normalize_(data, [CT])
    np.testing.assert_allclose(data.ravel(), [-6, -6, -2, 0, 6, 3], atol=1e-6)
    assert applied == [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}]


def test_zscore_over_nonzero_mask_hand_computed():
    """Values 1, 2, 3, 4 inside, 0 outside: mean 2.5, std sqrt(1.25); outside stays 0."""
    data = np.zeros((1, 4, 2, 1), np.float32)
    data[0, :, 0, 0] = [1, 2, 3, 4]
    applied = normalize_(data, [{"scheme": "zscore", "clip": None, "mean": None, "std": None}])
    s = np.sqrt(1.25)
    np.testing.assert_allclose(data[0, :, 0, 0], [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], atol=1e-6)
    assert np.all(data[0, :, 1, 0] == 0)
    assert applied[0]["mean"] == 2.5 and applied[0]["masked"]


def test_ct_through_preprocess_case_hand_computed():
    """No resampling, no crop: the output equals the hand-computed clip + z-score of the input."""
    affine = make_affine((1.0, 1.0, 1.0))
    raw = np.full((1, 4, 4, 4), -1000, np.int16)
    raw[0, 1:3, 1:3, 1:3] = 100
    img, _, _ = preprocess_case(Volume(raw, affine), None, plan_for((1.0, 1.0, 1.0)), PreprocessConfig())
    expected = np.where(raw == 100, 2.0, -6.0)  # (100 - 50) / 25 and (-100 - 50) / 25
    np.testing.assert_allclose(img.data, expected, atol=1e-6)


def test_schemes_auto_and_count_check():
    assert resolve_schemes(["CT"], ["auto"]) == ["ct"]
    assert resolve_schemes(["T2", "ADC", "noNorm"], ["auto"]) == ["zscore", "zscore", "none"]
    assert resolve_schemes(["CT", "PET"], ["ct", "zscore"]) == ["ct", "zscore"]
    with pytest.raises(ValueError, match="2 entries but the data set has 3 channels"):
        resolve_schemes(["a", "b", "c"], ["ct", "zscore"])


# ---------------------------------------------------------------------------------- geometry helpers


def test_reorientation_matches_nibabel():
    """Our permutation / flip equals nibabel's as_closest_canonical (data and affine)."""
    affine = oblique_affine()
    data = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    view, new_affine = to_canonical(data[None], affine, canonical_ornt(affine))
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert np.array_equal(view[0], np.asarray(ref.dataobj))
    np.testing.assert_allclose(new_affine, ref.affine, atol=1e-12)
    assert np.array_equal(from_canonical(view, canonical_ornt(affine))[0], data)


def test_nonzero_box():
    data = np.zeros((2, 10, 8, 6), np.float32)
    data[0, 2:5, 3, 1:4] = 1
    data[1, 7, 6, 2] = -1  # any channel counts
    assert nonzero_box(data) == [[2, 8], [3, 7], [1, 4]]
    assert nonzero_box(np.full((1, 4, 4, 4), -1000.0)) == [[0, 4]] * 3  # CT air is not zero: no crop


def test_unlabelled_scan_crops_from_image_alone():
    affine = oblique_affine()
    image, _ = phantom((40, 36, 16), affine, organ_radii_mm=(12, 10, 14), lesions=(), zero_border=3)
    _, lab, record = preprocess_case(image, None, plan_for((1.0, 1.0, 2.5)), PreprocessConfig())
    assert lab is None and record.has_label is False
    assert tuple(hi - lo for lo, hi in record.crop.box) == record.crop.shape
    assert record.crop.shape != record.orientation.shape


def test_separable_cubic_equals_scipy_zoom():
    """Our per-axis B-spline equals scipy.ndimage.zoom(order=3, grid_mode=True, mode='nearest')."""
    x = np.random.default_rng(1).normal(size=(1, 20, 17, 9)).astype(np.float32)
    ours = resample_array(x, (13, 23, 5), [3, 3, 3])
    ref = ndi.zoom(
        x[0].astype(np.float64), (13 / 20, 23 / 17, 5 / 9), order=3, mode="nearest", grid_mode=True
    )
    np.testing.assert_allclose(ours[0], ref, atol=2e-5)
    assert np.allclose(np.asarray(interp_matrix(20, 13, 1).sum(axis=1)).ravel(), 1.0)


def test_blockwise_normalisation_inside_resampling(monkeypatch):
    """Normalising block by block inside the first pass (here 8 blocks, on a flipped int16 view) gives the
    same result as normalising a float32 copy first, then resampling."""
    from pipeline.preprocessing import resample as resample_module
    from pipeline.preprocessing.normalize import apply_intensity_, intensity_parameters

    raw = (np.random.default_rng(2).normal(0, 300, size=(2, 24, 20, 10))).astype(np.int16)
    raw[:, :3] = 0
    before = raw.copy()
    view = raw[:, ::-1, :, ::-1]
    applied = intensity_parameters(view, [CT, {"scheme": "zscore", "clip": None, "mean": None, "std": None}])
    reference = np.array(view, dtype=np.float32)
    apply_intensity_(reference, applied)
    reference = resample_array(reference, (15, 13, 7), [3, 3, 1])
    monkeypatch.setattr(resample_module, "_BLOCK_ELEMENTS", 2 * 24 * 10 * 3)
    blockwise = resample_array(view, (15, 13, 7), [3, 3, 1], prepare=lambda b: apply_intensity_(b, applied))
    np.testing.assert_allclose(blockwise, reference, atol=1e-5)
    assert applied[1]["masked"] and np.array_equal(raw, before)  # the input is untouched


def test_label_grid_mismatch_is_a_clear_error():
    affine = oblique_affine()
    image, label = phantom((32, 30, 12), affine)
    shifted = Volume(label.data, make_affine((0.9, 0.85, 3.0), (0, 0, 0)))
    with pytest.raises(ValueError, match="label grid does not match the image grid"):
        preprocess_case(image, shifted, plan_for((1.0, 1.0, 2.5)), PreprocessConfig())
    bad_values = Volume(np.where(label.data == 2, 5, label.data).astype(np.uint8), affine)
    with pytest.raises(ValueError, match=r"outside the declared labels 0..2.*label_remap"):
        preprocess_case(image, bad_values, plan_for((1.0, 1.0, 2.5)), PreprocessConfig())


def test_inputs_are_not_modified():
    affine = oblique_affine()
    image, label = phantom((32, 30, 12), affine)
    before = image.data.copy()
    preprocess_case(
        Volume(image.data.astype(np.float32), affine), label, plan_for((0.9, 0.85, 3.0)), PreprocessConfig()
    )
    assert np.array_equal(image.data, before)
