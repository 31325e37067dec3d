"""Tiny untrained checkpoints with a real plan, for the inference tests (the weights do not matter to
geometry, shapes, formats or averaging; only the plan and the config travel with them)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.contracts import OperatingPoint, Plan
from pipeline.model.checkpoint import save_checkpoint


def tiny_plan(cfg: Config) -> Plan:
    """Write ``cfg``'s synthetic data set to ``cfg.paths.raw`` and plan it (fingerprint + planner)."""
    from pipeline.data.synthetic import write_synthetic_dataset
    from pipeline.io.dataset import load_dataset
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan

    write_synthetic_dataset(cfg.paths.raw, cfg.data.synthetic, progress=False)
    ds = load_dataset(cfg.data, cfg.paths.raw)
    return make_plan(compute_fingerprint(ds, [c.case_id for c in ds.training], cfg.data, 1), ds, cfg)


def random_checkpoint(path: Path, cfg: Config, plan: Plan, seed: int = 0,
                      threshold: float | None = 0.5) -> Path:
    """Save a freshly initialised 1-channel network (``torch.manual_seed(seed)``) as a ``best.pt``, with an
    operating point at ``threshold`` (None: no candidate on validation, stored as null)."""
    from pipeline.model.factory import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.train.model, plan.network, 1, plan.n_classes)
    op = OperatingPoint(target_fp_rate=1.0, threshold=float("inf") if threshold is None else threshold,
                        fps_per_scan=1.0, sensitivity=0.5)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "plan": plan.to_dict(),
                           "operating_point": op.to_dict()})
    return path
