"""Tiny scans built in code for the preprocessing tests: oblique, anisotropic, LPS-stored phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.io.formats import write_volume
from pipeline.io.volume import Volume, make_affine


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation from x, y, z angles (degrees)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def oblique_affine(spacing=(0.9, 0.85, 3.0), origin=(12.5, -31.25, 40.125)) -> np.ndarray:
    """An LPS-stored (x -> L, y -> P), oblique (rotated ~(10, -7, 18) deg), anisotropic RAS affine (mm)."""
    direction = rotation((10.0, -7.0, 18.0)) @ np.diag([-1.0, -1.0, 1.0])
    return make_affine(spacing, origin, direction)


def world_grid(shape, affine) -> np.ndarray:
    """RAS mm coordinates ``(X, Y, Z, 3)`` of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def phantom(
    shape,
    affine,
    organ_radii_mm=(20.0, 17.0, 24.0),
    lesions=(((3.0, 2.0, 4.0), 10.0),),
    zero_border: int = 0,
    seed: int = 0,
) -> tuple[Volume, Volume]:
    """CT-like image (int16 HU) and label (0 background, 1 organ ellipsoid, 2 lesion spheres) Volumes.

    Lesions are ``(offset from the organ centre (mm), radius (mm))``. With ``zero_border`` the image is 0
    within that many voxels of its faces (a nonzero box to crop to); the organ stays inside.
    """
    xyz = world_grid(shape, affine)
    centre = xyz.reshape(-1, 3).mean(axis=0)
    label = np.zeros(shape, np.uint8)
    label[np.linalg.norm((xyz - centre) / np.asarray(organ_radii_mm), axis=-1) < 1] = 1
    for offset, radius in lesions:
        label[np.linalg.norm(xyz - (centre + np.asarray(offset)), axis=-1) < radius] = 2
    rng = np.random.default_rng(seed)
    image = np.where(label == 1, 60.0, np.where(label == 2, 10.0, -1000.0)) + rng.normal(0, 8, shape)
    image = image.astype(np.int16)
    if zero_border:
        inner = np.zeros(shape, bool)
        b = zero_border
        inner[b:-b, b:-b, b:-b] = True
        image[~inner] = 0
    return Volume(image[None], affine), Volume(label[None], affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def write_msd(
    root: Path, cases: list[tuple[str, Volume, Volume | None]], channel_names=("CT",), labels=None
) -> Path:
    """Write an MSD data set (``dataset.json`` + NIfTI files) holding ``cases``; returns ``root``."""
    labels = labels or {0: "background", 1: "organ", 2: "lesion"}
    training, test = [], []
    for case_id, image, label in cases:
        write_volume(root / "imagesTr" / f"{case_id}.nii.gz", image)
        if label is None:
            test.append(f"./imagesTr/{case_id}.nii.gz")
            continue
        write_volume(root / "labelsTr" / f"{case_id}.nii.gz", label)
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {
        "name": root.name,
        "modality": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {str(k): v for k, v in labels.items()},
        "training": training,
        "test": test,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
