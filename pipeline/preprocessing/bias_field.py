"""N4 bias-field correction of one MRI channel (Tustison et al., IEEE TMI 2010), through SimpleITK.

An MRI scan is the tissue signal times a smooth multiplicative field ``b(x)`` (coil sensitivity, RF
inhomogeneity): ``v(x) = u(x) b(x)``. N4 fits ``log b`` as a B-spline on a shrunk copy of the scan so that the
histogram of ``log u`` inside a mask is as sharp as possible, and the corrected scan is
``u(x) = v(x) / b(x)`` (same units as the input; zero stays zero). Per-scan z-scoring removes a global
scale only; N4 removes the part that varies across the scan, which otherwise reads as a false intensity
*change* between two visits of a longitudinal pair (their fields differ) and as a false lesion where the
field is high.

The field is fitted on a copy shrunk to about ``grid_mm`` voxels (a field varies over centimetres), inside
the voxels above Otsu's threshold of the whole scan (the head, without air), then evaluated on the full
grid. Repeatable: the same scan gives the same bytes on every run on one machine (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_otsu

DEFAULT_GRID_MM = 4.0
DEFAULT_ITERATIONS = (50, 50, 50, 50)  # per fitting level (ITK's default: 4 levels of 50)


def shrink_factors(spacing_mm: Sequence[float], grid_mm: float, shape: Sequence[int]) -> list[int]:
    """Per-axis integer shrink that brings the spacing to about ``grid_mm`` (at least 1, and never below 4
    voxels along an axis): ``max(1, round(grid_mm / spacing))``."""
    out = []
    for s, n in zip(spacing_mm, shape, strict=True):
        factor = max(1, int(round(grid_mm / float(s))))
        out.append(int(max(1, min(factor, int(n) // 4))))
    return out


def n4_correct(
    channel: np.ndarray,
    spacing_mm: Sequence[float],
    grid_mm: float = DEFAULT_GRID_MM,
    iterations: Sequence[int] = DEFAULT_ITERATIONS,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Divide one channel by its N4-estimated bias field.

    Args:
        channel: ``(X, Y, Z)`` MRI magnitudes (any real dtype, non-negative; zero = no signal / outside the
            field of view).
        spacing_mm: voxel size along X, Y, Z (mm), used for the shrink and the B-spline grid.
        grid_mm: spacing (mm) of the shrunk copy the field is fitted on.
        iterations: maximum iterations per fitting level (the number of entries is the number of levels;
            each level doubles the B-spline resolution).

    Returns:
        ``(corrected, info)``: float32 ``(X, Y, Z)`` ``channel / b`` (0 where ``channel`` is 0), and
        ``{"method": "n4", "shrink": [sx, sy, sz], "iterations": [...], "field_range": [lo, hi],
        "mask_voxels": n}`` with the range of ``b`` (unitless, geometric mean 1 over the fit mask) inside that mask.
        A channel without two distinct foreground intensities is returned unchanged (``"method": "none"``).

    Raises:
        ValueError: the channel has negative or non-finite values (already normalised data: N4 fits a
            logarithm) or is not 3-D.
    """
    data = np.asarray(channel)
    if data.ndim != 3:
        raise ValueError(f"N4 bias-field correction needs a 3-D channel, got shape {data.shape}")
    values = data.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ValueError("N4 bias-field correction: the channel holds NaN or infinite values")
    lowest = float(values.min()) if values.size else 0.0
    if lowest < 0:
        raise ValueError(
            f"N4 bias-field correction needs non-negative MRI magnitudes, but the channel's minimum is {lowest:g} "
            "(already normalised data?): set preprocess.intensity.bias_field to none for this channel"
        )
    positive = values[values > 0]
    info: dict[str, Any] = {"method": "none", "shrink": [1, 1, 1], "iterations": [], "field_range": [1.0, 1.0],
                            "mask_voxels": 0}
    if positive.size < 2 or float(positive.min()) == float(positive.max()):
        return np.array(values, dtype=np.float32, copy=True), info

    # SimpleITK arrays are (z, y, x): transpose views, spacing in (x, y, z)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing_mm])
    # Otsu over every voxel, zeros included (SimpleITK's N4 example): the head against air / outside
    inside = values > float(threshold_otsu(values))
    if int(inside.sum()) < 2:
        inside = values > 0
    mask = sitk.GetImageFromArray(np.ascontiguousarray(inside.transpose(2, 1, 0).astype(np.uint8)))
    mask.CopyInformation(image)

    shrink = shrink_factors(spacing_mm, grid_mm, values.shape)
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    # N4's field has an arbitrary scale: centre log b on the mask so that the corrected scan keeps its level
    log_field = log_field - float(log_field[inside].mean(dtype=np.float64))
    field = np.exp(log_field, dtype=np.float32)
    corrected = np.divide(values, field, dtype=np.float32)
    info = {
        "method": "n4",
        "shrink": [int(f) for f in shrink],
        "iterations": [int(i) for i in iterations],
        "field_range": [float(field[inside].min()), float(field[inside].max())],
        "mask_voxels": int(inside.sum()),
    }
    return corrected, info

