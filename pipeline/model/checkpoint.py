"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), compatibility checks.

A checkpoint is a dict of tensors and plain Python values only: model / optimiser / scaler state,
epoch, RNG states, the full config, the plan and a format version, so it loads without unpickling code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.io.atomic import atomic_path

FORMAT_VERSION = 1
# the train stage's checkpoint files in ``paths.models`` (their one spelling; see :func:`best_checkpoint`)
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.pt", "last.pt"
# config sections whose change makes a checkpoint unusable for resuming the same run
RESUME_SECTIONS = ("seed", "preprocess", "train", "data.lesion_labels", "data.label_remap")


# settings that do not change the trained weights (tested: batches do not depend on the worker count), or
# that only say how long to go on (epochs, the wall-clock budget: a resumed run may be given more)
RESUME_FREE = {"train.epochs", "train.time_budget_min", "train.num_workers", "train.device", "train.cache",
               "train.checkpoint_every", "train.dist_timeout_min", "train.cache_ram_fraction"}


def best_checkpoint(models_dir: str | Path) -> Path:
    """The checkpoint model selection chose (what evaluate, predict and the registry use)."""
    return Path(models_dir) / BEST_CHECKPOINT


def last_checkpoint(models_dir: str | Path) -> Path:
    """The checkpoint of the last finished epoch (what ``--resume`` continues from)."""
    return Path(models_dir) / LAST_CHECKPOINT


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or from another config or code version."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a half-written checkpoint."""
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint format version {found} does not match this code's version {FORMAT_VERSION}; "
            "retrain with this version of the pipeline"
        )
    return state


def _select(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if any(k == s or k.startswith(s + ".") for s in RESUME_SECTIONS)}


def check_resume_compatible(path: Path, saved_flat: dict[str, Any], current_flat: dict[str, Any]) -> None:
    """Fail with the differing keys when the checkpoint was trained with another config."""
    old, new = _select(saved_flat), _select(current_flat)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_FREE)
    if diff:
        lines = [f"  {k}: checkpoint {old.get(k)!r} != config {new.get(k)!r}" for k in diff[:20]]
        raise CheckpointError(f"{path}: checkpoint was written with a different config; cannot resume:\n"
                              + "\n".join(lines))
