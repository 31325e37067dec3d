"""The ``evaluate`` stage: predict the held-out test scans with the best model (in each scan's original
geometry), evaluate lesion by lesion (FROC / CPM with bootstrap CIs, by size, operating points) for the
union of lesion classes and for each lesion class, voxel metrics for every class, and track it all in
MLflow as a child of the training run's pipeline run.

Outputs: ``paths.predictions/{probabilities,labels}/<case>.nii.gz`` and, in ``paths.evaluation``,
``metrics.json``, ``froc.csv``, ``lesions.csv``, ``froc.png``, ``lesion_views/`` (and ``per_class/<name>/``
when there are several lesion classes); in ``paths.metrics`` (git-tracked, what DVC experiments compare):
``metrics.json`` and the step-vertex ``froc.csv`` (see :mod:`pipeline.dvc_metrics`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.dvc_metrics import write_evaluation_metrics
from pipeline.evaluation.evaluate import evaluate_cases, json_safe
from pipeline.evaluation.folders import evaluate_folders
from pipeline.evaluation.report import write_report
from pipeline.evaluation.voxel_metrics import summarize_class, voxel_scores
from pipeline.inference.predict import load_predictor, predict_volume
from pipeline.inspection.export import export_lesion_views
from pipeline.io.atomic import atomic_dir
from pipeline.io.dataset import read_case_image, read_case_label
from pipeline.io.formats import read_volume, write_volume
from pipeline.io.validate import validated_dataset
from pipeline.model.checkpoint import best_checkpoint
from pipeline.tracking import create_tracker, lineage_tags, read_run_ref
from pipeline.tracking.pipeline_run import finish_pipeline_run, open_pipeline_run, run_ref_path

log = logging.getLogger(__name__)


def _predict_test_scans(cfg: Config, ds, test_ids: list[str], pred_dir: Path, progress: bool) -> dict[str, list]:
    """Write predictions for the test scans; return per-class voxel scores computed from the label maps."""
    from tqdm import tqdm

    loaded = load_predictor(checkpoint_paths(cfg), cfg.inference.device)  # several: an ensemble
    lesion_names = {k: ds.labels[k] for k in loaded.lesion_labels}
    voxel: dict[str, list] = {name: [] for k, name in ds.labels.items() if k != 0}
    with atomic_dir(pred_dir) as tmp:
        for cid in tqdm(test_ids, desc="predict test scans", unit="scan", disable=not progress):
            case = ds.case(cid)
            image = read_case_image(case)
            truth = read_case_label(case, cfg.data.label_remap).data[0]
            pred = predict_volume(loaded, image, cfg.inference)
            write_volume(tmp / "probabilities" / f"{cid}.nii.gz", pred.lesion_probability)
            write_volume(tmp / "labels" / f"{cid}.nii.gz", pred.labels)
            if len(lesion_names) > 1:
                for k, name in lesion_names.items():
                    write_volume(tmp / "class_probabilities" / name / f"{cid}.nii.gz",
                                 pred.class_probabilities.with_data(pred.class_probabilities.data[k:k + 1]))
            labels = pred.labels.data[0]
            for k, name in ds.labels.items():
                if k != 0:
                    voxel[name].append(voxel_scores(labels == k, truth == k, image.spacing,
                                                    cfg.evaluation.surface_tolerance_mm))
    return voxel


def checkpoint_paths(cfg: Config) -> list[Path]:
    """``inference.checkpoints`` (their probabilities are averaged), or the train stage's ``best.pt``."""
    return [Path(p) for p in cfg.inference.checkpoints] or [best_checkpoint(cfg.paths.models)]


