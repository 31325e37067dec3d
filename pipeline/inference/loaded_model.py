"""A trained network rebuilt from its checkpoint (its own config and plan), ready to predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config, InferenceConfig, config_from_dict
from pipeline.contracts import ContractError, OperatingPoint, Plan, operating_point_or_none
from pipeline.inference.sliding_window import predict_probabilities
from pipeline.model.checkpoint import CheckpointError, load_checkpoint
from pipeline.model.device import resolve_device
from pipeline.model.factory import build_model


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: Config  # the training run's config (plan, preprocessing, loss mode)
    plan: Plan
    operating_point: OperatingPoint | None  # chosen on the run's validation scans; None: not stored
    device: torch.device

    @property
    def lesion_labels(self) -> list[int]:
        return list(self.plan.lesion_labels)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.cfg.train.patch_size or self.plan.patch_size)

    def probabilities(self, image: torch.Tensor, inference: InferenceConfig, progress: bool = False) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed image -> (K, X, Y, Z) float32 class probabilities on the CPU (sliding
        window, mirror TTA as configured). :class:`~pipeline.inference.ensemble.ModelEnsemble` averages these."""
        return predict_probabilities(self.model, image, self.patch_size, inference, self.cfg.train.loss.mode,
                                     self.device, progress=progress)


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the network from a checkpoint's own config and plan (the current config is not needed)."""
    dev = resolve_device(device)
    state = load_checkpoint(path, dev)
    try:
        cfg = config_from_dict(state["config"], source=f"{path} (config saved in the checkpoint)")
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config does not validate with this code version:\n{exc}") from None
    try:  # stored as plain dicts (weights_only loading): validated back into their types
        plan = Plan.from_dict(state["plan"], f"{path} (plan saved in the checkpoint)")
        operating_point = operating_point_or_none(state.get("operating_point"),
                                                  f"{path} (operating point saved in the checkpoint)")
    except ContractError as exc:
        raise CheckpointError(f"{path}: its plan or operating point does not validate with this code "
                              f"version:\n{exc}") from None
    model = build_model(cfg.train.model, plan.network, plan.n_channels, plan.n_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network built from its config: {exc}") from None
    model.to(dev).eval()
    return LoadedModel(model, cfg, plan, operating_point, dev)
