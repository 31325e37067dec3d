"""Focal loss (Lin et al., 2017, "Focal Loss for Dense Object Detection") per voxel, sigmoid or softmax.

Why not MONAI's: its focal term in ``DiceFocalLoss`` is always the sigmoid form, its ``alpha`` is one
number, a scalar alpha is silently dropped with ``include_background=False``, and its softmax form has
NaN gradients for ``gamma < 1`` on saturated voxels (MONAI issues 8242, 8117). Here the softmax form
takes one weight per class, and everything is computed in log space with a finite floor on
``log(1 - p)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses._common import Mode, as_one_hot, check_mode, compute_dtype, foreground_mask, no_autocast

FocalReduction = Literal["none", "mean", "sum", "foreground"]
FOCAL_REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum", "foreground")
Alpha = float | Sequence[float] | torch.Tensor | None

_LN2 = math.log(2.0)


def check_alpha(alpha: Alpha, mode: str, n_classes: int) -> None:
    """Validate ``alpha`` for ``mode``: a float in [0, 1] (sigmoid), ``n_classes`` weights >= 0 (softmax).

    Raises:
        ValueError: with what was expected.
    """
    check_mode(mode)
    if alpha is None:
        return
    if mode == "sigmoid":
        if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"sigmoid focal loss takes alpha as one float in [0, 1] (or None), got {alpha!r}")
        return
    if isinstance(alpha, (int, float)):
        # A scalar has no agreed meaning for softmax (MONAI maps it to 1-a for channel 0, a for the rest).
        raise ValueError(f"softmax focal loss takes alpha as one weight per class (or None), got {alpha!r}")
    weights = torch.as_tensor(alpha, dtype=torch.float64)
    if weights.ndim != 1 or weights.numel() != n_classes:
        raise ValueError(f"softmax focal loss needs {n_classes} class weights in alpha, got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError(f"class weights in alpha must be finite and >= 0, got {alpha!r}")


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate on both sides of ``-log 2`` (Maechler, 2012).

    Both branches of ``torch.where`` are evaluated and both receive gradients (zeros for the discarded
    one), so each branch is fed only inputs where it is finite: otherwise ``0 * inf = NaN`` leaks in.
    """
    near = a > -_LN2
    a_near = torch.where(near, a, -_LN2)
    a_far = torch.where(near, -_LN2, a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def _reduce(loss: torch.Tensor, one_hot: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    # As the paper divides by the number of anchors assigned to a ground-truth box: the sum over all
    # voxels (easy negatives included) divided by the number of foreground voxels, at least 1 so that a
    # lesion-free batch neither divides by zero nor inflates the loss.
    count = foreground_mask(one_hot).sum().to(loss.dtype)
    return loss.sum() / count.clamp_min(1.0)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: Alpha = None,
    mode: Mode = "sigmoid",
    reduction: FocalReduction = "mean",
) -> torch.Tensor:
    r"""Focal loss of ``logits`` against ``target``, sigmoid (per channel) or softmax (over channels).

    Sigmoid, each channel a binary problem, ``p = sigmoid(x)``, per element:

        FL = -[ y * a * (1 - p)^gamma * log(p) + (1 - y) * (1 - a) * p^gamma * log(1 - p) ]

    with ``a = alpha`` (positives) and ``1 - a`` (negatives), as in the paper and torchvision; with
    ``alpha=None`` both weights are 1 (not 0.5).

    Softmax, ``p = softmax(x)`` over the C channels, per voxel:

        FL = -sum_c y_c * a_c * (1 - p_c)^gamma * log(p_c)

    with ``a_c = alpha[c]`` (all 1 when ``alpha=None``). ``gamma = 0`` gives exactly (alpha-weighted)
    binary cross-entropy / cross-entropy; at ``p_t = 0.9`` and ``gamma = 2`` an easy voxel weighs
    ``(1 - 0.9)^2 = 0.01`` of its cross-entropy.

    Numerics: ``log p`` is ``logsigmoid(x)`` / ``log_softmax(x)`` and the modulating factor is
    ``exp(gamma * log(1 - p))`` with ``log(1 - p) = logsigmoid(-x)`` (sigmoid) or
    ``log1mexp(log p_c)`` (softmax), where ``log p_c`` is first capped at ``-tiny`` (the smallest normal
    number of the dtype) so that ``log(1 - p_c) >= log(tiny)`` (about -87 in float32): a saturated
    voxel with ``p_c = 1`` exactly then has a finite gradient for every ``gamma >= 0``, also below 1.
    Loss and gradients are finite for logits up to +-1e4. Half/bfloat16 logits (autocast) are computed
    in float32 and float64 in float64; the result has that dtype.

    Args:
        logits: ``(N, C, *spatial)`` raw network outputs.
        target: one-hot / binary ``(N, C, *spatial)``, or integer labels ``(N, 1, *spatial)`` in
            ``[0, C)`` (one-hot encoded to C channels, in sigmoid mode too).
        gamma: focusing parameter, ``>= 0``.
        alpha: sigmoid: one float in [0, 1] or None; softmax: C class weights (>= 0) or None.
        mode: ``"sigmoid"`` or ``"softmax"`` (softmax needs ``C >= 2``).
        reduction: ``"none"`` -> ``(N, C, *spatial)`` (sigmoid) or ``(N, *spatial)`` (softmax);
            ``"sum"``; ``"mean"`` (mean of the ``"none"`` tensor); ``"foreground"``: the sum divided by
            ``max(1, number of foreground voxels)``, foreground being target voxels that are not
            background (label != 0 when ``C > 1``; mask == 1 when ``C == 1``), over the whole batch.

    Returns:
        The loss, a scalar unless ``reduction="none"``.

    Example:
        >>> logits = torch.tensor([[[math.log(9.0)], [0.0]]])  # (N=1, C=2, 1 voxel): p = (0.9, 0.1)
        >>> labels = torch.zeros(1, 1, 1, dtype=torch.long)
        >>> round(float(focal_loss(logits, labels, mode="softmax")), 6)  # 0.01 * -log(0.9)
        0.001054
    """
    check_mode(mode)
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if reduction not in FOCAL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FOCAL_REDUCTIONS}, got {reduction!r}")
    if logits.ndim < 2:
        raise ValueError(f"logits must be (N, C, *spatial), got {tuple(logits.shape)}")
    n_classes = logits.shape[1]
    if mode == "softmax" and n_classes < 2:
        raise ValueError("softmax focal loss needs at least 2 channels; use mode='sigmoid' for one")
    check_alpha(alpha, mode, n_classes)

    dtype = compute_dtype(logits)
    with no_autocast(logits.device):
        x = logits.to(dtype)
        y = as_one_hot(target, logits, dtype)
        if mode == "sigmoid":
            loss = _sigmoid_focal(x, y, gamma, alpha)
        else:
            loss = _softmax_focal(x, y, gamma, alpha)
        return _reduce(loss, y, reduction)


