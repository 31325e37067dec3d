"""Axis-aligned resampling: images (B-spline), probabilities (linear), label maps (one-hot linear + argmax).

All resampling here is between two grids that share their voxel axes (the grid of a scan in its canonical
voxel frame and a coarser / finer grid over the same field of view), so it is *separable*: a 3D tensor-
product spline of order ``k`` equals three 1D spline interpolations of order ``k``, one per axis. Each 1D
step is a fixed linear map ``(n_out, n_in)`` applied along one axis; we build that matrix once from
``scipy.ndimage.map_coordinates`` applied to the identity (so it *is* scipy's spline, prefilter included),
drop entries below 1e-7 (the prefilter's tail decays as 0.268^d) and apply it as a sparse product. That is
several times faster than ``scipy.ndimage.zoom`` (64 taps per voxel for a cubic) and lets each axis have its
own order, which is how strongly anisotropic scans are handled (nnU-Net's "separate z": in-plane order 3,
the low-resolution axis order 0/1).

Grid convention (the one of ``skimage.transform.resize`` and nnU-Net): the *edges* of the first and last
voxels are kept, so output voxel ``i'`` sits at input voxel coordinate ``(i' + 0.5) * n / n' - 0.5`` and
the effective output spacing is ``spacing * n / n'`` (mm). :func:`grid_affine` gives the exact affine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp

from pipeline.spacing import anisotropic_axis, is_anisotropic

_DROP_BELOW = 1e-7  # relative size of spline-prefilter tails we drop (float32 resolution)
_BLOCK_ELEMENTS = 1 << 22  # voxels per block of the first resampling pass (16 MB of float32)


def target_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]
) -> tuple[int, ...]:
    """Voxels per axis after resampling ``shape`` at ``spacing_mm`` to ``target_spacing_mm`` (same field
    of view)."""
    return tuple(
        max(1, int(np.rint(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_spacing_mm, strict=True)
    )


def grid_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine (4x4, mm) of the grid ``new_shape`` that covers the same field of view.

    New voxel ``i'`` is old voxel ``(i' + 0.5) * f - 0.5`` with ``f = n_old / n_new`` per axis.
    """
    f = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = 0.5 * f - 0.5
    return np.asarray(affine, dtype=np.float64) @ scale


def lowres_axis(spacing_mm: Sequence[float], target_spacing_mm: Sequence[float], ratio: float) -> int | None:
    """The axis to resample separately (nnU-Net's rule), or None.

    The rule of :mod:`pipeline.spacing`, on the source spacing first, the target spacing second.
    """
    for spacing in (spacing_mm, target_spacing_mm):
        if is_anisotropic(spacing, ratio):
            return anisotropic_axis(spacing, ratio)
    return None


@lru_cache(maxsize=256)
def interp_matrix(n_in: int, n_out: int, order: int) -> sp.csr_matrix:
    """The 1D resampling map ``(n_out, n_in)`` (float32 CSR): spline of ``order``, edge-aligned grids.

    Row ``i'`` holds the weights of the input samples for output sample ``i'``; rows sum to 1. Edges are
    extended with the nearest value (``skimage``'s ``mode="edge"``). The result is cached: do not modify it.
    """
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    grid = np.meshgrid(coords, np.arange(n_in, dtype=np.float64), indexing="ij")
    dense = ndi.map_coordinates(np.eye(n_in), grid, order=order, mode="nearest", prefilter=order > 1)
    dense[np.abs(dense) < _DROP_BELOW] = 0.0
    matrix = sp.csr_matrix(dense.astype(np.float32))
    matrix.sort_indices()
    return matrix


def _resample_axis(x: np.ndarray, axis: int, matrix: sp.csr_matrix) -> np.ndarray:
    """Apply ``matrix`` (n_out, n_in) along ``axis`` of the C-contiguous float32 array ``x``."""
    shape = x.shape
    n_in, n_out = shape[axis], matrix.shape[0]
    before, after = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
    new_shape = (*shape[:axis], n_out, *shape[axis + 1 :])
    x3 = x.reshape(before, n_in, after)
    if before == 1:  # first axis: one sparse x dense product, no copy
        return np.ascontiguousarray(matrix @ x3[0], dtype=np.float32).reshape(new_shape)
    if after == 1:  # last axis: rows are contiguous lines, right-multiply by the transpose
        return np.ascontiguousarray(x3[:, :, 0] @ matrix.T, dtype=np.float32).reshape(new_shape)
    out = np.empty((before, n_out, after), dtype=np.float32)
    for b in range(before):
        out[b] = matrix @ x3[b]
    return out.reshape(new_shape)


def _axis_plan(shape: Sequence[int], new_shape: Sequence[int]) -> list[int]:
    """Axes that change, most-shrinking first (later passes then work on smaller arrays)."""
    axes = [a for a in range(len(shape)) if shape[a] != new_shape[a]]
    return sorted(axes, key=lambda a: (new_shape[a] / shape[a], a))


