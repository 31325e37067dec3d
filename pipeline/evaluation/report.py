"""Evaluation outputs, each written atomically: ``metrics.json``, ``froc.csv``, ``lesions.csv``, ``froc.png``.

* ``froc.csv``: ``threshold,fps_per_scan,sensitivity``, one row per corner of the FROC polyline (first
  row threshold ``inf``), for ``dvc plots``: vertices inside a run of equal sensitivity or equal FP
  count lie on the segment between their neighbours and are left out
  (:func:`pipeline.evaluation.froc.froc_corners`), so reading the file by linear interpolation gives
  the full curve's values exactly.
* ``lesions.csv``: one row per GT lesion (``kind=lesion``; outcome ``hit`` / ``missed``; ``matched_id``
  = the best hitting candidate) and per kept candidate (``kind=candidate``; outcome ``tp`` / ``fp`` /
  ``ignored``; ``matched_id`` = the lesions it hits, ``;``-separated). Centroids are world (RAS) mm,
  volumes mm^3, diameters the equivalent-sphere diameter in mm, size bucket from that diameter.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.froc import froc_corners, size_bucket, size_bucket_names
from pipeline.evaluation.froc_plot import froc_figure
from pipeline.evaluation.lesions import CANDIDATE_OUTCOMES, CaseMatch
from pipeline.io.atomic import atomic_path, write_json, write_text

if TYPE_CHECKING:
    from pipeline.evaluation.evaluate import EvaluationResult

LESION_COLUMNS = ["scan", "kind", "id", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "voxels",
                  "volume_mm3", "diameter_mm", "score", "outcome", "matched_id", "iou", "size_bucket"]


def froc_csv_text(result: EvaluationResult) -> str:
    """``threshold,fps_per_scan,sensitivity`` rows at the FROC curve's corners (:func:`froc_corners`).

    Each value as ``repr`` (the shortest text that reads back to the same float), so the file is exact.
    """
    c = result.curve
    keep = froc_corners(c)
    cols = [repr(a[keep].tolist())[1:-1].split(", ") if keep.size else []
            for a in (c.thresholds, c.fps_per_scan, c.sensitivity)]
    return "\n".join(["threshold,fps_per_scan,sensitivity", *map(",".join, zip(*cols))]) + "\n"


Column = np.ndarray | tuple[list[str], np.ndarray]  # values, or (texts, (R,) index into texts)


def _case_rows(case: CaseMatch, edges: tuple[float, ...]) -> dict[str, Column]:
    """The ``lesions.csv`` columns of one scan (lesion rows, then candidate rows): numbers as arrays,
    text as ``(texts, codes)`` so that each distinct text is handled once (10^4 candidate rows hold a
    handful of distinct texts)."""
    les, cand = case.lesions, case.candidates
    m, n = len(les), len(cand)
    # only the few hitting pairs need Python; every candidate-long column is built by array indexing
    hits_of: dict[int, list[str]] = {}
    for c, g in case.pairs.tolist():
        hits_of.setdefault(c, []).append(str(g))
    cand_iou = np.zeros(n)
    if case.pairs.size:
        np.maximum.at(cand_iou, case.pairs[:, 0] - 1, case.pair_iou)
    matched = [""] + [str(g) for g in case.lesion_match[case.lesion_match > 0].tolist()]
    matched_code = np.zeros(m + n, np.intp)
    matched_code[np.flatnonzero(case.lesion_match > 0)] = np.arange(1, len(matched))
    for c, gs in hits_of.items():
        matched_code[m + c - 1] = len(matched)
        matched.append(";".join(gs))
    outcomes = ["hit", "missed"] + [CANDIDATE_OUTCOMES[k] for k in sorted(CANDIDATE_OUTCOMES)]
    diameter = np.r_[les.diameter_mm, cand.diameter_mm]
    return {
        "scan": ([case.scan], np.zeros(m + n, np.intp)),
        "kind": (["lesion", "candidate"], np.repeat(np.array([0, 1], np.intp), [m, n])),
        "id": (_id_texts(max(m, n)), np.r_[np.arange(1, m + 1), np.arange(1, n + 1)]),
        "centroid_x_mm": np.r_[les.centroid_mm[:, 0], cand.centroid_mm[:, 0]],
        "centroid_y_mm": np.r_[les.centroid_mm[:, 1], cand.centroid_mm[:, 1]],
        "centroid_z_mm": np.r_[les.centroid_mm[:, 2], cand.centroid_mm[:, 2]],
        "voxels": np.r_[les.voxels, cand.voxels],
        "volume_mm3": np.r_[les.volume_mm3, cand.volume_mm3],
        "diameter_mm": diameter,
        "score": np.r_[case.lesion_score, cand.score],
        "outcome": (outcomes, np.r_[np.isnan(case.lesion_score).astype(np.intp),
                                    2 + np.asarray(case.candidate_outcome, dtype=np.intp)]),
        "matched_id": (matched, matched_code),
        "iou": np.r_[case.lesion_iou, cand_iou],
        "size_bucket": (size_bucket_names(edges), size_bucket(diameter, edges)),
    }


_ID_TEXTS: list[str] = ["0"]
_ID_TEXTS_LOCK = threading.Lock()  # scans' rows are rendered in the evaluation's worker threads


def _id_texts(n: int) -> list[str]:
    """``["0", "1", ..., str(n)]``, kept between calls: every scan numbers its rows from 1 again."""
    with _ID_TEXTS_LOCK:
        if len(_ID_TEXTS) <= n:
            _ID_TEXTS.extend(map(str, range(len(_ID_TEXTS), n + 1)))
    return _ID_TEXTS


def _csv_field(text: str) -> str:
    """One field exactly as ``csv.writer`` (QUOTE_MINIMAL, ``\\n`` line ends) writes it in a row (quoted
    when it holds a comma, a quote or a line break); asked of the writer itself, once per distinct text."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([text, ""])  # two fields: a lone "" would be quoted
    return buf.getvalue()[:-2]


