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
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from clebench import layers, ops
from clebench.errors import MissingExtraError, UserError
from clebench.quant.aimet_format import aimet_entries
from clebench.quant.encoding import Encoding, bias_encoding
from clebench.quant.sim import ActivationQuantizer, QuantSim

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

    def __init__(self, opset: int) -> None:
        self.onnx = require("onnx")
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self.opset = opset

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array, order="C"), name))  # keeps 0-D
        return name

    def reduce(self, op: str, source: str, axes: list[int], keepdims: bool, output: str) -> str:
        """ReduceMean / ReduceL2 ...: axes are an attribute up to opset 17, an input from opset 18."""
        if self.opset >= 18:
            axes_name = self.constant(f"{output}_axes", np.array(axes, dtype=np.int64))
            return self.node(op, [source, axes_name], output, keepdims=int(keepdims))
        return self.node(op, [source], output, axes=axes, keepdims=int(keepdims))

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
        live = scale > 0  # a zero-scale grid (an all-zero channel, a bias on a constant input) holds only zero
        integers = (torch.round(values.detach().float().cpu() / torch.where(live, scale, 1.0)) + zero_point)
        integers = torch.where(live, integers, zero_point.float()).clamp(encoding.quant_min, encoding.quant_max)
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


@dataclass(frozen=True)
class _Dim:
    """A python int that depends on the batch size (x.size(0) and what is computed from it): int64 [1] in the graph."""

    name: str


@dataclass(frozen=True)
class _ShapeOf:
    """x.shape / x.size() of a graph tensor whose batch size is dynamic: indexed into _Dim or static ints."""

    value: _Value
    static: tuple[int, ...]  # the sizes seen at the first probe batch
    dynamic: tuple[bool, ...]  # which dims change with the batch size


def _same(a, b) -> bool:
    """Equal probe values (tensors by shape and value; tuples element-wise)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class _Probe(fx.Interpreter):
    """Runs the sim's graph and keeps every node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.outputs: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.outputs[node] = result
        return result


def _probe(gm: fx.GraphModule, dummy: tuple[torch.Tensor, ...]) -> tuple[dict, dict]:
    """Every node's output for two random inputs of batch sizes 2 and 3: what does not change is a constant, and which
    dims and python ints follow the batch size."""
    results = []
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for batch in (2, 3):
        inputs = [torch.randn((batch, *x.shape[1:]), generator=generator).to(device=device, dtype=x.dtype)
                  for x in dummy]
        probe = _Probe(gm)
        with torch.no_grad():
            probe.run(*inputs)
        results.append(probe.outputs)
    return results[0], results[1]


