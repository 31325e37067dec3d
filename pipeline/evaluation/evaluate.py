"""Evaluate in-memory cases (training validation, the evaluate stage): arrays in, :class:`EvaluationResult`
out, no file I/O (:func:`evaluate_cases`). Folders of files: :mod:`pipeline.evaluation.folders`.

Prediction conventions are those of :func:`pipeline.evaluation.lesions.lesion_score_map`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EvaluationConfig
from pipeline.evaluation import froc as F
from pipeline.evaluation.candidates import extraction_params, extraction_record
from pipeline.evaluation.lesions import (
    CaseMatch,
    check_affine,
    lesion_mask_from_labels,
    lesion_score_map,
    match_case,
)
from pipeline.evaluation.voxel_metrics import VoxelScores, summarize_class, voxel_scores

log = logging.getLogger(__name__)

VOXEL_PROBABILITY_THRESHOLD = 0.5  # a single-channel probability map is binarised at >= 0.5 for voxel metrics
Case = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # (scan, prediction, label map, 4x4 voxel-to-RAS affine)


class EvaluationInputError(ValueError):
    """The prediction / label folders cannot be evaluated; ``problems`` lists each one, naming the files."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"{len(problems)} problem(s) with the evaluation inputs:"
        super().__init__("\n  ".join([head, *problems]))


@dataclass(frozen=True)
class EvaluationResult:
    """Everything an evaluation computed; :meth:`to_metrics` gives the ``metrics.json`` content."""

    cases: list[CaseMatch]
    curve: F.FrocCurve
    fp_rates: tuple[float, ...]
    cpm: float
    sensitivity_at_fp: np.ndarray  # (R,) at fp_rates
    operating_points: list[F.OperatingPoint]
    operating_point: F.OperatingPoint
    by_size: dict[str, dict]
    voxel: dict[str, dict]  # class name -> summarize_class(...)
    bootstrap: F.BootstrapResult | None
    settings: dict[str, Any] = field(default_factory=dict)
    extraction: dict[str, Any] = field(default_factory=dict)  # candidate extraction + hit rule (metrics.json)

    @property
    def cpm_ci95(self) -> tuple[float, float] | None:
        return None if self.bootstrap is None or self.bootstrap.cpm.size == 0 else self.bootstrap.ci95()[0]

    def to_metrics(self) -> dict[str, Any]:
        """JSON-safe metrics (NaN / inf -> None)."""
        keys = [F.fp_rate_key(r) for r in self.fp_rates]
        sens_ci = None
        if self.cpm_ci95 is not None:
            per_rate = self.bootstrap.ci95()[1]  # type: ignore[union-attr]
            sens_ci = {k: [float(a), float(b)] for k, (a, b) in zip(keys, per_rate)}
        n_cand = sum(len(c.candidates) for c in self.cases)
        n_fp = int(self.curve.fp[-1])
        n_ignored = sum(int(np.count_nonzero(c.candidate_outcome == 2)) for c in self.cases)
        out = {
            "cpm": self.cpm,
            "cpm_ci95": list(self.cpm_ci95) if self.cpm_ci95 is not None else None,
            "sensitivity_at_fp": {k: float(v) for k, v in zip(keys, self.sensitivity_at_fp)},
            "sensitivity_at_fp_ci95": sens_ci,
            "lesions_total": self.curve.n_lesions,
            "lesions_detected": int(self.curve.tp[-1]),
            "lesions_excluded": sum(c.n_excluded for c in self.cases),
            "max_sensitivity": float(self.curve.sensitivity[-1]) if self.curve.n_lesions else None,
            "scans_total": self.curve.n_scans,
            "scans_with_lesions": sum(1 for c in self.cases if c.n_lesions),
            "candidates_total": n_cand,
            "false_positives_total": n_fp,
            "candidates_ignored": n_ignored,
            "candidates_dropped": sum(c.n_dropped for c in self.cases),
            "by_size": self.by_size,
            "operating_point": self.operating_point.to_dict(),
            "operating_points": [op.to_dict() for op in self.operating_points],
            "dice": {name: v["dice"] for name, v in self.voxel.items()},
            "hd95_mm": {name: v["hd95_mm"] for name, v in self.voxel.items()},
            "surface_dice": {name: v["surface_dice"] for name, v in self.voxel.items()},
            "voxel_metrics": self.voxel,
            "extraction": self.extraction,
            "settings": self.settings,
        }
        return json_safe(out)