def _csv_column(values: Column) -> list[str]:
    """Cells of one column as ``csv.writer`` writes pandas' ``to_csv(float_format="%.6g")`` cells:
    floats ``%.6g`` (NaN -> empty), ints via ``str``, text ``(texts, codes)`` via :func:`_csv_field`.

    Each distinct value is formatted once and the cells are gathered by index: a noisy scan's 10^4
    candidate rows repeat few centroid, size and IoU values, and ``%`` formatting (~0.2 us a cell) was
    most of the report's time. Floats are told apart by their bits, so ``-0.0`` keeps its ``-0``.
    """
    if isinstance(values, tuple):
        texts, codes = values
        if texts is not _ID_TEXTS:  # row ids are digits: nothing to quote
            texts = [_csv_field(str(t)) for t in texts]
        return np.asarray(texts, dtype=object)[np.asarray(codes, np.intp).reshape(-1)].tolist()
    values = np.asarray(values)
    if values.dtype.kind == "f":
        bits, inv = np.unique(values.astype(np.float64).view(np.int64), return_inverse=True)
        cells = ["%.6g" % v if v == v else "" for v in bits.view(np.float64).tolist()]
    elif values.dtype.kind in "iub":
        uniq, inv = np.unique(values, return_inverse=True)
        cells = [str(v) for v in uniq.tolist()]
    else:
        uniq, inv = np.unique(values.astype(str), return_inverse=True)
        cells = [_csv_field(v) for v in uniq.tolist()]
    return np.asarray(cells, dtype=object)[np.asarray(inv, np.intp).reshape(-1)].tolist()


def lesion_rows_text(case: CaseMatch, size_buckets_mm: tuple[float, ...]) -> str:
    """The ``lesions.csv`` lines of one scan (no header), each ending in ``\\n``; ``""`` without rows.

    The same bytes as ``csv.writer`` over :func:`_csv_column` cells, joined column-wise instead: a noisy
    map gives 10^4 rows per scan, where pandas' per-cell float formatter took ~15 us a row and
    ``csv.writer`` ~1 us. Thread-safe: folder evaluation renders each scan's lines in its worker thread.
    """
    rows = _case_rows(case, tuple(size_buckets_mm))
    if not rows["id"][1].size:
        return ""
    return "\n".join(map(",".join, zip(*(_csv_column(rows[c]) for c in LESION_COLUMNS)))) + "\n"


