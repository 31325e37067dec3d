"""Prior-probability initialisation of the output head (Lin et al., 2017, section 4.1).

At initialisation a network predicts about 1/C for every class, so the (overwhelming) background
voxels each produce a large loss that swamps the few lesion voxels in the first iterations. Setting the
head's bias so that every voxel starts with lesion probability ``pi`` (0.01 by default) makes the
background loss small from the first step.

The bias only controls the output if the pre-bias activations are near 0, which they are not in a
freshly initialised network. So :func:`init_prior_bias` also multiplies the head's weights by
``weight_scale`` (0.01 by default; RetinaNet draws its head from N(0, 0.01^2) for the same reason). The
trunk still receives (smaller) gradients from the first step; ``weight_scale=0`` zero-inits the head
(exact prior, but no gradient reaches the trunk on the first step).

MONAI ``UNet`` with ``num_res_units >= 1`` ends in a ``ResidualUnit`` whose output is
``x + conv(x)``: the identity skip adds the (instance-normalised, activated) features ``x`` to the
logits, whatever the head's weights. Given the model or that unit, the head conv's centre tap gets
``-I`` added, so that ``x + conv(x) = weight_scale * W * x + b`` at initialisation (the same function
space; only the starting point changes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def _lesion_set(n_classes: int, lesion_classes: Sequence[int] | None) -> set[int]:
    if lesion_classes is None:
        lesion_classes = tuple(range(1, n_classes)) if n_classes > 1 else (0,)
    lesions = {int(c) for c in lesion_classes}
    if not lesions or any(not 0 <= c < n_classes for c in lesions):
        raise ValueError(f"lesion_classes must be channel indices in [0, {n_classes}), got {lesion_classes}")
    return lesions


def class_priors(prior: float, n_classes: int, lesion_classes: Sequence[int] | None = None) -> list[float]:
    """Initial probability of each class: ``prior`` per lesion class, the rest shared equally.

    With ``k`` lesion classes and ``m = n_classes - k`` others, each other class gets ``(1 - k*pi) / m``.

    Args:
        prior: ``pi`` in (0, 1).
        n_classes: output channels C.
        lesion_classes: channel indices of the rare classes; None -> every class but 0 (the
            background) when ``C > 1``, else ``(0,)`` (a binary sigmoid head).

    Example:
        >>> class_priors(0.01, 3, lesion_classes=(2,))
        [0.495, 0.495, 0.01]
    """
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    lesions = _lesion_set(n_classes, lesion_classes)
    others = n_classes - len(lesions)
    rest = 1.0 - len(lesions) * prior
    if others and rest <= 0:
        raise ValueError(f"{len(lesions)} lesion classes at prior {prior} leave no probability for the others")
    return [prior if c in lesions else rest / others for c in range(n_classes)]


def prior_biases(
    prior: float, mode: str, n_classes: int, lesion_classes: Sequence[int] | None = None
) -> list[float]:
    """Biases that make the head predict :func:`class_priors` when its other inputs are 0.

    * sigmoid: ``b_c = log(q_c / (1 - q_c))``; for a lesion class ``-log((1 - pi) / pi)`` as in the paper
      (about -4.595 for pi = 0.01).
    * softmax: ``b_c = log(q_c)``, so that ``softmax(b) = q`` (softmax ignores a common shift).

    Example:
        >>> [round(b, 3) for b in prior_biases(0.01, "sigmoid", 1)]
        [-4.595]
    """
    q = class_priors(prior, n_classes, lesion_classes)
    if mode == "sigmoid":
        return [math.log(p / (1.0 - p)) for p in q]
    if mode == "softmax":
        if len(_lesion_set(n_classes, lesion_classes)) == n_classes:
            raise ValueError("softmax needs at least one non-lesion class (e.g. the background)")
        return [math.log(p) for p in q]
    raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")


def _last_conv(module: nn.Module) -> Conv | None:
    from monai.networks.blocks import ResidualUnit  # lazy: importing monai takes seconds

    # A ResidualUnit's projection shortcut is registered after its branch but is not the output conv.
    shortcuts = {id(m.residual) for m in module.modules() if isinstance(m, ResidualUnit)}
    convs = [m for m in module.modules() if isinstance(m, _CONV_TYPES) and id(m) not in shortcuts]
    return convs[-1] if convs else None


def find_head_convs(model: nn.Module) -> list[Conv]:
    """Every output conv of ``model``, the main head first, then any deep-supervision heads.

    * MONAI ``DynUNet``: ``output_block``'s conv, then ``deep_supervision_heads`` (registered after the
      main head, so "the last conv" alone would pick a supervision head).
    * MONAI ``UNet`` and other models: the last registered conv layer, ``Conv3d`` or
      ``ConvTranspose3d`` (a ``UNet`` with ``num_res_units=0`` ends in a transposed conv).

    Raises:
        ValueError: no conv layer found.
    """
    from monai.networks.nets import DynUNet

    dyn = next((m for m in model.modules() if isinstance(m, DynUNet)), None)
    if dyn is not None:
        heads = [_last_conv(dyn.output_block)]
        heads += [_last_conv(h) for h in getattr(dyn, "deep_supervision_heads", [])]
        return [h for h in heads if h is not None]
    last = _last_conv(model)
    if last is None:
        raise ValueError(f"no convolution found in {type(model).__name__}")
    return [last]


def find_head_conv(model: nn.Module) -> Conv:
    """The main output conv of ``model`` (MONAI ``UNet`` or ``DynUNet``, deep supervision or not).

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = UNet(3, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
        >>> find_head_conv(net)
        Conv3d(3, 3, kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1))
    """
    return find_head_convs(model)[0]


def _enclosing_residual_unit(root: nn.Module, head: nn.Module) -> nn.Module | None:
    from monai.networks.blocks import ResidualUnit

    for m in root.modules():
        if isinstance(m, ResidualUnit) and any(sub is head for sub in m.conv.modules()):
            return m
    return None


@torch.no_grad()
def _cancel_residual(unit: nn.Module, head: Conv, weight_scale: float) -> None:
    """Make ``unit(x) = x + head(x)`` (plus a linear residual) equal ``head(x)`` at initialisation."""
    branch_layers = [m for m in unit.conv.modules() if len(list(m.children())) == 0]
    if branch_layers != [head]:
        # e.g. subunits > 1: a nonlinearity sits between x and the head, nothing linear cancels it.
        raise ValueError("the head's residual branch holds more than the head conv; cannot cancel its skip")
    if isinstance(unit.residual, nn.Identity):
        if isinstance(head, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) or any(
            k % 2 == 0 for k in head.kernel_size
        ) or head.in_channels != head.out_channels or any(s != 1 for s in head.stride):
            raise ValueError("cannot express the identity skip with this head conv")
        centre = tuple(k // 2 for k in head.kernel_size)
        eye = torch.eye(head.out_channels, dtype=head.weight.dtype, device=head.weight.device)
        head.weight[(slice(None), slice(None), *centre)] -= eye
    elif isinstance(unit.residual, _CONV_TYPES):  # a linear projection of x: shrink it like the head
        unit.residual.weight.mul_(weight_scale)
        if unit.residual.bias is not None:
            unit.residual.bias.zero_()
    else:
        raise ValueError(f"unsupported residual {type(unit.residual).__name__} around the head")


@torch.no_grad()
def init_prior_bias(
    conv_or_layer: nn.Module,
    prior: float,
    mode: str,
    n_classes: int,
    lesion_classes: Sequence[int] | None = None,
    *,
    weight_scale: float = 0.01,
) -> list[float]:
    """Initialise the output head(s) so that each voxel starts at lesion probability ``prior``.

    Sets the head bias to :func:`prior_biases` and multiplies the head weight by ``weight_scale``.
    Pass the whole model (preferred): every head is found with :func:`find_head_convs` (DynUNet deep
    supervision heads included) and the identity skip of a MONAI ``UNet`` residual head is cancelled
    (see the module docstring). A bare conv is initialised as it is; if a skip connection adds to its
    output elsewhere, that is not seen.

    Args:
        conv_or_layer: a conv layer, or a module (model, ``ResidualUnit``, ``UnetOutBlock``) with heads.
        prior: ``pi``, e.g. ``cfg.train.model.prior_probability`` (0.01).
        mode: ``"sigmoid"`` or ``"softmax"``, as the loss (``cfg.train.loss.mode``).
        n_classes: output channels; must match the head(s).
        lesion_classes: channels of the rare classes (e.g. ``cfg.data.lesion_labels``); None -> all but 0.
        weight_scale: factor on the head weights; 0 zero-inits them, 1 leaves them.

    Returns:
        The biases that were set, one per class.

    Example:
        >>> from monai.networks.nets import UNet
        >>> net = UNet(3, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
        >>> [round(b, 3) for b in init_prior_bias(net, 0.01, "softmax", 3, lesion_classes=(2,))]
        [-0.703, -0.703, -4.605]
    """
    if weight_scale < 0:
        raise ValueError(f"weight_scale must be >= 0, got {weight_scale}")
    biases = prior_biases(prior, mode, n_classes, lesion_classes)
    heads = [conv_or_layer] if isinstance(conv_or_layer, _CONV_TYPES) else find_head_convs(conv_or_layer)
    for head in heads:
        if head.out_channels != n_classes:
            raise ValueError(f"head {head} has {head.out_channels} output channels, expected {n_classes}")
        if head.bias is None:
            raise ValueError(f"head {head} has no bias to initialise")
        head.weight.mul_(weight_scale)
        head.bias.copy_(torch.tensor(biases, dtype=head.bias.dtype, device=head.bias.device))
        unit = None if head is conv_or_layer else _enclosing_residual_unit(conv_or_layer, head)
        if unit is not None:
            _cancel_residual(unit, head, weight_scale)
    return biases
