"""Data set fingerprint: per-case geometry, foreground intensities, class voxel counts and lesions.

Computed on the training + validation cases only (never on test), in parallel, one case per worker. The
result is a plain dict written as ``fingerprint.json``; it is deterministic (cases in sorted order, random
foreground samples seeded by the case id, no timestamps) so the stage output is reproducible byte for byte.

Units: spacing and origin in mm (RAS), volumes in mm^3, intensities as stored (HU for CT).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import cc3d
import numpy as np

from pipeline.config import DataConfig
from pipeline.io.dataset import Case, Dataset
from pipeline.preprocessing.cases import load_case
from pipeline.preprocessing.crop import crop, nonzero_box
from pipeline.preprocessing.orient import axcodes, canonical_ornt, permute, to_canonical
from pipeline.preprocessing.parallel import map_cases, resolve_workers, worker_pool

FINGERPRINT_VERSION = 1
FG_SAMPLES_TOTAL = 10_000_000  # foreground voxels sampled over the whole data set (nnU-Net: 1e8)
QUANTILE_GRID = np.linspace(0.0, 100.0, 201)  # percentiles stored for the pooled foreground (0.5 % steps)


def _stats(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {
            "n": 0,
            "mean": None,
            "std": None,
            "min": None,
            "max": None,
            "percentile_00_5": None,
            "percentile_99_5": None,
        }
    v = values.astype(np.float64, copy=False)
    p_lo, p_hi = np.percentile(v, [0.5, 99.5])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(p_lo),
        "percentile_99_5": float(p_hi),
    }


def _component_sizes(label: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components of the voxels ``flat_idx`` of ``label`` (raster order),
    labelled inside their bounding box only (lesions are tiny next to the scan)."""
    if flat_idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    coords = np.unravel_index(flat_idx, label.shape)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    mask = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
    mask[tuple(c - b.start for c, b in zip(coords, box, strict=True))] = True
    components = cc3d.connected_components(mask, connectivity=26)
    return np.bincount(components.ravel())[1:]


def case_fingerprint(
    case: Case,
    label_remap: dict[int, int] | None,
    n_classes: int,
    lesion_labels: Sequence[int],
    n_samples: int,
) -> tuple[str, dict[str, Any], np.ndarray]:
    """Fingerprint one labelled case.

    Returns:
        ``(case_id, entry, samples)``: the JSON-able entry and ``(C, k)`` float32 foreground samples
        (``k <= n_samples`` voxels with label > 0, drawn without replacement, seeded by the case id).
    """
    if case.label is None:
        raise ValueError(
            f"case {case.case_id}: the fingerprint needs labelled cases, {case.images[0]} has no label"
        )
    image, label = load_case(case, label_remap, n_classes)
    assert label is not None
    lab = label.data[0]
    ornt = canonical_ornt(image.affine)
    data_ras, _ = to_canonical(image.data, image.affine, ornt)
    box = nonzero_box(data_ras)
    # flat indices of the foreground: one pass over the volume, then work on the (small) foreground only
    flat = lab.reshape(-1)
    fg_idx = np.flatnonzero(flat)
    n_fg = int(fg_idx.size)
    values = image.data.reshape(image.n_channels, -1)[:, fg_idx]  # (C, n_fg)
    if n_fg > n_samples:
        rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
        idx = np.sort(rng.choice(n_fg, size=n_samples, replace=False))
        samples = values[:, idx]
    else:
        samples = values
    voxel_mm3 = float(np.prod(image.spacing))
    lesions = {}
    fg_labels = flat[fg_idx]
    for value in lesion_labels:
        sizes = _component_sizes(lab, fg_idx[fg_labels == value])
        volumes = sorted((float(n * voxel_mm3) for n in sizes), reverse=True)
        lesions[str(int(value))] = {"count": len(volumes), "volumes_mm3": volumes}
    counts = np.bincount(fg_labels, minlength=n_classes)
    counts[0] = flat.size - n_fg
    entry = {
        "shape": [int(n) for n in image.shape],
        "spacing_mm": [float(s) for s in image.spacing],
        "origin_mm": [float(o) for o in image.origin],
        "direction": [[float(v) for v in row] for row in image.direction],
        "axcodes": axcodes(image.affine),
        "n_channels": int(image.n_channels),
        "shape_ras": [int(n) for n in data_ras.shape[1:]],
        "spacing_ras_mm": [float(s) for s in permute(image.spacing, ornt)],
        "shape_after_crop": [int(n) for n in crop(data_ras, box).shape[1:]],
        "foreground": [_stats(values[c]) for c in range(values.shape[0])],
        "voxels_per_class": {str(k): int(n) for k, n in enumerate(counts)},
        "lesions": lesions,
    }
    return case.case_id, entry, np.ascontiguousarray(samples, dtype=np.float32)


