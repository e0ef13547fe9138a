"""How each op kind of clebench.ops exports to ONNX: one lowering per op-table name, registered in LOWERINGS.

A lowering `lower(ex, node)` gets the exporter (clebench.runtimes.export: the fx node's resolved arguments, the probe
runs' outputs `ex.first` / `ex.second`, the GraphBuilder `ex.builder`), writes the node's ONNX nodes and returns what
the node is in the graph: a Value (a float tensor, maybe DequantizeLinear of integers), a tuple / list of Values, or a
Dim / ShapeOf / python int for shape arithmetic. Tensors are [B, C, ...] unless said otherwise.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from clebench import layers, ops
from clebench.quant.encoding import Encoding, bias_encoding
from clebench.quant.sim import ActivationQuantizer
from clebench.runtimes.onnx_graph import Dim, ShapeOf, Value, container

if TYPE_CHECKING:
    from clebench.runtimes.export import _Exporter

Lowering = Callable[["_Exporter", fx.Node], object]
LOWERINGS: dict[str, Lowering] = {}
_INT64_MAX = np.iinfo(np.int64).max


def register(*names: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the lowering of the op-table names `names` (Op.name in clebench.ops)."""
    unknown = [name for name in names if name not in ops.NAMES]
    if unknown:
        raise ValueError(f"ops {unknown} are not in clebench.ops")

    def add(lowering: Lowering) -> Lowering:
        twice = [name for name in names if name in LOWERINGS]
        if twice:
            raise ValueError(f"ops {twice} are lowered twice")
        LOWERINGS.update(dict.fromkeys(names, lowering))
        return lowering
    return add


def _pair(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def _channel_shape(ex: _Exporter, node: fx.Node) -> list[int]:
    """[-1, 1, ...]: a per-channel [C] tensor broadcast over the node's [B, C, ...] output."""
    shape = [1] * (ex.first[node].dim() - 1)
    shape[0] = -1
    return shape


def _reshape(ex: _Exporter, node: fx.Node, x: str, shape: list, label: str) -> str:
    return ex.builder.node("Reshape", [x, ex.int64(node, shape)], f"{node.name}_{label}")


def _unary(ex: _Exporter, node: fx.Node, op: str, **attributes) -> Value:
    return Value(ex.builder.node(op, [ex.value(node, node.args[0]).name], node.name, **attributes))


# -- layers -----------------------------------------------------------------------------------------------------------
def _layer_input(ex: _Exporter, node: fx.Node, layer: nn.Module) -> Value:
    value = ex.value(node, node.args[0])
    if ex.int32_bias and layer.bias is not None and value.quantized is None:
        raise ex.fail(node, "an int32 bias needs the layer's input on an activation grid (act_bits set)")
    return value


def _weight_and_bias(ex: _Exporter, node: fx.Node, layer: nn.Module, value: Value, transpose: bool = False
                     ) -> list[str]:
    """[weight, bias] inputs of a conv / linear: integers + DequantizeLinear (per tensor or per output channel on
    axis 0, axis 1 `transpose`d), the bias in float or as int32 integers on input scale x weight scale."""
    axis = layers.output_axis(layer) if ex.encodings[f"{node.target}.weight"]["per_channel"] else None
    weight_encoding = _encoding_from_dict(ex.encodings[f"{node.target}.weight"], axis)
    weight = layer.weight.t() if transpose else layer.weight
    weight_axis = None if axis is None else (1 if transpose else axis)
    names = [ex.builder.integer_tensor(weight, weight_encoding, f"{node.target}.weight", weight_axis)]
    if layer.bias is None:
        return names
    if not ex.int32_bias:
        names.append(ex.builder.constant(f"{node.target}.bias", layer.bias.detach().cpu().numpy()))
        return names
    entry = ex.encodings.get(f"{node.target}.bias")
    if entry is not None:
        encoding = _encoding_from_dict(entry, 0 if entry["per_channel"] else None)
    else:
        encoding = bias_encoding(float(value.quantized.encoding.scale), weight_encoding, layer.bias.numel())
    names.append(ex.builder.integer_tensor(layer.bias, encoding, f"{node.target}.bias", encoding.axis))
    return names


def _encoding_from_dict(entry: dict, axis: int | None) -> Encoding:
    """Inverse of Encoding.to_dict (lossless: float32 scales went through float64)."""
    return Encoding(
        torch.tensor(entry["scale"], dtype=torch.float32), torch.tensor(entry["zero_point"], dtype=torch.int32),
        entry["bits"], entry["symmetric"], axis,
    )


@register("conv")
def lower_conv(ex: _Exporter, node: fx.Node) -> Value:
    conv = ex.modules[node.target]
    if isinstance(conv, layers.CONV_TRANSPOSE_TYPES):
        raise ex.fail(node, "transposed convolutions are not exported yet")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ex.fail(node, f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} "
                            "(only numeric zero padding)")
    value = _layer_input(ex, node, conv)
    return Value(ex.builder.node(
        "Conv", [value.name, *_weight_and_bias(ex, node, conv, value)], node.name,
        kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=_conv_pads(ex, node, conv),
        dilations=list(conv.dilation), group=conv.groups,
    ))