def _sigmoid_focal(x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: Alpha) -> torch.Tensor:
    log_p = F.logsigmoid(x)
    log_q = F.logsigmoid(-x)  # log(1 - p), finite for any finite x
    if gamma == 0:  # skip exp(0 * log): exact cross-entropy, and no work
        pos, neg = log_p, log_q
    else:
        pos = torch.exp(gamma * log_q) * log_p
        neg = torch.exp(gamma * log_p) * log_q
    if alpha is None:
        return -(y * pos + (1 - y) * neg)
    a = float(alpha)
    return -(a * y * pos + (1 - a) * (1 - y) * neg)


def _softmax_focal(x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: Alpha) -> torch.Tensor:
    log_p = F.log_softmax(x, dim=1)
    if gamma == 0:
        term = log_p
    else:
        # Cap p_c below 1 (in log space) so that log(1 - p_c) stays finite where p_c rounds to 1.
        tiny = torch.finfo(x.dtype).tiny
        log_q = log1mexp(log_p.clamp(max=-tiny))
        term = torch.exp(gamma * log_q) * log_p
    weights = y
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        weights = y * a.view(1, -1, *([1] * (x.ndim - 2)))
    return -(weights * term).sum(dim=1)


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a module; holds only the hyper-parameters (no buffers, no state).

    Example:
        >>> loss = FocalLoss(gamma=2.0, alpha=(0.25, 1.0, 4.0), mode="softmax")
        >>> logits, labels = torch.zeros(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4))
        >>> loss(logits, labels).shape
        torch.Size([])
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        mode: Mode = "sigmoid",
        reduction: FocalReduction = "mean",
    ) -> None:
        super().__init__()
        check_mode(mode)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if reduction not in FOCAL_REDUCTIONS:
            raise ValueError(f"reduction must be one of {FOCAL_REDUCTIONS}, got {reduction!r}")
        if alpha is not None:  # the number of classes is only known in forward: check the form here
            check_alpha(alpha, mode, len(alpha) if isinstance(alpha, Sequence) else 1)
        self.gamma = float(gamma)
        # A plain tuple, not a buffer: the alpha tensor is built on the logits' device in each call, so
        # the module never needs .to(device) and has an empty state_dict.
        self.alpha = tuple(float(a) for a in alpha) if isinstance(alpha, Sequence) else alpha
        self.mode = mode
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            logits, target, gamma=self.gamma, alpha=self.alpha, mode=self.mode, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}"
