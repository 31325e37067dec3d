"""build_model: full-resolution first stage for every model option, nnU-Net's blocks and deep supervision."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.contracts import NetworkPlan
from pipeline.model.factory import (
    build_model,
    deep_supervision_heads,
    deep_supervision_weights,
    main_output,
    network_layout,
    stage_filters,
    supervision_target,
)

MODEL_NAMES = typing.get_args(ModelConfig.model_fields["name"].annotation)


def plan(n_stages: int = 4, filters=None) -> NetworkPlan:
    """A plan's network part as make_plan writes it for 0.8 x 0.8 x 2.5 mm data: z is not pooled at the first
    downsampling."""
    strides = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1]][:n_stages]
    kernels = [[3, 3, 1]] + [[3, 3, 3]] * (n_stages - 1)
    net = {"strides": strides, "kernel_sizes": kernels}
    if filters is not None:
        net["filters"] = filters
    return NetworkPlan.from_dict(net)


def tiny(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, base_filters=4, max_filters=16, **kw)


def first_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the first convolution that runs in ``model(x)`` (forward hooks on every conv)."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen[0]


@pytest.mark.parametrize("num_res_units", [0, 1])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_first_feature_map_has_the_input_size(name, num_res_units):
    """Every model option computes its first features at full resolution (MONAI UNet used to apply the
    first stride at the input convolution: no full-resolution layer at all)."""
    assert set(MODEL_NAMES) == {"unet", "dynunet"}
    model = build_model(tiny(name, num_res_units=num_res_units), plan(4), 1, 3).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    fmap = first_feature_map(model, x)
    assert fmap.shape[2:] == x.shape[2:] and fmap.shape[1] == 4
    assert main_output(model(x)).shape == (1, 3, 32, 32, 16)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_planned_stage_is_a_resolution_level(name):
    """4 stages at strides (1, (2,2,1), 2, 2): the deepest features are at 1/8 x 1/8 x 1/4 of the input."""
    model = build_model(tiny(name, num_res_units=0), plan(4), 1, 3).eval()
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[2:])))
             for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32, 16))
    for h in hooks:
        h.remove()
    assert min(sizes) == (4, 4, 4)
    assert (32, 32, 16) in sizes and (16, 16, 16) in sizes and (8, 8, 8) in sizes


def test_dynunet_stages_are_two_conv_instancenorm_leakyrelu():
    """nnU-Net's stage: conv - InstanceNorm (affine) - LeakyReLU(0.01), twice; no residual."""
    from monai.networks.blocks.dynunet_block import UnetBasicBlock

    model = build_model(tiny("dynunet"), plan(4), 1, 3)
    blocks = [m for m in model.modules() if isinstance(m, UnetBasicBlock)]
    assert len(blocks) == 4 + 3  # one per encoder stage (bottleneck included), one per decoder stage
    for block in blocks:
        assert isinstance(block.norm1, nn.InstanceNorm3d) and block.norm1.affine
        assert isinstance(block.norm2, nn.InstanceNorm3d) and block.norm2.affine
        assert isinstance(block.lrelu, nn.LeakyReLU) and block.lrelu.negative_slope == 0.01
        assert isinstance(block.conv1.conv, nn.Conv3d) and isinstance(block.conv2.conv, nn.Conv3d)
    first = model.input_block
    assert first.conv1.conv.stride == (1, 1, 1) and first.conv1.conv.kernel_size == (3, 3, 1)


def test_filters_from_the_plan_or_the_config():
    assert stage_filters(32, 320, 6) == [32, 64, 128, 256, 320, 320]
    planned = plan(5, filters=[8, 16, 32, 64, 128])
    assert network_layout(ModelConfig(), planned)["filters"] == [8, 16, 32, 64, 128]
    assert network_layout(ModelConfig(base_filters=4, max_filters=16), planned)["filters"] == [4, 8, 16, 16, 16]
    # a plan without filters (older plans): nnU-Net's width
    assert network_layout(ModelConfig(), plan(5))["filters"] == [32, 64, 128, 256, 320]
    assert network_layout(ModelConfig(depth=3), planned)["filters"] == [8, 16, 32]
    with pytest.raises(ValueError, match="depth=6 exceeds the 5 levels"):
        network_layout(ModelConfig(depth=6), planned)


def test_a_plan_without_a_full_resolution_stage_is_refused():
    bad = {"strides": [[2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2}  # the JSON form is accepted too
    with pytest.raises(ValueError, match=r"first stage has stride \[2, 2, 2\]"):
        network_layout(ModelConfig(), bad)


def test_deep_supervision_weights_are_nnunets():
    """nnU-Net v2, 5 stages: 4 decoder outputs weighted (1, 1/2, 1/4, 0) / 1.75; the 0 head is not built."""
    assert deep_supervision_heads(5) == 2
    assert deep_supervision_weights(1 + deep_supervision_heads(5)) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75])
    # 6 stages: (1, 1/2, 1/4, 1/8, 0) / 1.875
    assert deep_supervision_weights(1 + deep_supervision_heads(6)) == pytest.approx(
        [1 / 1.875, 0.5 / 1.875, 0.25 / 1.875, 0.125 / 1.875]
    )
    assert deep_supervision_heads(3) == 0 and deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_heads_keep_their_own_resolution():
    """5 stages: the main head and 2 supervision heads at 1/2 x 1/2 x 1 and 1/4 x 1/4 x 1/2 of the patch;
    evaluation mode returns the main head alone."""
    model = build_model(tiny("dynunet"), plan(5), 1, 3)
    x = torch.randn(2, 1, 32, 32, 16)
    out = model.train()(x)
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32, 16), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 32, 32, 16)
    # 3 stages: nnU-Net would weight its one extra head 0, so there is none; off -> none either
    assert isinstance(build_model(tiny("dynunet"), plan(3), 1, 3).train()(x), torch.Tensor)
    assert isinstance(build_model(tiny("dynunet", deep_supervision=False), plan(5), 1, 3).train()(x), torch.Tensor)


def test_state_dict_is_monais_dynunet():
    """The native-resolution heads change only forward: a MONAI DynUNet loads the same state dict."""
    from monai.networks.nets import DynUNet

    model = build_model(tiny("dynunet"), plan(5), 1, 3)
    layout = network_layout(tiny("dynunet"), plan(5))
    ref = DynUNet(3, 1, 3, kernel_size=layout["kernel_sizes"], strides=layout["strides"],
                  upsample_kernel_size=layout["strides"][1:], filters=layout["filters"],
                  deep_supervision=True, deep_supr_num=2)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), model.eval()(x))


def test_supervision_target_is_nearest_neighbour():
    labels = torch.arange(16).reshape(1, 1, 4, 4, 1)
    down = supervision_target(labels, (2, 2, 1))
    assert down.dtype == labels.dtype
    assert down[0, 0, :, :, 0].tolist() == [[0, 2], [8, 10]]  # voxel j takes input voxel 2j
    assert supervision_target(labels, (4, 4, 1)) is labels