class _Exporter:
    """Walks the sim's fx graph and writes the matching ONNX nodes, one handler per op of clebench.ops."""

    def __init__(self, sim: QuantSim, int32_bias: bool, dummy: tuple[torch.Tensor, ...]) -> None:
        self.sim = sim
        self.gm = sim.model
        self.modules = dict(self.gm.named_modules())
        self.encodings = sim.encodings()
        self.int32_bias = int32_bias
        self.dummy = dummy
        wide = any(entry["bits"] > 8 for entry in self.encodings.values() if entry["kind"] != "bias")
        self.builder = _Builder(opset=21 if wide else 17)  # 16-bit QuantizeLinear / DequantizeLinear need opset 21
        self.values: dict[fx.Node, object] = {}
        self.constants: dict[int, str] = {}  # id of a folded tensor -> its initializer
        self.inputs: list = []
        self.outputs: list = []
        self.first, self.second = _probe(self.gm, dummy)

    def fail(self, node: fx.Node, why: str) -> ExportError:
        return ExportError(f"cannot export {_describe(node, self.modules)} to ONNX: {why}; {HINT}")

    def run(self) -> object:
        onnx = self.builder.onnx
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, self.dummy):
            shape = ["batch", *example.shape[1:]]
            self.inputs.append(onnx.helper.make_tensor_value_info(node.name, onnx.TensorProto.FLOAT, shape))
            self.builder.name(node.name)
            self.values[node] = _Value(node.name)
        for node in self.gm.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method", "get_attr"):
                self.values[node] = self.convert(node)
            elif node.op == "output":
                self.output(node)
        nodes, initializers = _reachable(self.builder.nodes, self.builder.initializers, self.outputs)
        graph = onnx.helper.make_graph(nodes, "clebench_qdq", self.inputs, self.outputs, initializers)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.builder.opset)],
                                       producer_name="clebench")
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.17
        return model

    def output(self, node: fx.Node) -> None:
        result = node.args[0]
        if not isinstance(result, fx.Node) or not isinstance(self.values.get(result), _Value):
            raise self.fail(node, "the model must return one tensor (logits)")
        value = self.values[result]
        rank = self.first[result].dim()
        onnx = self.builder.onnx
        name = self.builder.node("Identity", [value.name], "logits")
        self.outputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                               ["batch"] + [None] * (rank - 1)))

    # -- values -----------------------------------------------------------------------------------------------
    def is_constant(self, node: fx.Node) -> bool:
        """Its output is the same for every input (parameters, shapes' static parts, tensors made from them)."""
        return node.op != "placeholder" and _same(self.first.get(node), self.second.get(node))

    def resolve(self, argument):
        """An fx argument with nodes replaced by what the export made of them (recursively through lists)."""
        if isinstance(argument, fx.Node):
            return self.values[argument]
        if isinstance(argument, (tuple, list)):
            return type(argument)(self.resolve(a) for a in argument)
        return argument

    def arg(self, node: fx.Node, index: int, name: str, default=None):
        """Positional argument `index` or keyword `name` of the call, resolved."""
        if len(node.args) > index:
            return self.resolve(node.args[index])
        return self.resolve(node.kwargs.get(name, default))

    def value(self, node: fx.Node, argument) -> _Value:
        resolved = self.resolve(argument)
        if isinstance(resolved, _Value):
            return resolved
        if torch.is_tensor(resolved):
            return _Value(self.tensor_constant(resolved, f"{node.name}_constant"))
        raise self.fail(node, f"argument {argument!r} is not a tensor computed by the graph")

    def tensor_constant(self, tensor: torch.Tensor, base: str) -> str:
        if id(tensor) not in self.constants:
            array = tensor.detach().cpu()
            array = array.float() if array.is_floating_point() else array
            self.constants[id(tensor)] = self.builder.constant(base, array.numpy())
        return self.constants[id(tensor)]

    def operand(self, node: fx.Node, argument) -> str:
        """An ONNX input for a tensor, a folded constant or a python number (as float32)."""
        resolved = self.resolve(argument)
        if isinstance(resolved, (int, float)) and not isinstance(resolved, bool):
            return self.builder.constant(f"{node.name}_scalar", np.array(resolved, dtype=np.float32))
        return self.value(node, argument).name

    def int64(self, node: fx.Node, values) -> str:
        """An int64 [n] ONNX input from python ints and _Dims (a shape, axes, split sizes)."""
        values = [values] if isinstance(values, (int, _Dim)) else list(values)
        if all(isinstance(v, int) for v in values):
            return self.builder.constant(f"{node.name}_ints", np.array(values, dtype=np.int64))
        parts = [v.name if isinstance(v, _Dim) else self.builder.constant(f"{node.name}_int", np.array([v], np.int64))
                 for v in values]
        return self.builder.node("Concat", parts, f"{node.name}_shape", axis=0)

    def shape_of(self, node: fx.Node, argument) -> list:
        """The sizes of a tensor argument: static ints, and a _Dim for each dim that follows the batch size."""
        source = argument if isinstance(argument, fx.Node) else None
        first, second = self.first[source].shape, self.second[source].shape
        value = self.value(node, argument)
        return [self.dim(node, value, i) if a != b else a for i, (a, b) in enumerate(zip(first, second))]

    def dim(self, node: fx.Node, value: _Value, index: int) -> _Dim:
        shape = self.builder.node("Shape", [value.name], f"{node.name}_shape{index}", start=index, end=index + 1)
        return _Dim(shape)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def convert(self, node: fx.Node) -> object:
        if self.is_constant(node):
            return self.first[node]
        if node.op == "get_attr":
            raise self.fail(node, "a module attribute that changes with the input")
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, ActivationQuantizer):
            return self.activation_quantizer(node, module)
        op = ops.op_of(node, self.modules)
        if not lowers(op):
            what = "this op" if op is None else f"op {op.name!r}"
            raise self.fail(node, f"no ONNX mapping for {what} (clebench.ops lists what the exporter lowers)")
        return getattr(self, f"lower_{op.name}")(node)

    def activation_quantizer(self, node: fx.Node, module: ActivationQuantizer) -> _Value:
        source = node.args[0]
        value = self.value(node, source)
        if value.quantized is not None and value.quantized.encoding is module.encoding:
            return value  # a fused activation already rounded onto this grid
        return self.builder.quantize(value.name, module.encoding, source.name)

    # -- layers -----------------------------------------------------------------------------------------------
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

    def lower_conv(self, node: fx.Node) -> _Value:
        conv = self.modules[node.target]
        if isinstance(conv, layers.CONV_TRANSPOSE_TYPES):
            raise self.fail(node, "transposed convolutions are not exported yet")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise self.fail(node, f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (only numeric zero padding)")
        value = self.layer_input(node, conv)
        name = self.builder.node(
            "Conv", [value.name, *self.weight_and_bias(node, conv, value)], node.name,
            kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=self.conv_pads(node, conv),
            dilations=list(conv.dilation), group=conv.groups,
        )
        return _Value(name)

    def conv_pads(self, node: fx.Node, conv: nn.Module) -> list[int]:
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
        sizes = self.first[node.args[0]].shape[2:]
        totals = [max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
                  for size, stride, kernel, dilation in zip(sizes, conv.stride, conv.kernel_size, conv.dilation)]
        expected = [-(-size // stride) for size, stride in zip(sizes, conv.stride)]
        if padding != [0] * n or list(self.first[node].shape[2:]) != expected:
            raise self.fail(node, f"a {type(conv).__name__} whose forward pads in a way the exporter does not know")
        return [t // 2 for t in totals] + [t - t // 2 for t in totals]

    def lower_linear(self, node: fx.Node) -> _Value:
        linear = self.modules[node.target]
        value = self.layer_input(node, linear)
        if self.first[node].dim() == 2:
            return _Value(self.builder.node("Gemm", [value.name, *self.weight_and_bias(node, linear, value)],
                                            node.name, transB=1))
        weight, *bias = self.weight_and_bias(node, linear, value, transpose=True)
        product = self.builder.node("MatMul", [value.name, weight], f"{node.name}_matmul")
        return _Value(self.builder.node("Add", [product, *bias], node.name) if bias else product)

    def lower_batch_norm(self, node: fx.Node) -> _Value:
        bn = self.modules[node.target]
        if bn.running_mean is None or not bn.affine:
            raise self.fail(node, "a batch norm without running statistics or affine parameters")
        names = [self.builder.constant(f"{node.target}.{field}", getattr(bn, field).detach().cpu().float().numpy())
                 for field in ("weight", "bias", "running_mean", "running_var")]
        return _Value(self.builder.node("BatchNormalization", [self.value(node, node.args[0]).name, *names],
                                        node.name, epsilon=float(bn.eps)))

    # -- ReLU-like activations (fused with the quantizer after them) -----------------------------------------------
    def lower_relu(self, node: fx.Node) -> _Value:
        return self.clip(node, 0.0, None)

    def lower_clip(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            lower, upper = float(module.min_val), float(module.max_val)
        else:
            lower, upper = ops.hardtanh_bounds(node.target, node.args, node.kwargs)
        if lower >= upper:
            raise self.fail(node, "an empty Hardtanh range")
        return self.clip(node, lower, upper)

    def lower_channel_clip(self, node: fx.Node) -> _Value:
        module = self.modules[node.target]
        if module.channel_axis != 1:
            raise self.fail(node, f"a per-channel clip on axis {module.channel_axis} (only axis 1)")
        return self.clip(node, 0.0, module.upper)

    def clip(self, node: fx.Node, lower: float | None, upper: float | torch.Tensor | None) -> _Value:
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
            return self.float_clip(node, value, lower, upper)
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
            bound = bound.reshape(self.channel_shape(node))
        integers = torch.round(encoding.fake_quantize(bound) / encoding.scale) + encoding.zero_point
        return integers.numpy().astype(_container(encoding.bits, encoding.symmetric))

    def channel_shape(self, node: fx.Node) -> list[int]:
        """[-1, 1, ...]: a per-channel [C] tensor broadcast over a [B, C, ...] output."""
        shape = [1] * (self.first[node].dim() - 1)
        shape[0] = -1
        return shape

    def float_clip(self, node: fx.Node, value: _Value, lower, upper) -> _Value:
        """The clip in float (no quantizer right after it)."""
        if torch.is_tensor(upper):  # per-channel: Relu then Min
            relu = self.builder.node("Relu", [value.name], f"{node.name}_relu")
            bound = self.builder.constant(f"{node.name}_upper",
                                          upper.detach().cpu().float().reshape(self.channel_shape(node)).numpy())
            return _Value(self.builder.node("Min", [relu, bound], node.name))
        if upper is None:
            return _Value(self.builder.node("Relu", [value.name], node.name))
        bounds = [self.builder.constant(f"{node.name}_{end}", np.array(bound, dtype=np.float32))
                  for end, bound in (("min", lower), ("max", upper))]
        return _Value(self.builder.node("Clip", [value.name, *bounds], node.name))

    # -- other activations: float between the quantizers around them ----------------------------------------------
    def unary(self, node: fx.Node, op: str, **attributes) -> _Value:
        return _Value(self.builder.node(op, [self.value(node, node.args[0]).name], node.name, **attributes))

    def lower_sigmoid(self, node: fx.Node) -> _Value:
        return self.unary(node, "Sigmoid")

    def lower_tanh(self, node: fx.Node) -> _Value:
        return self.unary(node, "Tanh")

    def lower_hardswish(self, node: fx.Node) -> _Value:
        return self.unary(node, "HardSwish")

    def lower_hardsigmoid(self, node: fx.Node) -> _Value:
        return self.unary(node, "HardSigmoid", alpha=1.0 / 6.0, beta=0.5)

    def lower_silu(self, node: fx.Node) -> _Value:
        value = self.value(node, node.args[0])
        sigmoid = self.builder.node("Sigmoid", [value.name], f"{node.name}_sigmoid")
        return _Value(self.builder.node("Mul", [value.name, sigmoid], node.name))

    def lower_gelu(self, node: fx.Node) -> _Value:
        """0.5 x (1 + erf(x / sqrt 2)), or the tanh form for approximate='tanh' (ONNX's Gelu needs opset 20)."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        approximate = module.approximate if module is not None else self.arg(node, 1, "approximate", "none")
        x = self.value(node, node.args[0]).name
        constant = lambda label, v: self.builder.constant(f"{node.name}_{label}", np.array(v, np.float32))  # noqa: E731
        if approximate == "tanh":
            cube = self.builder.node("Mul", [x, self.builder.node("Mul", [x, x], f"{node.name}_sq")], f"{node.name}_cube")
            inner = self.builder.node("Add", [x, self.builder.node("Mul", [cube, constant("c", 0.044715)],
                                                                   f"{node.name}_ccube")], f"{node.name}_inner")
            scaled = self.builder.node("Mul", [inner, constant("k", math.sqrt(2.0 / math.pi))], f"{node.name}_scaled")
            curve = self.builder.node("Tanh", [scaled], f"{node.name}_tanh")
        else:
            scaled = self.builder.node("Div", [x, constant("sqrt2", math.sqrt(2.0))], f"{node.name}_scaled")
            curve = self.builder.node("Erf", [scaled], f"{node.name}_erf")
        plus_one = self.builder.node("Add", [curve, constant("one", 1.0)], f"{node.name}_plus_one")
        half = self.builder.node("Mul", [x, constant("half", 0.5)], f"{node.name}_half")
        return _Value(self.builder.node("Mul", [half, plus_one], node.name))

    def lower_leaky_relu(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        slope = module.negative_slope if module is not None else self.arg(node, 1, "negative_slope", 0.01)
        return self.unary(node, "LeakyRelu", alpha=float(slope))

    def lower_elu(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        alpha = module.alpha if module is not None else self.arg(node, 1, "alpha", 1.0)
        return self.unary(node, "Elu", alpha=float(alpha))

    def lower_prelu(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        weight = module.weight if module is not None else self.arg(node, 1, "weight")
        slope = weight.detach().cpu().float()
        rank = self.first[node].dim()
        if slope.numel() > 1:
            slope = slope.reshape(self.channel_shape(node))
        elif rank:
            slope = slope.reshape([])
        name = self.builder.constant(f"{node.name}_slope", slope.numpy())
        return _Value(self.builder.node("PRelu", [self.value(node, node.args[0]).name, name], node.name))

    def lower_softmax(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        axis = module.dim if module is not None else self.arg(node, 1, "dim")
        if axis is None:
            raise self.fail(node, "softmax without an explicit dim")
        return self.unary(node, "Softmax", axis=int(axis))

    # -- identities and values moved around (on the integers where there are some) ------------------------------
    def lower_identity(self, node: fx.Node) -> _Value:
        return self.value(node, node.args[0])

    def lower_stochastic_depth(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        training = module.training if module is not None else self.arg(node, 3, "training", True)
        if training:
            raise self.fail(node, "stochastic depth in training mode (put the model in eval mode)")
        return self.value(node, node.args[0])

    def on_integers(self, node: fx.Node, op: str, extra_inputs: list[str] = (), value: _Value | None = None,
                    output: str | None = None, **attributes) -> _Value:
        """A value-preserving op on `value` (default: the node's first argument): applied to the integer tensor when
        there is one, then dequantized."""
        value = self.value(node, node.args[0]) if value is None else value
        output = output or node.name
        if value.quantized is None:
            return _Value(self.builder.node(op, [value.name, *extra_inputs], output, **attributes))
        moved = self.builder.node(op, [value.quantized.name, *extra_inputs], f"{output}_quantized", **attributes)
        return self.builder.dequantize(_Quantized(moved, value.quantized.scale, value.quantized.zero_point,
                                                  value.quantized.encoding), output)

    def reshape_to(self, node: fx.Node, shape: list) -> _Value:
        return self.on_integers(node, "Reshape", [self.int64(node, shape)])

    def output_shape(self, node: fx.Node) -> list:
        """This node's output sizes: static ints, -1 for the one dim that follows the batch size."""
        first, second = self.first[node].shape, self.second[node].shape
        dynamic = [a != b for a, b in zip(first, second)]
        if sum(dynamic) > 1:
            raise self.fail(node, "more than one output dim follows the batch size")
        return [-1 if d else int(a) for a, d in zip(first, dynamic)]

    def lower_reshape(self, node: fx.Node) -> _Value:
        return self.reshape_to(node, self.output_shape(node))

    lower_flatten = lower_reshape
    lower_unflatten = lower_reshape
    lower_reshape_as = lower_reshape
    lower_squeeze = lower_reshape
    lower_unsqueeze = lower_reshape

    def lower_permute(self, node: fx.Node) -> _Value:
        dims = [self.resolve(a) for a in node.args[1:]] or list(self.resolve(node.kwargs["dims"]))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        rank = self.first[node].dim()
        return self.on_integers(node, "Transpose", perm=[d % rank for d in dims])

    def lower_transpose(self, node: fx.Node) -> _Value:
        rank = self.first[node].dim()
        if len(node.args) == 1 and not node.kwargs:  # .t()
            first, second = 0, 1
        else:
            first, second = self.arg(node, 1, "dim0"), self.arg(node, 2, "dim1")
        perm = list(range(rank))
        perm[first % rank], perm[second % rank] = perm[second % rank], perm[first % rank]
        return self.on_integers(node, "Transpose", perm=perm)

    def lower_expand(self, node: fx.Node) -> _Value:
        sizes = [self.resolve(a) for a in node.args[1:]]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        shape = [1 if isinstance(s, int) and s == -1 else s for s in sizes]  # Expand broadcasts a 1 to the input's size
        return self.on_integers(node, "Expand", [self.int64(node, shape)])

    def lower_expand_as(self, node: fx.Node) -> _Value:
        return self.on_integers(node, "Expand", [self.int64(node, self.shape_of(node, node.args[1]))])

    def lower_getitem(self, node: fx.Node) -> object:
        container, index = self.resolve(node.args[0]), node.args[1]
        if isinstance(container, _ShapeOf):
            return self.dim(node, container.value, index) if container.dynamic[index] else container.static[index]
        if isinstance(container, (tuple, list)):
            return container[index]
        if not isinstance(container, _Value):
            raise self.fail(node, "indexing something that is not a tensor")
        return self.tensor_index(node, index)

    def tensor_index(self, node: fx.Node, index) -> _Value:
        """x[...]: slices (with steps), ints and Ellipsis over static dims, as Slice then Reshape."""
        index = index if isinstance(index, tuple) else (index,)
        shape = list(self.first[node.args[0]].shape)
        if any(i is None for i in index) or sum(i is Ellipsis for i in index) > 1:
            raise self.fail(node, f"indexing with {index!r} (only slices, ints and one Ellipsis)")
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
        starts, ends, axes, steps = [], [], [], []
        for axis, item in enumerate(index):
            if isinstance(item, int):
                item = slice(item, item + 1 if item != -1 else None)
            if not isinstance(item, slice) or any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
                raise self.fail(node, f"indexing with {item!r}")
            if item == slice(None):
                continue
            start, stop, step = item.indices(shape[axis]) if axis else (item.start, item.stop, item.step)
            if axis == 0 and (step not in (None, 1) or start is not None and start < 0):
                raise self.fail(node, "slicing the batch dim")
            starts.append(0 if start is None else start)
            ends.append(np.iinfo(np.int64).max if stop is None else stop)
            axes.append(axis)
            steps.append(1 if step is None else step)
        value = self.value(node, node.args[0])
        reshape = self.first[node].dim() != len(shape)
        if starts:
            extra = [self.int64(node, v) for v in (starts, ends, axes, steps)]
            value = self.on_integers(node, "Slice", extra, value=value, output=f"{node.name}_sliced" if reshape else None)
        if reshape:
            value = self.on_integers(node, "Reshape", [self.int64(node, self.output_shape(node))], value=value)
        return value

    def split_into(self, node: fx.Node, sizes: list[int], axis: int) -> list[_Value]:
        value = self.value(node, node.args[0])
        source = value.quantized.name if value.quantized is not None else value.name
        names = [self.builder.name(f"{node.name}_{i}{'_quantized' if value.quantized else ''}")
                 for i in range(len(sizes))]
        self.builder.nodes.append(self.builder.onnx.helper.make_node(
            "Split", [source, self.int64(node, sizes)], names, name=names[0], axis=axis))
        if value.quantized is None:
            return [_Value(name) for name in names]
        return [self.builder.dequantize(_Quantized(name, value.quantized.scale, value.quantized.zero_point,
                                                   value.quantized.encoding), f"{node.name}_{i}")
                for i, name in enumerate(names)]

    def lower_chunk(self, node: fx.Node) -> list[_Value]:
        """chunk / split: the part sizes the probe run produced, along `dim`."""
        axis = self.arg(node, 2, "dim", 0)
        return self.split_into(node, [int(t.shape[axis]) for t in self.first[node]], axis)

    lower_split = lower_chunk

    def lower_unbind(self, node: fx.Node) -> list[_Value]:
        axis = self.arg(node, 1, "dim", 0)
        parts = self.split_into(node, [1] * len(self.first[node]), axis)
        return [self.squeezed(node, part, i) for i, part in enumerate(parts)]

    def squeezed(self, node: fx.Node, part: _Value, i: int) -> _Value:
        shape = list(self.first[node][i].shape)
        dynamic = [a != b for a, b in zip(shape, self.second[node][i].shape)]
        target = [-1 if d else a for a, d in zip(shape, dynamic)]
        return _Value(self.builder.node("Reshape", [part.name, self.int64(node, target)], f"{node.name}_{i}_squeezed"))

    def lower_max_pool(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else self.pool_module(
            node, nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            (None, None, 0, 1, False, False))
        if module.return_indices:
            raise self.fail(node, "max pooling that returns indices")
        n = self.first[node].dim() - 2
        padding = _pair(module.padding, n)
        return self.on_integers(node, "MaxPool", kernel_shape=_pair(module.kernel_size, n),
                                strides=_pair(module.stride or module.kernel_size, n), pads=padding + padding,
                                ceil_mode=int(module.ceil_mode), dilations=_pair(module.dilation, n))

    def pool_module(self, node: fx.Node, kind: type, fields: tuple[str, ...], defaults: tuple) -> nn.Module:
        """The pooling module equivalent to a functional pooling call (its arguments after the input)."""
        return kind(**{f: self.arg(node, i + 1, f, d) for i, (f, d) in enumerate(zip(fields, defaults))})

    # -- new values ---------------------------------------------------------------------------------------------
    def binary(self, node: fx.Node, op: str) -> _Value:
        if set(node.kwargs) - {"out", "alpha", "rounding_mode"} or node.kwargs.get("out") is not None:
            raise self.fail(node, "only a two-operand form without out is supported")
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            raise self.fail(node, "alpha / rounding_mode")
        if len(node.args) != 2:
            raise self.fail(node, "only a two-operand form is supported")
        return _Value(self.builder.node(op, [self.operand(node, a) for a in node.args], node.name))

    def lower_add(self, node: fx.Node) -> _Value:
        return self.binary(node, "Add")

    def lower_sub(self, node: fx.Node) -> _Value:
        return self.binary(node, "Sub")

    def lower_mul(self, node: fx.Node) -> _Value:
        return self.binary(node, "Mul")

    def lower_div(self, node: fx.Node) -> _Value:
        return self.binary(node, "Div")

    def lower_matmul(self, node: fx.Node) -> _Value:
        return self.binary(node, "MatMul")

    def lower_mean(self, node: fx.Node) -> _Value:
        dims = self.arg(node, 1, "dim")
        keepdim = bool(self.arg(node, 2, "keepdim", False))
        rank = self.first[node.args[0]].dim()
        dims = list(range(rank)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        axes = sorted(d % rank for d in dims)
        value = self.value(node, node.args[0])
        if axes == list(range(2, rank)):  # global average pooling, which runtimes run on integers
            pooled = self.builder.node("GlobalAveragePool", [value.name],
                                       node.name if keepdim else f"{node.name}_pooled")
            return _Value(pooled) if keepdim else self.flatten_pooled(node, pooled)
        return _Value(self.builder.reduce("ReduceMean", value.name, axes, keepdim, node.name))

    def flatten_pooled(self, node: fx.Node, pooled: str) -> _Value:
        return _Value(self.builder.node("Reshape", [pooled, self.int64(node, self.output_shape(node))], node.name))

    def lower_adaptive_avg_pool(self, node: fx.Node) -> _Value:
        """Any output size: global pooling for 1, average pooling where the size divides the input, else a
        matrix product with the averaging weights torch uses (floor / ceil window bounds)."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        output_size = module.output_size if module is not None else self.arg(node, 1, "output_size")
        spatial = list(self.first[node.args[0]].shape[2:])
        sizes = [s if o is None else o for s, o in zip(spatial, _pair(output_size, len(spatial)))]
        value = self.value(node, node.args[0])
        if all(o == 1 for o in sizes):
            return _Value(self.builder.node("GlobalAveragePool", [value.name], node.name))
        if sizes == spatial:
            return value
        if all(s % o == 0 for s, o in zip(spatial, sizes)):
            kernel = [s // o for s, o in zip(spatial, sizes)]
            return _Value(self.builder.node("AveragePool", [value.name], node.name, kernel_shape=kernel,
                                            strides=kernel))
        if len(spatial) != 2:
            raise self.fail(node, f"adaptive pooling of {spatial} to {sizes} in {len(spatial)}-D")
        rows = self.builder.constant(f"{node.name}_rows", _averaging_matrix(spatial[0], sizes[0]))
        columns = self.builder.constant(f"{node.name}_columns", _averaging_matrix(spatial[1], sizes[1]).T.copy())
        pooled_rows = self.builder.node("MatMul", [rows, value.name], f"{node.name}_rows_pooled")
        return _Value(self.builder.node("MatMul", [pooled_rows, columns], node.name))

    def lower_avg_pool(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else self.pool_module(
            node, nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
            (None, None, 0, False, True, None))
        if module.divisor_override is not None:
            raise self.fail(node, "average pooling with divisor_override")
        n = self.first[node].dim() - 2
        padding = _pair(module.padding, n)
        return self.unary(node, "AveragePool", kernel_shape=_pair(module.kernel_size, n),
                          strides=_pair(module.stride or module.kernel_size, n), pads=padding + padding,
                          ceil_mode=int(module.ceil_mode), count_include_pad=int(module.count_include_pad))

    def lower_cat(self, node: fx.Node) -> _Value:
        tensors = self.arg(node, 0, "tensors")
        axis = self.arg(node, 1, "dim", 0)
        names = [t.name if isinstance(t, _Value) else self.tensor_constant(t, f"{node.name}_part")
                 for t in tensors]
        return _Value(self.builder.node("Concat", names, node.name, axis=axis % self.first[node].dim()))

    def lower_stack(self, node: fx.Node) -> _Value:
        tensors = self.arg(node, 0, "tensors")
        axis = self.arg(node, 1, "dim", 0) % self.first[node].dim()
        axes = self.int64(node, [axis])
        parts = [self.builder.node("Unsqueeze", [t.name if isinstance(t, _Value) else
                                                 self.tensor_constant(t, f"{node.name}_part"), axes],
                                   f"{node.name}_part{i}") for i, t in enumerate(tensors)]
        return _Value(self.builder.node("Concat", parts, node.name, axis=axis))

    def lower_pad(self, node: fx.Node) -> _Value:
        """F.pad with constant values: torch lists (begin, end) pairs from the last dim backwards."""
        pad, mode, fill = self.arg(node, 1, "pad"), self.arg(node, 2, "mode", "constant"), self.arg(node, 3, "value")
        if mode != "constant":
            raise self.fail(node, f"padding mode {mode!r} (only constant)")
        rank = self.first[node].dim()
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):
            begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
        fill = self.builder.constant(f"{node.name}_value", np.array(fill or 0.0, np.float32))
        return _Value(self.builder.node("Pad", [self.value(node, node.args[0]).name, self.int64(node, begins + ends),
                                                fill], node.name))

    def lower_einsum(self, node: fx.Node) -> _Value:
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
            operands = list(operands[0])
        return _Value(self.builder.node("Einsum", [self.operand(node, o) for o in operands], node.name,
                                        equation=equation.replace(" ", "")))

    def lower_layer_norm(self, node: fx.Node) -> _Value:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        else:
            shape, weight, bias, eps = (self.arg(node, 1, "normalized_shape"), self.arg(node, 2, "weight"),
                                        self.arg(node, 3, "bias"), self.arg(node, 4, "eps", 1e-5))
        shape = list(shape)
        weight = torch.ones(shape) if weight is None else weight
        bias = torch.zeros(shape) if bias is None else bias
        names = [self.tensor_constant(t, f"{node.name}_{label}") if torch.is_tensor(t) else self.value(node, t).name
                 for t, label in ((weight, "scale"), (bias, "bias"))]
        return _Value(self.builder.node("LayerNormalization", [self.value(node, node.args[0]).name, *names],
                                        node.name, axis=-len(shape), epsilon=float(eps)))

    # -- python values about shapes ------------------------------------------------------------------------------
    def shape_value(self, node: fx.Node, argument) -> _ShapeOf:
        first, second = self.first[argument].shape, self.second[argument].shape
        return _ShapeOf(self.value(node, argument), tuple(first), tuple(a != b for a, b in zip(first, second)))

    def lower_size(self, node: fx.Node) -> object:
        shape = self.shape_value(node, node.args[0])
        dim = self.arg(node, 1, "dim")
        if dim is None:
            return shape
        return self.dim(node, shape.value, dim) if shape.dynamic[dim] else shape.static[dim]

    def lower_getattr(self, node: fx.Node) -> object:
        if node.args[1] != "shape":
            raise self.fail(node, f"attribute {node.args[1]!r} of a tensor")
        return self.shape_value(node, node.args[0])

    def lower_int_arithmetic(self, node: fx.Node) -> _Dim:
        operation = {operator.floordiv: "Div", operator.mul: "Mul", operator.add: "Add", operator.sub: "Sub"}.get(
            node.target)
        if operation is None:
            raise self.fail(node, "arithmetic on the batch size")
        names = [self.int64(node, self.resolve(a)) for a in node.args]
        return _Dim(self.builder.node(operation, names, node.name))

    def lower_assert(self, node: fx.Node) -> None:
        raise self.fail(node, "an assertion whose condition depends on the batch size")

    # -- attention --------------------------------------------------------------------------------------------------
    def lower_multihead_attention(self, node: fx.Node) -> tuple:
        """nn.MultiheadAttention(x, x, x) in float, batch first, as torch computes it; (output, None)."""
        attention = self.modules[node.target]
        query, key, value = (node.args + (None, None, None))[:3]
        if not (query is key is value) or not attention.batch_first or not attention._qkv_same_embed_dim:
            raise self.fail(node, "only batch-first self-attention with one input projection")
        if node.kwargs.get("need_weights", True) or any(node.kwargs.get(k) is not None
                                                       for k in ("attn_mask", "key_padding_mask")):
            raise self.fail(node, "attention weights or masks (call it with need_weights=False and no masks)")
        x = self.value(node, query).name
        heads, embed = attention.num_heads, attention.embed_dim
        constant = lambda t, label: self.tensor_constant(t, f"{node.name}_{label}")  # noqa: E731
        qkv = self.builder.node("MatMul", [x, constant(attention.in_proj_weight.t().contiguous(), "in_weight")],
                                f"{node.name}_qkv_product")
        if attention.in_proj_bias is not None:
            qkv = self.builder.node("Add", [qkv, constant(attention.in_proj_bias, "in_bias")], f"{node.name}_qkv")
        length = int(self.first[query].shape[1])
        split = self.builder.name(f"{node.name}_q"), self.builder.name(f"{node.name}_k"), self.builder.name(f"{node.name}_v")
        self.builder.nodes.append(self.builder.onnx.helper.make_node(
            "Split", [qkv, self.int64(node, [embed] * 3)], list(split), name=split[0], axis=2))
        per_head = self.int64(node, [-1, length, heads, embed // heads])
        q, k, v = [self.builder.node("Transpose", [self.builder.node("Reshape", [t, per_head], f"{t}_heads")],
                                     f"{t}_bhld", perm=[0, 2, 1, 3]) for t in split]
        scale = self.builder.constant(f"{node.name}_scale", np.array(1.0 / math.sqrt(embed // heads), np.float32))
        kt = self.builder.node("Transpose", [k], f"{node.name}_kt", perm=[0, 1, 3, 2])
        scores = self.builder.node("Mul", [self.builder.node("MatMul", [q, kt], f"{node.name}_qk"), scale],
                                   f"{node.name}_scores")
        weights = self.builder.node("Softmax", [scores], f"{node.name}_weights", axis=-1)
        context = self.builder.node("MatMul", [weights, v], f"{node.name}_context")
        merged = self.builder.node("Reshape", [self.builder.node("Transpose", [context], f"{node.name}_blhd",
                                                                 perm=[0, 2, 1, 3]),
                                               self.int64(node, [-1, length, embed])], f"{node.name}_merged")
        out = attention.out_proj
        projected = self.builder.node("MatMul", [merged, constant(out.weight.t().contiguous(), "out_weight")],
                                      f"{node.name}_out_product")
        if out.bias is not None:
            projected = self.builder.node("Add", [projected, constant(out.bias, "out_bias")], node.name)
        return _Value(projected), None

    def lower_patch_merging_pad(self, node: fx.Node) -> _Value:
        """torchvision Swin's patch merging: pad H, W [B, H, W, C] to even, then the 4 strided sub-grids on C."""
        height, width = self.first[node.args[0]].shape[-3:-1]
        x = self.value(node, node.args[0]).name
        if height % 2 or width % 2:
            pads = self.int64(node, [0, 0, 0, 0, 0, height % 2, width % 2, 0])
            x = self.builder.node("Pad", [x, pads], f"{node.name}_padded")
        big = np.iinfo(np.int64).max
        parts = [self.builder.node("Slice", [x, *(self.int64(node, v) for v in ([row, column], [big, big], [1, 2],
                                                                                   [2, 2]))],
                                   f"{node.name}_part{i}")
                 for i, (row, column) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
        return _Value(self.builder.node("Concat", parts, node.name, axis=3))

    def lower_shifted_window_attention(self, node: fx.Node) -> _Value:
        """torchvision Swin (v1 and v2) window attention in float, as torchvision computes it, with the spatial
        sizes fixed by the export (only the batch is dynamic)."""
        names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                 "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
        defaults = (None,) * 7 + (0.0, 0.0, None, None, None, True)
        a = {n: self.arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
        if a["training"]:
            raise self.fail(node, "window attention in training mode (put the model in eval mode)")
        if not all(torch.is_tensor(a[n]) or a[n] is None for n in names[1:4] + names[9:12]):
            raise self.fail(node, "window attention whose weights depend on the input")
        build, name = self.builder, node.name
        _, height, width, channels = self.first[node.args[0]].shape
        window, heads = list(a["window_size"]), a["num_heads"]
        pad_bottom, pad_right = (-height) % window[0], (-width) % window[1]
        padded = height + pad_bottom, width + pad_right
        shift = [0 if window[i] >= padded[i] else a["shift_size"][i] for i in range(2)]
        x = self.value(node, node.args[0]).name
        if pad_bottom or pad_right:
            x = build.node("Pad", [x, self.int64(node, [0, 0, 0, 0, 0, pad_bottom, pad_right, 0])], f"{name}_padded")
        x = self.roll(node, x, [-shift[0], -shift[1]], padded)
        tokens = window[0] * window[1]
        rows, columns = padded[0] // window[0], padded[1] // window[1]
        x = self.reshape(node, x, [-1, rows, window[0], columns, window[1], channels], "grid")
        x = build.node("Transpose", [x], f"{name}_windows_grid", perm=[0, 1, 3, 2, 4, 5])
        x = self.reshape(node, x, [-1, tokens, channels], "windows")
        qkv_bias = a["qkv_bias"]
        if a["logit_scale"] is not None and qkv_bias is not None:
            qkv_bias = qkv_bias.clone()
            qkv_bias[qkv_bias.numel() // 3: 2 * qkv_bias.numel() // 3] = 0
        qkv = self.matmul_bias(node, x, a["qkv_weight"], qkv_bias, "qkv")
        qkv = self.reshape(node, qkv, [-1, tokens, 3, heads, channels // heads], "qkv_heads")
        qkv = build.node("Transpose", [qkv], f"{name}_qkv_split", perm=[2, 0, 3, 1, 4])
        q, k, v = (build.node("Gather", [qkv, build.constant(f"{name}_index{i}", np.array(i, np.int64))],
                              f"{name}_{part}", axis=0) for i, part in enumerate("qkv"))
        if a["logit_scale"] is not None:  # cosine attention
            q, k = self.l2_normalize(node, q, "q"), self.l2_normalize(node, k, "k")
        else:
            scale = build.constant(f"{name}_scale", np.array((channels // heads) ** -0.5, np.float32))
            q = build.node("Mul", [q, scale], f"{name}_q_scaled")
        attention = build.node("MatMul", [q, build.node("Transpose", [k], f"{name}_kt", perm=[0, 1, 3, 2])],
                               f"{name}_qk")
        if a["logit_scale"] is not None:
            logit = torch.clamp(a["logit_scale"], max=math.log(100.0)).exp()
            attention = build.node("Mul", [attention, self.tensor_constant(logit, f"{name}_logit_scale")],
                                   f"{name}_scaled")
        attention = build.node("Add", [attention, self.tensor_constant(a["relative_position_bias"], f"{name}_bias")],
                               f"{name}_biased")
        if sum(shift) > 0:
            mask = _window_mask(padded, window, shift)  # [windows, tokens, tokens]
            attention = self.reshape(node, attention, [-1, rows * columns, heads, tokens, tokens], "per_window")
            mask_name = build.constant(f"{name}_mask", mask[None, :, None])
            attention = build.node("Add", [attention, mask_name], f"{name}_masked")
            attention = self.reshape(node, attention, [-1, heads, tokens, tokens], "masked_flat")
        attention = build.node("Softmax", [attention], f"{name}_softmax", axis=-1)
        x = build.node("Transpose", [build.node("MatMul", [attention, v], f"{name}_context")], f"{name}_tokens",
                       perm=[0, 2, 1, 3])
        x = self.matmul_bias(node, self.reshape(node, x, [-1, tokens, channels], "merged"), a["proj_weight"],
                             a["proj_bias"], "proj")
        x = self.reshape(node, x, [-1, rows, columns, window[0], window[1], channels], "unwindow")
        x = self.reshape(node, build.node("Transpose", [x], f"{name}_ungrid", perm=[0, 1, 3, 2, 4, 5]),
                         [-1, padded[0], padded[1], channels], "image")
        x = self.roll(node, x, shift, padded)
        if pad_bottom or pad_right:
            x = build.node("Slice", [x, self.int64(node, [0, 0]), self.int64(node, [height, width]),
                                     self.int64(node, [1, 2])], f"{name}_unpadded")
        return _Value(build.node("Identity", [x], name))

    def reshape(self, node: fx.Node, x: str, shape: list, label: str) -> str:
        return self.builder.node("Reshape", [x, self.int64(node, shape)], f"{node.name}_{label}")

    def matmul_bias(self, node: fx.Node, x: str, weight: torch.Tensor, bias: torch.Tensor | None, label: str) -> str:
        """F.linear(x, weight, bias) with constant weights."""
        product = self.builder.node("MatMul", [x, self.tensor_constant(weight.t().contiguous(),
                                                                       f"{node.name}_{label}_weight")],
                                    f"{node.name}_{label}_product")
        if bias is None:
            return product
        return self.builder.node("Add", [product, self.tensor_constant(bias, f"{node.name}_{label}_bias")],
                                 f"{node.name}_{label}")

    def l2_normalize(self, node: fx.Node, x: str, label: str) -> str:
        """F.normalize(x, dim=-1): x / max(||x||_2, 1e-12)."""
        norm = self.builder.reduce("ReduceL2", x, [-1], True, f"{node.name}_{label}_norm")
        floor = self.builder.constant(f"{node.name}_eps", np.array(1e-12, np.float32))
        return self.builder.node("Div", [x, self.builder.node("Max", [norm, floor], f"{node.name}_{label}_floor")],
                                 f"{node.name}_{label}_normalized")

    def roll(self, node: fx.Node, x: str, shifts: list[int], sizes: tuple[int, int]) -> str:
        """torch.roll over dims 1 and 2 (static sizes) as slices and concats."""
        for axis, (shift, size) in enumerate(zip(shifts, sizes), start=1):
            k = shift % size
            if k == 0:
                continue
            head = self.builder.node("Slice", [x, *(self.int64(node, [v]) for v in (size - k, size, axis))],
                                     f"{node.name}_roll{axis}_head")
            tail = self.builder.node("Slice", [x, *(self.int64(node, [v]) for v in (0, size - k, axis))],
                                     f"{node.name}_roll{axis}_tail")
            x = self.builder.node("Concat", [head, tail], f"{node.name}_rolled{axis}", axis=axis)
        return x


def _window_mask(padded: tuple[int, int], window: list[int], shift: list[int]) -> np.ndarray:
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


def _reachable(nodes: list, initializers: list, outputs: list) -> tuple[list, list]:
    """The nodes and initializers the graph outputs depend on (shape arithmetic that only fed a static reshape is
    dropped), in their original order."""
    producer = {output: node for node in nodes for output in node.output}
    needed, stack = set(), [o.name for o in outputs]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(producer[name].input)
    kept = [node for node in nodes if any(o in needed for o in node.output)]
    return kept, [t for t in initializers if t.name in needed]


def _averaging_matrix(size: int, output: int) -> np.ndarray:
    """[output, size] weights of adaptive average pooling along one axis: window i is [floor(i size / output),
    ceil((i + 1) size / output)), each value weighted 1 / its length."""
    matrix = np.zeros((output, size), dtype=np.float32)
    for i in range(output):
        start, end = (i * size) // output, -((-(i + 1) * size) // output)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


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


def lowers(op: ops.Op | None) -> bool:
    """Whether the exporter has an ONNX lowering for op-table entry `op` (None: an op the table does not know)."""
    return op is not None and hasattr(_Exporter, f"lower_{op.name}")


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
    model = _Exporter(sim, int32_bias, _dummy_tuple(dummy_input)).run()
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
