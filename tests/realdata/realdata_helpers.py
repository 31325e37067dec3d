"""Helpers for the real-data tests: small downsampled copies of real scans, written with ``pipeline.io``.

A copy is made by averaging blocks of ``factors`` voxels (images) or taking their maximum (labels, so a
small lesion is not lost and label values stay integers). The copy's affine is the original affine scaled by
``factors`` and shifted to the centre of each block, so the copy covers the same place in the world (mm)
as the original: geometry stays consistent, only the voxels are coarser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


def block_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid whose voxel ``i`` covers original voxels ``f*i .. f*i + f - 1`` (per axis)."""
    f = np.asarray(factors, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (f - 1) / 2  # the block centre, in original voxels
    return np.asarray(affine, dtype=np.float64) @ scale


def block_reduce(data: np.ndarray, factors: tuple[int, int, int], how: str) -> np.ndarray:
    """``(C, X, Y, Z)`` -> ``(C, X // fx, Y // fy, Z // fz)`` by block ``mean`` or ``max`` (trailing voxels
    that do not fill a block are dropped)."""
    c = data.shape[0]
    n = [s // f for s, f in zip(data.shape[1:], factors, strict=True)]
    cut = data[:, : n[0] * factors[0], : n[1] * factors[1], : n[2] * factors[2]]
    blocks = cut.reshape(c, n[0], factors[0], n[1], factors[1], n[2], factors[2])
    if how == "mean":
        return blocks.astype(np.float32).mean(axis=(2, 4, 6))
    if how == "max":
        return blocks.max(axis=(2, 4, 6))
    raise ValueError(f"unknown block reduction {how!r}")


def write_downsampled(src: Path, dst: Path, factors: tuple[int, int, int], kind: str) -> Path:
    """Read ``src``, block-reduce it (``kind`` ``"image"``: mean, float32; ``"label"``: max, uint8) and
    write it to ``dst`` (format from its suffix) with the matching affine."""
    from pipeline.io.formats import read_volume, write_volume
    from pipeline.io.volume import Volume

    vol = read_volume(src)
    if kind == "image":
        data = block_reduce(vol.data, factors, "mean").astype(np.float32)
    else:
        data = block_reduce(np.rint(vol.data).astype(np.int16), factors, "max").astype(np.uint8)
    return write_volume(dst, Volume(np.ascontiguousarray(data), block_affine(vol.affine, factors)))


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m pipeline <args>`` in ``cwd`` (tracking telemetry and DVC analytics off)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
