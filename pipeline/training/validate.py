"""Validation during training: sliding-window inference on the validation scans (preprocessed grid),
lesion-level CPM for model selection, Dice as the secondary metric, and the operating point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.evaluation.candidates import extraction_params
from pipeline.evaluation.froc import cpm, froc_curve, operating_points, sensitivity_at
from pipeline.evaluation.lesions import match_case
from pipeline.inference.sliding_window import lesion_probability, predict_probabilities
from pipeline.training.data import PreprocessedCase


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    operating_point: dict[str, float] | None


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P & T| / (|P| + |T|); 1.0 when both are empty."""
    inter = np.count_nonzero(pred & truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return 1.0 if total == 0 else 2.0 * inter / total


def validate(model: nn.Module, cases: list[PreprocessedCase], plan: dict[str, Any], cfg: Config,
             device: torch.device, patch_size) -> ValidationResult:
    """CPM (LUNA16 FP rates from ``cfg.evaluation``), sensitivities, lesion Dice and the operating point."""
    ev, mode = cfg.evaluation, cfg.train.loss.mode
    lesion_labels = list(plan["lesion_labels"])
    inference = cfg.inference.model_copy(update={"tta_mirror": False})
    matches, dices = [], []
    for case in cases:
        probs = predict_probabilities(model, torch.from_numpy(np.ascontiguousarray(case.image)), patch_size,
                                      inference, mode, device)
        lesion_prob = lesion_probability(probs, lesion_labels, mode).numpy()
        truth = np.isin(case.label, lesion_labels)
        matches.append(match_case(case.case_id, lesion_prob, truth, case.spacing_mm,
                                  extraction_threshold=ev.extraction_threshold, score=ev.score,
                                  hit_criterion=ev.hit_criterion, iou_threshold=ev.iou_threshold,
                                  max_candidates=ev.max_candidates_per_scan, dynamic=extraction_params(ev)))
        predicted = np.isin(probs.argmax(0).numpy(), lesion_labels)
        if truth.any() or predicted.any():
            dices.append(dice_score(predicted, truth))
    lesion_scores = np.concatenate([m.lesion_score for m in matches]) if matches else np.zeros(0)
    fp_scores = np.concatenate([m.fp_scores for m in matches]) if matches else np.zeros(0)
    curve = froc_curve(lesion_scores, fp_scores, n_scans=len(cases))
    metrics = {"cpm": cpm(curve, ev.fp_rates) if curve.n_lesions else 0.0,
               "dice_lesion": float(np.mean(dices)) if dices else 1.0,
               "lesions": float(curve.n_lesions)}
    for rate, sens in zip(ev.fp_rates, sensitivity_at(curve, ev.fp_rates), strict=True):
        metrics[f"sens_at_{rate:g}fp"] = float(np.nan_to_num(sens))
    op = operating_points(curve, [ev.operating_fp_rate])[0]
    # threshold None: no candidate at all on validation (then predict applies no score filter)
    threshold = op.threshold if np.isfinite(op.threshold) else None
    operating_point = {"target_fp_rate": op.target_fp_rate, "threshold": threshold,
                       "sensitivity": float(np.nan_to_num(op.sensitivity)), "fps_per_scan": op.fps_per_scan}
    return ValidationResult(metrics, operating_point)
