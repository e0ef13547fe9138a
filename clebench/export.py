"""Export a QuantSim as an ONNX QDQ model that encodes its quantizers exactly, and its encodings as AIMET JSON.

The ONNX graph is written node by node from the sim's torch.fx graph (not through torch.onnx), so every quantizer
lands where the simulator has it, with its own scale and zero point:

* each activation quantizer becomes QuantizeLinear -> DequantizeLinear on the tensor named like the fx node it
  quantizes (the model input, a fused layer + ReLU/ReLU6/clip output, an add, a pooling ...); value-preserving ops
  (flatten, identity, dropout) run on the integer tensor, so a layer reads DequantizeLinear directly;
* weights are integer initializers + DequantizeLinear (per tensor, or per output channel on axis 0); weights below
  8 bits are int8 values inside the narrower grid, 9-16 bits use int16 (opset 21);
* biases stay float, or, with int32 biases, are int32 initializers + DequantizeLinear with scale
  input scale x weight scale (what `QuantConfig(int32_bias=True)` simulates, and what int8 kernels need);
* activations have 8 (uint8) or 16 (uint16, opset 21) bits: ONNX's QuantizeLinear saturates at its type's bounds,
  so another width has no exact encoding and is refused (evaluate it with the torch engine);
* a ReLU / ReLU6 / Hardtanh / ChannelClippedReLU (per-channel clip) fused with the quantizer after it becomes
  QuantizeLinear of the layer output, then Max / Min on the integers with the bounds' grid values (per channel
  for the clip), then DequantizeLinear: exactly the simulator's values, since rounding is monotone; a bound the grid
  saturates at anyway (ReLU with zero point 0) is dropped, and the layer keeps a QuantizeLinear right after it,
  which ONNX Runtime fuses into an int8 kernel.

Anything else (a custom module, a function without an ONNX mapping) raises ExportError naming the fx node.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from clebench import layers
from clebench.activations import ChannelClippedReLU, functional_relu6_bound
from clebench.errors import MissingExtraError, UserError
from clebench.graph import TRANSPARENT_FUNCTIONS, TRANSPARENT_TYPES
from clebench.quant.aimet_format import aimet_entries
from clebench.quant.encoding import Encoding, bias_encoding
from clebench.quant.sim import ADD_FUNCTIONS, ADD_METHODS, ActivationQuantizer, QuantSim

EXPORT_FORMAT = 1  # bump when the written graph changes, so cached exports are rebuilt
ONNX_EXTRA_HINT = 'pip install -e ".[onnx]"'
AIMET_ENCODING_VERSION = "0.6.1"
HINT = "evaluate this model with the torch engine (engine='torch' / --engine torch)"
_INT_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


class ExportError(UserError):
    """A model, op or setting that has no exact ONNX QDQ encoding."""


def require(module: str):
    """Import onnx / onnxruntime (the optional `onnx` extra) or raise a one-line MissingExtraError."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(f"{module} is not installed: {ONNX_EXTRA_HINT} (the optional onnx extra)") from None


@dataclass(frozen=True)
class _Quantized:
    """An integer tensor in the graph and the encoding that maps it back to float."""

    name: str
    scale: str
    zero_point: str
    encoding: Encoding


@dataclass(frozen=True)
class _Value:
    """A float tensor in the graph; `quantized` when it is DequantizeLinear of an integer tensor."""

    name: str
    quantized: _Quantized | None = None


def _container(bits: int, signed: bool) -> type:
    """numpy integer type holding a `bits`-bit grid: 8 bits for 2-8 (weights only), 16 for 9-16."""
    width = 8 if bits <= 8 else 16
    return _INT_TYPES[(width, signed)]


