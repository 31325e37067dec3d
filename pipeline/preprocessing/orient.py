"""Canonical orientation: permute and flip voxel axes so they run closest to R, A, S (no interpolation).

An oblique scan stays oblique (its direction matrix is only permuted and sign-flipped); what changes is which
array axis points roughly where. Resampling afterwards happens in that canonical voxel frame, so the exact
geometry of every step stays a 4x4 affine.

Orientation arrays follow nibabel: ``ornt[i] = (j, f)`` means input axis ``i`` becomes output axis ``j``,
reversed when ``f == -1``.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import aff2axcodes, inv_ornt_aff, io_orientation


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The ``(3, 2)`` int orientation that brings the voxel axes of ``affine`` closest to RAS."""
    return io_orientation(np.asarray(affine, dtype=np.float64)).astype(int)


def axcodes(affine: np.ndarray) -> str:
    """Axis codes of the voxel axes, e.g. ``"LPS"`` (``"RAS"`` for a canonical grid)."""
    return "".join(aff2axcodes(np.asarray(affine, dtype=np.float64)))


def to_canonical(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a channel-first array ``(C, X, Y, Z)`` with ``ornt``.

    Returns:
        ``(view, affine)``: a (possibly non-contiguous) view ``(C, X', Y', Z')`` and its voxel-to-RAS affine.
    """
    spatial = data.shape[1:]
    out = data
    for axis, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            out = np.flip(out, axis=axis + 1)
    out = out.transpose((0, *(1 + np.argsort(ornt[:, 0]))))
    new_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, spatial)
    return out, new_affine


def from_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical` on a channel-first array ``(C, X', Y', Z')``; returns a view."""
    out = data.transpose((0, *(1 + np.asarray(ornt[:, 0], dtype=int))))
    for axis, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            out = np.flip(out, axis=axis + 1)
    return out


def permute(values, ornt: np.ndarray) -> list:
    """Per-axis values (spacing, shape) listed in the canonical axis order."""
    order = np.argsort(ornt[:, 0])
    return [values[int(i)] for i in order]
