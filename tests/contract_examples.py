"""Complete contract objects for tests: :func:`plan_with`, a realistic base plan (what ``make_plan`` writes for
30 CT scans of 128 x 128 x 40 at 0.8 x 0.8 x 2.5 mm) with some keys replaced, and :func:`grid_record`, the
record of a scan already on its preprocessed grid (RAS, not cropped, not resampled)."""

from __future__ import annotations

import copy
from typing import Any

from pipeline.contracts import CaseRecord, Plan

PLAN_JSON: dict[str, Any] = {
    "version": 2, "orientation": "RAS", "channel_names": ["CT"],
    "labels": {"0": "background", "1": "liver", "2": "lesion"}, "n_classes": 3, "lesion_labels": [2],
    "target_spacing_mm": [0.8, 0.8, 2.5], "anisotropic": True, "median_shape": [128, 128, 40],
    "patch_size": [64, 80, 24], "patch_size_requested": None, "batch_size": 2,
    "budget": {"kind": "cpu", "requested": "auto", "voxels": 250000.0, "patch_voxels_x_batch": 245760},
    "network": {"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
                "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                "filters": [8, 16, 32, 64, 128], "pools_per_axis": [4, 4, 2]},
    "intensity": [{"scheme": "ct", "clip": [-98.5, 198.5], "mean": 50.0, "std": 80.0}],
    "resampling": {"image_order": 3, "image_order_z": 1, "anisotropy_ratio": 3.0,
                   "label": "one-hot linear + argmax", "crop_to_nonzero": True},
    "n_fingerprint_cases": 30,
}


def plan_with(**changes: Any) -> Plan:
    """:data:`PLAN_JSON` with top-level keys replaced, validated; ``channel_names`` follows the number of
    ``intensity`` entries unless given."""
    tree = {**copy.deepcopy(PLAN_JSON), **changes}
    if "intensity" in changes and "channel_names" not in changes:
        tree["channel_names"] = [f"ch{i}" for i in range(len(changes["intensity"]))]
    return Plan.from_dict(tree, "tests/contract_examples.py")



def grid_record(case_id: str, shape, spacing_mm, n_classes: int = 3, has_label: bool = True) -> CaseRecord:
    """:func:`pipeline.preprocessing.transform.grid_record` of a scan left on its grid, with its case id."""
    from pipeline.preprocessing.transform import grid_record as record_of_grid

    return record_of_grid(shape, spacing_mm, n_classes, has_label, case_id=case_id)