class _Builder:
    """Collects ONNX nodes and initializers with unique tensor names."""

    def __init__(self) -> None:
        self.onnx = require("onnx")
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self.opset = 17

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        if array.dtype in (np.int16, np.uint16):
            self.opset = 21  # 16-bit QuantizeLinear / DequantizeLinear
        name = self.name(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array, order="C"), name))  # keeps 0-D
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        output = self.name(output)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def quantize(self, source: str, encoding: Encoding, base: str) -> _Value:
        """QuantizeLinear -> DequantizeLinear of float tensor `source` on a per-tensor activation grid."""
        return self.dequantize(self.quantize_integers(source, encoding, f"{base}_quantized"), base)

    def quantize_integers(self, source: str, encoding: Encoding, output: str) -> _Quantized:
        """QuantizeLinear of float tensor `source` on a per-tensor activation grid."""
        if encoding.bits not in (8, 16):
            raise ExportError(
                f"activation {source!r} has {encoding.bits} bits; ONNX QuantizeLinear saturates at its 8- or 16-bit "
                f"type's bounds, so only act_bits 8 and 16 export exactly; {HINT}"
            )
        scale, zero_point = _grid(encoding, _container(encoding.bits, encoding.symmetric), per_channel=False)
        scale = self.constant(f"{source}_scale", scale)
        zero_point = self.constant(f"{source}_zero_point", zero_point)
        return _Quantized(self.node("QuantizeLinear", [source, scale, zero_point], output), scale, zero_point, encoding)

    def dequantize(self, quantized: _Quantized, base: str) -> _Value:
        """DequantizeLinear of an integer tensor, named <base>_dq."""
        name = self.node("DequantizeLinear", [quantized.name, quantized.scale, quantized.zero_point], f"{base}_dq")
        return _Value(name, quantized)

    def integer_tensor(self, values: torch.Tensor, encoding: Encoding, base: str, axis: int | None) -> str:
        """Integer initializer of the float `values` already on `encoding`'s grid, + DequantizeLinear -> float."""
        shape = [1] * values.dim()
        if axis is not None:
            shape[axis] = -1
        scale, zero_point = encoding.scale.view(shape), encoding.zero_point.view(shape)
        integers = (torch.round(values.detach().float().cpu() / scale) + zero_point).clamp(encoding.quant_min,
                                                                                           encoding.quant_max)
        dtype = np.int32 if encoding.bits == 32 else _container(encoding.bits, encoding.symmetric)
        data = self.constant(base, integers.numpy().astype(dtype))
        scale, zero_point = _grid(encoding, dtype, per_channel=axis is not None)
        scale_name = self.constant(f"{base}_scale", scale)
        zero_name = self.constant(f"{base}_zero_point", zero_point)
        attributes = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [data, scale_name, zero_name], f"{base}_dq", **attributes)


