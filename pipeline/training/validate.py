"""Validation during training: sliding-window inference on the validation scans (preprocessed grid),
lesion-level CPM for model selection, Dice as the secondary metric, and the operating point.

Per scan (:func:`validate_scan`) then over scans (:func:`summarize`, pure), so that under DDP each rank
validates its share and the small per-scan results are gathered (:func:`validate_distributed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, EvaluationConfig
from pipeline.contracts import OperatingPoint, Plan
from pipeline.evaluation.candidates import extraction_params
from pipeline.evaluation.froc import summarize_scores
from pipeline.evaluation.lesions import match_case
from pipeline.evaluation.voxel_metrics import dice as voxel_dice
from pipeline.inference.sliding_window import lesion_probability, predict_probabilities
from pipeline.io.volume import make_affine
from pipeline.training.data import PreprocessedCase
from pipeline.training.distributed import DistInfo, gather_shards, shard


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    operating_point: OperatingPoint | None


@dataclass(frozen=True)
class ScanResult:
    """What the CPM, the operating point and the Dice need from one validation scan: small and picklable,
    so that ranks can gather them (:func:`validate_distributed`).

    Attributes:
        case_id: the scan.
        lesion_score: ``(M,)`` best score among the candidates hitting each GT lesion, NaN when missed
            (:attr:`~pipeline.evaluation.lesions.CaseMatch.lesion_score`).
        fp_scores: ``(F,)`` scores of the false-positive candidates.
        dice: lesion Dice of the argmax prediction; ``None`` when neither prediction nor truth has a lesion
            voxel (such a scan does not enter the mean).
    """

    case_id: str
    lesion_score: np.ndarray
    fp_scores: np.ndarray
    dice: float | None


def validate_scan(model: nn.Module, case: PreprocessedCase, plan: Plan, cfg: Config,
                  device: torch.device, patch_size) -> ScanResult:
    """Sliding-window inference on one preprocessed scan (no mirroring), lesion matching and Dice."""
    ev, mode = cfg.evaluation, cfg.train.loss.mode
    lesion_labels = list(plan.lesion_labels)
    inference = cfg.inference.model_copy(update={"tta_mirror": False})
    probs = predict_probabilities(model, torch.from_numpy(np.ascontiguousarray(case.image)), patch_size,
                                  inference, mode, device)
    lesion_prob = lesion_probability(probs, lesion_labels, mode).numpy()
    truth = np.isin(case.label, lesion_labels)
    match = match_case(case.case_id, lesion_prob, truth, make_affine(case.spacing_mm),
                       extraction_threshold=ev.extraction_threshold, score=ev.score,
                       hit_criterion=ev.hit_criterion, iou_threshold=ev.iou_threshold,
                       max_candidates=ev.max_candidates_per_scan, dynamic=extraction_params(ev),
                       min_lesion_mm3=ev.min_lesion_mm3)
    predicted = np.isin(probs.argmax(0).numpy(), lesion_labels)
    dice = voxel_dice(predicted, truth) if truth.any() or predicted.any() else None
    return ScanResult(case.case_id, match.lesion_score, match.fp_scores, dice)


def summarize(scans: Sequence[ScanResult], ev: EvaluationConfig) -> ValidationResult:
    """CPM (at ``ev.fp_rates``), sensitivities, mean lesion Dice and the operating point at
    ``ev.operating_fp_rate`` from the per-scan results, in their order (pure)."""
    lesion_scores = np.concatenate([s.lesion_score for s in scans]) if scans else np.zeros(0)
    fp_scores = np.concatenate([s.fp_scores for s in scans]) if scans else np.zeros(0)
    dices = [s.dice for s in scans if s.dice is not None]
    froc = summarize_scores(lesion_scores, fp_scores, len(scans), ev.fp_rates, ev.operating_fp_rate)
    metrics = {"cpm": froc.cpm if froc.curve.n_lesions else 0.0,
               "dice_lesion": float(np.mean(dices)) if dices else 1.0,
               "lesions": float(froc.curve.n_lesions)}
    for rate, sens in zip(froc.fp_rates, froc.sensitivity_at_fp, strict=True):
        metrics[f"sens_at_{rate:g}fp"] = float(np.nan_to_num(sens))
    op = froc.operating_point
    # threshold inf (null in JSON): no candidate at all on validation (then predict applies no score
    # filter); no lesion counts (they are the evaluation's); sensitivity 0 without lesions
    operating_point = OperatingPoint(target_fp_rate=op.target_fp_rate, threshold=op.threshold,
                                     sensitivity=float(np.nan_to_num(op.sensitivity)), fps_per_scan=op.fps_per_scan)
    return ValidationResult(metrics, operating_point)


def validate(model: nn.Module, cases: list[PreprocessedCase], plan: Plan, cfg: Config,
             device: torch.device, patch_size) -> ValidationResult:
    """CPM (LUNA16 FP rates from ``cfg.evaluation``), sensitivities, lesion Dice and the operating point."""
    return summarize([validate_scan(model, c, plan, cfg, device, patch_size) for c in cases], cfg.evaluation)


def validate_distributed(model: nn.Module, cases: list[PreprocessedCase], plan: Plan, cfg: Config,
                         device: torch.device, patch_size, dist_info: DistInfo) -> ValidationResult:
    """:func:`validate` with the scans shared over the ranks: rank ``r`` of ``W`` runs scans ``r::W``, the
    per-scan results are gathered on every rank in the original scan order, and each rank computes the same
    CPM and operating point from all of them (equal to single-process :func:`validate`: same scans, same
    order, same arithmetic). Every rank must call it; only the gather waits for the slowest share.
    """
    mine = [validate_scan(model, c, plan, cfg, device, patch_size) for c in shard(cases, dist_info)]
    return summarize(gather_shards(mine, dist_info), cfg.evaluation)
