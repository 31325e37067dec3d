"""Library entry points: evaluate in-memory cases (training validation) or two folders (``evaluate``).

* :func:`evaluate_cases` -- arrays in, :class:`EvaluationResult` out; no file I/O.
* :func:`evaluate_folders` -- a folder of predictions against a folder of label maps matched by file
  name; every pairing / readability / grid problem is collected first and raised together as
  :class:`EvaluationInputError` before anything is written; then ``metrics.json``, ``froc.csv``,
  ``lesions.csv`` and ``froc.png`` are written atomically to the output folder.

Prediction conventions are those of :func:`pipeline.evaluation.lesions.lesion_score_map`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvaluationConfig
from pipeline.evaluation import froc as F
from pipeline.evaluation.candidates import extraction_params, extraction_record
from pipeline.evaluation.lesions import (
    CaseMatch,
    as_affine,
    lesion_mask_from_labels,
    lesion_score_map,
    match_case,
)
from pipeline.evaluation.voxel_metrics import VoxelScores, summarize_class, voxel_scores

log = logging.getLogger(__name__)

VOXEL_PROBABILITY_THRESHOLD = 0.5  # a single-channel probability map is binarised at >= 0.5 for voxel metrics
Case = tuple[str, np.ndarray, np.ndarray, Any]  # (scan, prediction, label map, spacing (3,) mm or 4x4 affine)


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
            "max_sensitivity": float(self.curve.sensitivity[-1]) if self.curve.n_lesions else None,
            "scans_total": self.curve.n_scans,
            "scans_with_lesions": sum(1 for c in self.cases if c.n_lesions),
            "candidates_total": n_cand,
            "false_positives_total": n_fp,
            "candidates_ignored": n_ignored,
            "candidates_dropped": sum(c.n_dropped for c in self.cases),
            "by_size": self.by_size,
            "operating_point": _op_dict(self.operating_point),
            "operating_points": [_op_dict(op) for op in self.operating_points],
            "dice": {name: v["dice"] for name, v in self.voxel.items()},
            "hd95_mm": {name: v["hd95_mm"] for name, v in self.voxel.items()},
            "surface_dice": {name: v["surface_dice"] for name, v in self.voxel.items()},
            "voxel_metrics": self.voxel,
            "extraction": self.extraction,
            "settings": self.settings,
        }
        return json_safe(out)


def _op_dict(op: F.OperatingPoint) -> dict[str, Any]:
    return {"target_fp_rate": op.target_fp_rate, "threshold": op.threshold, "fps_per_scan": op.fps_per_scan,
            "sensitivity": op.sensitivity, "precision": op.precision, "tp": op.tp, "fp": op.fp}


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


def _classes(class_labels: dict[int, str] | None, lesion_label: int | None) -> list[tuple[str, int | None]]:
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


def evaluate_case(scan: str, pred: np.ndarray, gt: np.ndarray, spacing_or_affine, cfg: EvaluationConfig,
                  lesion_label: int | None = None, classes: list[tuple[str, int | None]] | None = None,
                  voxel_metrics: bool = True) -> tuple[CaseMatch, dict[str, VoxelScores]]:
    """Match one scan and compute its voxel metrics (no I/O).

    Args:
        scan: scan name.
        pred: ``(X, Y, Z)`` probability or label map, or ``(C, X, Y, Z)`` class probabilities.
        gt: ``(X, Y, Z)`` integer label map.
        spacing_or_affine: spacing (mm) or 4x4 voxel-to-world affine (mm; centroids are then world RAS).
        cfg: evaluation settings.
        lesion_label: label value / channel that is lesion (None: every nonzero label).
        classes: voxel-metric classes (default: the lesion class only).
        voxel_metrics: compute Dice / HD95 / surface Dice.

    Raises:
        ValueError: the prediction or label map breaks the input conventions, or shapes differ.
    """
    affine = as_affine(spacing_or_affine)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    score_map, is_label = lesion_score_map(pred, lesion_label)
    gmask = lesion_mask_from_labels(gt, lesion_label)
    if score_map.shape != gmask.shape:
        raise ValueError(f"{scan}: prediction grid {score_map.shape} != label grid {gmask.shape}")
    match = match_case(scan, score_map, gmask, affine, is_label_map=is_label,
                       extraction_threshold=cfg.extraction_threshold, score=cfg.score,
                       hit_criterion=cfg.hit_criterion, iou_threshold=cfg.iou_threshold,
                       max_candidates=cfg.max_candidates_per_scan, dynamic=extraction_params(cfg))
    scores: dict[str, VoxelScores] = {}
    if voxel_metrics:
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        for name, value in classes or _classes(None, lesion_label):
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
    curve = F.froc_curve(lesion_scores, fp_scores, n_scans=len(cases))
    sens = F.sensitivity_at(curve, rates)
    targets = tuple(sorted(set(rates) | {float(cfg.operating_fp_rate)}))
    ops = F.operating_points(curve, targets)
    op = next(o for o in ops if o.target_fp_rate == float(cfg.operating_fp_rate))
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
        "bootstrap": cfg.bootstrap, "bootstrap_seed": cfg.bootstrap_seed,
        "size_buckets_mm": list(cfg.size_buckets_mm), "surface_tolerance_mm": cfg.surface_tolerance_mm,
        "max_candidates_per_scan": cfg.max_candidates_per_scan, "operating_fp_rate": cfg.operating_fp_rate,
        "voxel_probability_threshold": VOXEL_PROBABILITY_THRESHOLD,
        **(settings or {}),
    }
    return EvaluationResult(
        cases=list(cases), curve=curve, fp_rates=rates, cpm=float(np.mean(sens)), sensitivity_at_fp=sens,
        operating_points=[o for o in ops if o.target_fp_rate in rates], operating_point=op, by_size=by_size,
        voxel={name: summarize_class(v) for name, v in voxel.items()}, bootstrap=boot, settings=all_settings,
        extraction=extraction_record(cfg),
    )


def evaluate_cases(cases: Iterable[Case], cfg: EvaluationConfig, *, lesion_label: int | None = None,
                   class_labels: dict[int, str] | None = None,
                   voxel_metrics: bool = True) -> EvaluationResult:
    """Evaluate in-memory scans (e.g. the validation set during training); no file I/O.

    Args:
        cases: iterable of ``(scan, prediction, label map, spacing_or_affine)``; prediction ``(X, Y, Z)``
            probability / label map or ``(C, X, Y, Z)`` probabilities, label map ``(X, Y, Z)`` integer,
            spacing ``(3,)`` mm or a 4x4 voxel-to-world affine (mm). Consumed one at a time, so a
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
        >>> evaluate_cases([("a", gt.astype(np.float32), gt, (1.0, 1.0, 1.0))], cfg).cpm
        1.0
    """
    classes = _classes(class_labels, lesion_label)
    matches: list[CaseMatch] = []
    voxel: dict[str, list[VoxelScores]] = {name: [] for name, _ in classes}
    for scan, pred, gt, geom in cases:
        match, scores = evaluate_case(scan, pred, gt, geom, cfg, lesion_label, classes, voxel_metrics)
        matches.append(match)
        for name, s in scores.items():
            voxel[name].append(s)
    voxel = {k: v for k, v in voxel.items() if v}
    return summarize(matches, voxel, cfg, {"lesion_label": lesion_label})


# --------------------------------------------------------------------------------------------------
# folders


def _image_files(folder: Path) -> list[Path]:
    from pipeline.io.formats import ITK_SUFFIXES, NIFTI_SUFFIXES, image_suffix

    suffixes = NIFTI_SUFFIXES + ITK_SUFFIXES
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and image_suffix(p) in suffixes)


def pair_files(predictions: Path, labels: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Match prediction and label files by name without image suffix (``case_01.nii.gz`` <-> ``case_01.mha``).

    Returns:
        (pairs ``(scan, prediction path, label path)`` sorted by scan, problems)
    """
    from pipeline.io.formats import strip_suffix

    problems: list[str] = []
    found: list[dict[str, list[Path]]] = []
    for folder, what in ((predictions, "predictions"), (labels, "labels")):
        by_name: dict[str, list[Path]] = {}
        if not folder.is_dir():
            problems.append(f"{folder}: {what} folder not found")
        else:
            for p in _image_files(folder):
                by_name.setdefault(strip_suffix(p), []).append(p)
            if not by_name:
                problems.append(f"{folder}: no image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) "
                                f"in the {what} folder")
        for name, paths in by_name.items():
            if len(paths) > 1:
                problems.append(f"{', '.join(map(str, paths))}: several {what} files for scan {name!r}")
        found.append(by_name)
    preds, labs = found
    pairs = []
    for name in sorted(set(preds) | set(labs)):
        if name not in labs:
            if labels.is_dir():
                problems.append(f"{preds[name][0]}: no label file for scan {name!r} in {labels}")
        elif name not in preds:
            if predictions.is_dir():
                problems.append(f"{labs[name][0]}: no prediction file for scan {name!r} in {predictions}")
        else:
            pairs.append((name, preds[name][0], labs[name][0]))
    return pairs, problems


