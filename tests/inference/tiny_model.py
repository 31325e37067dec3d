"""Tiny untrained checkpoints with a real plan, for the inference tests (the weights do not matter to
geometry, shapes, formats or averaging; only the plan and the config travel with them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.training.checkpoint import save_checkpoint


def tiny_plan(cfg: Config) -> dict[str, Any]:
    """Write ``cfg``'s synthetic data set to ``cfg.paths.raw`` and plan it (fingerprint + planner)."""
    from pipeline.data.synthetic import write_synthetic_dataset
    from pipeline.io.dataset import load_dataset
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan

    write_synthetic_dataset(cfg.paths.raw, cfg.data.synthetic, progress=False)
    ds = load_dataset(cfg.data, cfg.paths.raw)
    return make_plan(compute_fingerprint(ds, [c.case_id for c in ds.training], cfg.data, 1), ds, cfg)


def random_checkpoint(path: Path, cfg: Config, plan: dict[str, Any], seed: int = 0,
                      threshold: float | None = 0.5) -> Path:
    """Save a freshly initialised 1-channel network (``torch.manual_seed(seed)``) as a ``best.pt``."""
    from pipeline.model.factory import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.train.model, plan, 1, int(plan["n_classes"]))
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "plan": plan,
                           "operating_point": {"threshold": threshold}})
    return path
