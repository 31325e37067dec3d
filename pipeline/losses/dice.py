"""Soft Dice loss on the same probability model (softmax or sigmoid) as the focal term."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pipeline.losses._common import Mode, as_one_hot, check_mode, compute_dtype, no_autocast, probabilities

DiceReduction = Literal["none", "mean", "sum"]
DICE_REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: Mode = "sigmoid",
    include_background: bool = True,
    batch_dice: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    reduction: DiceReduction = "mean",
) -> torch.Tensor:
    r"""Soft Dice loss per class, ``p = softmax(x)`` over C or ``sigmoid(x)`` per channel.

    For class ``c`` and the set ``S`` of summed voxels (the spatial voxels of one sample, or with
    ``batch_dice`` those of the whole batch, as if it were one large image):

        D_c = 1 - (2 * sum_S p_c * y_c + smooth_nr) / (sum_S p_c + sum_S y_c + smooth_dr)

    Batch Dice keeps a patch with no lesion from scoring its class as 0 or 1 by itself (an empty patch
    only adds its false positives to the batch's denominator), which is why it suits rare lesions.
    With ``smooth_nr = smooth_dr`` a class absent from target and prediction scores ~0 loss; keep
    ``smooth_dr > 0`` so that the ratio is always defined.

    Args:
        logits: ``(N, C, *spatial)`` raw network outputs.
        target: one-hot / binary ``(N, C, *spatial)``, or integer labels ``(N, 1, *spatial)``.
        mode: ``"softmax"`` or ``"sigmoid"``, as for the focal term.
        include_background: keep channel 0. Ignored when ``C == 1`` (that channel is the foreground).
        batch_dice: sum over batch and space (one Dice per class) instead of per sample.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        reduction: ``"none"`` -> ``(C',)`` with ``batch_dice`` else ``(N, C')`` (C' = classes kept);
            ``"mean"`` or ``"sum"`` over those.

    Returns:
        The loss in float32 (float64 for float64 logits), a scalar unless ``reduction="none"``.

    Example:
        >>> labels = torch.tensor([[[0, 1, 1, 0]]])  # (N=1, 1, 4 voxels)
        >>> logits = torch.nn.functional.one_hot(labels[:, 0], 2).movedim(-1, 1) * 40.0 - 20.0
        >>> float(dice_loss(logits, labels, mode="softmax", include_background=False)) < 1e-6  # perfect
        True
    """
    check_mode(mode)
    if reduction not in DICE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DICE_REDUCTIONS}, got {reduction!r}")
    if logits.ndim < 3:
        raise ValueError(f"logits must be (N, C, *spatial), got {tuple(logits.shape)}")
    if mode == "softmax" and logits.shape[1] < 2:
        raise ValueError("softmax Dice needs at least 2 channels; use mode='sigmoid' for one")

    dtype = compute_dtype(logits)
    with no_autocast(logits.device):
        p = probabilities(logits.to(dtype), mode)
        y = as_one_hot(target, logits, dtype)
        if not include_background and p.shape[1] > 1:
            p, y = p[:, 1:], y[:, 1:]
        dims = tuple(range(2, p.ndim))
        if batch_dice:
            dims = (0, *dims)
        intersection = (p * y).sum(dims)
        denominator = p.sum(dims) + y.sum(dims)
        loss = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss


class DiceLoss(nn.Module):
    """:func:`dice_loss` as a module; holds only the hyper-parameters (no buffers, no state).

    Example:
        >>> loss = DiceLoss(mode="softmax", include_background=False, batch_dice=True)
        >>> loss(torch.zeros(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4))).shape
        torch.Size([])
    """

    def __init__(
        self,
        mode: Mode = "sigmoid",
        include_background: bool = True,
        batch_dice: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: DiceReduction = "mean",
    ) -> None:
        super().__init__()
        check_mode(mode)
        if reduction not in DICE_REDUCTIONS:
            raise ValueError(f"reduction must be one of {DICE_REDUCTIONS}, got {reduction!r}")
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError("smooth_nr and smooth_dr must be >= 0")
        self.mode = mode
        self.include_background = bool(include_background)
        self.batch_dice = bool(batch_dice)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(
            logits,
            target,
            mode=self.mode,
            include_background=self.include_background,
            batch_dice=self.batch_dice,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, include_background={self.include_background}, batch_dice={self.batch_dice}, "
            f"smooth_nr={self.smooth_nr}, smooth_dr={self.smooth_dr}, reduction={self.reduction!r}"
        )
