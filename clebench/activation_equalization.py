"""Data-aware activation equalization (SmoothQuant's migration, Xiao et al. 2023, on CNN layer pairs).

Where the activation grid limits accuracy (W8A4, W4A4), a channel with a wide activation range can hand part of it to
the next layer's weights. For every pair W1 -> act -> W2 that pairwise CLS finds (each hop of
`clebench.graph.find_cls_chains`: layers linked only by ReLU / PReLU and identities, and ReLU6 under the `clip`
policy), channel c being output channel c of W1 and input channel c of W2:

    a[c] = max |x[:, c, ...]|   over the calibration batches, x the input of W2 (channel axis 1; -1 for a Linear)
    w[c] = max |W2[:, c, ...]|  (axis `layers.input_axis`: 1 of a conv / Linear weight [out, in, *k], 0 of a
                                 transposed conv's [in, out, *k] and of a depthwise conv's [C, 1, *k])
    s[c] = a[c]^alpha / w[c]^(1 - alpha)      (zero, NaN or infinite -> 1: a dead channel stays as it is)
    W1[c] /= s[c], b1[c] /= s[c]  (output channel c);   W2[:, c] *= s[c]

W2 then reads x / s, which is exact through ReLU / PReLU (positively homogeneous) and, under relu6 = 'clip', through a
ReLU6 that becomes a ChannelClippedReLU with bound 6 / s[c] (as `cls_relu6_clip` does); under 'keep' a ReLU6 ends
the chain, so its pair is left alone. Afterwards max|x'[c]| = (a[c] w[c])^(1 - alpha) and max|W2'[:, c]| =
(a[c] w[c])^alpha: alpha = 0.5 gives both sqrt(a w), alpha = 1 makes every activation channel's range 1, alpha = 0
every weight column's.

Depthwise convs are treated exactly, as plain pairs: a hop into a depthwise conv scales its weight[c] (its input and
output channel c) by s[c], a hop out of it divides weight[c] and bias[c] by s[c]. So a (conv, depthwise, conv) triple
is two pairs, and a depthwise conv that ends a chain (which CLS leaves alone) is equalized with the layer before it.

Every a[c] is measured in one pass before any scaling and the pairs are scaled in chain order: a pair's scaling keeps
every other pair's activation, and W2 of a pair is scaled by no earlier pair, so each s[c] is the formula's on the
model as the step found it. Run it after BN folding (a BN between two layers ends their chain).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from clebench import graph, layers
from clebench.cle_diagnostics import channel_extrema_at
from clebench.cross_layer_equalization import _check_clip_sites, _clip_activations, _finite_or_one

DEFAULT_ALPHA = 0.5
Relu6Handling = Literal["keep", "clip"]
RELU6_HANDLING: tuple[str, ...] = ("keep", "clip")


@dataclass(frozen=True)
class EqualizedPair:
    """layer1's output channel c was divided by scale[c] and layer2's input channel c multiplied by it ([C], CPU)."""

    layer1: str
    layer2: str
    scale: torch.Tensor


def check_alpha(alpha: object) -> None:
    """ValueError unless alpha is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (SmoothQuant's migration strength), got {alpha!r}")


def migration_scale(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^alpha / w^(1 - alpha) per channel, with 1 where it is zero, NaN or infinite."""
    return _finite_or_one(activation_max.pow(alpha) / weight_max.pow(1.0 - alpha))


def equalize_activations(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], alpha: float = DEFAULT_ALPHA,
                         relu6: Relu6Handling = "keep") -> list[EqualizedPair]:
    """Migrate activation range into the next layer's weights for every CLS pair of `model`, in place (module
    docstring); return what was scaled, in graph order.

    batches: model-input tuples (dim 0: samples), the calibration data. relu6: 'keep' leaves the pairs across a ReLU6
    alone; 'clip' scales across it and makes it a per-channel clip (one module per call site needed:
    clebench.graph.prepare_model). The FP32 function is unchanged.
    """
    check_alpha(alpha)
    if relu6 not in RELU6_HANDLING:
        raise ValueError(f"relu6 must be one of {RELU6_HANDLING}, got {relu6!r}")
    if not batches:
        raise ValueError("equalize_activations needs at least one calibration batch")
    model = graph.unwrap(model)
    gm = graph.trace(model)
    _check_clip_sites(gm, relu6)
    modules = dict(gm.named_modules())
    hops = [hop for chain in graph.find_cls_chains(gm, relu6) for hop in chain]
    extrema = channel_extrema_at(gm, [hop.next_layer for hop in hops], [(inputs,) for inputs in batches])
    return [_equalize_hop(model, hop, modules, extrema[hop.next_layer], alpha) for hop in hops]


def _equalize_hop(model: nn.Module, hop: graph.Hop, modules: dict[str, nn.Module], extrema: torch.Tensor,
                  alpha: float) -> EqualizedPair:
    layer1, layer2 = modules[hop.layer], modules[hop.next_layer]
    weight_max = layers.channel_abs_max(layer2.weight, layers.input_axis(layer2))
    activation_max = extrema.abs().amax(dim=0).to(weight_max)
    scale = migration_scale(activation_max, weight_max, alpha)
    layers.scale_output_channels(layer1, 1.0 / scale)
    layers.scale_input_channels(layer2, scale)
    _clip_activations(model, hop.activations, scale, modules, channel_axis=_channel_axis(layer1))
    return EqualizedPair(hop.layer, hop.next_layer, scale.cpu())


def _channel_axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1
