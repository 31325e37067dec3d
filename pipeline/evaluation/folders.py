"""Evaluate a folder of predictions against a folder of label maps matched by file name (``evaluate
--predictions``): every pairing / readability / grid problem is collected first and raised together as
:class:`~pipeline.evaluation.evaluate.EvaluationInputError` before anything is written; then
``metrics.json``, ``froc.csv``, ``lesions.csv`` and ``froc.png`` are written atomically to the output folder.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import EvaluationConfig
from pipeline.evaluation.evaluate import (
    EvaluationInputError,
    classes_of,
    evaluate_validated,
    summarize_evaluated,
)
from pipeline.evaluation.lesions import CaseMatch, lesion_mask_from_labels, lesion_score_map
from pipeline.evaluation.report import lesion_rows_text, write_report
from pipeline.evaluation.voxel_metrics import VoxelScores

log = logging.getLogger(__name__)


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


def _read_pair(scan: str, pred_path: Path, label_path: Path,
               lesion_label: int | None) -> tuple[tuple | None, list[str]]:
    """Read and validate one prediction / label pair: (the arguments of
    :func:`~pipeline.evaluation.evaluate.evaluate_validated` up to the affine, or None; its problems naming the
    files)."""
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
        score = lesion_score_map(pred, lesion_label)
    except ValueError as exc:
        return None, [f"{pred_path}: {exc}"]
    try:
        gmask = lesion_mask_from_labels(label_vol.data[0], lesion_label)
    except ValueError as exc:
        return None, [f"{label_path}: {exc}"]
    return (scan, pred, score, label_vol.data[0], gmask, label_vol.affine), []


Evaluated = tuple[CaseMatch, dict[str, VoxelScores], str]  # match, voxel scores, its lesions.csv lines


def _read_and_evaluate(pair: tuple[str, Path, Path], lesion_label: int | None, cfg: EvaluationConfig,
                       classes: list[tuple[str, int | None]], failed: threading.Event
                       ) -> tuple[Evaluated | None, list[str]]:
    """Read, validate and evaluate one pair and render its ``lesions.csv`` lines: (result or None, its
    problems). After any problem (this pair's or an earlier one's, ``failed``) pairs are only read and
    validated, to report every problem."""
    case, problems = _read_pair(*pair, lesion_label)
    if problems:
        failed.set()
    if case is None or failed.is_set():
        return None, problems
    match, scores = evaluate_validated(*case, cfg, lesion_label, classes)
    return (match, scores, lesion_rows_text(match, tuple(cfg.size_buckets_mm))), problems


def _evaluated_pairs(pairs: list[tuple[str, Path, Path]], problems: list[str], lesion_label: int | None,
                     cfg: EvaluationConfig, classes: list[tuple[str, int | None]], workers: int
                     ) -> Iterator[Evaluated]:
    """Per-pair results in pair order, ``workers`` pairs read and evaluated at once in threads; raise every
    problem together at the end.

    Threads, not processes: the NIfTI decompression (one ``gzip.decompress`` call), connected components,
    KD-tree queries and NumPy's array work release the GIL, so two threads keep two cores busy, and
    nothing is pickled. At most ``workers`` pairs are in memory at once.
    """
    failed = threading.Event()

    def take(future) -> Evaluated | None:
        result, probs = future.result()
        problems.extend(probs)
        return None if problems else result

    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="eval") as pool:
        pending: deque = deque()
        for pair in pairs:
            pending.append(pool.submit(_read_and_evaluate, pair, lesion_label, cfg, classes, failed))
            if len(pending) >= workers and (result := take(pending.popleft())) is not None:
                yield result
        while pending:
            if (result := take(pending.popleft())) is not None:
                yield result
    if problems:
        raise EvaluationInputError(problems)


def evaluate_folders(predictions: Path, labels: Path, output: Path, cfg: EvaluationConfig,
                     lesion_label: int | None = None, class_labels: dict[int, str] | None = None,
                     workers: int = 2) -> dict:
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
        workers: pairs read and evaluated at once (threads; each holds one pair in memory).

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        EvaluationInputError: missing folders or partners, duplicate names, unreadable files,
            mismatched grids or unusable contents, all listed with their files; nothing is written.
    """
    predictions, labels, output = Path(predictions), Path(labels), Path(output)
    pairs, problems = pair_files(predictions, labels)
    if not pairs and not problems:
        problems.append(f"{predictions}, {labels}: no prediction/label pairs")
    log.info("evaluating %d scan(s) from %s against %s", len(pairs), predictions, labels)
    if problems and not pairs:
        raise EvaluationInputError(problems)
    classes = classes_of(class_labels, lesion_label)
    lesion_rows: list[str] = []  # rendered in the worker threads; written by write_report

    def evaluated() -> Iterator[tuple[CaseMatch, dict[str, VoxelScores]]]:
        for match, scores, rows in _evaluated_pairs(pairs, problems, lesion_label, cfg, classes, workers):
            lesion_rows.append(rows)
            yield match, scores

    result = summarize_evaluated(evaluated(), cfg, classes, lesion_label)
    metrics = result.to_metrics()
    metrics["settings"].update({"predictions": str(predictions), "labels": str(labels)})
    write_report(output, result, metrics, lesion_rows)
    return metrics
