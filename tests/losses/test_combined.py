"""The combined loss: the weighted sum of its parts, built from the config, stateless in forward."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import DiceConfig, LossConfig
from pipeline.losses import DiceLoss, FocalDiceLoss, FocalLoss, LossParts, build_loss, dice_loss, focal_loss
from pipeline.losses.combined import resolve_focal_reduction


def case(seed: int = 0, n_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, n_classes, 4, 4, 3, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, n_classes, (2, 1, 4, 4, 3), generator=g)
    return logits, labels


def test_total_is_weighted_sum_of_parts():
    logits, labels = case()
    alpha = (0.25, 1.0, 4.0)
    loss = FocalDiceLoss(
        FocalLoss(gamma=2.0, alpha=alpha, mode="softmax", reduction="foreground"),
        DiceLoss(mode="softmax", include_background=False, batch_dice=True),
        lambda_focal=0.7,
        lambda_dice=1.3,
    )
    parts = loss.parts(logits, labels)
    assert isinstance(parts, LossParts)
    focal = focal_loss(logits, labels, gamma=2.0, alpha=alpha, mode="softmax", reduction="foreground")
    dice = dice_loss(logits, labels, mode="softmax", include_background=False, batch_dice=True)
    assert torch.equal(parts.focal, focal) and torch.equal(parts.dice, dice)
    torch.testing.assert_close(parts.total, 0.7 * focal + 1.3 * dice, rtol=1e-15, atol=0)
    assert torch.equal(loss(logits, labels), parts.total)


def test_forward_does_not_change_module_state():
    loss = build_loss(LossConfig(alpha=(0.5, 1.0, 2.0)), n_classes=3)
    modules_before = {name: copy.deepcopy(vars(m)) for name, m in loss.named_modules()}
    state_before = copy.deepcopy(loss.state_dict())
    logits, labels = case()
    logits.requires_grad_()
    for _ in range(2):
        loss.parts(logits, labels).total.backward()
        loss(logits, labels)
    modules_after = {name: vars(m) for name, m in loss.named_modules()}
    assert modules_after.keys() == modules_before.keys()
    for name, before in modules_before.items():
        assert modules_after[name].keys() == before.keys(), f"attributes added or removed on {name!r}"
        for key, value in before.items():
            if key in ("_modules", "_parameters", "_buffers"):
                assert list(modules_after[name][key]) == list(value)
            else:
                assert modules_after[name][key] == value, f"{name}.{key} changed"
    assert state_before == {} and loss.state_dict() == {}  # no tensors held at all


def test_build_loss_uses_config_defaults():
    cfg = LossConfig()  # softmax, gamma 2, alpha None, lambdas 1/1, Dice without background, batch Dice
    loss = build_loss(cfg, n_classes=3)
    assert (loss.focal.mode, loss.focal.gamma, loss.focal.alpha, loss.focal.reduction) == ("softmax", 2.0, None, "mean")
    assert (loss.lambda_focal, loss.lambda_dice) == (1.0, 1.0)
    assert loss.dice.mode == "softmax" and not loss.dice.include_background and loss.dice.batch_dice
    logits, labels = case()
    logits.requires_grad_()
    total, focal, dice = loss.parts(logits, labels)  # (N, 1, *spatial) integer labels, as training passes
    expected_focal = focal_loss(logits, labels, mode="softmax")
    expected_dice = dice_loss(logits, labels, mode="softmax", include_background=False, batch_dice=True)
    torch.testing.assert_close(focal, expected_focal)
    torch.testing.assert_close(dice, expected_dice)
    torch.testing.assert_close(total, expected_focal + expected_dice)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_build_loss_sigmoid_from_config_with_integer_labels():
    cfg = LossConfig(
        mode="sigmoid",
        gamma=1.0,
        alpha=0.25,
        focal_reduction="foreground",
        lambda_focal=2.0,
        lambda_dice=0.5,
        dice=DiceConfig(include_background=True, batch_dice=False, smooth_nr=0.0, smooth_dr=1e-3),
    )
    loss = build_loss(cfg, n_classes=3)
    logits, labels = case(seed=1)
    one_hot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1)  # labels -> 3 sigmoid channels
    focal = focal_loss(logits, one_hot, gamma=1.0, alpha=0.25, mode="sigmoid", reduction="foreground")
    dice = dice_loss(logits, one_hot, mode="sigmoid", include_background=True, smooth_nr=0.0, smooth_dr=1e-3)
    total, f, d = loss.parts(logits, labels)
    torch.testing.assert_close(f, focal)
    torch.testing.assert_close(d, dice)
    torch.testing.assert_close(total, 2.0 * focal + 0.5 * dice)


@pytest.mark.parametrize(
    ("mode", "n_classes", "expected"),
    [("softmax", 2, "foreground"), ("softmax", 3, "mean"), ("softmax", 4, "mean"),
     ("sigmoid", 1, "foreground"), ("sigmoid", 2, "mean")],
)
def test_auto_focal_reduction_divides_by_the_lesion_voxels_only_for_one_foreground_class(mode, n_classes, expected):
    assert LossConfig().focal_reduction == "auto"
    assert resolve_focal_reduction("auto", mode, n_classes) == expected
    loss = build_loss(LossConfig(mode=mode), n_classes=n_classes)
    assert loss.focal.reduction == expected
    # the built term is that reduction's, computed: binary labels for one channel, class labels otherwise
    logits, labels = case(seed=3, n_classes=max(n_classes, 2))
    logits = logits[:, :n_classes]
    labels = labels.clamp(max=n_classes - 1) if n_classes > 1 else (labels > 0).to(labels.dtype)
    torch.testing.assert_close(loss.parts(logits, labels).focal,
                               focal_loss(logits, labels, mode=mode, reduction=expected))


@pytest.mark.parametrize("explicit", ["mean", "sum", "foreground"])
def test_an_explicit_focal_reduction_is_kept_for_every_head(explicit):
    for mode, n_classes in (("softmax", 2), ("softmax", 3), ("sigmoid", 1)):
        assert resolve_focal_reduction(explicit, mode, n_classes) == explicit
        loss = build_loss(LossConfig(mode=mode, focal_reduction=explicit), n_classes=n_classes)
        assert loss.focal.reduction == explicit


def test_build_loss_per_class_alpha_reaches_the_focal_term():
    logits, labels = case(seed=2)
    weighted = build_loss(LossConfig(alpha=(0.25, 1.0, 4.0)), n_classes=3).parts(logits, labels).focal
    plain = build_loss(LossConfig(), n_classes=3).parts(logits, labels).focal
    expected = focal_loss(logits, labels, alpha=(0.25, 1.0, 4.0), mode="softmax")
    torch.testing.assert_close(weighted, expected)
    assert not torch.allclose(weighted, plain)


def test_build_loss_rejects_what_the_config_cannot_check():
    with pytest.raises(ValueError, match="train.loss.alpha"):
        build_loss(LossConfig(alpha=(1.0, 2.0)), n_classes=3)  # 2 weights for 3 classes
    with pytest.raises(ValueError, match="train.loss.alpha"):
        build_loss(LossConfig(alpha=0.25), n_classes=3)  # softmax needs class weights
    with pytest.raises(ValueError, match="train.loss.mode"):
        build_loss(LossConfig(), n_classes=1)
    with pytest.raises(ValueError, match="same"):
        FocalDiceLoss(FocalLoss(mode="softmax"), DiceLoss(mode="sigmoid"))
    with pytest.raises(ValueError, match="scalar"):
        FocalDiceLoss(FocalLoss(reduction="none"), DiceLoss())
