"""Several checkpoints as one predictor: their class probabilities averaged voxel by voxel (e.g. the
models of the cross-validation folds, as nnU-Net ensembles its folds).

Each member runs the same sliding window (and mirror TTA) on the same preprocessed image; the softmax
(or sigmoid) class probabilities are averaged, p = (1/M) * sum_m p_m, and the lesion probability and
label map are then computed from the mean exactly as for one model. The members must share the
preprocessing plan (the scan is preprocessed once) and the probability model (softmax / sigmoid).

The label map needs one operating threshold; each member brings the one chosen on its own validation
scans, and the ensemble uses their mean (members without a finite threshold are left out; none: no
threshold).
Lesion-candidate settings (``evaluation``) are the first member's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, InferenceConfig
from pipeline.contracts import OperatingPoint, Plan
from pipeline.inference.loaded_model import LoadedModel, load_model
from pipeline.model.checkpoint import CheckpointError


def mean_operating_point(points: Sequence[OperatingPoint | None]) -> OperatingPoint | None:
    """The members' operating points averaged over those with a finite threshold: mean threshold, FP rate
    and sensitivity (the target FP rate is the first such member's); None if no member has one."""
    kept = [p for p in points if p is not None and np.isfinite(p.threshold)]
    if not kept:
        return None
    return OperatingPoint(target_fp_rate=kept[0].target_fp_rate,
                          threshold=float(np.mean([p.threshold for p in kept])),
                          fps_per_scan=float(np.mean([p.fps_per_scan for p in kept])),
                          sensitivity=float(np.mean([p.sensitivity for p in kept])))


@dataclass
class ModelEnsemble:
    """Checkpoints predicting together; duck-types :class:`~pipeline.inference.loaded_model.LoadedModel` for
    :func:`~pipeline.inference.predict.predict_volume` (``cfg``, ``plan``, ``operating_point``,
    ``lesion_labels``, ``probabilities``)."""

    members: list[LoadedModel]
    paths: list[Path]

    @property
    def cfg(self) -> Config:
        return self.members[0].cfg

    @property
    def plan(self) -> Plan:
        return self.members[0].plan

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def lesion_labels(self) -> list[int]:
        return self.members[0].lesion_labels

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.members[0].patch_size

    @property
    def operating_point(self) -> OperatingPoint | None:
        return mean_operating_point([m.operating_point for m in self.members])

    def probabilities(self, image: torch.Tensor, inference: InferenceConfig, progress: bool = False) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed image -> (K, X, Y, Z) float32 mean of the members' probabilities (CPU)."""
        total: torch.Tensor | None = None
        for member in self.members:
            probs = member.probabilities(image, inference, progress=progress)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        return total / len(self.members)


def check_compatible(members: Sequence[LoadedModel], paths: Sequence[Path]) -> None:
    """Fail naming both files when a member was planned, preprocessed or trained to another probability
    model than the first: their probability maps would not be on the same grid or scale."""
    first, first_path = members[0], paths[0]
    for member, path in zip(members[1:], paths[1:], strict=True):
        problems = []
        if member.plan != first.plan:
            keys = member.plan.differing_keys(first.plan)
            problems.append(f"preprocessing plans differ ({', '.join(keys)})")
        if member.cfg.preprocess != first.cfg.preprocess:
            problems.append("preprocess settings differ")
        if member.cfg.train.loss.mode != first.cfg.train.loss.mode:
            problems.append(f"loss modes differ ({first.cfg.train.loss.mode} vs {member.cfg.train.loss.mode})")
        if problems:
            raise CheckpointError(f"{path} cannot be ensembled with {first_path}: " + "; ".join(problems))


def load_ensemble(paths: Sequence[str | Path], device: str = "auto") -> ModelEnsemble:
    """Load every checkpoint (see :func:`~pipeline.inference.loaded_model.load_model`) and check they fit."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("an ensemble needs at least one checkpoint")
    members = [load_model(p, device) for p in paths]
    check_compatible(members, paths)
    return ModelEnsemble(members, paths)
