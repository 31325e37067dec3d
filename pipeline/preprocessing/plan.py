"""The preprocessing / training plan derived from the fingerprint (nnU-Net's experiment planning, simplified).

* **Target spacing** (mm, canonical RAS axis order): per-axis median of the training spacings. When the
  coarsest axis is more than ``anisotropy_ratio`` (3) times coarser than the others, that axis takes a
  lower percentile (``anisotropic_percentile``, 10) of its spacings instead, never finer than the other axes
  (nnU-Net's rule, on spacing only).
* **Network topology** from patch size and spacing (nnU-Net's ``get_pool_and_conv_props``): an axis is
  downsampled (stride 2) while its feature map stays >= 4 voxels and its spacing is within 2x of the finest
  one; kernels are 1 along an axis while it is > 2x coarser than the finest, 3 after.
* **Patch and batch size** within a memory budget: start from the median preprocessed shape, shrink the
  axis that is largest relative to that shape (one divisibility step at a time, not below 16 voxels) until
  ``patch voxels x 2 <= budget``, then take the largest batch that fits (capped at 5 % of the data set's
  voxels, at least 2). Budgets: ``cpu`` = ``cpu_budget_mvoxels`` million voxels of patch x batch; ``gpu`` =
  ``gpu_budget_gb`` at about ``64 x base_filters`` bytes per voxel (activations of a U-Net under AMP;
  nnU-Net's default 128^3 x 2 at 32 filters lands near 9 GB); ``auto`` (default) = ``gpu`` when CUDA is
  available where the plan is made, else ``cpu``.
* **Network width** for that budget: the GPU plan is nnU-Net's, 32 filters doubling per stage up to 320; the
  CPU plan narrows it to ``cpu_base_filters`` .. ``cpu_max_filters`` (same topology: full-resolution first
  stage, two convolutions per stage; measured step times in docs/model.md). ``train.model.base_filters`` /
  ``max_filters``, when set, override both.
* **Intensity scheme** per channel (:mod:`.normalize`), with the CT clip / mean / std from the pooled
  foreground of the fingerprint.

Config overrides: ``preprocess.target_spacing_mm``, ``preprocess.patch_size`` (still clipped to the median
shape and made divisible), ``preprocess.batch_size``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ModelConfig, PreprocessConfig
from pipeline.contracts import Plan
from pipeline.io.dataset import Dataset
from pipeline.preprocessing.fingerprint import QUANTILE_GRID
from pipeline.preprocessing.normalize import resolve_bias_field, resolve_schemes
from pipeline.preprocessing.resample import target_shape
from pipeline.spacing import is_anisotropic

PLAN_VERSION = 2  # 2: network filters chosen by the budget kind (CPU / GPU); memory_budget "auto"
MIN_FEATURE_MAP = 4  # voxels per axis at the bottleneck
MIN_PATCH = 16  # voxels per axis, where the image allows
DEFAULT_MAX_STAGES = 6
MIN_BATCH = 2
BYTES_PER_VOXEL_PER_FILTER = 64  # GPU memory heuristic: training bytes per patch voxel and per base filter
DATASET_FRACTION_CAP = 0.05  # one batch covers at most 5 % of the data set's voxels (nnU-Net)


class PlanError(ValueError):
    """The data set cannot be planned as configured; the message says what to change."""


def target_spacing(
    spacings_mm: np.ndarray, anisotropy_ratio: float = 3.0, percentile: float = 10.0
) -> list[float]:
    """Target spacing (mm) from per-case spacings ``(N, 3)`` (canonical axis order).

    Example: spacings (0.8, 0.8, 5.0) for most cases and (0.8, 0.8, 1.0) for one in ten: the median z is 5.0 >
    3 x 0.8, so z takes the 10th percentile of the z spacings instead.
    """
    spacings = np.asarray(spacings_mm, dtype=np.float64)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    finest_other = float(max(target[a] for a in others))
    if target[worst] > anisotropy_ratio * finest_other:
        target[worst] = max(float(np.percentile(spacings[:, worst], percentile)), finest_other)
    return [float(t) for t in target]


def network_topology(patch: Sequence[int], spacing_mm: Sequence[float], max_stages: int) -> dict[str, Any]:
    """Strides and kernel sizes per stage for a U-Net on ``patch`` voxels at ``spacing_mm``.

    Returns:
        ``{"strides": [[1, 1, 1], ...], "kernel_sizes": [[k, k, k], ...], "pools": [p_x, p_y, p_z]}``;
        the patch must be divisible by ``2 ** pools`` per axis.
    """
    size = [float(n) for n in patch]
    spacing = [float(s) for s in spacing_mm]
    kernel = [3 if s / min(spacing) < 2 else 1 for s in spacing]
    strides, kernels, pools = [[1, 1, 1]], [list(kernel)], [0, 0, 0]
    while len(strides) < max_stages:
        valid = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not valid:
            break
        finest = min(spacing[a] for a in valid)
        valid = [a for a in valid if spacing[a] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP:
            break
        stride = [1, 1, 1]
        for a in valid:
            stride[a] = 2
            pools[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        kernel = [3 if k == 3 or spacing[a] / min(spacing) < 2 else 1 for a, k in enumerate(kernel)]
        strides.append(stride)
        kernels.append(list(kernel))
    return {"strides": strides, "kernel_sizes": kernels, "pools": pools}


def fit_patch(
    patch: Sequence[int], spacing_mm: Sequence[float], max_stages: int
) -> tuple[list[int], dict[str, Any]]:
    """Round ``patch`` down until it is divisible by ``2 ** pools`` of its own topology (a fixed point)."""
    patch = [int(n) for n in patch]
    while True:
        topo = network_topology(patch, spacing_mm, max_stages)
        fitted = [max(2**p, n // 2**p * 2**p) for n, p in zip(patch, topo["pools"], strict=True)]
        if fitted == patch:
            return patch, topo
        patch = fitted


def plan_patch(
    median_shape: Sequence[int], spacing_mm: Sequence[float], budget_voxels: float, max_stages: int
) -> tuple[list[int], dict[str, Any]]:
    """Largest patch (voxels) with ``patch x MIN_BATCH <= budget_voxels``, shaped like the median scan."""
    median = [max(1, int(n)) for n in median_shape]
    floor = [min(MIN_PATCH, n) for n in median]
    # nnU-Net's start: a cube in mm holding 256^3 voxels, clipped to the median shape
    inv = 1.0 / np.asarray(spacing_mm, dtype=np.float64)
    start = inv * (256**3 / np.prod(inv)) ** (1 / 3)
    patch = [min(int(np.rint(s)), n) for s, n in zip(start, median, strict=True)]
    while True:
        patch, topo = fit_patch(patch, spacing_mm, max_stages)
        if np.prod(patch) * MIN_BATCH <= budget_voxels:
            return patch, topo
        steps = [2**p for p in topo["pools"]]
        candidates = [a for a in range(3) if patch[a] - steps[a] >= floor[a]]
        if not candidates:
            return patch, topo  # cannot shrink further; the batch size takes the rest
        axis = max(candidates, key=lambda a: (patch[a] / median[a], patch[a] * spacing_mm[a], -a))
        patch[axis] -= steps[axis]


def resolve_budget_kind(memory_budget: str, cuda_available: bool | None = None) -> str:
    """``"auto"`` -> ``"gpu"`` when CUDA is available (``cuda_available``, None: ask torch), else ``"cpu"``."""
    if memory_budget != "auto":
        return memory_budget
    if cuda_available is None:
        import torch  # lazy: only the auto budget needs it

        cuda_available = torch.cuda.is_available()
    return "gpu" if cuda_available else "cpu"


def planned_filters(model: ModelConfig, pre: PreprocessConfig, kind: str) -> tuple[int, int]:
    """(base, max) filters of the planned network: the config's when set, else nnU-Net's 32 / 320 on the GPU
    plan and ``preprocess.cpu_base_filters`` / ``cpu_max_filters`` on the CPU plan."""
    from pipeline.model.factory import NNUNET_BASE_FILTERS, NNUNET_MAX_FILTERS

    base, top = (NNUNET_BASE_FILTERS, NNUNET_MAX_FILTERS) if kind == "gpu" else (pre.cpu_base_filters,
                                                                                 pre.cpu_max_filters)
    return model.base_filters or base, model.max_filters or top


def _quantile(fp_channel: dict[str, Any], percentile: float) -> float:
    table = fp_channel.get("quantiles")
    if not table:
        raise PlanError(
            "the fingerprint has no foreground voxels to set the CT clip range (all labels empty?)"
        )
    return float(np.interp(percentile, QUANTILE_GRID, np.asarray(table, dtype=np.float64)))


def _check_labels(labels: dict[int, str], lesion_labels: Sequence[int]) -> None:
    values = sorted(labels)
    if values != list(range(len(values))):
        raise PlanError(
            f"labels must be consecutive 0..K-1, got {values}: map them with data.label_remap, e.g. "
            f"{ {v: i for i, v in enumerate(values) if v != i} }"
        )
    missing = [v for v in lesion_labels if v not in labels]
    if missing:
        raise PlanError(f"data.lesion_labels {missing} are not declared labels {values}")


def make_plan(fingerprint: dict[str, Any], dataset: Dataset, cfg: Config) -> Plan:
    """Derive the plan from the fingerprint, the data set's labels / channels and the config.

    Args:
        fingerprint: :func:`pipeline.preprocessing.fingerprint.compute_fingerprint` output.
        dataset: the data set (``labels``, ``channel_names``).
        cfg: the whole :class:`pipeline.config.Config` (``preprocess``, ``data.lesion_labels``,
            ``train.model.base_filters`` / ``max_filters`` / ``depth``). ``preprocess.memory_budget: auto``
            asks torch whether CUDA is available here.

    Returns:
        The :class:`~pipeline.contracts.Plan`: ``target_spacing_mm``, ``patch_size``, ``batch_size``,
        ``network`` (``strides``, ``kernel_sizes``, ``filters``), ``intensity`` (per channel), ``labels``,
        ``lesion_labels``, ``n_classes``, ``channel_names``, ``orientation``, ``median_shape`` and the budget
        used (``plan.json`` holds its :meth:`~pipeline.contracts.Contract.to_dict`).

    Raises:
        PlanError: labels not consecutive, lesion labels undeclared, channel mismatch.
    """
    pre = cfg.preprocess
    _check_labels(dataset.labels, cfg.data.lesion_labels)
    cases = [fingerprint["cases"][cid] for cid in fingerprint["case_ids"]]
    n_channels = cases[0]["n_channels"]
    if n_channels != len(dataset.channel_names):
        raise PlanError(
            f"the scans have {n_channels} channels but the data set names {len(dataset.channel_names)}: "
            f"{list(dataset.channel_names)} (set data.channel_names)"
        )

    spacings = np.array([c["spacing_ras_mm"] for c in cases], dtype=np.float64)
    if pre.target_spacing_mm is not None:
        spacing = [float(s) for s in pre.target_spacing_mm]
    else:
        spacing = target_spacing(spacings, pre.anisotropy_ratio, pre.anisotropic_percentile)
    new_shapes = np.array([target_shape(c["shape_after_crop"], c["spacing_ras_mm"], spacing) for c in cases])
    median_shape = [int(n) for n in np.floor(np.median(new_shapes, axis=0))]

    model = cfg.train.model
    max_stages = model.depth if model.depth is not None else DEFAULT_MAX_STAGES
    kind = resolve_budget_kind(pre.memory_budget)
    base_filters, max_filters = planned_filters(model, pre, kind)
    if kind == "cpu":
        budget = pre.cpu_budget_mvoxels * 1e6
    else:
        budget = pre.gpu_budget_gb * 1e9 / (BYTES_PER_VOXEL_PER_FILTER * base_filters)
    if pre.patch_size is not None:
        requested = [int(n) for n in pre.patch_size]
        patch, topo = fit_patch(
            [min(r, n) for r, n in zip(requested, median_shape, strict=True)], spacing, max_stages
        )
    else:
        requested = None
        patch, topo = plan_patch(median_shape, spacing, budget, max_stages)
    patch_voxels = int(np.prod(patch))
    if pre.batch_size is not None:
        batch = int(pre.batch_size)
    else:
        fits = int(budget // patch_voxels)
        cap = int(np.rint(DATASET_FRACTION_CAP * float(new_shapes.prod(axis=1).sum()) / patch_voxels))
        batch = max(MIN_BATCH, min(fits, cap)) if fits >= MIN_BATCH else max(1, fits)

    n_stages = len(topo["strides"])
    filters = [min(base_filters * 2**i, max_filters) for i in range(n_stages)]

    schemes = resolve_schemes(dataset.channel_names, pre.intensity.scheme)
    bias = resolve_bias_field(dataset.channel_names, schemes, pre.intensity)
    lo_pct, hi_pct = pre.intensity.ct_clip_percentiles
    intensity = []
    for c, scheme in enumerate(schemes):
        fg = fingerprint["foreground_intensity"][c]
        if scheme == "ct":
            intensity.append(
                {
                    "scheme": "ct",
                    "clip": [_quantile(fg, lo_pct), _quantile(fg, hi_pct)],
                    "mean": float(fg["mean"]),
                    "std": float(fg["std"]),
                }
            )
        else:
            intensity.append({"scheme": scheme, "clip": None, "mean": None, "std": None})
        if bias[c] is not None:  # only when set: plans without correction keep their bytes (and hash)
            intensity[-1]["bias_field"] = bias[c]

    labels = {str(k): v for k, v in sorted(dataset.labels.items())}
    return Plan.from_dict({
        "version": PLAN_VERSION,
        "orientation": "RAS",
        "channel_names": list(dataset.channel_names),
        "labels": labels,
        "n_classes": len(labels),
        "lesion_labels": [int(v) for v in cfg.data.lesion_labels],
        "target_spacing_mm": spacing,
        "anisotropic": is_anisotropic(spacing, pre.anisotropy_ratio),
        "median_shape": median_shape,
        "patch_size": patch,
        "patch_size_requested": requested,
        "batch_size": batch,
        "budget": {
            "kind": kind,
            "requested": pre.memory_budget,
            "voxels": float(budget),
            "patch_voxels_x_batch": patch_voxels * batch,
        },
        "network": {
            "strides": topo["strides"],
            "kernel_sizes": topo["kernel_sizes"],
            "filters": filters,
            "pools_per_axis": topo["pools"],
        },
        "intensity": intensity,
        "resampling": {
            "image_order": pre.image_order,
            "image_order_z": pre.image_order_z,
            "anisotropy_ratio": pre.anisotropy_ratio,
            "label": "one-hot linear + argmax",
            "crop_to_nonzero": pre.crop_to_nonzero,
        },
        "n_fingerprint_cases": len(cases),
    }, "make_plan")


CASE_PLAN_KEYS = ("orientation", "target_spacing_mm", "intensity", "n_classes")
CASE_SETTINGS = ("crop_to_nonzero", "image_order", "image_order_z", "anisotropy_ratio")


def plan_hash(plan: Plan, pre_cfg: PreprocessConfig) -> str:
    """Hash of everything in the plan and the ``preprocess`` config that decides a case's preprocessed
    bytes (``CASE_PLAN_KEYS``, ``CASE_SETTINGS``, the record version). Stored in every case record; a
    mismatch makes the stage recompute the case. Patch size, batch size and network do not count.

    The hash is taken over the plan's JSON form, so a plan read back from ``plan.json`` hashes as the one
    written (and as the plain-dict plans of earlier versions did: existing outputs stay valid)."""
    from pipeline.preprocessing.transform import RECORD_VERSION

    as_json = plan.to_dict()
    blob = json.dumps(
        {
            "plan": {key: as_json[key] for key in CASE_PLAN_KEYS},
            "preprocess": {key: getattr(pre_cfg, key) for key in CASE_SETTINGS},
            "record_version": RECORD_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_plan(path: str | Path) -> Plan:
    """Read ``plan.json``; a missing or invalid file raises :class:`~pipeline.contracts.ContractError`
    naming it (and the key)."""
    return Plan.load(path)
