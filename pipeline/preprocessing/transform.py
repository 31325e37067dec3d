"""One scan in, training-ready arrays out, and the exact way back.

:func:`preprocess_case` (pure, no I/O) runs, in this order and as nnU-Net does:

1. reorient to the canonical (RAS-closest) voxel axes by permutation / flips only (:mod:`.orient`);
2. crop to the nonzero box of the image (:mod:`.crop`);
3. correct the bias field of the MRI channels the plan names (:mod:`.bias_field`, N4: not in nnU-Net, off by default),
   then normalise intensities per channel (:mod:`.normalize`), before any interpolation;
4. resample to the plan's target spacing in that voxel frame (:mod:`.resample`): images with a cubic
   B-spline (the strongly anisotropic axis separately, default linear), labels one-hot linear + argmax.

Steps 1-2 are views (a bias-field correction makes one float32 copy of the cropped scan); step 3's
normalisation is pointwise and runs block by block inside the first resampling pass, so the
full-resolution scan is never copied as a whole.

It returns the image and label map as :class:`~pipeline.io.volume.Volume` s on the preprocessed grid and a
:class:`~pipeline.contracts.CaseRecord` of every step; :func:`invert_case` uses only that record to map a
prediction on the preprocessed grid back onto the original grid (same shape, same affine, bit for bit).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.contracts import CaseRecord, Plan
from pipeline.io.volume import Volume, grid_mismatch
from pipeline.preprocessing.bias_field import n4_correct
from pipeline.preprocessing.crop import crop, nonzero_box, uncrop
from pipeline.preprocessing.normalize import apply_intensity_, intensity_parameters
from pipeline.preprocessing.orient import axcodes, canonical_ornt, from_canonical, permute, to_canonical
from pipeline.preprocessing.resample import (
    grid_affine,
    lowres_axis,
    resample_array,
    resample_labels,
    target_shape,
)

RECORD_VERSION = 1
LABEL_METHOD = "one-hot linear + argmax"


def _translate(affine: np.ndarray, offset_vox) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = offset_vox
    return affine @ shift


def _affine_list(affine: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(affine, dtype=np.float64)]


def check_label(image: Volume, label: Volume, n_classes: int | None = None, what: str = "label") -> None:
    """Raise ``ValueError`` naming ``what`` when the label's grid or values do not fit the image."""
    if label.n_channels != 1:
        raise ValueError(f"{what}: label map has {label.n_channels} channels, expected 1")
    diff = grid_mismatch(image, label)
    if diff:
        raise ValueError(f"{what}: label grid does not match the image grid: {'; '.join(diff)}")
    if not np.issubdtype(label.data.dtype, np.integer):
        raise ValueError(f"{what}: label map must hold integers, got {label.data.dtype}")
    if n_classes is not None and label.data.size:
        lo, hi = int(label.data.min()), int(label.data.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(
                f"{what}: label values span {lo}..{hi}, outside the declared labels 0..{n_classes - 1} "
                "(declare them in data.labels or map them with data.label_remap)"
            )


def preprocess_case(
    image: Volume, label: Volume | None, plan: Plan, cfg: PreprocessConfig
) -> tuple[Volume, Volume | None, CaseRecord]:
    """Reorient, crop, normalise and resample one scan (and its label map) as the plan says.

    Args:
        image: the scan, ``(C, X, Y, Z)`` with its RAS affine (mm); not modified.
        label: its integer label map ``(1, X, Y, Z)`` on the same grid, or None (prediction).
        plan: the data set plan (:func:`pipeline.preprocessing.plan.make_plan`); uses ``target_spacing_mm``,
            ``intensity`` and ``n_classes``.
        cfg: ``crop_to_nonzero``, ``image_order``, ``image_order_z`` and ``anisotropy_ratio``.

    Returns:
        ``(image, label, record)``: the image, float32 ``(C, x, y, z)`` C-contiguous, and the label map,
        uint8 ``(1, x, y, z)`` or None, as Volumes on the preprocessed grid (affine ``record.affine``); the
        record of the original geometry, orientation change, crop box, spacing change and the intensity
        parameters applied (everything :func:`invert_case` needs).

    Raises:
        ValueError: the label does not match the image (grid or values) or the plan (channels).
    """
    n_classes = plan.n_classes
    if image.n_channels != len(plan.intensity):
        raise ValueError(f"image has {image.n_channels} channels, the plan expects {len(plan.intensity)}")
    if label is not None:
        check_label(image, label, n_classes)

    # 1. canonical voxel axes (views, no copy)
    ornt = canonical_ornt(image.affine)
    data_ras, affine_ras = to_canonical(image.data, image.affine, ornt)
    shape_ras = tuple(int(n) for n in data_ras.shape[1:])
    spacing_ras = [float(s) for s in permute(image.spacing, ornt)]

    # 2. crop box from the image alone
    box = nonzero_box(data_ras) if cfg.crop_to_nonzero else [[0, n] for n in shape_ras]
    cropped = crop(data_ras, box)
    crop_shape = tuple(int(n) for n in cropped.shape[1:])
    affine_crop = _translate(affine_ras, [lo for lo, _ in box])

    # 3. bias-field correction (MRI channels the plan names; needs the whole channel, so a float32 copy),
    # then the intensity parameters (z-score statistics of this scan), applied pointwise in step 4
    bias_info: dict[int, dict] = {}
    if any(channel.bias_field is not None for channel in plan.intensity):
        cropped = np.array(cropped, dtype=np.float32)
        for c, channel in enumerate(plan.intensity):
            if channel.bias_field is not None:
                cropped[c], bias_info[c] = n4_correct(cropped[c], spacing_ras, channel.bias_field.grid_mm,
                                                      channel.bias_field.iterations)
    applied = intensity_parameters(cropped, [channel.to_dict() for channel in plan.intensity])
    for c, info in bias_info.items():
        applied[c]["bias_field"] = info

    # 4. resampling in the canonical voxel frame; the scan is normalised block by block on the way in
    target = [float(t) for t in plan.target_spacing_mm]
    new_shape = target_shape(crop_shape, spacing_ras, target)
    low = lowres_axis(spacing_ras, target, cfg.anisotropy_ratio)
    orders = [int(cfg.image_order)] * 3
    if low is not None:
        orders[low] = int(cfg.image_order_z)
    img = resample_array(cropped, new_shape, orders, prepare=lambda block: apply_intensity_(block, applied))
    affine_out = grid_affine(affine_crop, crop_shape, new_shape)
    spacing_out = [float(s * n / m) for s, n, m in zip(spacing_ras, crop_shape, new_shape, strict=True)]

    lab_out = None
    outside = 0
    if label is not None:
        lab_ras, _ = to_canonical(label.data, label.affine, ornt)
        lab_crop = crop(lab_ras, box)[0]
        if crop_shape != shape_ras:
            outside = int(np.count_nonzero(lab_ras)) - int(np.count_nonzero(lab_crop))
        lab_out = resample_labels(lab_crop, new_shape, n_classes)

    record = CaseRecord.from_dict({
        "version": RECORD_VERSION,
        "original": {
            "shape": [int(n) for n in image.shape],
            "affine": _affine_list(image.affine),
            "spacing_mm": [float(s) for s in image.spacing],
            "axcodes": axcodes(image.affine),
            "n_channels": int(image.n_channels),
        },
        "orientation": {
            "ornt": [[int(j), int(f)] for j, f in ornt],
            "axcodes": axcodes(affine_ras),
            "shape": list(shape_ras),
            "spacing_mm": spacing_ras,
            "affine": _affine_list(affine_ras),
        },
        "crop": {
            "box": [[int(lo), int(hi)] for lo, hi in box],
            "shape": list(crop_shape),
            "affine": _affine_list(affine_crop),
            "label_voxels_outside": outside,
        },
        "resample": {
            "target_spacing_mm": target,
            "spacing_mm": spacing_out,
            "shape": list(new_shape),
            "image_orders": orders,
            "lowres_axis": low,
            "label_method": LABEL_METHOD,
        },
        "intensity": applied,
        "n_classes": n_classes,
        "has_label": label is not None,
        "shape": list(new_shape),
        "spacing_mm": spacing_out,
        "affine": _affine_list(affine_out),
    }, "preprocess_case")
    image_out = Volume(img, affine_out)
    return image_out, (None if lab_out is None else Volume(lab_out[None], affine_out)), record


def invert_case(prediction: np.ndarray | Volume, record: CaseRecord, kind: Literal["prob", "label"]) -> Volume:
    """Map a prediction on the preprocessed grid back onto the original scan's grid and geometry.

    Args:
        prediction: ``(C, x, y, z)`` or ``(x, y, z)`` (array or Volume) on the grid ``record.shape``: class
            probabilities (``kind="prob"``; one channel = a lesion probability) or integer labels
            (``kind="label"``).
        record: the record :func:`preprocess_case` returned for that scan.
        kind: ``"prob"``: resampled linearly, float32; outside the crop box the background channel is 1 and
            the others 0 (a single channel: 0). ``"label"``: one-hot linear resampling + argmax, uint8,
            0 outside the crop box.

    Returns:
        Volume ``(C, X, Y, Z)`` (``C = 1`` for labels) with the original shape and affine.
    """
    if kind not in ("prob", "label"):
        raise ValueError(f"invert_case: kind must be 'prob' or 'label', got {kind!r}")
    if isinstance(prediction, Volume):
        if not np.allclose(prediction.affine, record.affine_array, atol=1e-6):
            raise ValueError("invert_case: the prediction's affine is not the preprocessed grid's (record.affine)")
        prediction = prediction.data
    pred = np.asarray(prediction)
    if pred.ndim == 3:
        pred = pred[None]
    expected = tuple(record.shape)
    if pred.ndim != 4 or tuple(pred.shape[1:]) != expected:
        raise ValueError(
            f"invert_case: prediction shape {prediction.shape} does not fit the preprocessed grid {expected}"
        )
    ornt = np.asarray(record.orientation.ornt, dtype=int)
    box = [list(pair) for pair in record.crop.box]
    crop_shape = tuple(record.crop.shape)
    shape_ras = tuple(record.orientation.shape)
    affine = record.original_affine

    if kind == "label":
        if pred.shape[0] != 1:
            raise ValueError(f"invert_case: a label prediction has one channel, got {pred.shape[0]}")
        if not np.issubdtype(pred.dtype, np.integer) and not np.array_equal(pred, np.rint(pred)):
            raise ValueError(
                "invert_case: kind='label' needs integer labels (use kind='prob' for probabilities)"
            )
        labels = pred[0].astype(np.int64, copy=False)
        n_classes = max(record.n_classes, int(labels.max(initial=0)) + 1)
        back = resample_labels(labels, crop_shape, n_classes)[None]
        full = uncrop(back, box, shape_ras, 0)
    else:
        back = resample_array(pred, crop_shape, [1, 1, 1])
        fill = [1.0] + [0.0] * (back.shape[0] - 1) if back.shape[0] > 1 else 0.0
        full = uncrop(back, box, shape_ras, fill)
    data = np.ascontiguousarray(from_canonical(full, ornt))
    return Volume(data, affine)



def grid_record(shape, spacing_mm, n_classes: int, has_label: bool = True, n_channels: int = 1,
                case_id: str | None = None) -> CaseRecord:
    """The record of a scan that is already on its preprocessed grid: an axis-aligned RAS grid of ``shape``
    voxels at ``spacing_mm`` (origin 0 mm), identity orientation, the whole image as crop box, no
    resampling and no normalisation. For arrays written in the preprocessed layout by other means
    (synthetic training data, benchmarks); :func:`invert_case` with it returns the array unchanged."""
    shape = [int(n) for n in shape]
    spacing = [float(s) for s in spacing_mm]
    affine = _affine_list(np.diag([*spacing, 1.0]))
    return CaseRecord.from_dict({
        **({"case_id": case_id} if case_id is not None else {}),
        "version": RECORD_VERSION,
        "original": {"shape": shape, "affine": affine, "spacing_mm": spacing, "axcodes": "RAS",
                     "n_channels": n_channels},
        "orientation": {"ornt": [[0, 1], [1, 1], [2, 1]], "axcodes": "RAS", "shape": shape, "spacing_mm": spacing,
                        "affine": affine},
        "crop": {"box": [[0, n] for n in shape], "shape": shape, "affine": affine, "label_voxels_outside": 0},
        "resample": {"target_spacing_mm": spacing, "spacing_mm": spacing, "shape": shape, "image_orders": [3, 3, 3],
                     "lowres_axis": None, "label_method": LABEL_METHOD},
        "intensity": [{"scheme": "none", "clip": None, "mean": None, "std": None}] * n_channels,
        "n_classes": n_classes,
        "has_label": has_label,
        "shape": shape,
        "spacing_mm": spacing,
        "affine": affine,
    }, "grid_record")
