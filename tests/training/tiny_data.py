"""A tiny preprocessed data set on disk, in the layout the train stage reads (for the training tests).

``<root>/pre/plan.json``, ``<root>/pre/cases/<id>_image.npy`` (float32 (C, X, Y, Z)), ``<id>_label.npy``
(uint8 (X, Y, Z)), ``<id>.json`` (the case record of a scan left on its grid) and ``<root>/splits.json``. Scans are
32 x 32 x 16 voxels at 1.5 x 1.5 x 3 mm from :func:`pipeline.data.synthetic.generate_case`, each with one or
two high-contrast lesions of 20-60 voxels; the networks are 3-level U-Nets with 4-8 base filters so a
training run takes seconds on two CPU cores. Tracking is off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.contracts import Plan
from tests.contract_examples import grid_record, plan_with

SHAPE = (32, 32, 16)  # voxels (x, y, z)
SPACING_MM = (1.5, 1.5, 3.0)
LESION_LABEL = 2
NO_AUGMENT = {  # every probability 0: the patch is the plain crop
    "rotate_prob": 0.0,
    "scale_prob": 0.0,
    "elastic_prob": 0.0,
    "noise_prob": 0.0,
    "blur_prob": 0.0,
    "brightness_prob": 0.0,
    "contrast_prob": 0.0,
    "lowres_prob": 0.0,
    "gamma_inverted_prob": 0.0,
    "gamma_prob": 0.0,
    "mirror_prob": 0.0,
}


def synthetic_config(shape=SHAPE):
    from pipeline.config import SyntheticConfig

    return SyntheticConfig(
        shape=shape,
        spacing_mm=SPACING_MM,
        n_cases=3,
        lesion_free_fraction=0.0,
        oblique_fraction=0.0,
        max_lesions=2,
        small_diameter_mm=(6.0, 10.0),
        large_fraction=0.0,
        lesion_contrast_hu=(-200.0, -150.0),
        noise_hu=5.0,
    )


def deep_update(tree: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in changes.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@dataclass
class TinyTrainData:
    """A preprocessed data set on disk plus the params tree that trains on it."""

    root: Path
    plan: Plan
    splits: dict[str, list[str]]
    params: dict[str, Any]

    @property
    def preprocessed(self) -> Path:
        return self.root / "pre"

    @property
    def models(self) -> Path:
        return Path(self.params["paths"]["models"])

    def config(self, models: str | Path | None = None, **sections: Any):
        """The validated :class:`Config`; ``sections`` are merged into the params tree, e.g.
        ``config(train={"epochs": 3})``; ``models`` replaces ``paths.models``."""
        from pipeline.config import config_from_dict

        tree = deep_update(self.params, sections)
        if models is not None:
            tree = deep_update(tree, {"paths": {"models": str(models)}})
        return config_from_dict(tree, source="tests/training")

    def write_params(self, path: Path, models: str | Path | None = None, **sections: Any) -> Path:
        path.write_text(yaml.safe_dump(self.config(models, **sections).to_dict()))
        return path

    def cases(self, split: str):
        from pipeline.training.data import load_preprocessed

        return load_preprocessed(self.preprocessed, self.splits[split])


def write_tiny_preprocessed(
    root: Path,
    n_train: int = 3,
    n_val: int = 1,
    patch=(16, 16, 8),
    batch_size: int = 2,
    same_scan_for_val: bool = False,
) -> TinyTrainData:
    """Write ``n_train + n_val`` synthetic scans in the preprocessed layout (``same_scan_for_val``: the
    validation split is the first training scan)."""
    from pipeline.data.synthetic import generate_case

    syn = synthetic_config()
    cases = root / "pre" / "cases"
    cases.mkdir(parents=True)
    ids = []
    for i in range(n_train + (0 if same_scan_for_val else n_val)):
        image, label, _ = generate_case(syn, i)
        cid = f"case_{i:03d}"
        # roughly the CT normalisation of the preprocess stage: liver ~0, lesion ~ -1.7, air -10.5
        np.save(cases / f"{cid}_image.npy", ((image.data.astype(np.float32) - 50.0) / 100.0))
        np.save(cases / f"{cid}_label.npy", np.ascontiguousarray(label.data[0]))
        (cases / f"{cid}.json").write_text(grid_record(cid, image.shape, SPACING_MM).to_json())
        ids.append(cid)
    splits = {"train": ids[:n_train], "val": ids[:n_val] if same_scan_for_val else ids[n_train:], "test": []}
    plan = plan_with(
        patch_size=list(patch),
        batch_size=batch_size,
        network={"strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 3},
        n_classes=3,
        channel_names=["CT"],
        lesion_labels=[LESION_LABEL],
        target_spacing_mm=list(SPACING_MM),
        anisotropic=False,  # 3.0 / 1.5 mm is below the anisotropy ratio 3
        median_shape=list(SHAPE),
    )
    (root / "pre" / "plan.json").write_text(plan.to_json())
    (root / "splits.json").write_text(json.dumps(splits))
    params = {
        "seed": 0,
        "paths": {
            "raw": str(root / "raw"),
            "preprocessed": str(root / "pre"),
            "splits": str(root / "splits.json"),
            "models": str(root / "models"),
            "metrics": str(root / "metrics"),  # the stage's git-tracked metrics, never the repository's
        },
        "train": {
            "epochs": 2,
            "steps_per_epoch": 3,
            "val_every": 1,
            "num_workers": 0,
            "device": "cpu",
            "deterministic": True,
            "model": {"base_filters": 4, "max_filters": 16, "depth": 3, "num_res_units": 0},
            "optim": {"warmup_epochs": 0},
        },
        "inference": {"sw_batch_size": 4, "device": "cpu"},
        "tracking": {"enabled": False},
    }
    return TinyTrainData(root, plan, splits, params)