def _conv_pads(ex: _Exporter, node: fx.Node, conv: nn.Module) -> list[int]:
    """ONNX pads [begin..., end...] of a conv, also of "same-padding" subclasses that pad inside forward: a
    `static_padding` ZeroPad (EfficientNet ports), or TensorFlow's SAME padding, checked against the output size."""
    n = len(conv.kernel_size)
    padding = _pair(conv.padding, n)
    if type(conv).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        return padding + padding
    static = getattr(conv, "static_padding", None)
    if isinstance(static, nn.Identity):
        return padding + padding
    if isinstance(static, nn.ZeroPad2d) and n == 2:
        left, right, top, bottom = static.padding
        return [top + padding[0], left + padding[1], bottom + padding[0], right + padding[1]]
    sizes = ex.first[node.args[0]].shape[2:]
    totals = [max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
              for size, stride, kernel, dilation in zip(sizes, conv.stride, conv.kernel_size, conv.dilation)]
    expected = [-(-size // stride) for size, stride in zip(sizes, conv.stride)]
    if padding != [0] * n or list(ex.first[node].shape[2:]) != expected:
        raise ex.fail(node, f"a {type(conv).__name__} whose forward pads in a way the exporter does not know")
    return [t // 2 for t in totals] + [t - t // 2 for t in totals]


@register("linear")
def lower_linear(ex: _Exporter, node: fx.Node) -> Value:
    """Gemm on [B, C]; MatMul (+ Add) on [B, ..., C]."""
    linear = ex.modules[node.target]
    value = _layer_input(ex, node, linear)
    if ex.first[node].dim() == 2:
        return Value(ex.builder.node("Gemm", [value.name, *_weight_and_bias(ex, node, linear, value)], node.name,
                                     transB=1))
    weight, *bias = _weight_and_bias(ex, node, linear, value, transpose=True)
    product = ex.builder.node("MatMul", [value.name, weight], f"{node.name}_matmul")
    return Value(ex.builder.node("Add", [product, *bias], node.name) if bias else product)


@register("batch_norm")
def lower_batch_norm(ex: _Exporter, node: fx.Node) -> Value:
    bn = ex.modules[node.target]
    if bn.running_mean is None or not bn.affine:
        raise ex.fail(node, "a batch norm without running statistics or affine parameters")
    names = [ex.builder.constant(f"{node.target}.{field}", getattr(bn, field).detach().cpu().float().numpy())
             for field in ("weight", "bias", "running_mean", "running_var")]
    return Value(ex.builder.node("BatchNormalization", [ex.value(node, node.args[0]).name, *names], node.name,
                                 epsilon=float(bn.eps)))


# -- ReLU-like activations (fused with the quantizer after them) ------------------------------------------------------
@register("relu")
def lower_relu(ex: _Exporter, node: fx.Node) -> Value:
    return _clip(ex, node, 0.0, None)


@register("clip")
def lower_clip(ex: _Exporter, node: fx.Node) -> Value:
    module = ex.module(node)
    if module is not None:
        lower, upper = float(module.min_val), float(module.max_val)
    else:
        lower, upper = ops.hardtanh_bounds(node.target, node.args, node.kwargs)
    if lower >= upper:
        raise ex.fail(node, "an empty Hardtanh range")
    return _clip(ex, node, lower, upper)


@register("channel_clip")
def lower_channel_clip(ex: _Exporter, node: fx.Node) -> Value:
    module = ex.modules[node.target]
    if module.channel_axis != 1:
        raise ex.fail(node, f"a per-channel clip on axis {module.channel_axis} (only axis 1)")
    return _clip(ex, node, 0.0, module.upper)


def _clip(ex: _Exporter, node: fx.Node, lower: float | None, upper: float | torch.Tensor | None) -> Value:
    """min(max(x, lower), upper) (None: unbounded; a tensor: one bound per channel).

    Fused with the quantizer after it (the simulator's placement), the clip is done on that quantizer's integers:
    rounding onto a grid is monotone, so Q(clip(x, lo, hi)) = clip(Q(x), Q(lo), Q(hi)) — the simulator's values,
    with a QuantizeLinear straight after the layer (which Runtime fuses into an int8 kernel) and a bound the
    grid already saturates at (ReLU on a zero point of 0) costs nothing.
    """
    value = ex.value(node, node.args[0])
    users = list(node.users)
    quantizer = ex.modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if not isinstance(quantizer, ActivationQuantizer) or value.quantized is not None:
        return _float_clip(ex, node, value, lower, upper)
    encoding = quantizer.encoding
    quantized = ex.quantize_integers(value.name, encoding, f"{node.name}_unclipped_quantized")
    clips = []
    for op, bound in (("Max", lower), ("Min", upper)):
        if bound is None:
            continue
        grid = _on_grid(ex, node, bound, encoding)
        saturated = (grid <= encoding.quant_min).all() if op == "Max" else (grid >= encoding.quant_max).all()
        if not saturated:
            clips.append((op, grid))
    for i, (op, grid) in enumerate(clips):
        output = f"{node.name}_quantized" if i == len(clips) - 1 else f"{node.name}_{op.lower()}_quantized"
        bound_name = ex.builder.constant(f"{node.name}_{op.lower()}_bound", grid)
        quantized = quantized.renamed(ex.builder.node(op, [quantized.name, bound_name], output))
    return ex.builder.dequantize(quantized, node.name)


def _on_grid(ex: _Exporter, node: fx.Node, bound: float | torch.Tensor, encoding: Encoding) -> np.ndarray:
    """The integer(s) the simulator's quantizer maps `bound` to (a per-channel bound shaped [C, 1, ...])."""
    bound = torch.as_tensor(bound, dtype=torch.float32).detach().cpu()
    if bound.dim():
        bound = bound.reshape(_channel_shape(ex, node))
    integers = torch.round(encoding.fake_quantize(bound) / encoding.scale) + encoding.zero_point
    return integers.numpy().astype(container(encoding.bits, encoding.symmetric))


def _float_clip(ex: _Exporter, node: fx.Node, value: Value, lower: float | None,
                upper: float | torch.Tensor | None) -> Value:
    """The clip in float (no quantizer right after it)."""
    if torch.is_tensor(upper):  # per-channel: Relu then Min
        relu = ex.builder.node("Relu", [value.name], f"{node.name}_relu")
        bound = ex.builder.constant(f"{node.name}_upper",
                                    upper.detach().cpu().float().reshape(_channel_shape(ex, node)).numpy())
        return Value(ex.builder.node("Min", [relu, bound], node.name))
    if upper is None:
        return Value(ex.builder.node("Relu", [value.name], node.name))
    bounds = [ex.builder.constant(f"{node.name}_{end}", np.array(bound, dtype=np.float32))
              for end, bound in (("min", lower), ("max", upper))]
    return Value(ex.builder.node("Clip", [value.name, *bounds], node.name))


# -- other activations: float between the quantizers around them -----------------------------------------------------
register("sigmoid")(functools.partial(_unary, op="Sigmoid"))
register("tanh")(functools.partial(_unary, op="Tanh"))
register("hardswish")(functools.partial(_unary, op="HardSwish"))
register("hardsigmoid")(functools.partial(_unary, op="HardSigmoid", alpha=1.0 / 6.0, beta=0.5))


@register("silu")
def lower_silu(ex: _Exporter, node: fx.Node) -> Value:
    value = ex.value(node, node.args[0])
    sigmoid = ex.builder.node("Sigmoid", [value.name], f"{node.name}_sigmoid")
    return Value(ex.builder.node("Mul", [value.name, sigmoid], node.name))


@register("gelu")
def lower_gelu(ex: _Exporter, node: fx.Node) -> Value:
    """0.5 x (1 + erf(x / sqrt 2)), or the tanh form for approximate='tanh' (ONNX's Gelu needs opset 20)."""
    approximate = ex.setting(node, "approximate", 1, "none")
    x = ex.value(node, node.args[0]).name
    build, name = ex.builder, node.name
    constant = lambda label, v: build.constant(f"{name}_{label}", np.array(v, np.float32))  # noqa: E731
    if approximate == "tanh":
        cube = build.node("Mul", [x, build.node("Mul", [x, x], f"{name}_sq")], f"{name}_cube")
        inner = build.node("Add", [x, build.node("Mul", [cube, constant("c", 0.044715)], f"{name}_ccube")],
                           f"{name}_inner")
        scaled = build.node("Mul", [inner, constant("k", math.sqrt(2.0 / math.pi))], f"{name}_scaled")
        curve = build.node("Tanh", [scaled], f"{name}_tanh")
    else:
        scaled = build.node("Div", [x, constant("sqrt2", math.sqrt(2.0))], f"{name}_scaled")
        curve = build.node("Erf", [scaled], f"{name}_erf")
    plus_one = build.node("Add", [curve, constant("one", 1.0)], f"{name}_plus_one")
    half = build.node("Mul", [x, constant("half", 0.5)], f"{name}_half")
    return Value(build.node("Mul", [half, plus_one], name))


@register("leaky_relu")
def lower_leaky_relu(ex: _Exporter, node: fx.Node) -> Value:
    return _unary(ex, node, "LeakyRelu", alpha=float(ex.setting(node, "negative_slope", 1, 0.01)))


@register("elu")
def lower_elu(ex: _Exporter, node: fx.Node) -> Value:
    return _unary(ex, node, "Elu", alpha=float(ex.setting(node, "alpha", 1, 1.0)))


@register("prelu")
def lower_prelu(ex: _Exporter, node: fx.Node) -> Value:
    """PRelu with the slope [C] broadcast over channels ([C, 1, ...]), or a scalar for one shared slope."""
    slope = ex.setting(node, "weight", 1).detach().cpu().float()
    if slope.numel() > 1:
        slope = slope.reshape(_channel_shape(ex, node))
    elif ex.first[node].dim():
        slope = slope.reshape([])
    name = ex.builder.constant(f"{node.name}_slope", slope.numpy())
    return Value(ex.builder.node("PRelu", [ex.value(node, node.args[0]).name, name], node.name))


@register("softmax")
def lower_softmax(ex: _Exporter, node: fx.Node) -> Value:
    axis = ex.setting(node, "dim", 1)
    if axis is None:
        raise ex.fail(node, "softmax without an explicit dim")
    return _unary(ex, node, "Softmax", axis=int(axis))


# -- identities and values moved around (on the integers where there are some) ---------------------------------------
@register("identity")
def lower_identity(ex: _Exporter, node: fx.Node) -> Value:
    return ex.value(node, node.args[0])


@register("stochastic_depth")
def lower_stochastic_depth(ex: _Exporter, node: fx.Node) -> Value:
    if ex.setting(node, "training", 3, True):
        raise ex.fail(node, "stochastic depth in training mode (put the model in eval mode)")
    return ex.value(node, node.args[0])


def _on_integers(ex: _Exporter, node: fx.Node, op: str, extra_inputs: Sequence[str] = (), value: Value | None = None,
                 output: str | None = None, **attributes) -> Value:
    """A value-preserving op on `value` (default: the node's first argument): applied to the integer tensor when
    there is one, then dequantized."""
    value = ex.value(node, node.args[0]) if value is None else value
    output = output or node.name
    if value.quantized is None:
        return Value(ex.builder.node(op, [value.name, *extra_inputs], output, **attributes))
    moved = ex.builder.node(op, [value.quantized.name, *extra_inputs], f"{output}_quantized", **attributes)
    return ex.builder.dequantize(value.quantized.renamed(moved), output)


@register("reshape", "flatten", "unflatten", "reshape_as", "squeeze", "unsqueeze")
def lower_reshape(ex: _Exporter, node: fx.Node) -> Value:
    return _on_integers(ex, node, "Reshape", [ex.int64(node, ex.output_shape(node))])


def _dims(ex: _Exporter, node: fx.Node) -> list:
    """The dims / sizes of x.permute(*dims) / x.expand(*sizes), given as varargs or as one sequence."""
    dims = [ex.resolve(a) for a in node.args[1:]]
    return list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims


@register("permute")
def lower_permute(ex: _Exporter, node: fx.Node) -> Value:
    dims = _dims(ex, node) or list(ex.resolve(node.kwargs["dims"]))
    rank = ex.first[node].dim()
    return _on_integers(ex, node, "Transpose", perm=[d % rank for d in dims])


@register("transpose")
def lower_transpose(ex: _Exporter, node: fx.Node) -> Value:
    rank = ex.first[node].dim()
    if len(node.args) == 1 and not node.kwargs:  # .t()
        first, second = 0, 1
    else:
        first, second = ex.arg(node, 1, "dim0"), ex.arg(node, 2, "dim1")
    perm = list(range(rank))
    perm[first % rank], perm[second % rank] = perm[second % rank], perm[first % rank]
    return _on_integers(ex, node, "Transpose", perm=perm)


@register("expand")
def lower_expand(ex: _Exporter, node: fx.Node) -> Value:
    shape = [1 if isinstance(s, int) and s == -1 else s for s in _dims(ex, node)]  # Expand broadcasts 1 to the size
    return _on_integers(ex, node, "Expand", [ex.int64(node, shape)])


@register("expand_as")
def lower_expand_as(ex: _Exporter, node: fx.Node) -> Value:
    return _on_integers(ex, node, "Expand", [ex.int64(node, ex.shape_of(node, node.args[1]))])


@register("getitem")
def lower_getitem(ex: _Exporter, node: fx.Node) -> object:
    """An element of a shape, of a tuple of graph values, or x[...] of a tensor."""
    container, index = ex.resolve(node.args[0]), node.args[1]
    if isinstance(container, ShapeOf):
        return ex.dim(node, container.value, index) if container.dynamic[index] else container.static[index]
    if isinstance(container, (tuple, list)):
        return container[index]
    if not isinstance(container, Value):
        raise ex.fail(node, "indexing something that is not a tensor")
    return _tensor_index(ex, node, index)


def _tensor_index(ex: _Exporter, node: fx.Node, index) -> Value:
    """x[...]: slices (with steps), ints and Ellipsis over static dims, as Slice then Reshape."""
    index = index if isinstance(index, tuple) else (index,)
    shape = list(ex.first[node.args[0]].shape)
    if any(i is None for i in index) or sum(i is Ellipsis for i in index) > 1:
        raise ex.fail(node, f"indexing with {index!r} (only slices, ints and one Ellipsis)")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    slices = [s for axis, item in enumerate(index) if (s := _slice(ex, node, axis, item, shape)) is not None]
    value = ex.value(node, node.args[0])
    reshape = ex.first[node].dim() != len(shape)
    if slices:
        extra = [ex.int64(node, column) for column in zip(*slices)]  # starts, ends, axes, steps
        value = _on_integers(ex, node, "Slice", extra, value=value, output=f"{node.name}_sliced" if reshape else None)
    if reshape:
        value = _on_integers(ex, node, "Reshape", [ex.int64(node, ex.output_shape(node))], value=value)
    return value


def _slice(ex: _Exporter, node: fx.Node, axis: int, item, shape: list[int]) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of Slice for index `item` of dim `axis` of a `shape` tensor (an int keeps a dim of 1,
    Reshape drops it); None for all of the dim."""
    if isinstance(item, int):
        item = slice(item, item + 1 if item != -1 else None)
    if not isinstance(item, slice) or any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
        raise ex.fail(node, f"indexing with {item!r}")
    if item == slice(None):
        return None
    start, stop, step = item.indices(shape[axis]) if axis else (item.start, item.stop, item.step)
    if axis == 0 and (step not in (None, 1) or start is not None and start < 0):
        raise ex.fail(node, "slicing the batch dim")
    return 0 if start is None else start, _INT64_MAX if stop is None else stop, axis, 1 if step is None else step


def _split(ex: _Exporter, node: fx.Node, sizes: list[int], axis: int) -> list[Value]:
    """The node's first argument split into parts of `sizes` along `axis`, on the integers where there are some."""
    value = ex.value(node, node.args[0])
    source = value.quantized.name if value.quantized is not None else value.name
    names = [ex.builder.name(f"{node.name}_{i}{'_quantized' if value.quantized else ''}") for i in range(len(sizes))]
    ex.builder.node_outputs("Split", [source, ex.int64(node, sizes)], names, axis=axis)
    if value.quantized is None:
        return [Value(name) for name in names]
    return [ex.builder.dequantize(value.quantized.renamed(name), f"{node.name}_{i}") for i, name in enumerate(names)]


@register("chunk", "split")
def lower_chunk(ex: _Exporter, node: fx.Node) -> list[Value]:
    """chunk / split: the part sizes the probe run produced, along `dim`."""
    axis = ex.arg(node, 2, "dim", 0)
    return _split(ex, node, [int(t.shape[axis]) for t in ex.first[node]], axis)


@register("unbind")
def lower_unbind(ex: _Exporter, node: fx.Node) -> list[Value]:
    axis = ex.arg(node, 1, "dim", 0)
    return [_squeezed(ex, node, part, i) for i, part in enumerate(_split(ex, node, [1] * len(ex.first[node]), axis))]


def _squeezed(ex: _Exporter, node: fx.Node, part: Value, i: int) -> Value:
    shape = list(ex.first[node][i].shape)
    dynamic = [a != b for a, b in zip(shape, ex.second[node][i].shape)]
    target = [-1 if d else a for a, d in zip(shape, dynamic)]
    return Value(ex.builder.node("Reshape", [part.name, ex.int64(node, target)], f"{node.name}_{i}_squeezed"))


def _pool_module(ex: _Exporter, node: fx.Node, kind: type, fields: tuple[str, ...], defaults: tuple) -> nn.Module:
    """The pooling module of a pooling node: its own, or the one equivalent to a functional call (its arguments after
    the input)."""
    module = ex.module(node)
    if module is not None:
        return module
    return kind(**{f: ex.arg(node, i + 1, f, d) for i, (f, d) in enumerate(zip(fields, defaults))})


def _pool_attributes(ex: _Exporter, node: fx.Node, pool: nn.Module) -> dict:
    """kernel_shape, strides, pads, ceil_mode of MaxPool / AveragePool for the node's [B, C, *spatial] output."""
    n = ex.first[node].dim() - 2
    padding = _pair(pool.padding, n)
    return dict(kernel_shape=_pair(pool.kernel_size, n), strides=_pair(pool.stride or pool.kernel_size, n),
                pads=padding + padding, ceil_mode=int(pool.ceil_mode))


@register("max_pool")
def lower_max_pool(ex: _Exporter, node: fx.Node) -> Value:
    pool = _pool_module(ex, node, nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                  "return_indices"), (None, None, 0, 1, False, False))
    if pool.return_indices:
        raise ex.fail(node, "max pooling that returns indices")
    dilations = _pair(pool.dilation, ex.first[node].dim() - 2)
    return _on_integers(ex, node, "MaxPool", **_pool_attributes(ex, node, pool), dilations=dilations)


# -- new values -------------------------------------------------------------------------------------------------------
def _binary(ex: _Exporter, node: fx.Node, op: str) -> Value:
    if set(node.kwargs) - {"out", "alpha", "rounding_mode"} or node.kwargs.get("out") is not None:
        raise ex.fail(node, "only a two-operand form without out is supported")
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        raise ex.fail(node, "alpha / rounding_mode")
    if len(node.args) != 2:
        raise ex.fail(node, "only a two-operand form is supported")
    return Value(ex.builder.node(op, [ex.operand(node, a) for a in node.args], node.name))


register("add")(functools.partial(_binary, op="Add"))
register("sub")(functools.partial(_binary, op="Sub"))
register("mul")(functools.partial(_binary, op="Mul"))
register("div")(functools.partial(_binary, op="Div"))
register("matmul")(functools.partial(_binary, op="MatMul"))


@register("mean")
def lower_mean(ex: _Exporter, node: fx.Node) -> Value:
    """ReduceMean; GlobalAveragePool (+ Reshape without keepdim) over all spatial dims, which runtimes run on
    integers."""
    dims = ex.arg(node, 1, "dim")
    keepdim = bool(ex.arg(node, 2, "keepdim", False))
    rank = ex.first[node.args[0]].dim()
    dims = list(range(rank)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    axes = sorted(d % rank for d in dims)
    value = ex.value(node, node.args[0])
    if axes != list(range(2, rank)):
        return Value(ex.builder.reduce("ReduceMean", value.name, axes, keepdim, node.name))
    pooled = ex.builder.node("GlobalAveragePool", [value.name], node.name if keepdim else f"{node.name}_pooled")
    if keepdim:
        return Value(pooled)
    return Value(ex.builder.node("Reshape", [pooled, ex.int64(node, ex.output_shape(node))], node.name))


@register("adaptive_avg_pool")
def lower_adaptive_avg_pool(ex: _Exporter, node: fx.Node) -> Value:
    """Any output size: global pooling for 1, average pooling where the size divides the input, else a
    matrix product with the averaging weights torch uses (floor / ceil window bounds)."""
    spatial = list(ex.first[node.args[0]].shape[2:])
    sizes = [s if o is None else o
             for s, o in zip(spatial, _pair(ex.setting(node, "output_size", 1), len(spatial)))]
    value = ex.value(node, node.args[0])
    if all(o == 1 for o in sizes):
        return Value(ex.builder.node("GlobalAveragePool", [value.name], node.name))
    if sizes == spatial:
        return value
    if all(s % o == 0 for s, o in zip(spatial, sizes)):
        kernel = [s // o for s, o in zip(spatial, sizes)]
        return Value(ex.builder.node("AveragePool", [value.name], node.name, kernel_shape=kernel, strides=kernel))
    if len(spatial) != 2:
        raise ex.fail(node, f"adaptive pooling of {spatial} to {sizes} in {len(spatial)}-D")
    rows = ex.builder.constant(f"{node.name}_rows", _averaging_matrix(spatial[0], sizes[0]))
    columns = ex.builder.constant(f"{node.name}_columns", _averaging_matrix(spatial[1], sizes[1]).T.copy())
    pooled_rows = ex.builder.node("MatMul", [rows, value.name], f"{node.name}_rows_pooled")
    return Value(ex.builder.node("MatMul", [pooled_rows, columns], node.name))


def _averaging_matrix(size: int, output: int) -> np.ndarray:
    """[output, size] weights of adaptive average pooling along one axis: window i is [floor(i size / output),
    ceil((i + 1) size / output)), each value weighted 1 / its length."""
    matrix = np.zeros((output, size), dtype=np.float32)
    for i in range(output):
        start, end = (i * size) // output, -((-(i + 1) * size) // output)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@register("avg_pool")
def lower_avg_pool(ex: _Exporter, node: fx.Node) -> Value:
    pool = _pool_module(ex, node, nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                                  "divisor_override"), (None, None, 0, False, True, None))
    if pool.divisor_override is not None:
        raise ex.fail(node, "average pooling with divisor_override")
    return _unary(ex, node, "AveragePool", **_pool_attributes(ex, node, pool),
                  count_include_pad=int(pool.count_include_pad))


def _part(ex: _Exporter, node: fx.Node, tensor: Value | torch.Tensor) -> str:
    """An input of torch.cat / torch.stack: a graph value or a folded constant."""
    return tensor.name if isinstance(tensor, Value) else ex.tensor_constant(tensor, f"{node.name}_part")


@register("cat")
def lower_cat(ex: _Exporter, node: fx.Node) -> Value:
    names = [_part(ex, node, t) for t in ex.arg(node, 0, "tensors")]
    return Value(ex.builder.node("Concat", names, node.name, axis=ex.arg(node, 1, "dim", 0) % ex.first[node].dim()))


@register("stack")
def lower_stack(ex: _Exporter, node: fx.Node) -> Value:
    tensors = ex.arg(node, 0, "tensors")
    axis = ex.arg(node, 1, "dim", 0) % ex.first[node].dim()
    axes = ex.int64(node, [axis])
    parts = [ex.builder.node("Unsqueeze", [_part(ex, node, t), axes], f"{node.name}_part{i}")
             for i, t in enumerate(tensors)]
    return Value(ex.builder.node("Concat", parts, node.name, axis=axis))


@register("pad")
def lower_pad(ex: _Exporter, node: fx.Node) -> Value:
    """F.pad with constant values: torch lists (begin, end) pairs from the last dim backwards."""
    pad, mode, fill = ex.arg(node, 1, "pad"), ex.arg(node, 2, "mode", "constant"), ex.arg(node, 3, "value")
    if mode != "constant":
        raise ex.fail(node, f"padding mode {mode!r} (only constant)")
    rank = ex.first[node].dim()
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    fill = ex.builder.constant(f"{node.name}_value", np.array(fill or 0.0, np.float32))
    return Value(ex.builder.node("Pad", [ex.value(node, node.args[0]).name, ex.int64(node, begins + ends), fill],
                                 node.name))


@register("einsum")
def lower_einsum(ex: _Exporter, node: fx.Node) -> Value:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    return Value(ex.builder.node("Einsum", [ex.operand(node, o) for o in operands], node.name,
                                 equation=equation.replace(" ", "")))


@register("layer_norm")
def lower_layer_norm(ex: _Exporter, node: fx.Node) -> Value:
    """LayerNormalization over the last len(normalized_shape) dims (scale 1 and bias 0 where there are none)."""
    module = ex.module(node)
    if module is not None:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
    else:
        shape, weight, bias, eps = (ex.arg(node, 1, "normalized_shape"), ex.arg(node, 2, "weight"),
                                    ex.arg(node, 3, "bias"), ex.arg(node, 4, "eps", 1e-5))
    shape = list(shape)
    weight = torch.ones(shape) if weight is None else weight
    bias = torch.zeros(shape) if bias is None else bias
    names = [ex.tensor_constant(t, f"{node.name}_{label}") if torch.is_tensor(t) else ex.value(node, t).name
             for t, label in ((weight, "scale"), (bias, "bias"))]
    return Value(ex.builder.node("LayerNormalization", [ex.value(node, node.args[0]).name, *names], node.name,
                                 axis=-len(shape), epsilon=float(eps)))


# -- python values about shapes ---------------------------------------------------------------------------------------
def _shape_value(ex: _Exporter, node: fx.Node, argument: fx.Node) -> ShapeOf:
    first, second = ex.first[argument].shape, ex.second[argument].shape
    return ShapeOf(ex.value(node, argument), tuple(first), tuple(a != b for a, b in zip(first, second)))


@register("size")
def lower_size(ex: _Exporter, node: fx.Node) -> object:
    """x.size(): a ShapeOf; x.size(d): a Dim where d follows the batch size, else an int."""
    shape = _shape_value(ex, node, node.args[0])
    dim = ex.arg(node, 1, "dim")
    if dim is None:
        return shape
    return ex.dim(node, shape.value, dim) if shape.dynamic[dim] else shape.static[dim]


@register("getattr")
def lower_getattr(ex: _Exporter, node: fx.Node) -> ShapeOf:
    if node.args[1] != "shape":
        raise ex.fail(node, f"attribute {node.args[1]!r} of a tensor")
    return _shape_value(ex, node, node.args[0])


_INT_OPS = {operator.floordiv: "Div", operator.mul: "Mul", operator.add: "Add", operator.sub: "Sub"}


@register("int_arithmetic")
def lower_int_arithmetic(ex: _Exporter, node: fx.Node) -> Dim:
    operation = _INT_OPS.get(node.target)
    if operation is None:
        raise ex.fail(node, "arithmetic on the batch size")
    return Dim(ex.builder.node(operation, [ex.int64(node, ex.resolve(a)) for a in node.args], node.name))


@register("assert")
def lower_assert(ex: _Exporter, node: fx.Node) -> None:
    raise ex.fail(node, "an assertion whose condition depends on the batch size")


# -- attention --------------------------------------------------------------------------------------------------------
def _matmul_bias(ex: _Exporter, node: fx.Node, x: str, weight: torch.Tensor, bias: torch.Tensor | None, label: str,
                 *, constants: str | None = None, output: str | None = None) -> str:
    """F.linear(x, weight, bias) with constant weights [out, in] on x [..., in]: MatMul <node>_<label>_product, then
    Add `output` (default <node>_<label>); the weights are <node>_<constants (default label)>_weight / _bias."""
    constants = f"{node.name}_{constants or label}"
    product = ex.builder.node("MatMul", [x, ex.tensor_constant(weight.t().contiguous(), f"{constants}_weight")],
                              f"{node.name}_{label}_product")
    if bias is None:
        return product
    return ex.builder.node("Add", [product, ex.tensor_constant(bias, f"{constants}_bias")],
                           output or f"{node.name}_{label}")


@register("multihead_attention")
def lower_multihead_attention(ex: _Exporter, node: fx.Node) -> tuple[Value, None]:
    """nn.MultiheadAttention(x, x, x) in float, batch first ([B, L, E]), as torch computes it; (output, None)."""
    attention = ex.modules[node.target]
    query, key, value = (node.args + (None, None, None))[:3]
    if not (query is key is value) or not attention.batch_first or not attention._qkv_same_embed_dim:
        raise ex.fail(node, "only batch-first self-attention with one input projection")
    if node.kwargs.get("need_weights", True) or any(node.kwargs.get(k) is not None
                                                   for k in ("attn_mask", "key_padding_mask")):
        raise ex.fail(node, "attention weights or masks (call it with need_weights=False and no masks)")
    build, name = ex.builder, node.name
    heads, embed = attention.num_heads, attention.embed_dim
    qkv = _matmul_bias(ex, node, ex.value(node, query).name, attention.in_proj_weight, attention.in_proj_bias, "qkv",
                       constants="in")
    length = int(ex.first[query].shape[1])
    split = [build.name(f"{name}_{part}") for part in "qkv"]
    build.node_outputs("Split", [qkv, ex.int64(node, [embed] * 3)], split, axis=2)
    per_head = ex.int64(node, [-1, length, heads, embed // heads])
    q, k, v = [build.node("Transpose", [build.node("Reshape", [t, per_head], f"{t}_heads")], f"{t}_bhld",
                          perm=[0, 2, 1, 3]) for t in split]
    scale = build.constant(f"{name}_scale", np.array(1.0 / math.sqrt(embed // heads), np.float32))
    kt = build.node("Transpose", [k], f"{name}_kt", perm=[0, 1, 3, 2])
    scores = build.node("Mul", [build.node("MatMul", [q, kt], f"{name}_qk"), scale], f"{name}_scores")
    weights = build.node("Softmax", [scores], f"{name}_weights", axis=-1)
    context = build.node("MatMul", [weights, v], f"{name}_context")
    merged = build.node("Reshape", [build.node("Transpose", [context], f"{name}_blhd", perm=[0, 2, 1, 3]),
                                    ex.int64(node, [-1, length, embed])], f"{name}_merged")
    out = attention.out_proj
    return Value(_matmul_bias(ex, node, merged, out.weight, out.bias, "out", output=name)), None


@register("patch_merging_pad")
def lower_patch_merging_pad(ex: _Exporter, node: fx.Node) -> Value:
    """torchvision Swin's patch merging: pad H, W of [B, H, W, C] to even, then the 4 strided sub-grids on C."""
    height, width = ex.first[node.args[0]].shape[-3:-1]
    x = ex.value(node, node.args[0]).name
    if height % 2 or width % 2:
        pads = ex.int64(node, [0, 0, 0, 0, 0, height % 2, width % 2, 0])
        x = ex.builder.node("Pad", [x, pads], f"{node.name}_padded")
    parts = [ex.builder.node("Slice", [x, *(ex.int64(node, v) for v in ([row, column], [_INT64_MAX] * 2, [1, 2],
                                                                         [2, 2]))], f"{node.name}_part{i}")
             for i, (row, column) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
    return Value(ex.builder.node("Concat", parts, node.name, axis=3))


@dataclass(frozen=True)
class _Windows:
    """Swin's attention windows over a [B, H, W, C] input (`size` H, W), padded to whole windows, shifted."""

    size: tuple[int, int]
    padded: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    channels: int

    @property
    def grid(self) -> tuple[int, int]:
        """Windows along H and along W."""
        return self.padded[0] // self.window[0], self.padded[1] // self.window[1]

    @property
    def tokens(self) -> int:
        return self.window[0] * self.window[1]


_WINDOW_ARGUMENTS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                     "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
_WINDOW_DEFAULTS = (None,) * 7 + (0.0, 0.0, None, None, None, True)
_WINDOW_TENSORS = _WINDOW_ARGUMENTS[1:4] + _WINDOW_ARGUMENTS[9:12]  # constant weights, or None


@register("shifted_window_attention")
def lower_shifted_window_attention(ex: _Exporter, node: fx.Node) -> Value:
    """torchvision Swin (v1 and v2) window attention in float on [B, H, W, C], as torchvision computes it, with the
    spatial sizes fixed by the export (only the batch is dynamic)."""
    a = {n: ex.arg(node, i, n, d) for i, (n, d) in enumerate(zip(_WINDOW_ARGUMENTS, _WINDOW_DEFAULTS))}
    if a["training"]:
        raise ex.fail(node, "window attention in training mode (put the model in eval mode)")
    if not all(torch.is_tensor(a[n]) or a[n] is None for n in _WINDOW_TENSORS):
        raise ex.fail(node, "window attention whose weights depend on the input")
    _, height, width, channels = ex.first[node.args[0]].shape
    window = tuple(a["window_size"])
    padded = height + (-height) % window[0], width + (-width) % window[1]
    shift = tuple(0 if window[i] >= padded[i] else a["shift_size"][i] for i in range(2))
    windows = _Windows((height, width), padded, window, shift, channels)
    x = _partition(ex, node, ex.value(node, node.args[0]).name, windows)
    x = _unpartition(ex, node, _window_attention(ex, node, x, a, windows), windows)
    return Value(ex.builder.node("Identity", [x], node.name))


def _partition(ex: _Exporter, node: fx.Node, x: str, windows: _Windows) -> str:
    """[B, H, W, C] -> [B * windows, tokens, C]: padded, shifted back by `shift`, cut into windows."""
    (height, width), padded, window = windows.size, windows.padded, windows.window
    if padded != windows.size:
        pads = ex.int64(node, [0, 0, 0, 0, 0, padded[0] - height, padded[1] - width, 0])
        x = ex.builder.node("Pad", [x, pads], f"{node.name}_padded")
    x = _roll(ex, node, x, [-windows.shift[0], -windows.shift[1]], padded)
    rows, columns = windows.grid
    x = _reshape(ex, node, x, [-1, rows, window[0], columns, window[1], windows.channels], "grid")
    x = ex.builder.node("Transpose", [x], f"{node.name}_windows_grid", perm=[0, 1, 3, 2, 4, 5])
    return _reshape(ex, node, x, [-1, windows.tokens, windows.channels], "windows")


def _unpartition(ex: _Exporter, node: fx.Node, x: str, windows: _Windows) -> str:
    """[B * windows, tokens, C] -> [B, H, W, C]: the inverse of _partition."""
    (height, width), padded, window = windows.size, windows.padded, windows.window
    rows, columns = windows.grid
    x = _reshape(ex, node, x, [-1, rows, columns, window[0], window[1], windows.channels], "unwindow")
    x = _reshape(ex, node, ex.builder.node("Transpose", [x], f"{node.name}_ungrid", perm=[0, 1, 3, 2, 4, 5]),
                 [-1, padded[0], padded[1], windows.channels], "image")
    x = _roll(ex, node, x, windows.shift, padded)
    if padded != windows.size:
        x = ex.builder.node("Slice", [x, ex.int64(node, [0, 0]), ex.int64(node, [height, width]),
                                      ex.int64(node, [1, 2])], f"{node.name}_unpadded")
    return x


def _window_attention(ex: _Exporter, node: fx.Node, x: str, a: dict, windows: _Windows) -> str:
    """Multi-head self-attention within each window, [B * windows, tokens, C] -> the same: scaled dot product (v1) or
    cosine attention with a learnt logit scale (v2), the relative position bias, the shifted windows' mask."""
    build, name = ex.builder, node.name
    tokens, channels, heads = windows.tokens, windows.channels, a["num_heads"]
    qkv_bias = a["qkv_bias"]
    if a["logit_scale"] is not None and qkv_bias is not None:  # v2 has no key bias
        qkv_bias = qkv_bias.clone()
        qkv_bias[qkv_bias.numel() // 3: 2 * qkv_bias.numel() // 3] = 0
    qkv = _matmul_bias(ex, node, x, a["qkv_weight"], qkv_bias, "qkv")
    qkv = _reshape(ex, node, qkv, [-1, tokens, 3, heads, channels // heads], "qkv_heads")
    qkv = build.node("Transpose", [qkv], f"{name}_qkv_split", perm=[2, 0, 3, 1, 4])
    q, k, v = (build.node("Gather", [qkv, build.constant(f"{name}_index{i}", np.array(i, np.int64))],
                          f"{name}_{part}", axis=0) for i, part in enumerate("qkv"))
    if a["logit_scale"] is not None:  # cosine attention
        q, k = _l2_normalize(ex, node, q, "q"), _l2_normalize(ex, node, k, "k")
    else:
        scale = build.constant(f"{name}_scale", np.array((channels // heads) ** -0.5, np.float32))
        q = build.node("Mul", [q, scale], f"{name}_q_scaled")
    attention = build.node("MatMul", [q, build.node("Transpose", [k], f"{name}_kt", perm=[0, 1, 3, 2])], f"{name}_qk")
    if a["logit_scale"] is not None:
        logit = torch.clamp(a["logit_scale"], max=math.log(100.0)).exp()
        attention = build.node("Mul", [attention, ex.tensor_constant(logit, f"{name}_logit_scale")], f"{name}_scaled")
    attention = build.node("Add", [attention, ex.tensor_constant(a["relative_position_bias"], f"{name}_bias")],
                           f"{name}_biased")
    if sum(windows.shift) > 0:
        mask = _window_mask(windows.padded, windows.window, windows.shift)  # [windows, tokens, tokens]
        attention = _reshape(ex, node, attention, [-1, windows.grid[0] * windows.grid[1], heads, tokens, tokens],
                             "per_window")
        attention = build.node("Add", [attention, build.constant(f"{name}_mask", mask[None, :, None])],
                               f"{name}_masked")
        attention = _reshape(ex, node, attention, [-1, heads, tokens, tokens], "masked_flat")
    attention = build.node("Softmax", [attention], f"{name}_softmax", axis=-1)
    x = build.node("Transpose", [build.node("MatMul", [attention, v], f"{name}_context")], f"{name}_tokens",
                   perm=[0, 2, 1, 3])
    return _matmul_bias(ex, node, _reshape(ex, node, x, [-1, tokens, channels], "merged"), a["proj_weight"],
                        a["proj_bias"], "proj")


def _l2_normalize(ex: _Exporter, node: fx.Node, x: str, label: str) -> str:
    """F.normalize(x, dim=-1): x / max(||x||_2, 1e-12)."""
    norm = ex.builder.reduce("ReduceL2", x, [-1], True, f"{node.name}_{label}_norm")
    floor = ex.builder.constant(f"{node.name}_eps", np.array(1e-12, np.float32))
    return ex.builder.node("Div", [x, ex.builder.node("Max", [norm, floor], f"{node.name}_{label}_floor")],
                           f"{node.name}_{label}_normalized")


def _roll(ex: _Exporter, node: fx.Node, x: str, shifts: list[int], sizes: tuple[int, int]) -> str:
    """torch.roll of [B, H, W, C] over dims 1 and 2 (static sizes) as slices and concats."""
    for axis, (shift, size) in enumerate(zip(shifts, sizes), start=1):
        k = shift % size
        if k == 0:
            continue
        head = ex.builder.node("Slice", [x, *(ex.int64(node, [v]) for v in (size - k, size, axis))],
                               f"{node.name}_roll{axis}_head")
        tail = ex.builder.node("Slice", [x, *(ex.int64(node, [v]) for v in (0, size - k, axis))],
                               f"{node.name}_roll{axis}_tail")
        x = ex.builder.node("Concat", [head, tail], f"{node.name}_rolled{axis}", axis=axis)
    return x


def _window_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """Swin's shifted-window attention mask [windows, tokens, tokens]: 0 between tokens of the same image region,
    -100 across regions the cyclic shift brought together."""
    regions = np.zeros(padded, dtype=np.float32)
    bounds = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(2)]
    for index, ((top, bottom), (left, right)) in enumerate((h, w) for h in bounds[0] for w in bounds[1]):
        regions[top:bottom, left:right] = index
    rows, columns = padded[0] // window[0], padded[1] // window[1]
    regions = regions.reshape(rows, window[0], columns, window[1]).transpose(0, 2, 1, 3)
    regions = regions.reshape(rows * columns, window[0] * window[1])
    different = regions[:, None, :] != regions[:, :, None]
    return np.where(different, -100.0, 0.0).astype(np.float32)
