"""Crop to the nonzero region of an image and paste back (nnU-Net's crop: ``image != 0`` over all channels).

The box is computed from the image alone, so that training and prediction on unlabelled scans crop alike.
CT stored with air at -1000 HU has no zero border, and keeps its whole volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = list[list[int]]  # [[lo, hi], ...] per spatial axis, voxels, hi exclusive


def nonzero_box(data: np.ndarray) -> Box:
    """Bounding box of ``data != 0`` (any channel) of a ``(C, X, Y, Z)`` array; the full extent if all zero.

    A face that holds a nonzero voxel already fixes that side of the box, so scans without a zero border
    (CT) are decided from their six faces without scanning the volume.
    """
    spatial = data.shape[1:]
    box: Box = []
    full_mask = None
    for axis, n in enumerate(spatial):
        first = np.take(data, 0, axis=axis + 1)
        last = np.take(data, n - 1, axis=axis + 1)
        if first.any() and last.any():
            box.append([0, n])
            continue
        if full_mask is None:
            full_mask = np.any(data != 0, axis=0)
        proj = np.flatnonzero(full_mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(proj[0]), int(proj[-1]) + 1] if len(proj) else [0, n])
    return box


def crop(data: np.ndarray, box: Box) -> np.ndarray:
    """View of the spatial ``box`` of a channel-first ``(C, X, Y, Z)`` array."""
    return data[(slice(None), *(slice(lo, hi) for lo, hi in box))]


def uncrop(
    data: np.ndarray, box: Box, full_shape: Sequence[int], fill: Sequence[float] | float
) -> np.ndarray:
    """Paste a ``(C, x, y, z)`` crop into a new ``(C, *full_shape)`` array filled with ``fill`` (per
    channel, or one value for all)."""
    out = np.empty((data.shape[0], *full_shape), dtype=data.dtype)
    out[...] = np.asarray(fill, dtype=data.dtype).reshape(-1, 1, 1, 1) if np.ndim(fill) else fill
    out[(slice(None), *(slice(lo, hi) for lo, hi in box))] = data
    return out