def _cases(prob_dir: Path, ds, test_ids: list[str], lesion_values: list[int], remap) -> Iterator[tuple]:
    """(scan, lesion probability, GT lesion mask as 0/1, affine), read lazily one scan at a time."""
    for cid in test_ids:
        prob = read_volume(prob_dir / f"{cid}.nii.gz")
        truth = read_case_label(ds.case(cid), remap).data[0]
        yield cid, prob.data[0], np.isin(truth, lesion_values).astype(np.uint8), prob.affine


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    tracker = create_tracker(cfg.tracking)  # fails fast, before any work
    models = Path(cfg.paths.models)
    ref = read_run_ref(run_ref_path(models)) if run_ref_path(models).exists() else {}
    ds, _ = validated_dataset(cfg.data, cfg.paths.raw, progress)
    test_ids = json.loads(Path(cfg.paths.splits).read_text())["test"]
    if not test_ids:
        raise ValueError(f"{cfg.paths.splits}: no test scans to evaluate (data.test_fraction is 0?)")
    pred_dir, out = Path(cfg.paths.predictions), Path(cfg.paths.evaluation)
    lesion_labels = list(cfg.data.lesion_labels)

    parent, _ = open_pipeline_run(tracker, cfg, prefer=ref.get("parent_run_id"))  # the training run's parent
    with tracker.start("evaluate", parent_run_id=parent,
                       tags={**lineage_tags(cfg.paths.raw), "train_run_id": ref.get("run_id") or ""}) as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("evaluation", "inference")})
        voxel = _predict_test_scans(cfg, ds, test_ids, pred_dir, progress)
        result = evaluate_cases(_cases(pred_dir / "probabilities", ds, test_ids, lesion_labels, cfg.data.label_remap),
                                cfg.evaluation, lesion_label=1, voxel_metrics=False)
        metrics = result.to_metrics()
        summaries = {name: summarize_class(scores) for name, scores in voxel.items()}
        metrics.update(json_safe({"dice": {n: s["dice"] for n, s in summaries.items()},
                                  "hd95_mm": {n: s["hd95_mm"] for n, s in summaries.items()},
                                  "surface_dice": {n: s["surface_dice"] for n, s in summaries.items()},
                                  "voxel_metrics": summaries}))
        metrics["lesion_classes"] = {str(k): ds.labels[k] for k in lesion_labels}
        if len(lesion_labels) > 1:
            metrics["per_class"] = {}
            for k in lesion_labels:
                name = ds.labels[k]
                res = evaluate_cases(_cases(pred_dir / "class_probabilities" / name, ds, test_ids, [k],
                                            cfg.data.label_remap), cfg.evaluation, lesion_label=1, voxel_metrics=False)
                write_report(out / "per_class" / name, res)
                m = res.to_metrics()
                metrics["per_class"][name] = {key: m[key] for key in ("cpm", "cpm_ci95", "sensitivity_at_fp",
                                                                     "lesions_total", "by_size")}
        metrics["settings"].update({"model": ", ".join(str(p) for p in checkpoint_paths(cfg)),
                                    "test_scans": test_ids})
        write_report(out, result, metrics)
        write_evaluation_metrics(Path(cfg.paths.metrics), metrics, cfg.evaluation.fp_rates,
                                 [ds.labels[k] for k in lesion_labels], result.curve.fps_per_scan,
                                 result.curve.sensitivity)  # the headline numbers experiments compare
        _export_views(cfg, ds, test_ids, out)

        flat = {"cpm": metrics["cpm"], "lesions_total": metrics["lesions_total"]}
        flat.update({f"sens_at_{k}fp": v for k, v in metrics["sensitivity_at_fp"].items()})
        flat.update({f"dice_{n}": v for n, v in metrics["dice"].items()})
        flat.update({f"hd95_mm_{n}": v for n, v in metrics["hd95_mm"].items()})
        for name, m in metrics.get("per_class", {}).items():
            flat[f"cpm_{name}"] = m["cpm"]
        run.log_metrics({k: float(v) for k, v in flat.items() if isinstance(v, (int, float))})
        ci = metrics.get("cpm_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            flat.update({"cpm_ci95_low": ci[0], "cpm_ci95_high": ci[1]})
        finish_pipeline_run(run, parent, ref, cfg.tracking, flat)  # parent metrics, version tags, champion alias
        for name in ("metrics.json", "froc.csv", "lesions.csv", "froc.png"):
            run.log_artifact(out / name, "evaluation")
        if (out / "lesion_views").exists():
            run.log_artifact(out / "lesion_views", "evaluation/lesion_views")
    log.info("test CPM %.4f over %d lesions in %d scans", metrics["cpm"] or 0.0, metrics["lesions_total"],
             metrics["scans_total"])
    return metrics


def run_folders(cfg: Config, predictions: Path, labels: Path, output: Path, lesion_label: int | None = None) -> dict:
    """``evaluate --predictions``: any tool's predictions against label maps, paired by file name (see
    :func:`pipeline.evaluation.folders.evaluate_folders`); returns the metrics written to ``output``."""
    return evaluate_folders(predictions, labels, output, cfg.evaluation, lesion_label=lesion_label)


def _export_views(cfg: Config, ds, test_ids: list[str], out: Path) -> None:
    """Static PNGs of every missed lesion and the top false positives (for users who skip the notebook)."""
    export_lesion_views(cfg, ds, test_ids, out, out / "lesion_views")
