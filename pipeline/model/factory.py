"""Build the 3D U-Net from the config and the preprocessing plan (docs/model.md).

The plan gives per-stage strides and kernel sizes derived from patch size and spacing (anisotropic data is
not downsampled along its thick-slice axis until the voxels are roughly isotropic) and the filters per stage
(nnU-Net's 32..320 on the GPU plan, narrower on the CPU plan); the config may override width and depth.
Stage 0 always has stride 1: the first feature maps and the first skip connection are at full resolution,
where a 3-5 mm lesion is still 3-6 voxels across.

* ``dynunet`` (default): nnU-Net's U-Net (MONAI ``DynUNet``): per stage two conv - InstanceNorm (affine) -
  LeakyReLU(0.01) (``num_res_units > 0``: residual blocks instead), transposed-conv upsampling, deep
  supervision heads at nnU-Net's weights (:func:`deep_supervision_weights`).
* ``unet``: MONAI ``UNet`` on the same stages. MONAI applies ``strides[i]`` at the i-th down layer, the
  first at the input convolution, so the plan's strides are passed whole (first = 1) and the bottom layer
  gets one more channel entry at the lowest resolution.

Output channels = number of classes (softmax) or classes (sigmoid, one binary map each, background included
so that label maps stay argmax-able).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.contracts import NetworkPlan

log = logging.getLogger(__name__)

# nnU-Net's network width (the GPU plan); the CPU plan narrows it (preprocess.cpu_base_filters / _max_filters)
NNUNET_BASE_FILTERS = 32
NNUNET_MAX_FILTERS = 320


def stage_filters(base_filters: int, max_filters: int, n_stages: int) -> list[int]:
    """Filters per stage: ``min(base * 2**i, max)``, e.g. 32, 64, 128, 256, 320, 320 (nnU-Net 3D)."""
    return [min(base_filters * 2**i, max_filters) for i in range(n_stages)]


def network_layout(model_cfg: ModelConfig, network: NetworkPlan | dict[str, Any]) -> dict[str, list]:
    """Strides, kernel sizes and filters per stage, truncated to ``model_cfg.depth`` when set.

    Args:
        model_cfg: ``train.model``.
        network: the plan's ``network`` part (:class:`~pipeline.contracts.NetworkPlan`, or its JSON dict).

    Filters: the config's ``base_filters`` / ``max_filters`` when set, else the plan's ``network.filters``
    (a plan without them falls back to nnU-Net's 32..320).
    """
    net = NetworkPlan.from_dict(network, "plan.network")
    strides = [list(s) for s in net.strides]
    kernels = [list(k) for k in net.kernel_sizes]
    depth = model_cfg.depth or len(strides)
    if depth > len(strides):
        raise ValueError(f"train.model.depth={depth} exceeds the {len(strides)} levels the plan's patch size allows")
    if strides[0] != [1, 1, 1]:
        raise ValueError(f"the plan's first stage has stride {strides[0]}; it must be [1, 1, 1] (full resolution)")
    strides, kernels = strides[:depth], kernels[:depth]
    planned = list(net.filters or stage_filters(NNUNET_BASE_FILTERS, NNUNET_MAX_FILTERS, depth))
    filters = stage_filters(model_cfg.base_filters or planned[0], model_cfg.max_filters or max(planned), depth)
    return {"strides": strides, "kernel_sizes": kernels, "filters": filters}


def deep_supervision_heads(n_stages: int) -> int:
    """Number of extra supervision heads, nnU-Net v2's rule.

    nnU-Net puts a head on each of the ``n_stages - 1`` decoder stages and gives the lowest-resolution one
    weight 0 (``_build_loss``), so ``n_stages - 2`` heads count: the main one plus ``n_stages - 3`` here
    (0 for a network of 3 stages or fewer: deep supervision is then off).
    """
    return max(0, n_stages - 3)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Loss weight of each output, full resolution first: ``w_i = 2**-i / sum_j 2**-j``, i < n_outputs.

    nnU-Net v2 (``nnUNetTrainer._build_loss``): weights ``1 / 2**i`` over its ``n_stages - 1`` decoder
    outputs, the lowest-resolution one set to 0, normalised to sum 1. With that head not built here
    (:func:`deep_supervision_heads`) the normalised weights of the rest are the same.

    Example:
        >>> [round(w, 4) for w in deep_supervision_weights(3)]  # 5 stages: nnU-Net's [1, .5, .25, 0] / 1.75
        [0.5714, 0.2857, 0.1429]
    """
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    raw = [0.5**i for i in range(n_outputs)]
    return [w / sum(raw) for w in raw]


def _dynunet_class():
    from monai.networks.nets import DynUNet  # lazy: importing monai takes seconds

    class SupervisedDynUNet(DynUNet):
        """MONAI ``DynUNet`` whose training-mode output keeps each supervision head at its own resolution.

        MONAI interpolates every head up to full size and stacks them; nnU-Net instead compares each head
        with the labels downsampled to its size (cheaper: the loss of a head at 1/4 resolution costs 1/16
        to 1/64 of a full-size one). Training mode with deep supervision returns a list of
        (N, C, *spatial_i) logits, full resolution first; evaluation mode returns (N, C, *spatial) as MONAI.
        The parameters and the state dict are MONAI's.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
            out = self.output_block(self.skip_layers(x))
            if self.training and self.deep_supervision:
                return [out, *self.heads]
            return out

    return SupervisedDynUNet


def build_model(model_cfg: ModelConfig, network: NetworkPlan | dict[str, Any], in_channels: int,
                n_classes: int) -> nn.Module:
    """A MONAI 3D U-Net whose head outputs ``n_classes`` logits per voxel: (N, n_classes, X, Y, Z), with the
    topology of the plan's ``network`` part (``plan.network``; see :func:`network_layout`).

    ``dynunet`` with ``deep_supervision`` (and at least 4 stages) returns, in training mode, a list of
    1 + :func:`deep_supervision_heads` logit tensors, full resolution first, the i-th downsampled by the
    product of the first i + 1 decoder strides (see :func:`supervision_target`); in evaluation mode one
    (N, n_classes, X, Y, Z) tensor.
    """
    layout = network_layout(model_cfg, network)
    n_stages = len(layout["strides"])
    if model_cfg.name == "unet":
        from monai.networks.nets import UNet

        if model_cfg.deep_supervision:
            log.info("train.model.deep_supervision applies to dynunet only; the unet has one head")
        # MONAI UNet: down layer i has stride strides[i] (the first acts on the input) and the bottom layer
        # stride 1, so stage i of the plan is down layer i; the bottom repeats the last stage's width.
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=n_classes,
                    channels=[*layout["filters"], layout["filters"][-1]],
                    strides=[tuple(s) for s in layout["strides"]], kernel_size=3, up_kernel_size=3,
                    num_res_units=model_cfg.num_res_units, dropout=model_cfg.dropout, norm="INSTANCE")
    heads = deep_supervision_heads(n_stages) if model_cfg.deep_supervision else 0
    return _dynunet_class()(
        spatial_dims=3, in_channels=in_channels, out_channels=n_classes,
        kernel_size=layout["kernel_sizes"], strides=layout["strides"],
        upsample_kernel_size=layout["strides"][1:], filters=layout["filters"],
        dropout=model_cfg.dropout or None, norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=heads > 0, deep_supr_num=max(1, heads), res_block=model_cfg.num_res_units > 0)


def supervision_target(target: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Labels for a supervision head of spatial ``size``: nearest-neighbour downsampling, as nnU-Net.

    Args:
        target: (N, C, *spatial) labels (integer class map C = 1, or one-hot / binary masks).
        size: the head's spatial size; equal to ``target``'s -> returned as is.

    Returns:
        (N, C, *size) of ``target``'s dtype; voxel ``j`` takes the label at ``floor(j * in / out)`` per axis.
    """
    if tuple(target.shape[2:]) == tuple(size):
        return target
    down = torch.nn.functional.interpolate(target.float(), size=tuple(size), mode="nearest")
    return down.to(target.dtype)


def main_output(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """The full-resolution head from a network output (deep supervision: a list, full resolution first)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