def resample_array(
    data: np.ndarray,
    new_shape: Sequence[int],
    orders: Sequence[int],
    prepare: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Resample a channel-first array ``(C, X, Y, Z)`` to ``(C, *new_shape)``.

    Args:
        data: ``(C, X, Y, Z)`` array of any dtype and strides (a reoriented, cropped view is fine); not
            modified.
        new_shape: output spatial shape (voxels).
        orders: spline order per spatial axis (0 nearest, 1 linear, 3 cubic B-spline).
        prepare: optional pointwise in-place operation on float32 blocks ``(C, ...)`` of ``data`` before
            interpolation (intensity normalisation). The first pass reads ``data`` block by block through
            it, so the full-resolution scan is never copied to float32 as a whole (memory and page faults).

    Returns:
        C-contiguous float32 ``(C, *new_shape)``, never sharing memory with ``data``.
    """
    new_shape = tuple(int(n) for n in new_shape)
    axes = _axis_plan(data.shape[1:], new_shape)
    if not axes:
        out = np.array(data, dtype=np.float32, order="C", copy=True)
        if prepare is not None:
            prepare(out)
        return out
    first = axes[0]
    matrix = interp_matrix(int(data.shape[first + 1]), new_shape[first], int(orders[first]))
    out_shape = list(data.shape)
    out_shape[first + 1] = new_shape[first]
    out = np.empty(out_shape, dtype=np.float32)
    # blocks along the longest other spatial axis, about _BLOCK_ELEMENTS voxels each
    block_axis = 1 + max((a for a in range(3) if a != first), key=lambda a: (data.shape[a + 1], -a))
    step = max(1, _BLOCK_ELEMENTS * data.shape[block_axis] // max(1, data.size))
    for start in range(0, data.shape[block_axis], step):
        index = tuple(slice(start, start + step) if a == block_axis else slice(None) for a in range(4))
        block = np.array(data[index], dtype=np.float32, order="C", copy=True)
        if prepare is not None:
            prepare(block)
        out[index] = _resample_axis(block, first + 1, matrix)
    for axis in axes[1:]:
        matrix = interp_matrix(int(out.shape[axis + 1]), new_shape[axis], int(orders[axis]))
        out = _resample_axis(out, axis + 1, matrix)
    return out


def _touched_rows(matrix: sp.csr_matrix, lo: int, hi: int) -> tuple[int, int]:
    """Output rows whose weights reach input samples ``[lo, hi)`` (a contiguous range)."""
    cols = matrix.indices
    starts, ends = matrix.indptr[:-1], matrix.indptr[1:]
    first = cols[np.minimum(starts, len(cols) - 1)]
    last = cols[np.maximum(ends - 1, 0)]
    hit = np.flatnonzero((ends > starts) & (last >= lo) & (first < hi))
    return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)


def resample_labels(label: np.ndarray, new_shape: Sequence[int], n_classes: int) -> np.ndarray:
    """Resample an integer label map ``(X, Y, Z)`` so that small structures survive.

    Each class's indicator (one-hot channel) is resampled linearly and every output voxel takes the class of
    highest value (ties go to the lower label, as ``np.argmax``). A structure 3 voxels across therefore keeps
    at least one voxel at 2x coarser spacing, and structures 3 or more voxels apart stay apart. Background is
    ``1 - sum(foreground)`` (linear weights sum to one) and only the bounding box of the foreground (plus the
    interpolation support) is computed.

    Returns:
        uint8 ``new_shape`` label map.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if n_classes > 256:
        raise ValueError(f"resample_labels: {n_classes} classes do not fit in uint8")
    if tuple(label.shape) == new_shape:
        return np.array(label, dtype=np.uint8, order="C", copy=True)
    out = np.zeros(new_shape, dtype=np.uint8)
    fg = label != 0
    boxes_in, boxes_out, matrices = [], [], []
    for axis in range(3):
        proj = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(proj) == 0:
            return out
        lo, hi = int(proj[0]), int(proj[-1]) + 1
        matrix = interp_matrix(label.shape[axis], new_shape[axis], 1)
        r0, r1 = _touched_rows(matrix, lo, hi)
        boxes_in.append(slice(lo, hi))
        boxes_out.append(slice(r0, r1))
        matrices.append(matrix[r0:r1, lo:hi])
    sub = label[tuple(boxes_in)]
    sub_shape = tuple(b.stop - b.start for b in boxes_out)
    axes = _axis_plan(label.shape, new_shape)  # decided on the whole grid, not on the box
    classes = [int(c) for c in np.unique(sub) if c != 0]
    probs = []
    for c in classes:
        p = (sub == c).astype(np.float32)[None]
        for axis in axes:
            p = _resample_axis(p, axis + 1, matrices[axis])
        probs.append(p[0])
    best = 1.0 - np.sum(probs, axis=0, dtype=np.float32)
    winner = np.zeros(sub_shape, dtype=np.uint8)
    for c, p in zip(classes, probs, strict=True):
        better = p > best
        winner[better] = c
        np.maximum(best, p, out=best)
    out[tuple(boxes_out)] = winner
    return out
