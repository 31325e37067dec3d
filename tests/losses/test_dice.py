"""Soft Dice loss against a float64 NumPy implementation and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.losses import DiceLoss, dice_loss


def ref_dice(x, y, mode, include_background, batch_dice, smooth_nr, smooth_dr):
    """D_c = 1 - (2 sum p y + s_nr) / (sum p + sum y + s_dr), unreduced: (N, C') or (C',)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if mode == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-x))
    if not include_background and p.shape[1] > 1:
        p, y = p[:, 1:], y[:, 1:]
    axes = tuple(range(2, p.ndim))
    if batch_dice:
        axes = (0, *axes)
    return 1.0 - (2.0 * (p * y).sum(axes) + smooth_nr) / (p.sum(axes) + y.sum(axes) + smooth_dr)


def random_case(seed: int, shape=(2, 3, 4, 5, 3)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, shape)
    labels = rng.integers(0, shape[1], (shape[0], 1, *shape[2:]))
    one_hot = np.moveaxis(np.eye(shape[1])[labels[:, 0]], -1, 1)
    return logits, labels, one_hot


def probs_to_logits(p) -> torch.Tensor:
    """Softmax logits giving exactly the probabilities ``p`` (N, C, *spatial)."""
    return torch.tensor(p, dtype=torch.float64).log()


@pytest.mark.parametrize("target_form", ["one_hot", "labels"])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_matches_numpy_reference(mode, include_background, batch_dice, target_form):
    logits, labels, one_hot = random_case(seed=batch_dice + 2 * include_background)
    target = torch.from_numpy(one_hot if target_form == "one_hot" else labels)
    kw = dict(mode=mode, include_background=include_background, batch_dice=batch_dice, smooth_nr=1e-5, smooth_dr=1e-4)
    expected = ref_dice(logits, one_hot, **kw)
    got = dice_loss(torch.from_numpy(logits), target, reduction="none", **kw)
    kept = 3 if include_background else 2
    assert got.shape == expected.shape == ((kept,) if batch_dice else (2, kept))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(dice_loss(torch.from_numpy(logits), target, **kw).numpy(), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        dice_loss(torch.from_numpy(logits), target, reduction="sum", **kw).numpy(), expected.sum(), rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_perfect_prediction_is_zero(mode):
    labels = torch.tensor([[[[0, 1, 2, 2], [0, 0, 1, 2]]]])  # (N=1, 1, 2, 4)
    one_hot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    logits = one_hot * 60.0 - 30.0  # p = 1 - O(1e-13) on the labelled class
    for include_background in (False, True):
        loss = dice_loss(logits, labels, mode=mode, include_background=include_background)
        assert 0.0 <= float(loss) < 1e-6
    # A wrong prediction (labels shifted by one class) is near 1.
    wrong = torch.roll(one_hot, 1, dims=1) * 60.0 - 30.0
    assert float(dice_loss(wrong, labels, mode=mode)) > 0.999


def test_include_or_exclude_background_hand_computed():
    # 4 voxels, labels (0, 0, 0, 1); every voxel predicts (background, lesion) = (0.9, 0.1); no smoothing.
    logits = probs_to_logits([[[0.9] * 4, [0.1] * 4]])
    labels = torch.tensor([[[0, 0, 0, 1]]])
    lesion = 1 - 2 * 0.1 / (0.4 + 1)  # I = 0.1, sum p = 0.4, sum y = 1: 0.8571429
    background = 1 - 2 * 2.7 / (3.6 + 3)  # I = 2.7, sum p = 3.6, sum y = 3: 0.1818182
    assert math.isclose(lesion, 0.8571429, rel_tol=1e-6) and math.isclose(background, 0.1818182, rel_tol=1e-6)
    kw = dict(mode="softmax", smooth_nr=0.0, smooth_dr=0.0)
    exclude = dice_loss(logits, labels, include_background=False, **kw)
    include = dice_loss(logits, labels, include_background=True, **kw)
    assert math.isclose(float(exclude), lesion, rel_tol=1e-12)
    assert math.isclose(float(include), (lesion + background) / 2, rel_tol=1e-12)  # 0.5194805


def test_batch_dice_versus_per_sample_hand_computed():
    # Sample A: lesion on voxels 1, 2, predicted exactly. Sample B: no lesion, predicts 0.5 on one voxel.
    p_lesion = [[0.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    eps = 1e-15  # keep log() finite; changes the sums by ~1e-15
    p = [[[max(1 - q, eps) for q in row], [max(q, eps) for q in row]] for row in p_lesion]
    logits = probs_to_logits(p)
    labels = torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]]])
    kw = dict(mode="softmax", include_background=False, smooth_nr=0.0, smooth_dr=0.0, reduction="none")
    per_sample = dice_loss(logits, labels, batch_dice=False, **kw)
    torch.testing.assert_close(per_sample, torch.tensor([[0.0], [1.0]], dtype=torch.float64), atol=1e-12, rtol=0)
    # Batch: I = 2, sum p = 2.5, sum y = 2 -> 1 - 4 / 4.5 = 1/9: the empty patch only costs its false positive.
    batch = dice_loss(logits, labels, batch_dice=True, **kw)
    torch.testing.assert_close(batch, torch.tensor([1 / 9], dtype=torch.float64), atol=1e-12, rtol=0)


def test_single_channel_sigmoid_keeps_its_channel():
    logits, _, _ = random_case(seed=9, shape=(2, 1, 4, 4, 2))
    mask = torch.from_numpy((np.random.default_rng(1).random(logits.shape) < 0.3).astype(np.float64))
    x = torch.from_numpy(logits)
    a = dice_loss(x, mask, include_background=False)
    b = dice_loss(x, mask, include_background=True)
    assert torch.equal(a, b)
    expected = ref_dice(logits, mask.numpy(), "sigmoid", True, False, 1e-5, 1e-5).mean()
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-5)


def test_autocast_and_float32():
    logits, labels, one_hot = random_case(seed=4)
    x = torch.from_numpy(logits).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dice_loss(x, torch.from_numpy(labels), mode="softmax", batch_dice=True)
    assert loss.dtype == torch.float32
    expected = ref_dice(x.double().numpy(), one_hot, "softmax", True, True, 1e-5, 1e-5).mean()
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_module_matches_functional():
    logits, labels, _ = random_case(seed=5)
    x, t = torch.from_numpy(logits), torch.from_numpy(labels)
    module = DiceLoss(mode="softmax", include_background=False, batch_dice=True, smooth_nr=0.0, smooth_dr=1e-3)
    expected = dice_loss(x, t, mode="softmax", include_background=False, batch_dice=True, smooth_nr=0.0, smooth_dr=1e-3)
    assert torch.equal(module(x, t), expected)
    assert module.state_dict() == {}
    with pytest.raises(ValueError, match="reduction"):
        DiceLoss(reduction="foreground")
