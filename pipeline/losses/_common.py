"""Helpers shared by the focal and Dice losses: target layout, probability model, precision.

Conventions used by every loss in this package:

* ``logits`` are ``(N, C, *spatial)``; ``target`` is either one-hot / binary ``(N, C, *spatial)`` or a
  label map ``(N, 1, *spatial)`` with integer class indices in ``[0, C)`` (the training loop's layout).
* Channel 0 is the background whenever ``C > 1``; with ``C == 1`` (binary sigmoid head) the single
  channel is the foreground and the target is the binary mask.
* Losses are computed in at least float32 with autocast switched off, whatever the logits' dtype.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from pipeline.losses.probability import MODES, check_mode, one_hot, probabilities

Mode = Literal["sigmoid", "softmax"]
__all__ = ["MODES", "Mode", "as_one_hot", "check_mode", "compute_dtype", "foreground_mask", "no_autocast",
           "probabilities"]


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits, float64 for float64 logits."""
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    return torch.promote_types(logits.dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off so that exp/log below run in the dtype we chose, not bf16/fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def as_one_hot(target: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return the target as ``(N, C, *spatial)`` in ``dtype``, one-hot encoding a label map if needed.

    Args:
        target: one-hot / binary ``(N, C, *spatial)`` (any dtype), or labels ``(N, 1, *spatial)``
            (integer dtype, or a float map of whole numbers as MONAI loaders produce) when ``C > 1``.
        logits: ``(N, C, *spatial)``, gives the expected shape and device.
        dtype: floating dtype of the result.

    Raises:
        ValueError: the shapes fit neither layout.
        RuntimeError: a label is outside ``[0, C)`` (raised by ``scatter_``).
    """
    n_classes = logits.shape[1]
    if target.ndim != logits.ndim or target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}: expected "
            f"(N, C, *spatial) one-hot or (N, 1, *spatial) labels"
        )
    if target.shape[1] == n_classes:  # one-hot, or the binary mask of a single-channel head
        return target.to(dtype=dtype)
    if target.shape[1] != 1:
        raise ValueError(f"target has {target.shape[1]} channels; expected {n_classes} (one-hot) or 1 (labels)")
    return one_hot(target, n_classes, dtype)


def foreground_mask(one_hot: torch.Tensor) -> torch.Tensor:
    """``(N, *spatial)`` bool: voxels whose target is not background.

    With ``C > 1`` that is every voxel whose background channel is below 0.5 (label != 0 for hard
    targets: lesions *and* any other non-background class); with ``C == 1`` the voxels whose mask is
    at least 0.5.
    """
    if one_hot.shape[1] == 1:
        return one_hot[:, 0] >= 0.5
    return one_hot[:, 0] < 0.5
