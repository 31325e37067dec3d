"""Losses for rare lesions: per-voxel focal loss (sigmoid or softmax), soft Dice, and their sum.

``build_loss(cfg.train.loss, n_classes)`` gives the training loss; see ``docs/losses.md``.
"""

from pipeline.losses.combined import FocalDiceLoss, LossParts, build_loss
from pipeline.losses.dice import DiceLoss, dice_loss
from pipeline.losses.focal import FocalLoss, focal_loss

__all__ = ["DiceLoss", "FocalDiceLoss", "FocalLoss", "LossParts", "build_loss", "dice_loss", "focal_loss"]
