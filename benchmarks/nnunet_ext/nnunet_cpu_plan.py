"""Add a CPU-sized configuration to an nnU-Net v2 plans file (run with the reference venv's python).

nnU-Net's planner sizes the patch for a GPU memory target (8 GB: e.g. 112x160x128, batch 2, 32-320 filters
for 1 mm MS scans, ~80 s per training iteration on 2 CPU cores). For an equal-compute comparison the
benchmark gives nnU-Net the patch x batch of our CPU plan and our filter counts, and builds the rest
exactly as nnU-Net's ``ExperimentPlanner.get_plans_for_configuration`` does: the topology (pooling per
axis, kernel sizes, patch rounded to a multiple of the total stride) from nnU-Net's own
``get_pool_and_conv_props`` with its minimum feature-map edge of 4, two conv-norm-LeakyReLU per stage,
features ``min(base * 2^i, max)``. The new configuration inherits everything else (spacing, normalisation,
preprocessed data) from ``3d_fullres``, so no second preprocessing run is needed.

Usage::

    python nnunet_cpu_plan.py PLANS.json --name 3d_cpu --patch-xyz 80 96 16 --batch 2 \
        --base-features 16 --max-features 320

``--patch-xyz`` is in our (x, y, z) voxel order; nnU-Net's arrays are (z, y, x) from SimpleITK, then
permuted by the plan's ``transpose_forward``. Prints the added configuration as JSON.
"""

from __future__ import annotations

import argparse
import json
from copy import deepcopy

import numpy as np

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

MIN_FEATURE_MAP_EDGE = 4  # ExperimentPlanner.UNet_featuremap_min_edge_length


def cpu_configuration(plans: dict, patch_xyz: list[int], batch: int, base: int, max_features: int,
                      parent: str = "3d_fullres") -> dict:
    """The configuration dict (inheriting from ``parent``) for a given patch / batch / filter count."""
    cfg = plans["configurations"][parent]
    transpose = plans["transpose_forward"]
    patch_zyx = list(reversed(patch_xyz))
    patch = np.array([patch_zyx[i] for i in transpose])
    spacing = cfg["spacing"]
    median = cfg.get("median_image_size_in_voxels")
    if median is not None:  # as nnU-Net: no patch larger than the median image
        patch = np.minimum(patch, np.array(median, dtype=int))
    _, pool, kernels, patch, _ = get_pool_and_conv_props(spacing, patch, MIN_FEATURE_MAP_EDGE, 999999)
    n_stages = len(pool)
    arch = deepcopy(cfg["architecture"])
    kw = arch["arch_kwargs"]
    kw.update({
        "n_stages": n_stages,
        "features_per_stage": [min(max_features, base * 2**i) for i in range(n_stages)],
        "kernel_sizes": [list(map(int, k)) for k in kernels],
        "strides": [list(map(int, s)) for s in pool],
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    return {"inherits_from": parent, "batch_size": int(batch), "patch_size": [int(p) for p in patch],
            "architecture": arch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plans")
    p.add_argument("--name", default="3d_cpu")
    p.add_argument("--patch-xyz", type=int, nargs=3, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--base-features", type=int, required=True)
    p.add_argument("--max-features", type=int, default=320)
    args = p.parse_args()
    with open(args.plans) as f:
        plans = json.load(f)
    new = cpu_configuration(plans, args.patch_xyz, args.batch, args.base_features, args.max_features)
    plans["configurations"][args.name] = new
    with open(args.plans, "w") as f:
        json.dump(plans, f, indent=1)
    print(json.dumps(new))


if __name__ == "__main__":
    main()
