"""Prior-probability initialisation: biases from the formulas, and small MONAI networks that really
start at lesion probability pi."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import DynUNet, UNet

from pipeline.model.prior_init import class_priors, find_head_conv, find_head_convs, init_prior_bias, prior_biases

PI = 0.01
LESION = 2  # classes: background, organ, lesion


def small_unet(num_res_units: int = 1, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=num_res_units)


def small_dynunet(seed: int = 0) -> DynUNet:
    torch.manual_seed(seed)
    return DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                   filters=(8, 16, 32), deep_supervision=True, deep_supr_num=1)


def random_image(shape=(2, 1, 24, 24, 24)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def mean_probability(logits: torch.Tensor, mode: str, channel: int = LESION) -> float:
    p = torch.softmax(logits, dim=1) if mode == "softmax" else torch.sigmoid(logits)
    return float(p[:, channel].mean())


def test_biases_from_the_formulas():
    # Sigmoid, paper: b = -log((1 - pi) / pi) = -log(99) = -4.59512.
    assert prior_biases(PI, "sigmoid", 1) == pytest.approx([-math.log(99.0)], rel=1e-12)
    assert prior_biases(PI, "sigmoid", 1)[0] == pytest.approx(-4.59512, abs=1e-5)
    # Softmax, 3 classes, lesion = 2: q = (0.495, 0.495, 0.01) and softmax(log q) = q.
    assert class_priors(PI, 3, lesion_classes=(LESION,)) == pytest.approx([0.495, 0.495, 0.01])
    b = torch.tensor(prior_biases(PI, "softmax", 3, lesion_classes=(LESION,)), dtype=torch.float64)
    torch.testing.assert_close(torch.softmax(b, 0), torch.tensor([0.495, 0.495, 0.01], dtype=torch.float64))
    # Default lesion classes = all but background: 0.01 each, background 0.98.
    assert class_priors(PI, 3) == pytest.approx([0.98, 0.01, 0.01])
    with pytest.raises(ValueError):
        prior_biases(PI, "softmax", 2, lesion_classes=(0, 1))  # softmax needs a non-lesion class
    with pytest.raises(ValueError):
        class_priors(0.6, 3, lesion_classes=(1, 2))  # 2 * 0.6 > 1


def test_fresh_unet_is_far_from_the_prior():
    # The premise: without prior init a 3-class head starts near 1/3, not 0.01.
    with torch.no_grad():
        p = mean_probability(small_unet().eval()(random_image()), "softmax")
    assert p > 0.2


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_res_units", [1, 0])
def test_initialised_unet_starts_at_the_prior(mode, num_res_units):
    net = small_unet(num_res_units)
    init_prior_bias(net, PI, mode, 3, lesion_classes=(LESION,))
    with torch.no_grad():
        logits = net.eval()(random_image())
    p = mean_probability(logits, mode)
    assert abs(p - PI) < 0.1 * PI, p
    # The other classes share the rest: 0.495 each.
    assert abs(mean_probability(logits, mode, channel=0) - 0.495) < 0.1 * 0.495


def test_residual_skip_must_be_cancelled():
    # MONAI UNet (num_res_units >= 1) ends in x + conv(x). Initialising only the bare conv leaves the
    # identity skip in the logits and the start is more than 20% above pi: why the model is passed.
    net = small_unet(1)
    init_prior_bias(find_head_conv(net), PI, "softmax", 3, lesion_classes=(LESION,))
    with torch.no_grad():
        p = mean_probability(net.eval()(random_image()), "softmax")
    assert p > 1.2 * PI, p


def test_trunk_still_gets_gradients():
    net = small_unet(1)
    init_prior_bias(net, PI, "softmax", 3, lesion_classes=(LESION,))
    labels = torch.zeros(2, 24, 24, 24, dtype=torch.long)
    labels[:, 8:12, 8:12, 8:12] = LESION
    torch.nn.functional.cross_entropy(net(random_image()), labels).backward()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_find_head_conv_unet():
    net = small_unet(1)
    assert find_head_conv(net) is net.model[2][1].conv.unit0.conv  # Conv3d inside the last ResidualUnit
    net0 = small_unet(0)
    assert isinstance(find_head_conv(net0), torch.nn.ConvTranspose3d)  # no res units: a transposed conv
    assert find_head_conv(net0) is net0.model[2].conv


def test_dynunet_with_deep_supervision():
    net = small_dynunet()
    heads = find_head_convs(net)
    # The main head first, though the supervision head is registered after it.
    assert find_head_conv(net) is net.output_block.conv.conv
    assert heads == [net.output_block.conv.conv, net.deep_supervision_heads[0].conv.conv]
    init_prior_bias(net, PI, "softmax", 3, lesion_classes=(LESION,))
    with torch.no_grad():
        stacked = net.train()(random_image((2, 1, 16, 16, 16)))  # (N, 1 + 1 heads, C, X, Y, Z)
    assert stacked.shape == (2, 2, 3, 16, 16, 16)
    for head in range(2):
        p = mean_probability(stacked[:, head], "softmax")
        assert abs(p - PI) < 0.1 * PI, (head, p)


def test_rejects_a_head_of_the_wrong_size():
    with pytest.raises(ValueError, match="output channels"):
        init_prior_bias(small_unet(), PI, "softmax", 4)


@pytest.mark.parametrize(("name", "num_res_units"), [("dynunet", 0), ("dynunet", 1), ("unet", 0), ("unet", 1)])
def test_every_model_option_of_the_factory_starts_at_the_prior(name, num_res_units):
    """build_model's networks (the default nnU-Net DynUNet with its deep-supervision heads at their own
    resolution, and the full-resolution UNet): every head starts at lesion probability pi."""
    from pipeline.config import ModelConfig
    from pipeline.model.factory import build_model

    plan = {"network": {"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
                        "kernel_sizes": [[3, 3, 1]] + [[3, 3, 3]] * 4}}
    torch.manual_seed(0)
    net = build_model(ModelConfig(name=name, base_filters=4, max_filters=16, num_res_units=num_res_units),
                      plan["network"], 1, 3)
    heads = find_head_convs(net)
    assert len(heads) == (3 if name == "dynunet" else 1)  # main + 2 supervision heads (5 stages)
    init_prior_bias(net, PI, "softmax", 3, lesion_classes=(LESION,))
    with torch.no_grad():
        out = net.train()(random_image((2, 1, 32, 32, 16)))
    outputs = out if isinstance(out, list) else [out]
    assert len(outputs) == len(heads)
    for logits in outputs:
        p = mean_probability(logits, "softmax")
        assert abs(p - PI) < 0.1 * PI, p