def _read_pair(scan: str, pred_path: Path, label_path: Path, lesion_label: int | None
               ) -> tuple[Case | None, list[str]]:
    """Read and validate one prediction / label pair: (case or None, its problems naming the files)."""
    from pipeline.io.formats import VolumeReadError, read_volume
    from pipeline.io.volume import grid_mismatch

    problems: list[str] = []
    vols = []
    for path in (pred_path, label_path):
        try:
            vols.append(read_volume(path))
        except VolumeReadError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported with its file
            problems.append(f"{path}: cannot read ({type(exc).__name__}: {exc})")
    if len(vols) < 2:
        return None, problems
    pred_vol, label_vol = vols
    mismatch = grid_mismatch(pred_vol, label_vol)
    if mismatch:
        return None, [f"{pred_path} vs {label_path}: grids differ ({'; '.join(mismatch)})"]
    if label_vol.n_channels != 1:
        return None, [f"{label_path}: label map has {label_vol.n_channels} channels; expected one"]
    pred = pred_vol.data if pred_vol.n_channels > 1 else pred_vol.data[0]
    try:
        lesion_score_map(pred, lesion_label)
    except ValueError as exc:
        return None, [f"{pred_path}: {exc}"]
    try:
        lesion_mask_from_labels(label_vol.data[0], lesion_label)
    except ValueError as exc:
        return None, [f"{label_path}: {exc}"]
    return (scan, pred, label_vol.data[0], label_vol.affine), []