def json_safe(obj: Any) -> Any:
    """Recursively convert numpy scalars / arrays to Python and non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------------
# per case


def classes_of(class_labels: dict[int, str] | None, lesion_label: int | None) -> list[tuple[str, int | None]]:
    """Voxel-metric classes as (name, label value); value None = any nonzero label."""
    if class_labels:
        return [(str(name), int(value)) for value, name in sorted(class_labels.items())]
    return [("lesion", lesion_label)]


def _voxel_masks(pred: np.ndarray, score_map: np.ndarray, is_label: bool, gt: np.ndarray, value: int | None,
                 lesion_label: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(predicted mask, GT mask) of one class, or None when the prediction cannot give that class."""
    gt3 = gt[0] if gt.ndim == 4 else gt
    g = gt3 != 0 if value is None else gt3 == value
    if value == lesion_label or value is None and lesion_label is None:
        if pred.ndim == 4 and pred.shape[0] > 1:
            am = np.argmax(pred, axis=0)
            return (am != 0 if value is None else am == value), g
        p = score_map if is_label else score_map >= VOXEL_PROBABILITY_THRESHOLD
        return np.asarray(p, bool), g
    if pred.ndim == 4 and pred.shape[0] > 1:
        if value is None or value >= pred.shape[0]:
            return None
        return np.argmax(pred, axis=0) == value, g
    if is_label:
        p3 = pred[0] if pred.ndim == 4 else pred
        return (p3 != 0 if value is None else p3 == value), g
    return None  # a single-channel probability map only speaks for the lesion class


