"""Evaluation outputs, each written atomically: ``metrics.json``, ``froc.csv``, ``lesions.csv``, ``froc.png``.

* ``froc.csv``: ``threshold,fps_per_scan,sensitivity``, one row per FROC vertex (first row threshold
  ``inf``), for ``dvc plots``.
* ``lesions.csv``: one row per GT lesion (``kind=lesion``; outcome ``hit`` / ``missed``; ``matched_id``
  = the best hitting candidate) and per kept candidate (``kind=candidate``; outcome ``tp`` / ``fp`` /
  ``ignored``; ``matched_id`` = the lesions it hits, ``;``-separated). Centroids are world (RAS) mm,
  volumes mm^3, diameters the equivalent-sphere diameter in mm, size bucket from that diameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.froc import size_bucket, size_bucket_names
from pipeline.evaluation.lesions import CANDIDATE_OUTCOMES, CaseMatch
from pipeline.io.atomic import atomic_path, write_json, write_text

if TYPE_CHECKING:
    from pipeline.evaluation.evaluate import EvaluationResult

LESION_COLUMNS = ["scan", "kind", "id", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "voxels",
                  "volume_mm3", "diameter_mm", "score", "outcome", "matched_id", "iou", "size_bucket"]


def froc_csv_text(result: EvaluationResult) -> str:
    """``threshold,fps_per_scan,sensitivity`` rows of the FROC curve."""
    c = result.curve
    lines = ["threshold,fps_per_scan,sensitivity"]
    lines += [f"{t!r},{f!r},{s!r}" for t, f, s in
              zip(c.thresholds.tolist(), c.fps_per_scan.tolist(), c.sensitivity.tolist())]
    return "\n".join(lines) + "\n"


def _case_rows(case: CaseMatch, edges: tuple[float, ...]) -> dict[str, np.ndarray]:
    les, cand = case.lesions, case.candidates
    m, n = len(les), len(cand)
    names = np.asarray(size_bucket_names(edges))
    hits_of: dict[int, list[str]] = {}
    for c, g in case.pairs.tolist():
        hits_of.setdefault(c, []).append(str(g))
    cand_iou = np.zeros(n)
    for (c, _g), v in zip(case.pairs.tolist(), case.pair_iou.tolist()):
        cand_iou[c - 1] = max(cand_iou[c - 1], v)
    lesion_matched = np.where(case.lesion_match > 0, case.lesion_match.astype(str), "")
    cand_outcome = np.array([CANDIDATE_OUTCOMES[int(o)] for o in case.candidate_outcome], dtype=object)
    return {
        "scan": np.full(m + n, case.scan, dtype=object),
        "kind": np.array(["lesion"] * m + ["candidate"] * n, dtype=object),
        "id": np.r_[np.arange(1, m + 1), np.arange(1, n + 1)],
        "centroid_x_mm": np.r_[les.centroid_mm[:, 0], cand.centroid_mm[:, 0]],
        "centroid_y_mm": np.r_[les.centroid_mm[:, 1], cand.centroid_mm[:, 1]],
        "centroid_z_mm": np.r_[les.centroid_mm[:, 2], cand.centroid_mm[:, 2]],
        "voxels": np.r_[les.voxels, cand.voxels],
        "volume_mm3": np.r_[les.volume_mm3, cand.volume_mm3],
        "diameter_mm": np.r_[les.diameter_mm, cand.diameter_mm],
        "score": np.r_[case.lesion_score, cand.score],
        "outcome": np.r_[np.where(np.isnan(case.lesion_score), "missed", "hit").astype(object),
                         cand_outcome],
        "matched_id": np.r_[lesion_matched.astype(object),
                            np.array([";".join(hits_of.get(i, [])) for i in range(1, n + 1)], dtype=object)],
        "iou": np.r_[case.lesion_iou, cand_iou],
        "size_bucket": names[size_bucket(np.r_[les.diameter_mm, cand.diameter_mm], edges)],
    }


def _csv_column(values: np.ndarray) -> list[str]:
    """Cells of one column as pandas' ``to_csv(float_format="%.6g")`` writes them (NaN -> empty)."""
    if values.dtype.kind == "f":
        return ["%.6g" % v if v == v else "" for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def write_lesions_csv(path: Path, cases: list[CaseMatch], size_buckets_mm: tuple[float, ...]) -> None:
    """One row per GT lesion and per candidate (see the module docstring).

    Written with the ``csv`` module from whole columns: a noisy map can give 10^5 rows, where
    pandas' per-cell float formatter took ~15 us per row.
    """
    import csv

    edges = tuple(size_buckets_mm)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LESION_COLUMNS)
        for case in cases:
            rows = _case_rows(case, edges)
            writer.writerows(zip(*(_csv_column(np.asarray(rows[c])) for c in LESION_COLUMNS)))


