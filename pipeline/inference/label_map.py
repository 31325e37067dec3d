"""The label map a user receives, built from the same lesion candidates the operating point was chosen on.

Validation (``training/validate.py``) extracts candidates from the lesion probability with the training
run's ``evaluation`` settings (static or dynamic, :func:`pipeline.evaluation.lesions.extract_candidates`)
and stores the operating threshold ``t`` for a target FP rate. Here, on a scan's probabilities:

1. the same candidates are extracted from the lesion probability with the same settings (and the same
   ``max_candidates_per_scan`` cap, highest scores kept);
2. a candidate is lesion when its score >= ``t`` (no threshold stored: every candidate) and, optionally,
   its volume >= ``min_volume_mm3``;
3. each kept candidate takes one lesion class: the lesion class with the largest summed probability over
   its voxels (``argmax_k sum_v p_k(v)``), so a candidate is never split between classes or background;
4. every other voxel takes the most probable non-lesion class.

Candidates do not touch each other (static: they are distinct components of one level set; dynamic:
PI-CAI skips a candidate touching a stored one), so the label map's lesion components are exactly the
kept candidates: evaluated as a label map it has the operating point's false positives per scan and
sensitivity (with ``min_volume_mm3`` = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import EvaluationConfig
from pipeline.evaluation.candidates import extraction_params
from pipeline.evaluation.lesions import extract_candidates


def candidate_label_map(class_probs: np.ndarray, lesion_prob: np.ndarray, lesion_labels: Sequence[int],
                        evaluation: EvaluationConfig, threshold: float | None, voxel_volume_mm3: float = 1.0,
                        min_volume_mm3: float = 0.0) -> np.ndarray:
    """Label map ``(X, Y, Z)`` uint8 from thresholded lesion candidates (see the module docstring).

    Args:
        class_probs: ``(K, X, Y, Z)`` class probabilities (channel = label value).
        lesion_prob: ``(X, Y, Z)`` lesion probability the candidates are extracted from (as validation).
        lesion_labels: label values (channels) that are lesion classes.
        evaluation: the ``evaluation`` settings the operating point was chosen with.
        threshold: the stored operating threshold (candidates with score >= it are lesion); None: all.
        voxel_volume_mm3: volume of one voxel (mm^3).
        min_volume_mm3: candidates smaller than this (mm^3) are dropped too.
    """
    class_probs = np.asarray(class_probs)
    lesion_labels = [int(k) for k in lesion_labels]
    other = class_probs.copy()
    other[lesion_labels] = -np.inf
    labels = np.ascontiguousarray(other.argmax(0).astype(np.uint8))
    cand, table = extract_candidates(np.ascontiguousarray(lesion_prob, dtype=np.float32),
                                     evaluation.extraction_threshold, np.eye(4), evaluation.score,  # voxel units
                                     dynamic=extraction_params(evaluation))
    n = len(table)
    if n == 0:
        return labels
    keep = np.zeros(n + 1, bool)
    ranked = np.argsort(-table.score, kind="stable")[:evaluation.max_candidates_per_scan]
    keep[ranked + 1] = True
    if threshold is not None and np.isfinite(threshold):
        keep[1:] &= table.score >= threshold
    keep[1:] &= table.voxels * voxel_volume_mm3 >= min_volume_mm3
    idx = np.flatnonzero(cand)
    lab = cand.reshape(-1)[idx].astype(np.intp)
    sel = keep[lab]
    idx, lab = idx[sel], lab[sel]
    if idx.size == 0:
        return labels
    sums = np.stack([np.bincount(lab, weights=class_probs[k].reshape(-1)[idx], minlength=n + 1)
                     for k in lesion_labels])
    cls = np.asarray(lesion_labels, np.uint8)[sums.argmax(0)]
    labels.reshape(-1)[idx] = cls[lab]
    return labels
