"""Focal loss against a float64 NumPy implementation of the formulas, hand-computed cases and torch's
(B)CE; numerics at +-1e4, under autocast and on saturated voxels; MONAI's pitfalls avoided."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import FocalLoss, focal_loss

C = 3  # background, organ, lesion
SOFTMAX_ALPHA = (0.25, 1.0, 4.0)


def ref_focal(x: np.ndarray, y: np.ndarray, gamma: float, alpha, mode: str, reduction: str) -> np.ndarray:
    """The issue's formulas, written directly in float64 NumPy (y one-hot (N, C, *spatial))."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if mode == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-x))
        a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
        loss = -(y * a_pos * (1 - p) ** gamma * np.log(p) + (1 - y) * a_neg * p**gamma * np.log(1 - p))
    else:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        a = np.ones(x.shape[1]) if alpha is None else np.asarray(alpha, np.float64)
        a = a.reshape(1, -1, *([1] * (x.ndim - 2)))
        loss = -(y * a * (1 - p) ** gamma * np.log(p)).sum(axis=1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    foreground = (y[:, 0] < 0.5).sum() if y.shape[1] > 1 else (y[:, 0] >= 0.5).sum()
    return loss.sum() / max(1, foreground)


def random_case(seed: int, shape=(2, C, 4, 5, 3)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.5, shape)
    labels = rng.integers(0, shape[1], (shape[0], 1, *shape[2:]))
    one_hot = np.moveaxis(np.eye(shape[1])[labels[:, 0]], -1, 1)
    return logits, labels, one_hot


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "foreground"])
@pytest.mark.parametrize("target_form", ["one_hot", "labels"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
@pytest.mark.parametrize(
    ("mode", "alpha"),
    [("sigmoid", None), ("sigmoid", 0.25), ("sigmoid", 0.8), ("softmax", None), ("softmax", SOFTMAX_ALPHA)],
)
def test_matches_numpy_reference(mode, alpha, gamma, target_form, reduction):
    logits, labels, one_hot = random_case(seed=int(gamma * 10) + len(reduction))
    target = torch.from_numpy(one_hot) if target_form == "one_hot" else torch.from_numpy(labels)
    got = focal_loss(torch.from_numpy(logits), target, gamma=gamma, alpha=alpha, mode=mode, reduction=reduction)
    expected = ref_focal(logits, one_hot, gamma, alpha, mode, reduction)
    assert got.dtype == torch.float64
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_float32_matches_reference(mode):
    logits, labels, one_hot = random_case(seed=7)
    got = focal_loss(torch.from_numpy(logits).float(), torch.from_numpy(labels), mode=mode, reduction="none")
    assert got.dtype == torch.float32
    expected = ref_focal(logits.astype(np.float32), one_hot, 2.0, None, mode, "none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_binary_single_channel_sigmoid():
    # C == 1: the target is the binary mask itself; foreground = mask voxels.
    logits, _, _ = random_case(seed=3, shape=(2, 1, 4, 4, 2))
    mask = (np.random.default_rng(4).random(logits.shape) < 0.2).astype(np.float64)
    for reduction in ("none", "foreground"):
        got = focal_loss(torch.from_numpy(logits), torch.from_numpy(mask), alpha=0.25, reduction=reduction)
        np.testing.assert_allclose(got.numpy(), ref_focal(logits, mask, 2.0, 0.25, "sigmoid", reduction), rtol=1e-5)


def test_gamma_zero_is_bce_with_logits():
    logits, labels, one_hot = random_case(seed=11)
    x, y = torch.from_numpy(logits), torch.from_numpy(one_hot)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(focal_loss(x, y, gamma=0.0, reduction="none"), bce, rtol=1e-12, atol=0)
    a = 0.25
    weighted = F.binary_cross_entropy_with_logits(x, y, weight=a * y + (1 - a) * (1 - y), reduction="none")
    torch.testing.assert_close(focal_loss(x, y, gamma=0.0, alpha=a, reduction="none"), weighted, rtol=1e-12, atol=0)


def test_gamma_zero_is_cross_entropy():
    logits, labels, _ = random_case(seed=12)
    x, t = torch.from_numpy(logits), torch.from_numpy(labels)
    ce = F.cross_entropy(x, t[:, 0], reduction="none")
    torch.testing.assert_close(focal_loss(x, t, gamma=0.0, mode="softmax", reduction="none"), ce, rtol=1e-12, atol=0)
    w = torch.tensor(SOFTMAX_ALPHA, dtype=torch.float64)
    wce = F.cross_entropy(x, t[:, 0], weight=w, reduction="none")  # per voxel: w[label] * CE
    got = focal_loss(x, t, gamma=0.0, alpha=SOFTMAX_ALPHA, mode="softmax", reduction="none")
    torch.testing.assert_close(got, wce, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_easy_voxel_is_down_weighted_to_one_percent(mode):
    # p_t = 0.9, gamma = 2: focal / CE = (1 - 0.9)^2 = 0.01.
    if mode == "sigmoid":
        x = torch.tensor([[[math.log(9.0), -math.log(9.0)]]], dtype=torch.float64)  # p = 0.9 and 0.1
        y = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)  # both have p_t = 0.9
    else:
        x = torch.tensor([[[math.log(9.0)], [0.0]]], dtype=torch.float64)  # softmax -> (0.9, 0.1)
        y = torch.tensor([[[0]]])
    focal = focal_loss(x, y, gamma=2.0, mode=mode, reduction="none")
    ce = focal_loss(x, y, gamma=0.0, mode=mode, reduction="none")
    torch.testing.assert_close(ce, torch.full_like(ce, -math.log(0.9)), rtol=1e-12, atol=0)
    torch.testing.assert_close(focal / ce, torch.full_like(ce, 0.01), rtol=1e-10, atol=0)


def test_three_class_hand_computed():
    # One voxel each of background, organ, lesion; every voxel predicts p = (0.7, 0.2, 0.1).
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    logits = p.log().view(1, 3, 1).expand(1, 3, 3).contiguous()
    labels = torch.tensor([[[0, 1, 2]]])
    a = SOFTMAX_ALPHA
    expected = torch.tensor(
        [
            -a[0] * (1 - 0.7) ** 2 * math.log(0.7),  # 0.0080252: easy background, alpha 0.25
            -a[1] * (1 - 0.2) ** 2 * math.log(0.2),  # 1.0300403
            -a[2] * (1 - 0.1) ** 2 * math.log(0.1),  # 7.4603757: hard lesion, alpha 4
        ],
        dtype=torch.float64,
    )
    assert math.isclose(float(expected.sum()), 8.4984412, rel_tol=1e-7)
    kw = dict(gamma=2.0, alpha=a, mode="softmax")
    torch.testing.assert_close(focal_loss(logits, labels, reduction="none", **kw)[0], expected)
    torch.testing.assert_close(focal_loss(logits, labels, reduction="sum", **kw), expected.sum())
    torch.testing.assert_close(focal_loss(logits, labels, reduction="mean", **kw), expected.sum() / 3)
    # Foreground = non-background voxels: organ and lesion -> 2.
    torch.testing.assert_close(focal_loss(logits, labels, reduction="foreground", **kw), expected.sum() / 2)


def test_foreground_reduction_without_foreground_divides_by_one():
    logits, _, _ = random_case(seed=5)
    x = torch.from_numpy(logits)
    background = torch.zeros(2, 1, 4, 5, 3, dtype=torch.long)
    for mode in ("sigmoid", "softmax"):
        total = focal_loss(x, background, mode=mode, reduction="sum")
        assert torch.equal(focal_loss(x, background, mode=mode, reduction="foreground"), total)


def test_per_class_alpha_is_applied_not_dropped():
    # MONAI pitfall: softmax + include_background=False silently drops alpha. Here each voxel's loss is
    # exactly alpha[its class] times the unweighted one.
    logits, labels, _ = random_case(seed=21)
    x, t = torch.from_numpy(logits), torch.from_numpy(labels)
    plain = focal_loss(x, t, mode="softmax", reduction="none")
    weighted = focal_loss(x, t, alpha=SOFTMAX_ALPHA, mode="softmax", reduction="none")
    per_voxel_alpha = torch.tensor(SOFTMAX_ALPHA, dtype=torch.float64)[t[:, 0]]
    torch.testing.assert_close(weighted, per_voxel_alpha * plain, rtol=1e-12, atol=0)
    assert not torch.allclose(weighted.mean(), plain.mean())
    # Only-lesion weights: the loss is the lesion voxels' share alone.
    lesion_only = focal_loss(x, t, alpha=(0.0, 0.0, 1.0), mode="softmax", reduction="sum")
    torch.testing.assert_close(lesion_only, plain[t[:, 0] == 2].sum(), rtol=1e-12, atol=0)


def test_sigmoid_alpha_weights_positives_and_negatives():
    logits, _, one_hot = random_case(seed=22)
    x, y = torch.from_numpy(logits), torch.from_numpy(one_hot)
    plain = focal_loss(x, y, reduction="none")
    # alpha = 0.5 halves every element; alpha = 1 keeps only positives; alpha = 0 only negatives.
    torch.testing.assert_close(focal_loss(x, y, alpha=0.5, reduction="none"), 0.5 * plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(focal_loss(x, y, alpha=1.0, reduction="none"), plain * y, rtol=1e-12, atol=0)
    torch.testing.assert_close(focal_loss(x, y, alpha=0.0, reduction="none"), plain * (1 - y), rtol=1e-12, atol=0)


def test_agrees_with_monai_sigmoid_focal_where_monai_is_right():
    from monai.losses import FocalLoss as MonaiFocalLoss

    logits, labels, _ = random_case(seed=31)
    x, t = torch.from_numpy(logits), torch.from_numpy(labels)
    monai = MonaiFocalLoss(include_background=True, to_onehot_y=True, gamma=2.0, alpha=0.25, reduction="mean")
    expected = monai(x, t).double()  # MONAI 1.6 returns float32 here even for float64 input
    torch.testing.assert_close(focal_loss(x, t, alpha=0.25), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize(("mode", "alpha"), [("sigmoid", 0.25), ("softmax", SOFTMAX_ALPHA)])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck(mode, alpha, gamma, labels):
    logits, lab, one_hot = random_case(seed=41, shape=(1, C, 2, 3))
    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(lab if labels else one_hot)
    assert torch.autograd.gradcheck(
        lambda z: focal_loss(z, t, gamma=gamma, alpha=alpha, mode=mode, reduction="sum"), (x,)
    )


def extreme_case(dtype: torch.dtype):
    """Every voxel at +-1e4: voxel 0 confidently right, voxel 1 confidently wrong (label 2 both)."""
    x = torch.empty(1, 3, 2, dtype=dtype)  # (N=1, C=3, 2 voxels)
    x[0, :, 0] = torch.tensor([-1e4, -1e4, 1e4])  # right: lesion
    x[0, :, 1] = torch.tensor([1e4, -1e4, -1e4])  # wrong: background
    return x, torch.tensor([[[2, 2]]])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_extreme_logits_finite_and_right(mode, dtype, gamma):
    x, t = extreme_case(dtype)
    x.requires_grad_()
    loss = focal_loss(x, t, gamma=gamma, mode=mode, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    if mode == "softmax":
        # right voxel: 0; wrong voxel: -log p_lesion = 2e4, modulating factor 1.
        torch.testing.assert_close(loss[0], torch.tensor([0.0, 2e4], dtype=dtype))
    else:
        # Per channel: right -> 0, wrong -> 1e4 (p_t = sigmoid(-1e4)). Voxel 1 is wrong in channels 0, 2.
        torch.testing.assert_close(loss[0], torch.tensor([[0.0, 1e4], [0.0, 0.0], [0.0, 1e4]], dtype=dtype))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("mode", "alpha"), [("sigmoid", 0.25), ("softmax", SOFTMAX_ALPHA)])
def test_autocast_extreme_logits(mode, alpha, amp_dtype):
    leaf, t = extreme_case(torch.float32)
    leaf.requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        logits = leaf.to(amp_dtype)  # what a network under autocast hands the loss
        loss = focal_loss(logits, t, gamma=0.5, alpha=alpha, mode=mode)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    # Autocast does not change the maths: same as the half-precision logits in float32 outside it.
    torch.testing.assert_close(loss.detach(), focal_loss(logits.detach().float(), t, gamma=0.5, alpha=alpha, mode=mode))


def test_autocast_network_output_matches_float32():
    conv = torch.nn.Conv3d(1, C, 1)
    image = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, C, (2, 1, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image) * 50
        loss = focal_loss(logits, labels, gamma=2.0, alpha=SOFTMAX_ALPHA, mode="softmax")
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = focal_loss(logits.detach().float(), labels, gamma=2.0, alpha=SOFTMAX_ALPHA, mode="softmax")
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_voxels_gamma_below_one_have_finite_gradients(dtype):
    # p = 1 exactly: d(1-p)^gamma/dp is infinite for gamma < 1 (MONAI's softmax form gives NaN here).
    x = torch.tensor([[[800.0], [0.0], [0.0]]], dtype=dtype, requires_grad=True)
    assert torch.softmax(x, 1)[0, 0, 0] == 1.0
    loss = focal_loss(x, torch.tensor([[[0]]]), gamma=0.5, mode="softmax")
    loss.backward()
    assert loss == 0.0 and torch.isfinite(x.grad).all()

    s = torch.tensor([[[40.0], [-40.0]]], dtype=dtype, requires_grad=True)  # sigmoid(40) == 1 in float32
    loss = focal_loss(s, torch.tensor([[[1.0], [0.0]]], dtype=dtype), gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_no_device_assumptions_meta_device():
    # On the meta device any CPU-built tensor (e.g. alpha) would raise: alpha must follow the logits.
    x = torch.empty(2, C, 4, 4, 4, device="meta")
    y = torch.empty(2, C, 4, 4, 4, device="meta")
    for mode, alpha in (("softmax", SOFTMAX_ALPHA), ("sigmoid", 0.25)):
        loss = focal_loss(x, y, alpha=alpha, mode=mode, reduction="foreground")
        assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_alpha_and_autocast():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    logits, labels, _ = random_case(seed=51)
    x, t = torch.from_numpy(logits).float(), torch.from_numpy(labels)
    for mode, alpha in (("softmax", SOFTMAX_ALPHA), ("sigmoid", 0.25)):
        expected = focal_loss(x, t, alpha=alpha, mode=mode)
        xd = x.to(device).requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            got = focal_loss(xd.half(), t.to(device), alpha=alpha, mode=mode)
        got.backward()
        assert got.device == device and torch.isfinite(xd.grad).all()
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-3)


def test_module_matches_functional_and_validates():
    logits, labels, _ = random_case(seed=61)
    x, t = torch.from_numpy(logits), torch.from_numpy(labels)
    module = FocalLoss(gamma=1.5, alpha=SOFTMAX_ALPHA, mode="softmax", reduction="foreground")
    expected = focal_loss(x, t, gamma=1.5, alpha=SOFTMAX_ALPHA, mode="softmax", reduction="foreground")
    assert torch.equal(module(x, t), expected)
    assert module.state_dict() == {}
    with pytest.raises(ValueError, match="one weight per class"):
        FocalLoss(alpha=0.25, mode="softmax")
    with pytest.raises(ValueError, match="one float"):
        FocalLoss(alpha=(0.25, 0.75), mode="sigmoid")
    with pytest.raises(ValueError, match="3 class weights"):
        focal_loss(x, t, alpha=(1.0, 2.0), mode="softmax")
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(x, t, gamma=-1.0)
    with pytest.raises(ValueError, match="target"):
        focal_loss(x, t[:, :, :2])