def evaluate_case(scan: str, pred: np.ndarray, gt: np.ndarray, affine: np.ndarray, cfg: EvaluationConfig,
                  lesion_label: int | None = None, classes: list[tuple[str, int | None]] | None = None,
                  voxel_metrics: bool = True) -> tuple[CaseMatch, dict[str, VoxelScores]]:
    """Match one scan and compute its voxel metrics (no I/O).

    Args:
        scan: scan name.
        pred: ``(X, Y, Z)`` probability or label map, or ``(C, X, Y, Z)`` class probabilities.
        gt: ``(X, Y, Z)`` integer label map.
        affine: 4x4 voxel-to-world affine (mm; centroids are world RAS); for a bare spacing use
            :func:`pipeline.io.volume.make_affine`.
        cfg: evaluation settings.
        lesion_label: label value / channel that is lesion (None: every nonzero label).
        classes: voxel-metric classes (default: the lesion class only).
        voxel_metrics: compute Dice / HD95 / surface Dice.

    Raises:
        ValueError: the prediction or label map breaks the input conventions, or shapes differ.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    score_map, is_label = lesion_score_map(pred, lesion_label)
    gmask = lesion_mask_from_labels(gt, lesion_label)
    return evaluate_validated(scan, pred, (score_map, is_label), gt, gmask, affine, cfg, lesion_label, classes,
                              voxel_metrics)


def evaluate_validated(scan: str, pred: np.ndarray, score: tuple[np.ndarray, bool], gt: np.ndarray,
                       gmask: np.ndarray, affine: np.ndarray, cfg: EvaluationConfig, lesion_label: int | None = None,
                       classes: list[tuple[str, int | None]] | None = None,
                       voxel_metrics: bool = True) -> tuple[CaseMatch, dict[str, VoxelScores]]:
    """:func:`evaluate_case` after its input checks: ``score`` = ``lesion_score_map(pred, lesion_label)``,
    ``gmask`` = ``lesion_mask_from_labels(gt, lesion_label)``, already computed by the caller (the folder
    reader checks every file before evaluating any, and a second min / max pass costs ~3 ms per 128^3 map)."""
    affine = check_affine(affine)
    score_map, is_label = score
    if score_map.shape != gmask.shape:
        raise ValueError(f"{scan}: prediction grid {score_map.shape} != label grid {gmask.shape}")
    match = match_case(scan, score_map, gmask, affine, is_label_map=is_label,
                       extraction_threshold=cfg.extraction_threshold, score=cfg.score,
                       hit_criterion=cfg.hit_criterion, iou_threshold=cfg.iou_threshold,
                       max_candidates=cfg.max_candidates_per_scan, dynamic=extraction_params(cfg),
                       min_lesion_mm3=cfg.min_lesion_mm3)
    scores: dict[str, VoxelScores] = {}
    if voxel_metrics:
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        for name, value in classes or classes_of(None, lesion_label):
            masks = _voxel_masks(pred, score_map, is_label, gt, value, lesion_label)
            if masks is not None:
                scores[name] = voxel_scores(masks[0], masks[1], spacing, cfg.surface_tolerance_mm)
    return match, scores


# --------------------------------------------------------------------------------------------------
# aggregation


def summarize(cases: list[CaseMatch], voxel: dict[str, list[VoxelScores]], cfg: EvaluationConfig,
              settings: dict[str, Any] | None = None) -> EvaluationResult:
    """Pure aggregation of per-scan matches into FROC, CPM, CIs, operating points and size buckets."""
    if not cases:
        raise ValueError("nothing to evaluate: no scans")
    rates = tuple(float(r) for r in cfg.fp_rates)
    lesion_scores = np.concatenate([c.lesion_score for c in cases])
    fp_scores = np.concatenate([c.fp_scores for c in cases])
    diameters = np.concatenate([c.lesions.diameter_mm for c in cases])
    froc = F.summarize_scores(lesion_scores, fp_scores, len(cases), rates, cfg.operating_fp_rate)
    curve, sens, op = froc.curve, froc.sensitivity_at_fp, froc.operating_point
    by_size = F.sensitivity_by_size(lesion_scores, diameters, fp_scores, len(cases), cfg.size_buckets_mm,
                                    rates, op.threshold)
    boot = None
    if cfg.bootstrap > 0:
        grid = np.geomspace(rates[0] / 2, rates[-1] * 2, 49)
        boot = F.bootstrap_froc([(c.lesion_score, c.fp_scores) for c in cases], rates, cfg.bootstrap,
                                cfg.bootstrap_seed, grid)
    all_settings = {
        "extraction": cfg.extraction, "extraction_threshold": cfg.extraction_threshold,
        "dynamic": cfg.dynamic.model_dump(), "score": cfg.score,
        "hit_criterion": cfg.hit_criterion, "iou_threshold": cfg.iou_threshold, "fp_rates": list(rates),
        "min_lesion_mm3": cfg.min_lesion_mm3,
        "bootstrap": cfg.bootstrap, "bootstrap_seed": cfg.bootstrap_seed,
        "size_buckets_mm": list(cfg.size_buckets_mm), "surface_tolerance_mm": cfg.surface_tolerance_mm,
        "max_candidates_per_scan": cfg.max_candidates_per_scan, "operating_fp_rate": cfg.operating_fp_rate,
        "voxel_probability_threshold": VOXEL_PROBABILITY_THRESHOLD,
        **(settings or {}),
    }
    return EvaluationResult(
        cases=list(cases), curve=curve, fp_rates=rates, cpm=froc.cpm, sensitivity_at_fp=sens,
        operating_points=froc.operating_points, operating_point=op, by_size=by_size,
        voxel={name: summarize_class(v) for name, v in voxel.items()}, bootstrap=boot, settings=all_settings,
        extraction=extraction_record(cfg),
    )


def evaluate_cases(cases: Iterable[Case], cfg: EvaluationConfig, *, lesion_label: int | None = None,
                   class_labels: dict[int, str] | None = None,
                   voxel_metrics: bool = True) -> EvaluationResult:
    """Evaluate in-memory scans (e.g. the validation set during training); no file I/O.

    Args:
        cases: iterable of ``(scan, prediction, label map, affine)``; prediction ``(X, Y, Z)``
            probability / label map or ``(C, X, Y, Z)`` probabilities, label map ``(X, Y, Z)`` integer,
            affine the 4x4 voxel-to-world matrix (mm). Consumed one at a time, so a
            generator keeps memory flat.
        cfg: evaluation settings (``bootstrap=0`` skips the confidence intervals, e.g. for speed).
        lesion_label: lesion label value (None: every nonzero label is lesion).
        class_labels: ``{label value: name}`` for voxel metrics (default: the lesion class, "lesion").
        voxel_metrics: compute Dice / HD95 / surface Dice.

    Returns:
        :class:`EvaluationResult` (``.cpm``, ``.sensitivity_at_fp``, ``.to_metrics()``...).

    Example:
        >>> gt = np.zeros((16, 16, 16), np.uint8); gt[4:8, 4:8, 4:8] = 1
        >>> cfg = EvaluationConfig(bootstrap=0)
        >>> evaluate_cases([("a", gt.astype(np.float32), gt, np.eye(4))], cfg).cpm
        1.0
    """
    classes = classes_of(class_labels, lesion_label)
    evaluated = (evaluate_case(scan, pred, gt, geom, cfg, lesion_label, classes, voxel_metrics)
                 for scan, pred, gt, geom in cases)
    return summarize_evaluated(evaluated, cfg, classes, lesion_label)


def summarize_evaluated(evaluated: Iterable[tuple[CaseMatch, dict[str, VoxelScores]]], cfg: EvaluationConfig,
                        classes: list[tuple[str, int | None]], lesion_label: int | None) -> EvaluationResult:
    """:func:`summarize` of per-scan :func:`evaluate_case` results, consumed one at a time, in order."""
    matches: list[CaseMatch] = []
    voxel: dict[str, list[VoxelScores]] = {name: [] for name, _ in classes}
    for match, scores in evaluated:
        matches.append(match)
        for name, s in scores.items():
            voxel[name].append(s)
    voxel = {k: v for k, v in voxel.items() if v}
    return summarize(matches, voxel, cfg, {"lesion_label": lesion_label})
