"""A tiny evaluated workspace built in code, with hand-made predictions: hits, a miss and false positives.

Used by the inspection tests and by the notebook test (so that every view has content; a model trained
for seconds detects nothing). Everything is defined in world (RAS) millimetres, so scans stored with
other orientations (LPS-stored, oblique) hold the same anatomy:

* a body ellipse (soft tissue, 40 HU) in air, a bone disc at the back (posterior, -y), an organ
  ellipsoid (label 1, 60 HU) on the patient's right (+x), lesions (label 2, 0 HU) inside the organ;
* predictions: a Gaussian bump of probability on each *detected* lesion, nothing on the missed one,
  and one false-positive bump per scan outside the lesions; the label map is lesion where p >= 0.5.

Expected outcome (``EXPECTED``): 3 GT lesions, 2 detected, 1 missed, 3 false positives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, dump_config
from pipeline.io.formats import write_volume
from pipeline.io.volume import Volume, make_affine


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def centred_affine(shape, spacing, direction=None, centre_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine whose grid centre lies at ``centre_mm``."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    half = (np.asarray(shape) - 1) / 2
    origin = np.asarray(centre_mm, float) - (direction * np.asarray(spacing)) @ half
    return make_affine(spacing, origin, direction)


IDENTITY = {"shape": (48, 48, 16), "spacing": (0.9, 0.9, 2.5), "direction": None}
LPS_OBLIQUE = {"shape": (50, 48, 15), "spacing": (0.9, 0.85, 2.5),
               "direction": rotation((6.0, -5.0, 12.0)) @ np.diag([-1.0, -1.0, 1.0])}
ORGAN_CENTRE, ORGAN_RADII = np.array([8.0, 0.0, 0.0]), np.array([12.0, 13.0, 14.0])

# scan -> (grid, lesions ((centre mm, radius mm, detected?)), false-positive (centre mm, peak probability))
SCANS = {
    "scan_a": (IDENTITY, [((12.0, 3.0, 0.0), 4.5, True), ((2.0, -5.0, 2.5), 3.0, False)],
               ((-9.0, 6.0, 0.0), 0.8)),
    "scan_b": (LPS_OBLIQUE, [((9.0, -2.0, 1.0), 4.0, True)], ((-10.0, -3.0, -2.0), 0.95)),
    "scan_c": (IDENTITY, [], ((-8.0, 9.0, 2.5), 0.45)),
}
EXPECTED = {"lesions": 3, "TP": 2, "missed": 1, "FP": 3}


@dataclass(frozen=True)
class Workspace:
    root: Path
    test_ids: list[str]


def world_grid(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def make_scan(name: str, seed: int = 0) -> tuple[Volume, Volume, Volume, Volume]:
    """(image HU int16, GT label, lesion probability float32, predicted label) of a scan of :data:`SCANS`."""
    grid, lesions, (fp_centre, fp_peak) = SCANS[name]
    affine = centred_affine(grid["shape"], grid["spacing"], grid["direction"])
    xyz = world_grid(grid["shape"], affine)
    x, y = xyz[..., 0], xyz[..., 1]
    label = np.zeros(grid["shape"], np.uint8)
    image = np.full(grid["shape"], -1000.0)
    image[(x / 19.0) ** 2 + (y / 16.0) ** 2 < 1] = 40.0
    image[x ** 2 + (y + 12.0) ** 2 < 3.0 ** 2] = 700.0  # bone, posterior
    organ = np.linalg.norm((xyz - ORGAN_CENTRE) / ORGAN_RADII, axis=-1) < 1
    label[organ] = 1
    prob = np.zeros(grid["shape"])
    for centre, radius, found in lesions:
        d = np.linalg.norm(xyz - np.asarray(centre), axis=-1)
        label[d < radius] = 2
        if found:
            prob = np.maximum(prob, 0.9 * np.exp(-0.5 * (d / (0.8 * radius)) ** 2))
    image[label == 1] = 60.0
    image[label == 2] = 0.0
    image += np.random.default_rng(seed).normal(0.0, 8.0, image.shape)
    d_fp = np.linalg.norm(xyz - np.asarray(fp_centre), axis=-1)
    prob = np.maximum(prob, fp_peak * np.exp(-0.5 * (d_fp / 2.5) ** 2)).astype(np.float32)
    pred = np.where(prob >= 0.5, 2, np.where(organ, 1, 0)).astype(np.uint8)
    return (Volume(image.astype(np.int16)[None], affine), Volume(label[None], affine),
            Volume(prob[None], affine), Volume(pred[None], affine))


def build_workspace(root: Path, bootstrap: int = 100, export: bool = True) -> Workspace:
    """Write data set, splits, predictions and evaluation outputs (as the stages would) under ``root``."""
    from pipeline.evaluation.evaluate import evaluate_cases
    from pipeline.evaluation.report import write_report

    root = Path(root)
    cfg = Config()
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "params.yaml").write_text(dump_config(cfg))
    raw, pred_dir, eval_dir = root / cfg.paths.raw, root / cfg.paths.predictions, root / cfg.paths.evaluation
    ids = list(SCANS)
    arrays = {}
    for i, name in enumerate(ids):
        image, label, prob, pred = make_scan(name, seed=i)
        write_volume(raw / "imagesTr" / f"{name}.nii.gz", image)
        write_volume(raw / "labelsTr" / f"{name}.nii.gz", label)
        write_volume(pred_dir / "probabilities" / f"{name}.nii.gz", prob)
        write_volume(pred_dir / "labels" / f"{name}.nii.gz", pred)
        arrays[name] = (prob.data[0], (label.data[0] == 2).astype(np.uint8), label.affine)
    meta = {"name": "inspection-tiny", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "organ", "2": "lesion"},
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ids],
            "test": []}
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2))
    (root / cfg.paths.splits).write_text(json.dumps({"train": [], "val": [], "test": ids}))
    # static: the hand-made answer (2 hits, 1 miss, 3 FPs) counts components at the fixed 0.1 level
    ecfg = cfg.evaluation.model_copy(update={"bootstrap": bootstrap, "extraction": "static"})
    result = evaluate_cases(((n, *arrays[n]) for n in ids), ecfg, lesion_label=1, voxel_metrics=False)
    metrics = result.to_metrics()
    metrics["settings"]["test_scans"] = ids
    write_report(eval_dir, result, metrics)
    if export:
        from pipeline.inspection.export import export_lesion_views
        from pipeline.io.dataset import load_dataset

        paths = cfg.paths.model_copy(update={k: str(root / v) for k, v in cfg.paths.model_dump().items()})
        abs_cfg = cfg.model_copy(update={"paths": paths})  # the stage runs in the workspace; this may not
        export_lesion_views(abs_cfg, load_dataset(cfg.data, raw), ids, eval_dir, eval_dir / "lesion_views")
    return Workspace(root, ids)
