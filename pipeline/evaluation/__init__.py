"""Lesion-level (FROC / CPM, LUNA16 conventions) and voxel-level evaluation.

Layout (picai_eval-style: per-case matching returns records, aggregation is a separate pure step):

* :mod:`~pipeline.evaluation.lesions` -- candidates, GT lesions, per-scan matching -> :class:`CaseMatch`
* :mod:`~pipeline.evaluation.froc` -- FROC curve, CPM, bootstrap CIs, operating points, size buckets
* :mod:`~pipeline.evaluation.voxel_metrics` -- Dice, HD95 (mm), surface Dice (mm tolerance)
* :mod:`~pipeline.evaluation.report` -- ``metrics.json``, ``froc.csv``, ``lesions.csv``, ``froc.png``
* :mod:`~pipeline.evaluation.evaluate` -- :func:`evaluate_cases` (arrays in, :class:`EvaluationResult` out)
* :mod:`~pipeline.evaluation.folders` -- :func:`evaluate_folders` (files in, the report files out)

Conventions
-----------
Predictions: a single-channel float map is the lesion probability; a multi-channel ``(C, X, Y, Z)`` map
holds per-class probabilities (lesion channel = ``lesion_label``; default ``1 - p(background)``); an
integer / binary map is a label map (lesion = ``value == lesion_label``, default any nonzero) whose
components are candidates with score 1.0. Labels: lesion = ``label == lesion_label`` (default any
nonzero).

Candidates are the 26-connected components of ``probability >= extraction_threshold`` (default 0.1), scored by
their maximum (or mean) probability (``extraction: static``), or PI-CAI's peak-relative candidates
(``extraction: dynamic``, :mod:`~pipeline.evaluation.candidates`); GT lesions are the 26-connected components
of the lesion label. A candidate hits a lesion when IoU >= ``iou_threshold`` (default 0.1, inclusive), or with
``hit_criterion="peak"`` when its maximum voxel lies in the lesion, or with ``"distance"`` when its centroid
is closer than the lesion's equivalent radius to the lesion centroid (mm). One candidate may hit several
lesions. Each lesion counts once with the best score among the candidates hitting it; further candidates on an
already-hit lesion are ignored (not false positives); candidates hitting nothing are false positives; scans
without lesions contribute only false positives (LUNA16).

FROC: at every distinct score threshold ``t`` (equal scores enter together), sensitivity = lesions with
best score >= t / all lesions, FPs per scan = false positives with score >= t / all scans, starting
from (0, 0). CPM = mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan, read off the curve by
linear interpolation exactly as ``np.interp`` on the full curve (LUNA16 / MONAI), the last sensitivity
holding beyond the curve's end. 95% CIs: bootstrap over scans (2.5 / 97.5 percentiles). Operating point
for a target FP rate: the lowest threshold whose FPs per scan do not exceed it.

Voxel metrics per class: Dice, HD95 = max of the two directed 95th-percentile surface distances (mm),
surface Dice at a tolerance (mm), as ``monai.metrics`` with spacing; a scan where both masks are empty
is "not applicable" (NaN, left out of means); a single-channel probability map is binarised at 0.5.
"""

from pipeline.evaluation.evaluate import (
    EvaluationInputError,
    EvaluationResult,
    evaluate_case,
    evaluate_cases,
    summarize,
)
from pipeline.evaluation.folders import evaluate_folders
from pipeline.evaluation.froc import (
    BootstrapResult,
    FrocCurve,
    OperatingPoint,
    bootstrap_froc,
    cpm,
    froc_curve,
    interpolate_sensitivity,
    operating_points,
    sensitivity_at,
    sensitivity_by_size,
)
from pipeline.evaluation.lesions import (
    CaseMatch,
    ComponentTable,
    extract_candidates,
    extract_lesions,
    lesion_mask_from_labels,
    lesion_score_map,
    match_case,
)
from pipeline.evaluation.voxel_metrics import VoxelScores, voxel_scores

__all__ = [
    "BootstrapResult", "CaseMatch", "ComponentTable", "EvaluationInputError", "EvaluationResult", "FrocCurve",
    "OperatingPoint", "VoxelScores", "bootstrap_froc", "cpm", "evaluate_case", "evaluate_cases",
    "evaluate_folders", "extract_candidates", "extract_lesions", "froc_curve", "interpolate_sensitivity",
    "lesion_mask_from_labels", "lesion_score_map", "match_case", "operating_points", "sensitivity_at",
    "sensitivity_by_size", "summarize", "voxel_scores",
]
