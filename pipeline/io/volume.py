"""The one carrier of image data and geometry used everywhere in the pipeline.

A :class:`Volume` holds a channel-first array ``(C, X, Y, Z)`` (C-contiguous) and the 4x4 affine that
maps a voxel index ``(i, j, k)`` to world coordinates in millimetres in the **RAS+** convention
(nibabel's). Readers return one and writers take one; LPS (ITK/DICOM) is converted at the I/O boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """Array ``(C, X, Y, Z)`` plus its voxel-to-RAS affine (mm).

    Example:
        >>> v = Volume(np.zeros((1, 4, 4, 2), np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
        >>> v.spacing
        (0.8, 0.8, 2.5)
    """

    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"Volume data must be (C, X, Y, Z), got shape {self.data.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape in voxels (X, Y, Z)."""
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> np.ndarray:
        """World (RAS, mm) position of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the array axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def with_data(self, data: np.ndarray) -> Volume:
        """Same geometry, new array (must have the same spatial shape)."""
        if data.ndim == 3:
            data = data[None]
        if tuple(data.shape[1:]) != self.shape:
            raise ValueError(f"with_data: spatial shape {data.shape[1:]} != {self.shape}")
        return Volume(np.ascontiguousarray(data), self.affine)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices ``(..., 3)`` -> RAS world coordinates in mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: Volume, atol_mm: float = 1e-3, atol_dir: float = 1e-4) -> bool:
        return not grid_mismatch(self, other, atol_mm, atol_dir)


def make_affine(spacing_mm, origin_mm=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """Build a RAS affine from spacing (mm), origin (RAS mm) and a 3x3 direction (columns = axes)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing_mm, dtype=np.float64)
    affine[:3, 3] = origin_mm
    return affine


def grid_mismatch(a: Volume, b: Volume, atol_mm: float = 1e-3, atol_dir: float = 1e-4) -> list[str]:
    """Human-readable differences between two grids (empty when they match)."""
    problems = []
    if a.shape != b.shape:
        problems.append(f"shape {a.shape} != {b.shape}")
    if not np.allclose(a.spacing, b.spacing, atol=atol_mm):
        problems.append(f"spacing {np.round(a.spacing, 4).tolist()} != {np.round(b.spacing, 4).tolist()} mm")
    if not np.allclose(a.origin, b.origin, atol=atol_mm):
        problems.append(f"origin {np.round(a.origin, 3).tolist()} != {np.round(b.origin, 3).tolist()} mm")
    if not np.allclose(a.direction, b.direction, atol=atol_dir):
        problems.append("direction differs")
    return problems