def write_lesions_csv(path: Path, cases: list[CaseMatch], size_buckets_mm: tuple[float, ...],
                      rows_text: Iterable[str] | None = None) -> None:
    """One row per GT lesion and per candidate (see the module docstring).

    ``rows_text``: each case's :func:`lesion_rows_text` already rendered (same order as ``cases``).
    """
    edges = tuple(size_buckets_mm)
    texts = rows_text if rows_text is not None else (lesion_rows_text(case, edges) for case in cases)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write(",".join(map(_csv_field, LESION_COLUMNS)) + "\n")
        for text in texts:
            fh.write(text)


def plot_froc(path: Path, result: EvaluationResult, metrics: dict[str, Any] | None = None) -> None:
    """``froc.png``: :func:`pipeline.evaluation.froc_plot.froc_figure` with the bootstrap band."""
    c, boot = result.curve, result.bootstrap
    band = None
    if boot is not None and boot.grid_fps.size:
        _, _, ci = boot.ci95()
        band = (boot.grid_fps, ci[:, 0], ci[:, 1])
    k = froc_corners(c)  # froc.csv's rows: the same polyline, without ~10^4 collinear vertices per noisy scan
    fig = froc_figure(c.fps_per_scan[k], c.sensitivity[k], metrics if metrics is not None else result.to_metrics(),
                      band, figsize=(6, 4.5), dpi=120)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(output: Path, result: EvaluationResult, metrics: dict[str, Any] | None = None,
                 lesion_rows: Iterable[str] | None = None) -> None:
    """Write ``metrics.json``, ``froc.csv``, ``lesions.csv`` and ``froc.png`` into ``output``
    (``lesion_rows``: the cases' :func:`lesion_rows_text`, when already rendered)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "froc.csv", froc_csv_text(result))
    write_lesions_csv(output / "lesions.csv", result.cases, tuple(result.settings.get("size_buckets_mm", ())),
                      lesion_rows)
    metrics = metrics if metrics is not None else result.to_metrics()
    plot_froc(output / "froc.png", result, metrics)
    write_json(output / "metrics.json", metrics)


def plot_extraction(path: Path, prob: np.ndarray, lesion_mask: np.ndarray, z: int, static_threshold: float,
                    dynamic, titles: tuple[str, str] = ("static", "dynamic")) -> None:
    """PNG of one axial slice: the same prediction and lesions, static vs dynamic candidates side by side.

    Args:
        path: output PNG.
        prob: ``(X, Y, Z)`` lesion probability.
        lesion_mask: ``(X, Y, Z)`` bool GT lesions (white contours).
        z: slice index.
        static_threshold: the static level.
        dynamic: :class:`pipeline.evaluation.candidates.DynamicExtraction`.
        titles: panel titles (candidate count and each lesion's best IoU are appended).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation.lesions import extract_candidates, match_case

    fig, axes = plt.subplots(1, 3, figsize=(11, 4), constrained_layout=True)
    axes[0].imshow(prob[:, :, z].T, cmap="magma", vmin=0, vmax=1, origin="lower")
    axes[0].contour(lesion_mask[:, :, z].T, levels=[0.5], colors="w", linewidths=1)
    axes[0].set_title("probability, lesions (white)")
    for ax, dyn, title in zip(axes[1:], (None, dynamic), titles):
        m = match_case("example", prob, lesion_mask, np.eye(4), extraction_threshold=static_threshold,
                       dynamic=dyn)
        labels, _ = extract_candidates(prob, static_threshold, np.eye(4), dynamic=dyn)
        shown = np.ma.masked_equal(labels[:, :, z].T, 0)
        ax.imshow(prob[:, :, z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        ax.imshow(shown, cmap="tab10", vmin=0.5, vmax=10.5, alpha=0.6, origin="lower", interpolation="nearest")
        ax.contour(lesion_mask[:, :, z].T, levels=[0.5], colors="w", linewidths=1)
        ious = ", ".join(f"{v:.2f}" for v in m.lesion_iou)
        n_fp = int(np.count_nonzero(m.candidate_outcome == 0))
        ax.set_title(f"{title}: {len(m.candidates)} candidates, {n_fp} FP\nlesion IoU {ious}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
