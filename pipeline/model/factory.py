"""Build the 3D U-Net from the config and the preprocessing plan (MONAI ``UNet`` or ``DynUNet``).

The plan gives per-level strides and kernel sizes derived from patch size and spacing (anisotropic data
is not downsampled along its thick-slice axis until the voxels are roughly isotropic); the config gives
width, depth and options. Output channels = number of classes (softmax) or classes (sigmoid, one binary
map each, background included so that label maps stay argmax-able).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig


def network_layout(model_cfg: ModelConfig, plan: dict[str, Any]) -> dict[str, list]:
    """Strides, kernel sizes and filters per level, truncated to ``model_cfg.depth`` when set."""
    net = plan["network"]
    strides = [list(s) for s in net["strides"]]
    kernels = [list(k) for k in net["kernel_sizes"]]
    depth = model_cfg.depth or len(strides)
    if depth > len(strides):
        raise ValueError(f"train.model.depth={depth} exceeds the {len(strides)} levels the plan's patch size allows")
    strides, kernels = strides[:depth], kernels[:depth]
    filters = [min(model_cfg.base_filters * 2**i, model_cfg.max_filters) for i in range(depth)]
    return {"strides": strides, "kernel_sizes": kernels, "filters": filters}


def build_model(model_cfg: ModelConfig, plan: dict[str, Any], in_channels: int, n_classes: int) -> nn.Module:
    """A MONAI 3D U-Net whose head outputs ``n_classes`` logits per voxel: (N, n_classes, X, Y, Z).

    With ``deep_supervision`` (DynUNet only) the training-mode output is (N, 1 + K, n_classes, X, Y, Z),
    every head already upsampled to full size by MONAI.
    """
    layout = network_layout(model_cfg, plan)
    if model_cfg.name == "unet":
        from monai.networks.nets import UNet

        if model_cfg.deep_supervision:
            raise ValueError("train.model.deep_supervision needs train.model.name=dynunet")
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=n_classes, channels=layout["filters"],
                    strides=[tuple(s) for s in layout["strides"][1:]], num_res_units=model_cfg.num_res_units,
                    dropout=model_cfg.dropout, norm="INSTANCE")
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=n_classes,
                   kernel_size=layout["kernel_sizes"], strides=layout["strides"],
                   upsample_kernel_size=layout["strides"][1:], filters=layout["filters"],
                   dropout=model_cfg.dropout or None, deep_supervision=model_cfg.deep_supervision,
                   deep_supr_num=max(1, min(2, len(layout["strides"]) - 2)), res_block=model_cfg.num_res_units > 0)


def main_output(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """The full-resolution head from a network output (deep supervision stacks heads on dim 1)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
