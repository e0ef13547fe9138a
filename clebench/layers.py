"""Which weight axis is which: the per-channel views that BN folding, scaling and quantization share.

Weight layouts (PyTorch):
    Linear            [out, in]
    ConvNd            [out, in / groups, *kernel]
    ConvTransposeNd   [in, out / groups, *kernel]   <- output channels sit on axis 1

A depthwise conv (groups == in == out) has weight [C, 1, *kernel]: channel c is both its input and
its output channel, so its "input axis" is axis 0 too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = CONV_TYPES + CONV_TRANSPOSE_TYPES + (nn.Linear,)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Layer = nn.Module  # one of LAYER_TYPES


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, LAYER_TYPES)


def groups(layer: Layer) -> int:
    return getattr(layer, "groups", 1)


def out_channels(layer: Layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: Layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def is_depthwise(layer: Layer) -> bool:
    """A conv whose every channel is filtered on its own: groups == in == out > 1."""
    return (
        isinstance(layer, CONV_TYPES)
        and layer.groups > 1
        and layer.groups == layer.in_channels == layer.out_channels
    )


def output_axis(layer: Layer) -> int:
    return 1 if isinstance(layer, CONV_TRANSPOSE_TYPES) else 0


def input_axis(layer: Layer) -> int:
    if is_depthwise(layer):
        return 0
    return 0 if isinstance(layer, CONV_TRANSPOSE_TYPES) else 1


def channel_abs_max(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """max |w| over every axis but `axis`: shape [weight.shape[axis]]."""
    # As [before, C, after], reducing the longer of the outer axes first (much faster than amax over a dim tuple),
    # and as max(-min, max), which reads the weight without writing an |w| copy.
    blocks = weight.detach().reshape(math.prod(weight.shape[:axis]), weight.shape[axis], -1)
    first, second = (2, 0) if blocks.shape[2] >= blocks.shape[0] else (0, 1)
    return torch.maximum(-blocks.amin(dim=first), blocks.amax(dim=first)).amax(dim=second)


def along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """View a per-channel vector so that it broadcasts along `axis` of an `ndim`-dim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def scale_output_channels(layer: Layer, scale: torch.Tensor) -> None:
    """Multiply output channel c of the layer's weight and bias by scale[c], in place."""
    with torch.no_grad():
        weight = layer.weight
        if isinstance(layer, CONV_TRANSPOSE_TYPES) and layer.groups > 1:
            # [in, out/g, *k]: output channel g*(out/g)+j is column j of the rows of group g
            g = layer.groups
            weight.view(g, -1, *weight.shape[1:]).mul_(scale.view(g, 1, -1, *[1] * (weight.dim() - 2)))
        else:
            weight.mul_(along(scale, output_axis(layer), weight.dim()))
        if layer.bias is not None:
            layer.bias.mul_(scale)


def scale_input_channels(layer: Layer, scale: torch.Tensor) -> None:
    """Multiply the weights that read input channel c by scale[c], in place (bias untouched)."""
    with torch.no_grad():
        layer.weight.mul_(along(scale, input_axis(layer), layer.weight.dim()))


def constant_input_response(layer: Layer, channel_values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Output per channel [out] of `layer` (bias left out) for an input that is constant per channel, away from borders.

    channel_values: [in]. `weight` (shaped like layer.weight) replaces the layer's own weight, e.g. by a weight error.
    A conv's every output sees each kernel tap once: the kernel sum. A transposed conv with stride s spreads the
    taps over s^d output phases, so its mean output is the kernel sum / s^d.
    """
    weight = layer.weight.detach() if weight is None else weight
    if isinstance(layer, nn.Linear):
        return weight @ channel_values
    kernel_sum = weight.flatten(2).sum(2)  # conv: [out, in / g]; transposed: [in, out / g]
    g = layer.groups
    if isinstance(layer, CONV_TRANSPOSE_TYPES):
        per_group = kernel_sum.view(g, -1, kernel_sum.shape[1]).transpose(1, 2) / math.prod(layer.stride)
    else:
        per_group = kernel_sum.view(g, -1, kernel_sum.shape[1])  # [g, out / g, in / g]
    return torch.bmm(per_group, channel_values.view(g, -1, 1)).flatten()


def ensure_bias(layer: Layer) -> torch.Tensor:
    """Give the layer a zero bias if it has none; return the bias."""
    if layer.bias is None:
        weight = layer.weight
        layer.bias = nn.Parameter(torch.zeros(out_channels(layer), device=weight.device, dtype=weight.dtype))
    return layer.bias


def describe(module: nn.Module) -> str:
    """A short, human-readable identity for error messages."""
    if is_layer(module):
        return f"{type(module).__name__}(in={in_channels(module)}, out={out_channels(module)}, groups={groups(module)})"
    if isinstance(module, BN_TYPES):
        return f"{type(module).__name__}({module.num_features})"
    return type(module).__name__