def _grid(encoding: Encoding, dtype: type, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale, `dtype` zero point) of `encoding` for Quantize/DequantizeLinear: 1-D [C] per channel,
    0-D per tensor. Runtime fuses DQ -> Add -> Q into QLinearAdd (and the other QLinear ops) only when per-tensor
    parameters are scalars; a [1]-shaped scale leaves the Add in float between a DequantizeLinear and a
    QuantizeLinear."""
    shape = (-1,) if per_channel else ()
    return (encoding.scale.numpy().astype(np.float32).reshape(shape),
            encoding.zero_point.numpy().astype(dtype).reshape(shape))


def _encoding_from_dict(entry: dict, axis: int | None) -> Encoding:
    """Inverse of Encoding.to_dict (lossless: float32 scales went through float64)."""
    return Encoding(
        torch.tensor(entry["scale"], dtype=torch.float32), torch.tensor(entry["zero_point"], dtype=torch.int32),
        entry["bits"], entry["symmetric"], axis,
    )


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"node {node.name!r} ({type(modules[node.target]).__name__} {node.target!r})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {target})"


def _pair(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


class _Exporter:
    """Walks the sim's fx graph and writes the matching ONNX nodes."""

    def __init__(self, sim: QuantSim, int32_bias: bool) -> None:
        self.sim = sim
        self.gm = sim.model
        self.modules = dict(self.gm.named_modules())
        self.encodings = sim.encodings()
        self.int32_bias = int32_bias
        self.builder = _Builder()
        self.values: dict[fx.Node, _Value | object] = {}
        self.inputs: list = []
        self.outputs: list = []

    def fail(self, node: fx.Node, why: str) -> ExportError:
        return ExportError(f"cannot export {_describe(node, self.modules)} to ONNX: {why}; {HINT}")

    def run(self, dummy: tuple[torch.Tensor, ...]) -> object:
        onnx = self.builder.onnx
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, dummy):
            shape = ["batch", *example.shape[1:]]
            self.inputs.append(onnx.helper.make_tensor_value_info(node.name, onnx.TensorProto.FLOAT, shape))
            self.builder.name(node.name)
            self.values[node] = _Value(node.name)
        for node in self.gm.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                self.values[node] = self.convert(node)
            elif node.op == "output":
                self.output(node)
            elif node.op != "placeholder":
                raise self.fail(node, f"{node.op} nodes (module attributes used as tensors) are not supported")
        graph = onnx.helper.make_graph(self.builder.nodes, "clebench_qdq", self.inputs, self.outputs,
                                       self.builder.initializers)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.builder.opset)],
                                       producer_name="clebench")
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.17
        return model

    def output(self, node: fx.Node) -> None:
        result = node.args[0]
        if not isinstance(result, fx.Node) or not isinstance(self.values.get(result), _Value):
            raise self.fail(node, "the model must return one tensor (logits)")
        value = self.values[result]
        rank = len(result.meta["tensor_meta"].shape) if "tensor_meta" in result.meta else 2
        onnx = self.builder.onnx
        name = self.builder.node("Identity", [value.name], "logits")
        self.outputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                               ["batch"] + [None] * (rank - 1)))

    def value(self, node: fx.Node, argument) -> _Value:
        if not isinstance(argument, fx.Node) or not isinstance(self.values.get(argument), _Value):
            raise self.fail(node, f"argument {argument!r} is not a tensor computed by the graph")
        return self.values[argument]

    # -- dispatch ---------------------------------------------------------------------------------------------
    def convert(self, node: fx.Node) -> _Value:
        if node.op == "call_module":
            module = self.modules[node.target]
            for types, handler in self.module_handlers():
                if isinstance(module, types):
                    return handler(node, module)
            raise self.fail(node, "no ONNX mapping for this module type")
        if node.op == "call_function" and node.target in ADD_FUNCTIONS or node.op == "call_method" and node.target in ADD_METHODS:
            return self.binary(node, "Add")
        if node.op == "call_function" and node.target in (operator.mul, torch.mul):
            return self.binary(node, "Mul")
        if node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_) or (
            node.op == "call_method" and node.target in ("relu", "relu_")
        ):
            return self.activation(node, 0.0, None)
        if node.op == "call_function" and functional_relu6_bound(node.target, node.args, node.kwargs) is not None:
            return self.activation(node, 0.0, functional_relu6_bound(node.target, node.args, node.kwargs))
        if node.op == "call_function" and node.target in TRANSPARENT_FUNCTIONS | {torch.detach, torch.clone} or (
            node.op == "call_method" and node.target in ("contiguous", "detach", "clone")
        ):
            return self.value(node, node.args[0])
        if node.target in (torch.flatten, "flatten"):
            return self.flatten(node, *node.args[1:3], **node.kwargs)
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            return self.global_pool(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
        if node.op == "call_function" and node.target is torch.cat:
            return self.concat(node)
        raise self.fail(node, "no ONNX mapping for this function")

    def module_handlers(self) -> list[tuple[tuple[type, ...], Callable]]:
        return [
            ((ActivationQuantizer,), self.activation_quantizer),
            ((nn.Conv1d, nn.Conv2d, nn.Conv3d), self.conv),
            ((nn.Linear,), self.linear),
            ((nn.ReLU,), lambda node, _: self.activation(node, 0.0, None)),
            ((ChannelClippedReLU,), self.channel_clip),
            ((nn.Hardtanh,), self.hardtanh),
            (TRANSPARENT_TYPES, lambda node, _: self.value(node, node.args[0])),
            ((nn.Flatten,), lambda node, m: self.flatten(node, m.start_dim, m.end_dim)),
            ((nn.AdaptiveAvgPool2d,), lambda node, m: self.global_pool(node, m.output_size)),
            ((nn.MaxPool2d, nn.AvgPool2d), self.pool),
            ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), self.batch_norm),
        ]

    # -- handlers ---------------------------------------------------------------------------------------------
    def activation_quantizer(self, node: fx.Node, module: ActivationQuantizer) -> _Value:
        source = node.args[0]
        value = self.value(node, source)
        if value.quantized is not None and value.quantized.encoding is module.encoding:
            return value  # a fused activation already rounded onto this grid
        return self.builder.quantize(value.name, module.encoding, source.name)

    def layer_input(self, node: fx.Node, layer: nn.Module) -> _Value:
        value = self.value(node, node.args[0])
        if self.int32_bias and layer.bias is not None and value.quantized is None:
            raise self.fail(node, "an int32 bias needs the layer's input on an activation grid (act_bits set)")
        return value

    def weight_and_bias(self, node: fx.Node, layer: nn.Module, value: _Value, transpose: bool = False) -> list[str]:
        axis = layers.output_axis(layer) if self.encodings[f"{node.target}.weight"]["per_channel"] else None
        weight_encoding = _encoding_from_dict(self.encodings[f"{node.target}.weight"], axis)
        weight = layer.weight.t() if transpose else layer.weight
        weight_axis = None if axis is None else (1 if transpose else axis)
        names = [self.builder.integer_tensor(weight, weight_encoding, f"{node.target}.weight", weight_axis)]
        if layer.bias is None:
            return names
        if not self.int32_bias:
            names.append(self.builder.constant(f"{node.target}.bias", layer.bias.detach().cpu().numpy()))
            return names
        entry = self.encodings.get(f"{node.target}.bias")
        if entry is not None:
            encoding = _encoding_from_dict(entry, 0 if entry["per_channel"] else None)
        else:
            input_scale = float(value.quantized.encoding.scale)
            encoding = bias_encoding(input_scale, weight_encoding, layer.bias.numel())
        names.append(self.builder.integer_tensor(layer.bias, encoding, f"{node.target}.bias", encoding.axis))
        return names

    def conv(self, node: fx.Node, conv: nn.Conv2d) -> _Value:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise self.fail(node, f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (only numeric zero padding)")
        value = self.layer_input(node, conv)
        n = len(conv.kernel_size)
        padding = _pair(conv.padding, n)
        name = self.builder.node(
            "Conv", [value.name, *self.weight_and_bias(node, conv, value)], node.name,
            kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=padding + padding,
            dilations=list(conv.dilation), group=conv.groups,
        )
        return _Value(name)

    def linear(self, node: fx.Node, linear: nn.Linear) -> _Value:
        value = self.layer_input(node, linear)
        rank = len(node.meta["tensor_meta"].shape)
        if rank == 2:
            return _Value(self.builder.node("Gemm", [value.name, *self.weight_and_bias(node, linear, value)],
                                            node.name, transB=1))
        weight, *bias = self.weight_and_bias(node, linear, value, transpose=True)
        product = self.builder.node("MatMul", [value.name, weight], f"{node.name}_matmul")
        return _Value(self.builder.node("Add", [product, *bias], node.name) if bias else product)

    def unary(self, node: fx.Node, op: str) -> _Value:
        return _Value(self.builder.node(op, [self.value(node, node.args[0]).name], node.name))

    def activation(self, node: fx.Node, lower: float | None, upper: float | torch.Tensor | None) -> _Value:
        """min(max(x, lower), upper) (None: unbounded; a tensor: one bound per channel).

        Fused with the quantizer after it (the simulator's placement), the clip is done on that quantizer's integers:
        rounding onto a grid is monotone, so Q(clip(x, lo, hi)) = clip(Q(x), Q(lo), Q(hi)) — the simulator's values,
        with a QuantizeLinear straight after the layer (which Runtime fuses into an int8 kernel) and a bound the
        grid already saturates at (ReLU on a zero point of 0) costs nothing.
        """
        value = self.value(node, node.args[0])
        users = list(node.users)
        quantizer = self.modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if not isinstance(quantizer, ActivationQuantizer) or value.quantized is not None:
            return self.float_activation(node, value, lower, upper)
        encoding = quantizer.encoding
        quantized = self.builder.quantize_integers(value.name, encoding, f"{node.name}_unclipped_quantized")
        clips = []
        for op, bound in (("Max", lower), ("Min", upper)):
            if bound is None:
                continue
            grid = self.on_grid(node, bound, encoding)
            saturated = (grid <= encoding.quant_min).all() if op == "Max" else (grid >= encoding.quant_max).all()
            if not saturated:
                clips.append((op, grid))
        for i, (op, grid) in enumerate(clips):
            output = f"{node.name}_quantized" if i == len(clips) - 1 else f"{node.name}_{op.lower()}_quantized"
            bound_name = self.builder.constant(f"{node.name}_{op.lower()}_bound", grid)
            quantized = _Quantized(self.builder.node(op, [quantized.name, bound_name], output), quantized.scale,
                                   quantized.zero_point, encoding)
        return self.builder.dequantize(quantized, node.name)

    def on_grid(self, node: fx.Node, bound: float | torch.Tensor, encoding: Encoding) -> np.ndarray:
        """The integer(s) the simulator's quantizer maps `bound` to (a per-channel bound shaped [C, 1, ...])."""
        bound = torch.as_tensor(bound, dtype=torch.float32).detach().cpu()
        if bound.dim():
            shape = [1] * (len(node.meta["tensor_meta"].shape) - 1)
            shape[0] = -1
            bound = bound.reshape(shape)
        integers = torch.round(encoding.fake_quantize(bound) / encoding.scale) + encoding.zero_point
        return integers.numpy().astype(_container(encoding.bits, encoding.symmetric))

    def float_activation(self, node: fx.Node, value: _Value, lower, upper) -> _Value:
        """The clip in float (no quantizer right after it)."""
        if torch.is_tensor(upper):  # per-channel: Relu then Min
            shape = [1] * (len(node.meta["tensor_meta"].shape) - 1)
            shape[0] = -1
            relu = self.builder.node("Relu", [value.name], f"{node.name}_relu")
            bound = self.builder.constant(f"{node.name}_upper", upper.detach().cpu().float().reshape(shape).numpy())
            return _Value(self.builder.node("Min", [relu, bound], node.name))
        if upper is None:
            return _Value(self.builder.node("Relu", [value.name], node.name))
        bounds = [self.builder.constant(f"{node.name}_{end}", np.array(bound, dtype=np.float32))
                  for end, bound in (("min", lower), ("max", upper))]
        return _Value(self.builder.node("Clip", [value.name, *bounds], node.name))

    def hardtanh(self, node: fx.Node, module: nn.Hardtanh) -> _Value:
        if module.min_val >= module.max_val:
            raise self.fail(node, "an empty Hardtanh range")
        return self.activation(node, float(module.min_val), float(module.max_val))

    def channel_clip(self, node: fx.Node, module: ChannelClippedReLU) -> _Value:
        if module.channel_axis != 1:
            raise self.fail(node, f"a per-channel clip on axis {module.channel_axis} (only axis 1)")
        return self.activation(node, 0.0, module.upper)

    def binary(self, node: fx.Node, op: str) -> _Value:
        if len(node.args) != 2 or set(node.kwargs) - {"out"} or node.kwargs.get("out") is not None:
            raise self.fail(node, "only a two-operand form without alpha / out is supported")
        names = []
        for i, argument in enumerate(node.args):
            if isinstance(argument, (int, float)):
                names.append(self.builder.constant(f"{node.name}_operand{i}", np.array(argument, dtype=np.float32)))
            else:
                names.append(self.value(node, argument).name)
        return _Value(self.builder.node(op, names, node.name))

    def on_integers(self, node: fx.Node, op: str, extra_inputs: list[str] = (), **attributes) -> _Value:
        """A value-preserving op: applied to the integer tensor when there is one, then dequantized."""
        value = self.value(node, node.args[0])
        if value.quantized is None:
            return _Value(self.builder.node(op, [value.name, *extra_inputs], node.name, **attributes))
        moved = self.builder.node(op, [value.quantized.name, *extra_inputs], f"{node.name}_quantized", **attributes)
        return self.builder.dequantize(_Quantized(moved, value.quantized.scale, value.quantized.zero_point,
                                                  value.quantized.encoding), node.name)

    def flatten(self, node: fx.Node, start_dim: int = 0, end_dim: int = -1) -> _Value:
        rank = len(node.args[0].meta["tensor_meta"].shape) if "tensor_meta" in node.args[0].meta else None
        if start_dim != 1 or end_dim not in (-1, (rank or 0) - 1):
            raise self.fail(node, f"flatten({start_dim}, {end_dim}) (only flatten from dim 1 to the end)")
        return self.on_integers(node, "Flatten", axis=1)

    def global_pool(self, node: fx.Node, output_size) -> _Value:
        if _pair(output_size, 2) != [1, 1]:
            raise self.fail(node, f"adaptive average pooling to {output_size} (only to 1x1)")
        return self.unary(node, "GlobalAveragePool")

    def pool(self, node: fx.Node, module: nn.Module) -> _Value:
        kernel = _pair(module.kernel_size, 2)
        padding = _pair(module.padding, 2)
        attributes = {"kernel_shape": kernel, "strides": _pair(module.stride or module.kernel_size, 2),
                      "pads": padding + padding, "ceil_mode": int(module.ceil_mode)}
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise self.fail(node, "max pooling that returns indices")
            return self.on_integers(node, "MaxPool", dilations=_pair(module.dilation, 2), **attributes)
        if module.divisor_override is not None:
            raise self.fail(node, "average pooling with divisor_override")
        return _Value(self.builder.node("AveragePool", [self.value(node, node.args[0]).name], node.name,
                                        count_include_pad=int(module.count_include_pad), **attributes))

    def batch_norm(self, node: fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> _Value:
        if bn.running_mean is None or not bn.affine:
            raise self.fail(node, "a batch norm without running statistics or affine parameters")
        names = [self.builder.constant(f"{node.target}.{field}", getattr(bn, field).detach().cpu().float().numpy())
                 for field in ("weight", "bias", "running_mean", "running_var")]
        return _Value(self.builder.node("BatchNormalization", [self.value(node, node.args[0]).name, *names],
                                        node.name, epsilon=float(bn.eps)))

    def concat(self, node: fx.Node) -> _Value:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        names = [self.value(node, t).name for t in tensors]
        return _Value(self.builder.node("Concat", names, node.name, axis=dim))


def _dummy_tuple(dummy_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    dummy = (dummy_input,) if torch.is_tensor(dummy_input) else tuple(dummy_input)
    if not dummy or not all(torch.is_tensor(x) for x in dummy):
        raise TypeError(f"dummy_input must be a tensor or a tuple of tensors, got {type(dummy_input).__name__}")
    return dummy


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def export_onnx(sim: QuantSim, dummy_input: torch.Tensor | tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                int32_bias: bool | None = None) -> Path:
    """Write `sim` as an ONNX QDQ model to `path` (atomically) and return the path.

    dummy_input: an input the sim accepts (its shape past the batch dim fixes the ONNX input shape; batch is dynamic).
    int32_bias: write biases as int32 + DequantizeLinear (None: as the sim does, i.e. sim.config.int32_bias). Real
    int8 kernels need int32 biases, so onnxruntime-int8 exports with True.
    Raises ExportError naming the node for anything without an exact ONNX encoding.
    """
    if not isinstance(sim, QuantSim):
        raise TypeError(f"export_onnx needs a clebench.quant.QuantSim, got {type(sim).__name__}")
    int32_bias = sim.config.int32_bias if int32_bias is None else int32_bias
    if int32_bias and sim.config.act_bits is None:
        raise ExportError(f"int32 biases need quantized activations; {sim.config.name} leaves them in float")
    model = _Exporter(sim, int32_bias).run(_dummy_tuple(dummy_input))
    require("onnx").checker.check_model(model)
    path = Path(path)
    _write_atomically(path, model.SerializeToString())
    return path


def aimet_encodings(sim: QuantSim) -> dict:
    """The sim's encodings in AIMET's JSON format (version 0.6.1).

    activation_encodings are keyed by the float tensor each quantizer reads, named as in `export_onnx`'s graph
    (the fx node name); param_encodings by parameter name ("<layer>.weight", "<layer>.bias" for int32 biases).
    """
    encodings = sim.encodings()
    config = sim.config
    return {
        "version": AIMET_ENCODING_VERSION,
        "activation_encodings": {name: aimet_entries(e) for name, e in encodings.items() if e["kind"] == "activation"},
        "param_encodings": {name: aimet_entries(e) for name, e in encodings.items() if e["kind"] != "activation"},
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": config.act_bits, "param_bitwidth": config.weight_bits, "dtype": "int",
            "is_symmetric": config.weight_symmetric, "per_channel_quantization": config.per_channel,
            "quant_scheme": {"minmax": "post_training_tf", "mse": "post_training_tf_enhanced",
                             "percentile": "post_training_percentile"}[config.calibration],
        },
    }


def export_encodings(sim: QuantSim, path: str | os.PathLike) -> Path:
    """Write `aimet_encodings(sim)` as JSON to `path` (atomically) and return the path."""
    path = Path(path)
    _write_atomically(path, (json.dumps(aimet_encodings(sim), indent=2) + "\n").encode())
    return path


def sim_key(sim: QuantSim, dummy_input: torch.Tensor | tuple[torch.Tensor, ...], **options) -> str:
    """A hex digest identifying what export_onnx would write: graph, weights, encodings, input shape, options."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": EXPORT_FORMAT, "graph": str(sim.model.graph), "options": options,
                              "encodings": sim.encodings(),
                              "inputs": [list(x.shape[1:]) for x in _dummy_tuple(dummy_input)]},
                             sort_keys=True, default=str).encode())
    for name, tensor in sim.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_export(sim: QuantSim, dummy_input: torch.Tensor | tuple[torch.Tensor, ...], workdir: str | os.PathLike, *,
                  int32_bias: bool | None = None) -> Path:
    """export_onnx into `workdir`/<sim_key>.onnx, reusing a file written before only if its sha256 (kept beside it
    in <key>.sha256 when it was written) still matches; a missing or corrupt file is exported again."""
    workdir = Path(workdir)
    key = sim_key(sim, dummy_input, int32_bias=int32_bias)
    path, checksum = workdir / f"{key}.onnx", workdir / f"{key}.sha256"
    if path.is_file() and checksum.is_file() and checksum.read_text().strip() == file_digest(path):
        return path
    export_onnx(sim, dummy_input, path, int32_bias=int32_bias)
    _write_atomically(checksum, (file_digest(path) + "\n").encode())
    return path
