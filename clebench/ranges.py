"""Per-output-channel weight ranges: the statistics behind the DFQ paper's Fig. 2 and its range-ratio argument.

For a layer with output channels c, r_c = max |W_c| over everything channel c computes from. Per-tensor
quantization gives every channel the step size of the widest one, so the spread range_max / range_min says how
many grid levels the narrowest channels lose; cross-layer scaling exists to shrink it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from clebench import layers
from clebench.graph import unwrap

LAYER_COLUMNS = ["layer", "kind", "out_channels", "range_min", "range_max", "range_ratio", "sqnr_db"]
CHANNEL_COLUMNS = ["layer", "channel", "min", "q1", "median", "q3", "max"]
MIN_BITS, MAX_BITS = 2, 16


def layer_kind(layer: nn.Module) -> str:
    """'depthwise', 'conv_transpose', 'linear' or 'conv' (grouped, non-depthwise convs count as 'conv')."""
    if layers.is_depthwise(layer):
        return "depthwise"
    if isinstance(layer, layers.CONV_TRANSPOSE_TYPES):
        return "conv_transpose"
    return "linear" if isinstance(layer, nn.Linear) else "conv"


def output_channel_rows(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_channels, -1]: row c holds every weight that feeds output channel c.

    The output axis is layers.output_axis (1 for ConvTranspose). A grouped ConvTranspose weight
    [in, out / g, *k] holds output channel g * (out / g) + j in column j of group g's rows.
    """
    weight = layer.weight.detach()
    if isinstance(layer, layers.CONV_TRANSPOSE_TYPES):
        g = layer.groups
        grouped = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1)  # [g, in/g, out/g, k]
        return grouped.transpose(1, 2).reshape(layers.out_channels(layer), -1)
    return weight.reshape(weight.shape[layers.output_axis(layer)], -1)


def _checked_weight(name: str, layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach()
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r} ({layers.describe(layer)}) has NaN or infinite weights; its ranges are undefined")
    return weight


def range_ratio(ranges: torch.Tensor) -> float:
    """max_c r_c / min_c r_c over the channels with r_c > 0; 1.0 when no channel is (all ranges equal, at 0).

    Dead channels (r_c = 0) are left out: they quantize exactly under any grid and would make every ratio infinite.
    """
    live = ranges[ranges > 0]
    return (live.max() / live.min()).item() if live.numel() else 1.0


def weight_sqnr_db(weight: torch.Tensor, bits: int) -> float:
    """10 log10(sum W^2 / sum (W - Q(W))^2) under symmetric per-tensor quantization, in dB.

    Q: signed grid [-2^(b-1), 2^(b-1) - 1], zero point 0, scale = max|W| / (2^(b-1) - 1), applied with torch's
    fake-quantize op (round half to even). inf when Q(W) == W exactly (all-zero weights included).
    """
    weight = weight.detach().float()
    quant_max = 2 ** (bits - 1) - 1
    abs_max = weight.abs().max().item() if weight.numel() else 0.0
    if abs_max == 0.0:
        return math.inf
    quantized = torch.fake_quantize_per_tensor_affine(weight, abs_max / quant_max, 0, -quant_max - 1, quant_max)
    noise = (weight.double() - quantized.double()).square().sum().item()
    signal = weight.double().square().sum().item()
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every conv / transposed conv / linear layer, in `named_modules` order."""
    return [(name, module) for name, module in unwrap(model).named_modules() if layers.is_layer(module)]


def layer_ranges(model: nn.Module, bits: int = 8) -> pd.DataFrame:
    """One row per conv / linear layer (named_modules order) with the columns of ranges.csv but model / steps.

    layer, kind (see `layer_kind`), out_channels, range_min / range_max (smallest / largest r_c), range_ratio
    (see `range_ratio`; 1.0 for an all-zero layer), sqnr_db (weights under per-tensor symmetric `bits`-bit
    quantization, see `weight_sqnr_db`; inf when exactly representable).
    """
    _check_bits(bits)
    rows = []
    for name, layer in named_layers(model):
        weight = _checked_weight(name, layer)
        ranges = output_channel_rows(layer).abs().amax(dim=1)
        rows.append({
            "layer": name,
            "kind": layer_kind(layer),
            "out_channels": layers.out_channels(layer),
            "range_min": ranges.min().item(),
            "range_max": ranges.max().item(),
            "range_ratio": range_ratio(ranges),
            "sqnr_db": weight_sqnr_db(weight, bits),
        })
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def _get_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in named_layers(model)]
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}; its conv / linear layers are: {shown}") from None
    if not layers.is_layer(module):
        raise TypeError(f"{name!r} is a {type(module).__name__}; channel statistics need one of "
                        f"{[t.__name__ for t in layers.LAYER_TYPES]}")
    return module


def channel_stats(model: nn.Module, layer_names: list[str]) -> pd.DataFrame:
    """Five-number summary of each output channel's weights: the rows of channel_ranges.csv but model / steps.

    Columns layer, channel, min, q1, median, q3, max; q1 / median / q3 are the 25 / 50 / 75 % quantiles with linear
    interpolation (numpy's default). Layers in the order given, channels 0..out_channels - 1.
    """
    if isinstance(layer_names, str):
        raise TypeError(f"layer_names must be a list of qualified module names, got the string {layer_names!r}; "
                        f"wrap it in a list")
    model = unwrap(model)
    frames = []
    for name in layer_names:
        layer = _get_layer(model, name)
        _checked_weight(name, layer)
        rows = output_channel_rows(layer).double().cpu().numpy()
        quantiles = np.quantile(rows, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1)  # [5, out_channels]
        frame = pd.DataFrame(dict(zip(CHANNEL_COLUMNS[2:], quantiles)))
        frame.insert(0, "channel", np.arange(rows.shape[0]))
        frame.insert(0, "layer", name)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=CHANNEL_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def first_depthwise_conv(model: nn.Module) -> str | None:
    """Qualified name of the first depthwise conv (groups == in == out > 1) in named_modules order, else None."""
    return next((name for name, module in named_layers(model) if layers.is_depthwise(module)), None)
