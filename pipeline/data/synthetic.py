"""Deterministic synthetic CT-like scans with rare, small lesions, in the MSD layout.

Each scan is a torso-like phantom in Hounsfield units (HU): air (-1000), a body of fat (-100) and soft
tissue (40), two lungs (-850) in the upper slices, a spine (bone, 300-1000), and a liver-like organ
(~60 HU, label 1) holding 0..``max_lesions`` hypodense lesions (label 2) of several sizes. Partial volume
comes from a Gaussian blur in mm, then Gaussian noise. Some scans get an oblique direction. The label is
evaluated at voxel centres, the image is blurred, so small lesions look as they do in real CT.

Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: the same seed gives
byte-identical files (nibabel writes gzip with a zero mtime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from pipeline.config import SyntheticConfig
from pipeline.io.atomic import atomic_dir, write_text
from pipeline.io.formats import write_volume
from pipeline.io.volume import Volume, make_affine

LABELS = {0: "background", 1: "liver", 2: "lesion"}


@dataclass(frozen=True)
class SyntheticLesion:
    centre_mm: tuple[float, float, float]  # in the scan's array frame, relative to the volume centre
    diameter_mm: float


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    """Normalised squared distance ((x-c)/r)^2 summed over axes (< 1 inside)."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))


def generate_case(cfg: SyntheticConfig, index: int) -> tuple[Volume, Volume, list[SyntheticLesion]]:
    """One synthetic scan: image (HU, int16) and label (uint8) Volumes plus the lesions drawn."""
    rng = np.random.default_rng([cfg.seed, index])
    shape = np.asarray(cfg.shape)
    spacing = np.asarray(cfg.spacing_mm, dtype=np.float64)
    # voxel-centre coordinates in mm relative to the volume centre, in the array frame (x, y, z)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    extent = shape * spacing / 2  # half-size in mm

    jitter = lambda scale: 1.0 + rng.uniform(-scale, scale)  # noqa: E731
    image = np.full(shape, -1000.0, dtype=np.float32)
    body_r = (extent[0] * 0.88 * jitter(0.05), extent[1] * 0.72 * jitter(0.05))
    body = (grid[0] / body_r[0]) ** 2 + (grid[1] / body_r[1]) ** 2 + 0 * grid[2]
    image[body < 1] = -100.0  # subcutaneous fat
    inner = (grid[0] / (body_r[0] - 6)) ** 2 + (grid[1] / (body_r[1] - 6)) ** 2 + 0 * grid[2]
    image[inner < 1] = 40.0  # soft tissue / muscle

    lung_top = extent[2] * rng.uniform(0.05, 0.25)
    for side in (-1, 1):
        lung = _ellipsoid(grid, (side * body_r[0] * 0.45, body_r[1] * 0.05, extent[2]),
                          (body_r[0] * 0.3, body_r[1] * 0.6, extent[2] - lung_top + 10))
        image[(lung < 1) & (inner < 1)] = -850.0

    spine_c = (0.0, -body_r[1] * 0.62)  # posterior (-y in RAS)
    spine = (grid[0] - spine_c[0]) ** 2 + (grid[1] - spine_c[1]) ** 2 + 0 * grid[2]
    image[spine < 9.0 ** 2] = 1000.0  # cortical bone
    image[spine < 6.5 ** 2] = 300.0  # trabecular bone

    # the liver on the patient's right (+x in RAS), slightly anterior
    liver_c = (body_r[0] * 0.35 * jitter(0.1), body_r[1] * 0.1 * jitter(0.2), -extent[2] * 0.15 * jitter(0.2))
    liver_r = (body_r[0] * 0.42 * jitter(0.08), body_r[1] * 0.55 * jitter(0.08), extent[2] * 0.55 * jitter(0.08))
    liver_d = _ellipsoid(grid, liver_c, liver_r)
    liver = (liver_d < 1) & (inner < 1)
    liver_hu = rng.uniform(50.0, 70.0)
    image[liver] = liver_hu
    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = 1

    lesions: list[SyntheticLesion] = []
    if rng.random() >= cfg.lesion_free_fraction:
        n = int(rng.integers(1, cfg.max_lesions + 1))
        for _ in range(200):  # rejection sampling: inside the liver, not touching another lesion
            if len(lesions) == n:
                break
            lo, hi = cfg.large_diameter_mm if rng.random() < cfg.large_fraction else cfg.small_diameter_mm
            diameter = float(rng.uniform(lo, hi))
            u = rng.uniform(-1, 1, size=3)
            if np.sum(u**2) > 1:
                continue
            r = diameter / 2
            centre = tuple(float(c + ui * max(rl - r - 2.0, 0.0))
                           for c, ui, rl in zip(liver_c, u, liver_r, strict=True))
            if _ellipsoid([np.asarray(c) for c in centre], liver_c, liver_r) > (1 - (r + 2) / min(liver_r)) ** 2:
                continue
            if any(np.linalg.norm(np.subtract(centre, o.centre_mm)) < r + o.diameter_mm / 2 + 4 for o in lesions):
                continue
            lesions.append(SyntheticLesion(centre, diameter))
    for lesion in lesions:
        r = lesion.diameter_mm / 2
        axes_r = tuple(r * jitter(0.15) for _ in range(3))
        inside = _ellipsoid(grid, lesion.centre_mm, axes_r) < 1
        image[inside] = liver_hu + rng.uniform(*cfg.lesion_contrast_hu)
        label[inside & liver] = 2

    if cfg.blur_sigma_mm > 0:
        image = gaussian_filter(image, sigma=cfg.blur_sigma_mm / spacing, mode="nearest")
    image += rng.normal(0.0, cfg.noise_hu, size=image.shape).astype(np.float32)
    image_hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    direction = np.eye(3)
    if rng.random() < cfg.oblique_fraction:
        rotvec = rng.normal(size=3) / 3 * np.deg2rad(rng.uniform(8, 25)) * np.sqrt(3)
        direction = Rotation.from_rotvec(rotvec).as_matrix()
    origin = -(direction * spacing) @ ((shape - 1) / 2) + rng.uniform(-20, 20, size=3).round(1)
    affine = make_affine(spacing, origin, direction)
    return Volume(image_hu[None], affine), Volume(label[None], affine), lesions


def write_synthetic_dataset(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write ``imagesTr/``, ``labelsTr/`` and ``dataset.json`` into ``out_dir`` (replaced atomically)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        training = []
        lesion_table = []
        for i in tqdm(range(cfg.n_cases), desc="synth-data", unit="scan", disable=not progress):
            case_id = f"synth_{i:03d}"
            image, label, lesions = generate_case(cfg, i)
            write_volume(tmp / "imagesTr" / f"{case_id}.nii.gz", image)
            write_volume(tmp / "labelsTr" / f"{case_id}.nii.gz", label)
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
            lesion_table += [{"case_id": case_id, "diameter_mm": round(les.diameter_mm, 3)} for les in lesions]
        meta = {
            "name": "SyntheticRareLesionsCT",
            "description": "Deterministic synthetic CT-like torso scans with rare small liver lesions",
            "reference": "generated by pipeline.data.synthetic",
            "licence": "CC0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
            "synthetic_config": json.loads(cfg.model_dump_json()),
            "lesions": lesion_table,
        }
        write_text(tmp / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return out_dir
