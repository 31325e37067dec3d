"""``lambda_focal * focal + lambda_dice * dice``, built from ``cfg.train.loss``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses.dice import DiceLoss
from pipeline.losses.focal import FocalLoss, check_alpha


class LossParts(NamedTuple):
    """Scalar losses of one step: what training optimises and the two parts it logs."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor


class FocalDiceLoss(nn.Module):
    """Weighted sum of a focal and a soft Dice loss that share one probability model.

        L = lambda_focal * FL + lambda_dice * Dice

    ``forward`` returns ``L``; :meth:`parts` returns ``(total, focal, dice)`` for logging. Both parts
    are always computed (so that both can be logged), even when one lambda is 0. The module holds no
    tensors and ``forward`` changes no attribute.

    Args:
        focal: the focal term; its reduction must be ``"mean"``, ``"sum"`` or ``"foreground"``.
        dice: the Dice term; same ``mode`` as ``focal``, reduction ``"mean"`` or ``"sum"``.
        lambda_focal: weight of the focal term, >= 0.
        lambda_dice: weight of the Dice term, >= 0 (not both 0).

    Example:
        >>> loss = FocalDiceLoss(FocalLoss(mode="softmax"), DiceLoss(mode="softmax", include_background=False))
        >>> logits, labels = torch.zeros(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4))
        >>> total, focal, dice = loss.parts(logits, labels)
        >>> torch.equal(total, focal + dice)
        True
    """

    def __init__(
        self, focal: FocalLoss, dice: DiceLoss, *, lambda_focal: float = 1.0, lambda_dice: float = 1.0
    ) -> None:
        super().__init__()
        if focal.mode != dice.mode:
            raise ValueError(f"focal mode {focal.mode!r} and Dice mode {dice.mode!r} must be the same")
        if focal.reduction == "none" or dice.reduction == "none":
            raise ValueError("the combined loss needs scalar parts: use a reduction other than 'none'")
        if lambda_focal < 0 or lambda_dice < 0 or lambda_focal == lambda_dice == 0:
            raise ValueError(f"lambdas must be >= 0 and not both 0, got {lambda_focal}, {lambda_dice}")
        self.focal = focal
        self.dice = dice
        self.lambda_focal = float(lambda_focal)
        self.lambda_dice = float(lambda_dice)

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> LossParts:
        """``(total, focal, dice)`` for ``logits`` ``(N, C, *spatial)`` and one-hot or label targets."""
        focal = self.focal(logits, target)
        dice = self.dice(logits, target)
        return LossParts(self.lambda_focal * focal + self.lambda_dice * dice, focal, dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(logits, target).total

    def extra_repr(self) -> str:
        return f"lambda_focal={self.lambda_focal}, lambda_dice={self.lambda_dice}"


def resolve_focal_reduction(reduction: str, mode: str, n_classes: int) -> str:
    """The focal reduction ``train.loss.focal_reduction`` means for a head of ``n_classes`` channels.

    ``"auto"`` is ``"foreground"`` when the head has exactly one foreground class (softmax with 2
    channels, sigmoid with 1), and ``"mean"`` otherwise; every other value is returned unchanged.

    Why: with one foreground class the foreground voxels *are* the lesion voxels, and the sum divided
    by their count (RetinaNet's normaliser) gives a lesion voxel of a batch about the weight it has in a
    lesion-only batch, so that small lesions steer the gradient (best CPM measured on the MS lesion-change
    scans). With several foreground classes the count is dominated by the largest one (an organ,
    oedema), no longer follows the lesions and only inflates the focal term against the Dice term: on
    the embedded synthetic CT (organ + lesion) the lesion class was then never learnt. Both measurements
    are in benchmarks/RESULTS.md.

    Example:
        >>> resolve_focal_reduction("auto", "softmax", 2), resolve_focal_reduction("auto", "softmax", 3)
        ('foreground', 'mean')
    """
    if reduction != "auto":
        return reduction
    single_foreground = n_classes == (2 if mode == "softmax" else 1)
    return "foreground" if single_foreground else "mean"


def build_loss(loss_cfg: LossConfig, n_classes: int) -> FocalDiceLoss:
    """The training loss from ``cfg.train.loss`` for a head with ``n_classes`` output channels.

    ``focal_reduction: auto`` is resolved here, from the head (:func:`resolve_focal_reduction`).

    Checks what the config alone cannot: softmax needs ``n_classes >= 2`` and ``alpha`` as
    ``n_classes`` class weights (a single float has no agreed softmax meaning and is rejected).

    Example:
        >>> loss = build_loss(LossConfig(), n_classes=3)  # softmax, gamma 2, Dice without background
        >>> loss.focal.mode, loss.dice.include_background, loss.dice.batch_dice
        ('softmax', False, True)

    Raises:
        ValueError: naming the ``train.loss`` key at fault.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if loss_cfg.mode == "softmax" and n_classes < 2:
        raise ValueError("train.loss.mode: softmax needs at least 2 classes (background + lesion)")
    alpha = loss_cfg.alpha
    try:
        check_alpha(alpha, loss_cfg.mode, n_classes)
    except ValueError as exc:
        raise ValueError(f"train.loss.alpha: {exc}") from None
    reduction = resolve_focal_reduction(loss_cfg.focal_reduction, loss_cfg.mode, n_classes)
    focal = FocalLoss(gamma=loss_cfg.gamma, alpha=alpha, mode=loss_cfg.mode, reduction=reduction)
    d = loss_cfg.dice
    dice = DiceLoss(
        mode=loss_cfg.mode,
        include_background=d.include_background,
        batch_dice=d.batch_dice,
        smooth_nr=d.smooth_nr,
        smooth_dr=d.smooth_dr,
    )
    return FocalDiceLoss(focal, dice, lambda_focal=loss_cfg.lambda_focal, lambda_dice=loss_cfg.lambda_dice)
