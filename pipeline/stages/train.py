"""The ``train`` stage: read the plan and the preprocessed train/val scans, train, write checkpoints,
the per-epoch CSV, the summary JSON and the curves, and track the run in MLflow (rank 0 only).

Outputs in ``paths.models``: ``best.pt``, ``last.pt``, ``train_log.csv`` (DVC plots),
``train_summary.json``, ``training_curves.png``, ``mlflow_run.json`` (run ids for evaluate); in
``paths.metrics`` (git-tracked, what DVC experiments compare): ``train.json``, ``train_loss.csv``,
``validation.csv`` (see :mod:`pipeline.dvc_metrics`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config, config_from_dict, dump_config
from pipeline.contracts import Plan
from pipeline.data.splits import fold_cases, load_or_make_folds
from pipeline.dvc_metrics import write_training_metrics
from pipeline.io.atomic import write_json
from pipeline.model.checkpoint import best_checkpoint
from pipeline.model.device import resolve_device
from pipeline.preprocessing.layout import fingerprint_path, plan_path
from pipeline.preprocessing.plan import load_plan
from pipeline.tracking import create_tracker, lineage_tags, write_run_ref
from pipeline.tracking.pipeline_run import numeric, open_pipeline_run, run_ref_path, version_tags
from pipeline.training.data import load_preprocessed
from pipeline.training.distributed import DistInfo, barrier, cleanup, init_distributed
from pipeline.training.loop import train
from pipeline.training.report import plot_training_curves, write_history_csv

log = logging.getLogger(__name__)


def run(cfg: Config, resume: bool = False, progress: bool = True, stop_after_steps: int | None = None) -> dict:
    device = resolve_device(cfg.train.device)
    dist_info = init_distributed(device.type, cfg.train.dist_timeout_min)
    tracker = create_tracker(cfg.tracking, rank=dist_info.rank)  # fails fast, before any work
    try:
        pre = Path(cfg.paths.preprocessed)
        plan = load_plan(plan_path(pre))
        train_ids, val_ids = training_case_ids(cfg, dist_info)
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))  # each rank loads its copy
        train_cases = load_preprocessed(pre, train_ids, cfg.train.cache, cfg.train.cache_ram_fraction,
                                        processes_per_machine=per_machine)
        val_cases = load_preprocessed(pre, val_ids, cfg.train.cache, cfg.train.cache_ram_fraction,
                                      processes_per_machine=per_machine)
        out = Path(cfg.paths.models)
        out.mkdir(parents=True, exist_ok=True)
        parent, key = open_pipeline_run(tracker, cfg)  # shared with evaluate: same execution, same key
        t0 = time.perf_counter()
        with tracker.start("train", parent_run_id=parent, tags=lineage_tags(cfg.paths.raw, device=device)) as run:
            run.log_params(cfg.flat())
            run.log_text(dump_config(cfg), "config/params.yaml")
            for path in (plan_path(pre), fingerprint_path(pre)):
                if path.exists():
                    run.log_artifact(path, "preprocessing")
            result = train(cfg, plan, train_cases, val_cases, out, resume=resume, progress=progress,
                           dist_info=dist_info, log_metrics=run.log_metrics, stop_after_steps=stop_after_steps)
            if not dist_info.is_main:
                return {}
            summary = {
                "best_epoch": result.best_epoch,
                **{f"best_val_{k}": v for k, v in result.best_metrics.items()},
                "final_train_loss": result.history[-1]["loss"],
                "mean_patches_per_s": float(np.mean([r["patches_per_s"] for r in result.history])),
                "mean_data_wait_fraction": float(np.mean([r["data_wait_fraction"] for r in result.history])),
                "train_time_s": time.perf_counter() - t0,
                "operating_point": result.operating_point.to_dict() if result.operating_point else None,
                "train_cases": len(train_cases), "val_cases": len(val_cases),
                # what ended the run: "epochs" (all of train.epochs) or "time_budget" (train.time_budget_min,
                # the LR schedule compressed to it); optimiser steps and wall-clock seconds of the run
                "stopped_by": result.stopped_by, "steps": result.steps, "elapsed_s": result.elapsed_s,
                "time_budget_min": cfg.train.time_budget_min,
                **({"fold": cfg.train.fold, "n_folds": cfg.train.n_folds} if cfg.train.fold is not None else {}),
            }
            write_history_csv(out / "train_log.csv", result.history)
            write_json(out / "train_summary.json", summary)
            write_training_metrics(Path(cfg.paths.metrics), summary, result.history)  # what experiments compare
            plot_training_curves(out / "training_curves.png", result.history)
            run.log_metrics(numeric(summary))
            run.log_metrics(numeric(summary), run_id=parent)  # the execution's row in the run table
            for name in ("train_log.csv", "train_summary.json", "training_curves.png"):
                run.log_artifact(out / name, "training")
            run.log_artifact(best_checkpoint(out), "checkpoint")
            model = _log_model(run, cfg, plan, best_checkpoint(out), key) or {}
            write_run_ref(run_ref_path(out), {**run.run_ref(), "pipeline_key": key,
                                                    "registered_model": model.get("registered_model_name"),
                                                    "model_version": model.get("registered_model_version")})
        return summary
    finally:
        cleanup(dist_info)


def training_case_ids(cfg: Config, dist_info=None) -> tuple[list[str], list[str]]:
    """(train, val) case ids: the data stage's split, or with ``train.fold`` set, that fold of the folds
    file ``paths.folds`` (made from the split's train + val scans on first use, rank 0 only)."""
    splits_path = Path(cfg.paths.splits)
    splits = json.loads(splits_path.read_text())
    if cfg.train.fold is None:
        return list(splits["train"]), list(splits["val"])
    dist_info = dist_info or DistInfo()
    cases = fold_cases(splits, str(splits_path))
    args = (Path(cfg.paths.folds), cases, cfg.train.n_folds, cfg.data.split_seed)
    if dist_info.is_main:
        load_or_make_folds(*args)
    barrier(dist_info)  # the other ranks read the file rank 0 made
    fold = load_or_make_folds(*args)[cfg.train.fold]
    log.info("fold %d of %d (%s): %d train, %d val scans", cfg.train.fold, cfg.train.n_folds, cfg.paths.folds,
             len(fold["train"]), len(fold["val"]))
    return fold["train"], fold["val"]


def make_folds_file(cfg: Config) -> list[dict[str, list[str]]]:
    """Write ``paths.folds`` from the data stage's split if it does not exist (else check and read it)."""
    splits_path = Path(cfg.paths.splits)
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path}: split not found; run the data stage (prepare-data) first")
    cases = fold_cases(json.loads(splits_path.read_text()), str(splits_path))
    return load_or_make_folds(cfg.paths.folds, cases, cfg.train.n_folds, cfg.data.split_seed)


