"""Region cross-layer equalization: one scale per channel shared by every layer that writes or reads the channel.

Pairwise CLS (clebench.cross_layer_equalization) stops at every add, concat, pooling or flatten. A *region* goes on
through every op that commutes with a positive per-channel scale D (op(D x) = D op(x)): ReLU / PReLU / LeakyReLU
(positively homogeneous), identities and dropout, max / average / adaptive average pooling and zero padding, a
residual add (each of its inputs joins the region), a channel concat (each input owns a channel slice of the
output), a flatten of a globally pooled tensor ([N, C, 1, 1] -> [N, C]: channel c is feature c) and, under the
ReLU6 `clip` policy, ReLU6 (it becomes a ChannelClippedReLU with bound u / s[c]). The region's

    sources  conv / linear layers whose output channels are region channels (layer.weight axis `output_axis`)
    sinks    conv / linear layers whose input channels are region channels (layer.weight axis `input_axis`)

are scaled with one vector s of shape [channels] (a source or sink covers the slice [offset, offset + its channels)):

    r_src[c] = max over sources of max|W_src[c, ...]|,   r_sink[c] = max over sinks of max|W_sink[:, c, ...]|
    s = sqrt(r_src / r_sink);   W_src[c] /= s[c], b_src[c] /= s[c];   W_sink[:, c] *= s[c]

(a zero, NaN or infinite s[c] -- a dead channel -- is 1), which leaves the FP32 function unchanged. A layer is a sink
of one region and a source of another, so the whole-model pass is repeated until no scale moves by more than
`tolerance` in log space (Brevitas' iterative graph equalization does the same). A region reached through anything
else -- an op not known to commute, a layer called at several places or with tied weights, a grouped (not
depthwise) conv, the graph output, a concat along another axis, a Linear reading a conv's spatial axis -- is skipped
whole, never half-scaled.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn

from clebench import graph, layers, ops
from clebench.cross_layer_equalization import _check_clip_sites, _clip_activations, _finite_or_one
from clebench.graph import Relu6Policy

# How a region tensor holds its channels: on axis 1 ([N, C, *spatial]), on axis 1 with every spatial extent 1
# ([N, C, 1, 1], after global pooling), or on the last axis (a Linear's output, a flattened pooled tensor).
Layout = Literal["channels", "pooled", "features"]
OpKind = Literal["elementwise", "clip", "spatial", "global_pool", "flatten", "add", "cat"]
DEFAULT_TOLERANCE = 1e-4  # largest |log s| of a pass below which the passes stop


class _InvalidRegion(Exception):
    """The region reached something that does not commute with a per-channel scale."""


@dataclass
class Region:
    """Layers sharing one channel scale. sources / sinks: layer name -> the region channel that its output / input
    channel 0 is (its channels are [offset, offset + n)); scale: [channels], the product of the scales of every pass
    (a source's output channel c was divided by scale[offset + c]); ones until equalized."""

    sources: dict[str, int]
    sinks: dict[str, int]
    channels: int
    scale: torch.Tensor
    clips: tuple[tuple[fx.Node, int, int, int], ...] = field(default=(), repr=False)  # ReLU6 call, offset, channels, axis


def _op_kind(node: fx.Node, modules: dict[str, nn.Module], relu6: Relu6Policy) -> OpKind | None:
    """What the op at `node` does to a region's channels; None where it does not commute with a channel scale."""
    activation = ops.activation_kind(node, modules)
    if activation == "relu":
        return "elementwise"
    if activation == "relu6":
        return "clip" if relu6 == "clip" and node.op == "call_module" else None
    op = ops.op_of(node, modules)
    name = None if op is None else op.name
    if name == "leaky_relu" or ops.is_identity(node, modules):
        return "elementwise"
    if name in ("max_pool", "avg_pool") or (name == "pad" and ops.is_zero_pad(node.target, node.args, node.kwargs)):
        return "spatial"
    if name == "adaptive_avg_pool":
        return "global_pool" if _pools_to_one(node, modules) else "spatial"
    if name == "flatten" and _flatten_dims(node, modules) == (1, -1):
        return "flatten"
    if name in ("add", "cat"):
        return name
    return None


def _pools_to_one(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An adaptive average pool whose every output extent is 1."""
    if node.op == "call_module":
        size = modules[node.target].output_size
    else:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    return all(extent == 1 for extent in (size if isinstance(size, (tuple, list)) else (size,)))


def _flatten_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """(start_dim, end_dim) of nn.Flatten, torch.flatten or Tensor.flatten."""
    if node.op == "call_module":
        module = modules[node.target]
        return module.start_dim, module.end_dim
    args = node.args[1:]
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    return start, args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)


def _data_inputs(node: fx.Node, kind: OpKind) -> list[fx.Node]:
    """The tensors a commuting op reads: every summand of an add, every part of a cat, else the one input."""
    if kind == "add":
        summands = list(node.args)
        if len(summands) != 2 or node.kwargs or not all(_is_tensor_node(n) for n in summands):
            raise _InvalidRegion(f"{node.name} adds a constant or scales a summand")
        return summands
    if kind == "cat":
        parts = node.args[0]
        if not all(_is_tensor_node(n) for n in parts):
            raise _InvalidRegion(f"{node.name} concatenates a constant")
        return list(parts)
    only = graph._only_input(node)
    if only is None:
        raise _InvalidRegion(f"{node.name} reads several tensors")
    return [only]


def _is_tensor_node(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op != "get_attr"


def _cat_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


@dataclass
class _Closure:
    """Every node of one region: sources, commuting ops (by kind), sinks (with the tensor each reads)."""

    sources: list[fx.Node] = field(default_factory=list)
    ops: dict[fx.Node, OpKind] = field(default_factory=dict)
    sinks: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)

    def tensors(self) -> list[fx.Node]:
        return self.sources + list(self.ops)


def _collect(start: fx.Node, modules: dict[str, nn.Module], single_use: set[str], relu6: Relu6Policy) -> _Closure:
    """The region of the layer call `start`: every consumer of a region tensor joins (op or sink), and every input of
    a region op joins (source or op), until closed. _InvalidRegion if anything else is reached."""
    closure, seen, pending = _Closure(), set(), deque([start])
    while pending:
        node = pending.popleft()
        if node in seen:
            continue
        seen.add(node)
        if _is_layer_call(node, modules):
            _check_layer(node, modules, single_use)
            closure.sources.append(node)
        else:
            kind = _op_kind(node, modules, relu6)
            if kind is None:
                raise _InvalidRegion(f"{node.name} does not commute with a channel scale")
            closure.ops[node] = kind
            pending.extend(_data_inputs(node, kind))
        for user in node.users:
            if _is_layer_call(user, modules):
                _check_layer(user, modules, single_use)
                closure.sinks.append((user, node))
            elif _op_kind(user, modules, relu6) is None:  # the graph output too
                raise _InvalidRegion(f"{node.name} is read by {user.name}, which does not commute with a channel scale")
            else:
                pending.append(user)
    if not closure.sinks:
        raise _InvalidRegion(f"nothing reads the region of {start.name}")
    return closure


def _is_layer_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layers.is_layer(graph.module_of(node, modules))


def _check_layer(node: fx.Node, modules: dict[str, nn.Module], single_use: set[str]) -> None:
    if not graph.is_scalable(modules[node.target]):
        raise _InvalidRegion(f"{node.target} is a grouped (not depthwise) layer")
    if node.target not in single_use:
        raise _InvalidRegion(f"{node.target} is called at several places or shares its weights")


def _shapes(closure: _Closure, modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> dict[fx.Node, tuple[Layout, int]]:
    """(layout, channels) of every region tensor, from the sources forward in graph order."""
    shapes: dict[fx.Node, tuple[Layout, int]] = {}
    for node in sorted(closure.tensors(), key=order.__getitem__):
        if node in closure.ops:
            shapes[node] = _op_shape(node, closure.ops[node], [shapes[n] for n in _data_inputs(node, closure.ops[node])])
        else:
            layer = modules[node.target]
            shapes[node] = ("features" if isinstance(layer, nn.Linear) else "channels", layers.out_channels(layer))
    for sink, read in closure.sinks:
        layout, channels = shapes[read]
        layer = modules[sink.target]
        if (layout == "features") != isinstance(layer, nn.Linear) or layers.in_channels(layer) != channels:
            raise _InvalidRegion(f"{sink.target} does not read {read.name}'s channels one to one")
    return shapes


def _op_shape(node: fx.Node, kind: OpKind, inputs: list[tuple[Layout, int]]) -> tuple[Layout, int]:
    layouts = {layout for layout, _ in inputs}
    if len(layouts) != 1:
        raise _InvalidRegion(f"{node.name} mixes channel layouts")
    (layout,) = layouts
    if kind in ("elementwise", "clip"):
        return inputs[0]
    if kind == "add":
        if len({channels for _, channels in inputs}) != 1:
            raise _InvalidRegion(f"{node.name} broadcasts over channels")
        return inputs[0]
    if kind == "cat":
        if _cat_dim(node) != (-1 if layout == "features" else 1):
            raise _InvalidRegion(f"{node.name} concatenates along another axis than the channels")
        return layout, sum(channels for _, channels in inputs)
    wanted = "pooled" if kind == "flatten" else ("channels", "pooled")
    if layout not in wanted:
        raise _InvalidRegion(f"{node.name} does not map channels to channels one to one")
    return {"spatial": "channels", "global_pool": "pooled", "flatten": "features"}[kind], inputs[0][1]


def _offsets(closure: _Closure, shapes: dict[fx.Node, tuple[Layout, int]]) -> dict[fx.Node, int]:
    """The region channel of channel 0 of every region tensor: an op's input sits where the op puts it in its output
    (a cat's k-th input after the channels of the ones before it; every other input at the output's offset)."""
    links: dict[fx.Node, list[tuple[fx.Node, int]]] = {node: [] for node in shapes}
    for node, kind in closure.ops.items():
        delta = 0
        for source in _data_inputs(node, kind):
            links[node].append((source, delta))
            links[source].append((node, -delta))
            delta += shapes[source][1] if kind == "cat" else 0
    first = closure.sources[0]
    offsets, pending = {first: 0}, deque([first])
    while pending:
        node = pending.popleft()
        for other, delta in links[node]:
            if other not in offsets:
                offsets[other] = offsets[node] + delta
                pending.append(other)
            elif offsets[other] != offsets[node] + delta:
                raise _InvalidRegion(f"{other.name} would hold two different channel slices of the region")
    low = min(offsets.values())
    return {node: offset - low for node, offset in offsets.items()}


def _build(closure: _Closure, modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> Region:
    shapes = _shapes(closure, modules, order)
    offsets = _offsets(closure, shapes)
    channels = max(offsets[node] + shapes[node][1] for node in shapes)
    covered = torch.zeros(channels, dtype=torch.bool)
    for node in closure.sources:
        covered[offsets[node]:offsets[node] + shapes[node][1]] = True
    if not covered.all():
        raise _InvalidRegion("some region channels have no source")
    clips = tuple(
        (node, offsets[node], shapes[node][1], -1 if shapes[node][0] == "features" else 1)
        for node in sorted(closure.ops, key=order.__getitem__)
        if closure.ops[node] == "clip"
    )
    return Region(
        sources={node.target: offsets[node] for node in sorted(closure.sources, key=order.__getitem__)},
        sinks={sink.target: offsets[read] for sink, read in sorted(closure.sinks, key=lambda pair: order[pair[0]])},
        channels=channels,
        scale=torch.ones(channels, dtype=torch.float64),
        clips=clips,
    )


def _regions_of(gm: fx.GraphModule, relu6: Relu6Policy) -> list[Region]:
    modules = dict(gm.named_modules())
    single_use = graph.single_use_modules(gm)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    regions, claimed = [], set()
    for node in gm.graph.nodes:
        if node in claimed or not _is_layer_call(node, modules) or node.target not in single_use:
            continue
        claimed.add(node)
        try:
            closure = _collect(node, modules, single_use, relu6)
            region = _build(closure, modules, order)
        except _InvalidRegion:
            continue
        claimed.update(closure.sources)
        regions.append(region)
    return regions


def _policy(relu6: Relu6Policy) -> Relu6Policy:
    graph.check_relu6_policy(relu6)
    return "clip" if relu6 == "clip" else "keep"  # 'replace' is equalize_model's ReLU6 -> ReLU step: here 'keep'


def find_regions(model: nn.Module, relu6: Relu6Policy = "keep") -> list[Region]:
    """The valid regions of `model` (fx-traced; not modified), in graph order of their first source.

    relu6: 'keep' ends a region at ReLU6 (a region reaching one is skipped); 'clip' scales across module ReLU6 calls.
    """
    return _regions_of(graph.trace(model), _policy(relu6))


def _range(names: dict[str, int], modules: dict[str, nn.Module], channels: int, side: Literal["source", "sink"],
           bias_aware: bool) -> torch.Tensor:
    """r_src or r_sink of a region: [channels], the largest |weight| (and |bias| if bias_aware, sources only) per
    region channel over the layers `names`."""
    first = modules[next(iter(names))].weight
    result = torch.zeros(channels, dtype=first.dtype, device=first.device)
    for name, offset in names.items():
        layer = modules[name]
        axis = layers.output_axis(layer) if side == "source" else layers.input_axis(layer)
        r = layers.channel_abs_max(layer.weight, axis)
        if bias_aware and side == "source" and layer.bias is not None:
            r = torch.maximum(r, layer.bias.detach().abs())
        part = result[offset:offset + len(r)]
        part.copy_(torch.maximum(part, r))
    return result


def _equalize(region: Region, model: nn.Module, modules: dict[str, nn.Module], bias_aware: bool) -> float:
    """One scaling of `region` in place; return its largest |log s|."""
    r_src = _range(region.sources, modules, region.channels, "source", bias_aware)
    r_sink = _range(region.sinks, modules, region.channels, "sink", bias_aware)
    s = _finite_or_one(torch.sqrt(r_src) / torch.sqrt(r_sink))  # not sqrt(r_src / r_sink): the ratio can overflow
    for name, offset in region.sources.items():
        layer = modules[name]
        layers.scale_output_channels(layer, 1.0 / s[offset:offset + layers.out_channels(layer)])
    for name, offset in region.sinks.items():
        layer = modules[name]
        layers.scale_input_channels(layer, s[offset:offset + layers.in_channels(layer)])
    for node, offset, channels, axis in region.clips:
        _clip_activations(model, (node,), s[offset:offset + channels], modules, channel_axis=axis)
    region.scale *= s.double().cpu()
    return float(s.log().abs().max())


def equalize_regions(model: nn.Module, relu6: Relu6Policy = "keep", iterations: int = 20, bias_aware: bool = False,
                     tolerance: float = DEFAULT_TOLERANCE) -> list[Region]:
    """Equalize every region of the BN-folded `model` in place; return the regions with their final scales.

    Each pass scales every region once, in graph order; passes repeat until a pass's largest |log s| is below
    `tolerance`, at most `iterations` times. relu6: as `find_regions`; under 'clip' each ReLU6 in a region becomes a
    ChannelClippedReLU with bound u / s (needs one module per call site: clebench.graph.prepare_model).
    bias_aware: r_src[c] also takes |b_src[c]|, so a channel whose folded bias outweighs its weights is not scaled up
    past what the bias allows (the bias is quantized on its own grid, but it shifts the activation range that the
    next quantizer sees); off by default, the DFQ weight-only criterion.
    """
    model = graph.unwrap(model)
    gm = graph.trace(model)
    relu6 = _policy(relu6)
    _check_clip_sites(gm, relu6)
    regions = _regions_of(gm, relu6)
    modules = dict(gm.named_modules())
    for _ in range(iterations if regions else 0):
        if max(_equalize(region, model, modules, bias_aware) for region in regions) < tolerance:
            break
    return regions