def compute_fingerprint(
    dataset: Dataset,
    case_ids: Sequence[str],
    data_cfg: DataConfig,
    workers: int,
    pool: ProcessPoolExecutor | None = None,
) -> dict[str, Any]:
    """Fingerprint the cases ``case_ids`` (the training + validation split; never pass test cases).

    Args:
        dataset: the loaded data set (labels and channel names already overridden by the config).
        case_ids: ids to include; order does not matter (the result is sorted).
        data_cfg: the ``data`` config section (``label_remap``, ``lesion_labels``).
        workers: worker processes (0 = CPU cores, 1 = in this process).
        pool: an already running pool to use instead (``workers`` is then ignored).

    Returns:
        ``{"version", "case_ids", "channel_names", "labels", "lesion_labels", "cases": {id: entry},
        "foreground_intensity": [per channel stats + "quantiles" on QUANTILE_GRID], "median_spacing_ras_mm",
        "median_shape_after_crop", "lesions": {label: {"count", "cases_with_lesions", "volumes_mm3"}}}``.
    """
    ids = sorted(set(case_ids))
    if not ids:
        raise ValueError("compute_fingerprint: no cases given (the train + val splits are empty)")
    n_classes = max(dataset.labels) + 1 if dataset.labels else 1
    per_case = max(1, FG_SAMPLES_TOTAL // len(ids))
    remap = dict(data_cfg.label_remap) or None
    tasks = [(dataset.case(cid), remap, n_classes, tuple(data_cfg.lesion_labels), per_case) for cid in ids]
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(worker_pool(min(resolve_workers(workers), len(tasks))))
        results = {
            cid: (entry, samples)
            for cid, entry, samples in map_cases(case_fingerprint, tasks, pool, "fingerprint")
        }
    n_channels = {results[cid][0]["n_channels"] for cid in ids}
    if len(n_channels) != 1:
        raise ValueError(f"cases differ in their number of channels: {sorted(n_channels)}")
    pooled = np.concatenate([results[cid][1] for cid in ids], axis=1)  # sorted case order: deterministic
    foreground = []
    for c in range(pooled.shape[0]):
        stats = _stats(pooled[c])
        stats["quantiles"] = (
            [float(q) for q in np.percentile(pooled[c].astype(np.float64), QUANTILE_GRID)]
            if pooled.shape[1]
            else None
        )
        foreground.append(stats)
    cases = {cid: results[cid][0] for cid in ids}
    spacings = np.array([cases[cid]["spacing_ras_mm"] for cid in ids])
    shapes = np.array([cases[cid]["shape_after_crop"] for cid in ids])
    lesions = {}
    for value in data_cfg.lesion_labels:
        key = str(int(value))
        volumes = sorted((v for cid in ids for v in cases[cid]["lesions"][key]["volumes_mm3"]), reverse=True)
        lesions[key] = {
            "count": len(volumes),
            "cases_with_lesions": sum(cases[cid]["lesions"][key]["count"] > 0 for cid in ids),
            "volumes_mm3": volumes,
        }
    return {
        "version": FINGERPRINT_VERSION,
        "case_ids": ids,
        "channel_names": list(dataset.channel_names),
        "labels": {str(k): v for k, v in sorted(dataset.labels.items())},
        "lesion_labels": [int(v) for v in data_cfg.lesion_labels],
        "cases": cases,
        "foreground_intensity": foreground,
        "median_spacing_ras_mm": [float(s) for s in np.median(spacings, axis=0)],
        "median_shape_after_crop": [float(s) for s in np.median(shapes, axis=0)],
        "lesions": lesions,
    }