def fold_config(cfg: Config, fold: int) -> Config:
    """``cfg`` training fold ``fold`` into ``<paths.models>/fold_<fold>``."""
    tree = cfg.to_dict()
    tree["train"]["fold"] = fold
    tree["paths"]["models"] = str(Path(cfg.paths.models) / f"fold_{fold}")
    return config_from_dict(tree, source=f"fold {fold}")


def run_folds(cfg: Config, folds: list[int] | None = None, resume: bool = False,
                       progress: bool = True) -> list[Path]:
    """Train the given folds (default: all ``train.n_folds``) one after another, each into
    ``<paths.models>/fold_<k>``; returns their ``best.pt`` paths (for ``inference.checkpoints``)."""
    folds = list(range(cfg.train.n_folds)) if folds is None else folds
    make_folds_file(cfg)
    best = []
    for k in folds:
        fold_cfg = fold_config(cfg, k)
        log.info("training fold %d of %d into %s", k, cfg.train.n_folds, fold_cfg.paths.models)
        run(fold_cfg, resume=resume, progress=progress)
        best.append(best_checkpoint(fold_cfg.paths.models))
    return best


def _log_model(run, cfg: Config, plan: Plan, best: Path, key: str | None) -> dict | None:
    """The best checkpoint as a whole-scan pyfunc model (:mod:`pipeline.tracking.pyfunc_model`), registered
    and tagged with the git commit, the data hash and the pipeline key."""
    if not run.enabled:
        return None
    return run.log_scan_model(best, plan.n_channels, cfg.tracking.registered_model,
                              version_tags=version_tags(cfg, key))