def _read_cases(pairs: list[tuple[str, Path, Path]], problems: list[str],
                lesion_label: int | None, prefetch: bool = True) -> Iterator[Case]:
    """Read and validate every pair; yield cases while no problem has been seen, raise them all at the end.

    With ``prefetch``, one background thread reads the next pair while the caller evaluates the current
    one: gzip decompression and NumPy's copies release the GIL, so on two or more cores the evaluation
    hides behind the file reading (at most two pairs are in memory at once).
    """
    if not prefetch or len(pairs) < 2:
        for pair in pairs:
            case, probs = _read_pair(*pair, lesion_label)
            problems.extend(probs)
            if case is not None and not problems:
                yield case
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-read") as pool:
            pending = pool.submit(_read_pair, *pairs[0], lesion_label)
            for k in range(len(pairs)):
                case, probs = pending.result()
                if k + 1 < len(pairs):
                    pending = pool.submit(_read_pair, *pairs[k + 1], lesion_label)
                problems.extend(probs)
                if case is not None and not problems:
                    yield case
                del case  # let the pair go before the next one arrives
    if problems:
        raise EvaluationInputError(problems)


def evaluate_folders(predictions: Path, labels: Path, output: Path, cfg: EvaluationConfig,
                     lesion_label: int | None = None, class_labels: dict[int, str] | None = None) -> dict:
    """Evaluate a folder of predictions against a folder of label maps matched by file name.

    Predictions may be probability maps (single channel: lesion probability; multi-channel: per-class
    probabilities, lesion channel = ``lesion_label``) or label / binary maps (integer files; every
    component is a candidate with score 1.0), e.g. other tools' outputs such as nnU-Net's.

    Args:
        predictions, labels: folders of NIfTI / NRRD / MHA / MHD files; pairs share a name.
        output: folder for ``metrics.json``, ``froc.csv``, ``lesions.csv``, ``froc.png``.
        cfg: evaluation settings.
        lesion_label: label value (and channel) that is lesion; None = every nonzero label.
        class_labels: ``{value: name}`` for per-class voxel metrics (default: the lesion class).

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        EvaluationInputError: missing folders or partners, duplicate names, unreadable files,
            mismatched grids or unusable contents, all listed with their files; nothing is written.
    """
    from pipeline.evaluation.report import write_report

    predictions, labels, output = Path(predictions), Path(labels), Path(output)
    pairs, problems = pair_files(predictions, labels)
    if not pairs and not problems:
        problems.append(f"{predictions}, {labels}: no prediction/label pairs")
    log.info("evaluating %d scan(s) from %s against %s", len(pairs), predictions, labels)
    cases = _read_cases(pairs, problems, lesion_label)
    if problems and not pairs:
        raise EvaluationInputError(problems)
    result = evaluate_cases(cases, cfg, lesion_label=lesion_label, class_labels=class_labels)
    metrics = result.to_metrics()
    metrics["settings"].update({"predictions": str(predictions), "labels": str(labels)})
    write_report(output, result, metrics)
    return metrics
