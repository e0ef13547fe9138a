"""Cross-layer scaling and high-bias folding (DFQ paper sec. 4.1-4.2; AIMET `cross_layer_equalization` API).

Pair W1 -> act -> W2, with r1[c] = max|W1[c, ...]| (output channel c) and r2[c] = max|W2[:, c, ...]| (input c):
    s = sqrt(r1 / r2);  W1[c] /= s[c], b1[c] /= s[c];  W2[:, c] *= s[c]   -> both ranges become sqrt(r1 * r2)
Triple W1 -> act -> depthwise W2 -> act -> W3, with r2 the depthwise per-channel range:
    S12 = r1 / cbrt(r1 r2 r3),  S23 = cbrt(r1 r2 r3) / r3
    W1 /= S12, b1 /= S12;  W2 *= S12 / S23, b2 /= S23;  W3[:, c] *= S23   -> all three ranges become cbrt(r1 r2 r3)
A scale that comes out zero, NaN or infinite (a dead channel) is replaced by 1.

High-bias fold of a pair whose layer1 had a BN (gamma, beta) folded into it, both layers with bias:
    gamma, beta /= s;  c = max(0, beta - 3 |gamma|) with a ReLU/PReLU between, else c = beta
    b1 -= c;  b2 += (W2 summed over its kernel) @ c   (element-wise for a depthwise layer2; / stride^d if transposed)
Under the ReLU6 `clip` policy the activation is clamp(x, 0, u) per channel; then c <= u as well and the bound
becomes u - c, which keeps clamp exact wherever x >= c (see `HighBiasFold`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from clebench import graph, layers, ops, utils
from clebench.activations import ChannelClippedReLU
from clebench.ops import relu6_upper_bound
from clebench.batch_norm_fold import backward_fold_map, fold_all_batch_norms
from clebench.graph import Relu6Policy
from clebench.layers import describe

ClsSet = tuple[nn.Module, nn.Module] | tuple[nn.Module, nn.Module, nn.Module]
ScaleFactor = np.ndarray | tuple[np.ndarray, np.ndarray]


class ClsSetInfo:
    """What scaling did to one CLS set: one pair info for a pair, two for a (conv, depthwise, conv) triple."""

    class ClsSetLayerPairInfo:
        """layer1 -> layer2 were scaled by `scale_factor` (layer1's output channel c divided by scale_factor[c]).

        clebench extensions (AIMET has neither): `clip` is the ChannelClippedReLU between the layers under the
        ReLU6 `clip` policy (high-bias folding lowers its bounds); `absorbed_bias` is the per-channel amount c that
        high-bias folding moved out of layer1's bias (None until folded), which analytical bias correction needs.
        """

        def __init__(
            self,
            layer1: nn.Module,
            layer2: nn.Module,
            scale_factor: np.ndarray,
            relu_activation_between_layers: bool,
            clip: ChannelClippedReLU | None = None,
        ) -> None:
            self.layer1 = layer1
            self.layer2 = layer2
            self.scale_factor = scale_factor
            self.relu_activation_between_layers = relu_activation_between_layers
            self.clip = clip
            self.absorbed_bias: torch.Tensor | None = None

    def __init__(self, cls_pair_1: ClsSetLayerPairInfo, cls_pair_2: ClsSetLayerPairInfo | None = None) -> None:
        self.cls_pair_info_list = [cls_pair_1] if cls_pair_2 is None else [cls_pair_1, cls_pair_2]


def _finite_or_one(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def scale_pair(layer1: nn.Module, layer2: nn.Module) -> torch.Tensor:
    """Equalize layer1's output ranges with layer2's input ranges in place; return s (shape [C])."""
    r1 = layers.channel_abs_max(layer1.weight, layers.output_axis(layer1))
    r2 = layers.channel_abs_max(layer2.weight, layers.input_axis(layer2))
    s = _finite_or_one(torch.sqrt(r1) / torch.sqrt(r2))  # not sqrt(r1 / r2): the ratio can overflow float32
    layers.scale_output_channels(layer1, 1.0 / s)
    layers.scale_input_channels(layer2, s)
    return s


def scale_triple(layer1: nn.Module, depthwise: nn.Module, layer3: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Equalize a conv -> depthwise -> conv triple in place; return (S12, S23), each of shape [C]."""
    r1 = layers.channel_abs_max(layer1.weight, layers.output_axis(layer1))
    r2 = layers.channel_abs_max(depthwise.weight, 0)
    r3 = layers.channel_abs_max(layer3.weight, layers.input_axis(layer3))
    c1, c2, c3 = (torch.pow(r, 1.0 / 3.0) for r in (r1, r2, r3))  # per factor: r1 * r2 * r3 can overflow float32
    s12 = _finite_or_one(c1 * (c1 / c2) / c3)  # r1 / cbrt(r1 r2 r3)
    s23 = _finite_or_one(c1 * (c2 / c3) / c3)  # cbrt(r1 r2 r3) / r3
    layers.scale_output_channels(layer1, 1.0 / s12)
    layers.scale_output_channels(depthwise, 1.0 / s23)  # weight and bias / S23 ...
    layers.scale_input_channels(depthwise, s12)  # ... and weight * S12
    layers.scale_input_channels(layer3, s23)
    return s12, s23


def _check_cls_set(cls_set: Sequence[nn.Module]) -> None:
    """Raise a ValueError / TypeError naming the layers if `cls_set` cannot be scaled."""
    if not isinstance(cls_set, (tuple, list)) or len(cls_set) not in (2, 3):
        raise ValueError(f"a CLS set is a (layer, layer) pair or a (conv, depthwise conv, conv) triple; got {cls_set!r}")
    for module in cls_set:
        if not graph.is_scalable(module):
            raise TypeError(
                f"{describe(module)} cannot be scaled: CLS supports ungrouped Conv1d/2d/3d, ConvTranspose (groups=1), "
                "Linear and depthwise convs"
            )
    if len(cls_set) == 3 and not layers.is_depthwise(cls_set[1]):
        raise ValueError(f"the middle layer of a CLS triple must be a depthwise conv; got {describe(cls_set[1])}")
    for first, second in zip(cls_set, cls_set[1:]):
        if layers.out_channels(first) != layers.in_channels(second):
            raise ValueError(
                f"channel mismatch in CLS set: {describe(first)} has {layers.out_channels(first)} output channels, "
                f"{describe(second)} has {layers.in_channels(second)} input channels"
            )
        if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
            raise ValueError(f"cannot scale across {describe(first)} -> {describe(second)}: a Linear only pairs with a Linear")


def _to_numpy(scale: torch.Tensor) -> np.ndarray:
    return scale.detach().cpu().numpy()


class CrossLayerScaling:
    """Cross-layer scaling: manual (`scale_cls_sets`) and auto (`scale_model`) mode."""

    @staticmethod
    def scale_cls_sets(cls_sets: Sequence[ClsSet]) -> list[ScaleFactor]:
        """Scale user-given sets in order; a pair returns s, a triple returns (S12, S23) (numpy, per channel).

        Every set is validated first, so on an error no layer has been changed.
        """
        for cls_set in cls_sets:
            _check_cls_set(cls_set)
        factors: list[ScaleFactor] = []
        for cls_set in cls_sets:
            if len(cls_set) == 2:
                factors.append(_to_numpy(scale_pair(*cls_set)))
            else:
                s12, s23 = scale_triple(*cls_set)
                factors.append((_to_numpy(s12), _to_numpy(s23)))
        return factors

    @staticmethod
    def scale_model(
        model: nn.Module,
        input_shapes: tuple | Sequence[tuple] | None = None,
        dummy_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        relu6: Relu6Policy = "keep",
    ) -> list[ClsSetInfo]:
        """Find the CLS sets from the model graph, scale them in place, return what was done.

        relu6: 'keep' stops chains at ReLU6 (AIMET 2.x); 'clip' scales across ReLU6 / Hardtanh(0, m) and turns
        each into a ChannelClippedReLU with bounds m / s (exact in FP32). ('replace' is `equalize_model`'s
        ReLU6 -> ReLU step; here it means the same as 'keep'.) `input_shapes` / `dummy_input` are accepted for
        AIMET compatibility; the fx trace needs neither.
        """
        model = graph.unwrap(model)
        gm = graph.trace(model)
        _check_clip_sites(gm, relu6)
        modules = dict(gm.named_modules())
        infos = []
        for chain in graph.find_cls_chains(gm, "clip" if relu6 == "clip" else "keep"):
            for hops in graph.chain_to_cls_sets(chain, modules):
                infos.append(_scale_hops(model, hops, modules))
        return infos


def _scale_hops(model: nn.Module, hops: tuple[graph.Hop, ...], modules: dict[str, nn.Module]) -> ClsSetInfo:
    """Scale one auto-discovered set and replace any ReLU6 between its layers by its per-channel clip."""
    chain_layers = [modules[hops[0].layer]] + [modules[hop.next_layer] for hop in hops]
    scales = [scale_pair(*chain_layers)] if len(hops) == 1 else list(scale_triple(*chain_layers))
    pairs = []
    for hop, scale, layer1 in zip(hops, scales, chain_layers):
        clip = _clip_activations(model, hop.activations, scale, modules, channel_axis=-1 if isinstance(layer1, nn.Linear) else 1)
        pairs.append(
            ClsSetInfo.ClsSetLayerPairInfo(
                layer1, modules[hop.next_layer], _to_numpy(scale), bool(hop.activations), clip
            )
        )
    return ClsSetInfo(*pairs)


def _clip_activations(
    model: nn.Module, activations: tuple[fx.Node, ...], scale: torch.Tensor, modules: dict[str, nn.Module], channel_axis: int
) -> ChannelClippedReLU | None:
    """Replace each ReLU6-like activation module on a scaled hop by ChannelClippedReLU(bound / scale)."""
    clip = None
    for node in activations:
        bound = relu6_upper_bound(modules[node.target]) if node.op == "call_module" else None
        if bound is None:
            continue
        upper = (bound if torch.is_tensor(bound) else torch.full_like(scale, bound)) / scale
        clip = ChannelClippedReLU(upper.to(scale.dtype), channel_axis=channel_axis)
        graph.set_submodule(model, node.target, clip)
        modules[node.target] = clip
    return clip


def _check_clip_sites(gm: fx.GraphModule, relu6: Relu6Policy) -> None:
    """Under 'clip', every ReLU6-like call must be a module of its own, or it cannot become a per-channel clip."""
    graph.check_relu6_policy(relu6)
    if relu6 != "clip":
        return
    modules = dict(gm.named_modules())
    sites = graph.call_sites(gm)
    blockers = [
        f"{node.target} (called at {sites[node.target]} places)" if node.op == "call_module" else f"functional {node.name}"
        for node in gm.graph.nodes
        if ops.activation_kind(node, modules) == "relu6" and (node.op != "call_module" or sites[node.target] > 1)
    ]
    if blockers:
        raise ValueError(
            "relu6='clip' must give each ReLU6 call site its own per-channel clip, but these ReLU6 calls are shared "
            f"or functional: {', '.join(blockers[:5])}{' ...' if len(blockers) > 5 else ''}. "
            "Run model = clebench.graph.prepare_model(model) first (a traced copy with one module per call site)."
        )


class HighBiasFold:
    """High-bias absorption into the next layer (DFQ paper sec. 4.2)."""

    @staticmethod
    def bias_fold(cls_set_info_list: Sequence[ClsSetInfo], bn_layers: dict[nn.Module, nn.Module]) -> None:
        """Fold high biases of each scaled pair whose layer1 had `bn_layers[layer1]` folded into it (in place).

        Pairs without a folded BN or without biases on both layers are skipped, as in AIMET.
        """
        for info in cls_set_info_list:
            for pair in info.cls_pair_info_list:
                bn = bn_layers.get(pair.layer1)
                if bn is None or pair.layer1.bias is None or pair.layer2.bias is None:
                    continue
                _fold_pair_bias(pair, bn)


def _fold_pair_bias(pair: ClsSetInfo.ClsSetLayerPairInfo, bn: nn.Module) -> None:
    layer1, layer2 = pair.layer1, pair.layer2
    bias1 = layer1.bias
    scale = torch.as_tensor(np.asarray(pair.scale_factor), device=bias1.device, dtype=bias1.dtype)
    gamma = (bn.weight.detach() if bn.affine else torch.ones_like(scale)) / scale
    beta = (bn.bias.detach() if bn.affine else torch.zeros_like(scale)) / scale
    if pair.relu_activation_between_layers:
        absorbed = torch.clamp(beta - 3.0 * gamma.abs(), min=0.0)
    else:
        absorbed = beta
    if pair.clip is not None:
        # clamp(x, 0, u) = clamp(x - c, 0, u - c) + c wherever x >= c, so c may not exceed u
        absorbed = torch.minimum(absorbed, pair.clip.upper)
    pair.absorbed_bias = absorbed
    if not absorbed.any():  # common in trained networks (beta <= 3|gamma| everywhere); the updates would add zeros
        return
    with torch.no_grad():
        if pair.clip is not None:
            pair.clip.upper.sub_(absorbed)
        bias1.sub_(absorbed)
        layer2.bias.add_(layers.constant_input_response(layer2, absorbed))


def equalize_model(
    model: nn.Module,
    input_shapes: tuple | Sequence[tuple] | None = None,
    dummy_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    relu6: Relu6Policy = "replace",
) -> None:
    """BN fold -> ReLU6 policy -> cross-layer scaling -> high-bias fold, in place.

    relu6: 'replace' (default, AIMET 1.x / the paper): every nn.ReLU6 becomes nn.ReLU, which may change the FP32
    function; 'keep': ReLU6 stays and ends scaling chains (FP32 function unchanged); 'clip': scale across ReLU6
    and make each a per-channel clip (FP32 function unchanged; needs one module per call site, see
    `clebench.graph.prepare_model`).
    """
    model = graph.unwrap(model)
    gm = graph.trace(model)  # one trace serves every step: they all edit gm, whose new leaves go back to model
    _check_clip_sites(gm, relu6)  # before folding, so that an error leaves the model unchanged
    try:
        folded = fold_all_batch_norms(gm, input_shapes, dummy_input)
        if relu6 == "replace":
            for root in (model, gm):  # model too: ReLU6 modules the graph never calls are replaced as well
                utils.replace_modules_of_type1_with_type2(root, nn.ReLU6, nn.ReLU)
        infos = CrossLayerScaling.scale_model(gm, relu6="clip" if relu6 == "clip" else "keep")
        HighBiasFold.bias_fold(infos, backward_fold_map(folded))
    finally:
        graph.copy_leaves(gm, model)
