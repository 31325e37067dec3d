"""Shared, generic test fixtures: tiny synthetic data sets built in code, and the optional real data.

Everything here is small (16^3 volumes) so tests stay fast on two CPU cores. Volumes carry an oblique,
anisotropic affine so that geometry mistakes (axis order, LPS/RAS, spacing) cannot cancel out.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the package may not be installed (e.g. a bare checkout)
    sys.path.insert(0, str(REPO_ROOT))

TINY_LABELS = {0: "background", 1: "organ", 2: "lesion"}


def rotation_xyz(degrees: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation (columns = rotated axes) from intrinsic x, y, z angles in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """A 4x4 RAS affine: spacing (0.8, 1.1, 2.5) mm, rotated ~(12, -8, 20) degrees, origin off-centre (mm)."""
    from pipeline.io.volume import make_affine  # imported here: a broken package must not stop other suites

    return make_affine((0.8, 1.1, 2.5), (-101.37, 57.123456789, 33.3), rotation_xyz((12.0, -8.0, 20.0)))


def make_case_arrays(shape: tuple[int, int, int], lesion: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like float32 image (HU) and a uint8 label (0 background, 1 organ cube, 2 small lesion cube)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 10.0, size=shape).astype(np.float32) - 100.0
    label = np.zeros(shape, dtype=np.uint8)
    x, y, z = (s // 4 for s in shape)
    label[x : 3 * x, y : 3 * y, z : 3 * z] = 1
    if lesion:
        label[2 * x - 1 : 2 * x + 1, 2 * y - 1 : 2 * y + 1, 2 * z - 1 : 2 * z + 1] = 2  # 2x2x2 voxels
    image[label == 1] += 160.0
    image[label == 2] -= 60.0
    return image, label


@pytest.fixture(name="make_case_arrays")
def make_case_arrays_fixture() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``make_case_arrays(shape, lesion, seed)`` -> (image, label) arrays, as in ``tiny_msd_dataset``."""
    return make_case_arrays


@pytest.fixture
def tiny_msd_dataset(tmp_path: Path, oblique_affine: np.ndarray) -> Callable[..., Path]:
    """Factory writing a small valid MSD data set; returns its root (the folder holding dataset.json).

    ``make(n_cases=4, shape=(16, 16, 16), channels=1, name="tiny")``: cases ``case_000``...; even cases
    have a lesion (label 2), odd ones are lesion-free; ``channels > 1`` writes one 4D NIfTI per image.
    """

    def make(
        n_cases: int = 4, shape: tuple[int, int, int] = (16, 16, 16), channels: int = 1, name: str = "tiny"
    ) -> Path:
        from pipeline.io.formats import write_volume
        from pipeline.io.volume import Volume

        root = tmp_path / name
        training = []
        for i in range(n_cases):
            case_id = f"case_{i:03d}"
            image, label = make_case_arrays(shape, lesion=i % 2 == 0, seed=i)
            data = np.stack([image + 10.0 * c for c in range(channels)])
            write_volume(root / "imagesTr" / f"{case_id}.nii.gz", Volume(data, oblique_affine))
            write_volume(root / "labelsTr" / f"{case_id}.nii.gz", Volume(label[None], oblique_affine))
            training.append(
                {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
            )
        meta = {
            "name": name,
            "modality": {str(c): f"MR{c}" if channels > 1 else "CT" for c in range(channels)},
            "labels": {str(k): v for k, v in TINY_LABELS.items()},
            "numTraining": n_cases,
            "training": training,
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
        return root

    return make


@dataclass(frozen=True)
class BadInput:
    """A data set with one known problem: ``file`` is the path a message must name, ``problem`` a regex."""

    kind: str
    root: Path
    file: Path
    problem: str
    case_id: str | None


# the bad inputs of the issue, each a fixture kind (test modules parametrise over their own copy of this list)
BAD_INPUT_KINDS = (
    "truncated_nii_gz",
    "not_an_image",
    "image_2d",
    "label_grid_mismatch",
    "undeclared_label",
    "nan_voxel",
    "missing_file",
    "empty_training",
    "invalid_json",
    "path_escape",
)


@pytest.fixture
def bad_msd_dataset(
    tiny_msd_dataset: Callable[..., Path], oblique_affine: np.ndarray
) -> Callable[[str], BadInput]:
    """Factory: a 2-case MSD data set broken in one way (one of ``BAD_INPUT_KINDS``), on ``case_001``."""

    def make(kind: str) -> BadInput:
        from pipeline.io.formats import write_volume
        from pipeline.io.volume import Volume

        root = tiny_msd_dataset(n_cases=2, name=f"bad_{kind}")
        manifest = root / "dataset.json"
        image = root / "imagesTr" / "case_001.nii.gz"
        label = root / "labelsTr" / "case_001.nii.gz"
        if kind == "truncated_nii_gz":
            raw = image.read_bytes()
            image.write_bytes(raw[: len(raw) // 2])
            return BadInput(kind, root, image, r"cannot read as NIfTI", "case_001")
        if kind == "not_an_image":
            image.write_text("case_id,age\ncase_001,54\n")
            return BadInput(kind, root, image, r"cannot read as NIfTI.*not a gzip file", "case_001")
        if kind == "image_2d":
            import nibabel as nib

            img2d = nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), oblique_affine)
            nib.save(img2d, str(image))
            return BadInput(kind, root, image, r"2D", "case_001")
        if kind == "label_grid_mismatch":
            _, lab = make_case_arrays((16, 16, 15), lesion=False, seed=1)
            write_volume(label, Volume(lab[None], oblique_affine))
            return BadInput(kind, root, label, r"label grid does not match.*shape", "case_001")
        if kind == "undeclared_label":
            _, lab = make_case_arrays((16, 16, 16), lesion=False, seed=1)
            lab[0, 0, 0] = 7
            write_volume(label, Volume(lab[None], oblique_affine))
            return BadInput(
                kind, root, label, r"label value\(s\) \[7\] not declared in dataset\.json", "case_001"
            )
        if kind == "nan_voxel":
            img, _ = make_case_arrays((16, 16, 16), lesion=False, seed=1)
            img[3, 4, 5] = np.nan
            write_volume(image, Volume(img[None], oblique_affine))
            return BadInput(kind, root, image, r"1 NaN/Inf voxel", "case_001")
        if kind == "missing_file":
            label.unlink()
            return BadInput(kind, root, label, r"file not found", "case_001")
        if kind == "empty_training":
            meta = json.loads(manifest.read_text())
            meta["training"] = []
            manifest.write_text(json.dumps(meta))
            return BadInput(kind, root, manifest, r"training list is empty", None)
        if kind == "invalid_json":
            manifest.write_text(manifest.read_text()[:-20])  # cut mid-structure
            return BadInput(kind, root, manifest, r"not valid JSON", None)
        if kind == "path_escape":
            outside = root.parent / "outside.nii.gz"
            outside.write_bytes(image.read_bytes())
            meta = json.loads(manifest.read_text())
            meta["training"][1]["image"] = "../outside.nii.gz"
            manifest.write_text(json.dumps(meta))
            return BadInput(
                kind, root, manifest, r"path '\.\./outside\.nii\.gz' escapes the data set root", None
            )
        raise ValueError(f"unknown bad input kind {kind!r}")

    return make


@pytest.fixture
def real_data_dir() -> Path:
    """``../shared/data/real`` next to the repository; skips the test when it is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "real").resolve()
    if not path.is_dir():
        pytest.skip(f"real data not available at {path}")
    return path
