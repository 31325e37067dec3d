"""The ``train`` stage: read the plan and the preprocessed train/val scans, train, write checkpoints,
the per-epoch CSV, the summary JSON and the curves, and track the run in MLflow (rank 0 only).

Outputs in ``paths.models``: ``best.pt``, ``last.pt``, ``train_log.csv`` (DVC plots),
``train_summary.json`` (DVC metrics), ``training_curves.png``, ``mlflow_run.json`` (run ids for evaluate).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.config import Config, dump_config
from pipeline.io.atomic import write_json
from pipeline.training.data import load_preprocessed
from pipeline.training.distributed import cleanup, init_distributed
from pipeline.training.loop import resolve_device, train
from pipeline.training.report import plot_training_curves, write_history_csv

log = logging.getLogger(__name__)


def run_training(cfg: Config, resume: bool = False, progress: bool = True, stop_after_steps: int | None = None) -> dict:
    from pipeline.tracking import create_tracker, lineage_tags, write_run_ref

    device = resolve_device(cfg.train.device)
    dist_info = init_distributed(device.type)
    tracker = create_tracker(cfg.tracking, rank=dist_info.rank)  # fails fast, before any work
    try:
        pre = Path(cfg.paths.preprocessed)
        plan = json.loads((pre / "plan.json").read_text())
        splits = json.loads(Path(cfg.paths.splits).read_text())
        train_cases = load_preprocessed(pre, splits["train"], cfg.train.cache)
        val_cases = load_preprocessed(pre, splits["val"], cfg.train.cache)
        out = Path(cfg.paths.models)
        out.mkdir(parents=True, exist_ok=True)
        parent = tracker.parent_run(uuid.uuid4().hex, run_name="pipeline")
        t0 = time.perf_counter()
        with tracker.start("train", parent_run_id=parent, tags=lineage_tags(cfg.paths.raw, device=device)) as run:
            run.log_params(cfg.flat())
            run.log_text(dump_config(cfg), "config/params.yaml")
            for name in ("plan.json", "fingerprint.json"):
                if (pre / name).exists():
                    run.log_artifact(pre / name, "preprocessing")
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
                "operating_point": result.operating_point,
                "train_cases": len(train_cases), "val_cases": len(val_cases),
            }
            write_history_csv(out / "train_log.csv", result.history)
            write_json(out / "train_summary.json", summary)
            plot_training_curves(out / "training_curves.png", result.history)
            run.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
            for name in ("train_log.csv", "train_summary.json", "training_curves.png"):
                run.log_artifact(out / name, "training")
            run.log_artifact(out / "best.pt", "checkpoint")
            _log_model(run, cfg, plan, out / "best.pt")
            write_run_ref(out / "mlflow_run.json", run.run_ref())
        return summary
    finally:
        cleanup(dist_info)


def _log_model(run, cfg: Config, plan: dict, best: Path) -> None:
    """The best model in MLflow's PyTorch flavour with a signature and an input example; registered."""
    from pipeline.inference.predict import load_model

    loaded = load_model(best, "cpu")
    patch = loaded.patch_size
    example = np.zeros((1, len(plan["channel_names"]), *patch), dtype=np.float32)
    run.log_torch_model(loaded.model, example, cfg.tracking.registered_model)