def style_froc_axes(ax, rates, lo_x: float, hi_x: float, title: str) -> None:
    """The FROC axes shared by the stage's PNG and the notebook: log2 FP axis ticked at the CPM rates."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rates)
    ax.set_xticklabels([f"{r:g}" for r in rates])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)


def plot_froc(path: Path, result: EvaluationResult) -> None:
    """FROC curve (log FP axis) with the bootstrap 95% band, the CPM FP rates and the operating points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = result.curve
    rates = np.asarray(result.fp_rates)
    lo_x, hi_x = rates[0] / 2, rates[-1] * 2
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if c.n_lesions:
        # draw the polyline read by interpolation, clipped to the axis range and extended flat at the end
        x = np.r_[c.fps_per_scan, max(hi_x, float(c.fps_per_scan[-1]))]
        y = np.r_[c.sensitivity, c.sensitivity[-1]]
        ax.plot(np.maximum(x, lo_x), y, color="C0", lw=1.8, label=f"FROC (CPM {result.cpm:.3f})")
        if result.bootstrap is not None and result.bootstrap.grid_fps.size:
            _, _, band = result.bootstrap.ci95()
            if np.isfinite(band).any():
                ax.fill_between(result.bootstrap.grid_fps, band[:, 0], band[:, 1], color="C0", alpha=0.2,
                                lw=0, label="95% CI (bootstrap)")
        ax.plot(rates, result.sensitivity_at_fp, "o", color="C0", ms=4)
        ops = result.operating_points
        ax.plot([max(o.fps_per_scan, lo_x) for o in ops], [o.sensitivity for o in ops], "s", mfc="none",
                color="C3", ms=6, label="operating points")
        op = result.operating_point
        ax.plot([max(op.fps_per_scan, lo_x)], [op.sensitivity], "*", color="C3", ms=11,
                label=f"chosen: {op.target_fp_rate:g} FP/scan, t={op.threshold:.3g}")
    else:
        ax.text(0.5, 0.5, "no lesions in the labels", ha="center", va="center", transform=ax.transAxes)
    style_froc_axes(ax, rates, lo_x, hi_x, f"{c.n_lesions} lesions, {c.n_scans} scans")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(output: Path, result: EvaluationResult, metrics: dict[str, Any] | None = None) -> None:
    """Write ``metrics.json``, ``froc.csv``, ``lesions.csv`` and ``froc.png`` into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "froc.csv", froc_csv_text(result))
    write_lesions_csv(output / "lesions.csv", result.cases, tuple(result.settings.get("size_buckets_mm", ())))
    plot_froc(output / "froc.png", result)
    write_json(output / "metrics.json", metrics if metrics is not None else result.to_metrics())


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
        m = match_case("example", prob, lesion_mask, (1.0, 1.0, 1.0), extraction_threshold=static_threshold,
                       dynamic=dyn)
        labels, _ = extract_candidates(prob, static_threshold, (1.0, 1.0, 1.0), dynamic=dyn)
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
