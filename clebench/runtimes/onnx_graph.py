"""ONNX graph building for the QDQ export: uniquely named nodes and initializers, the QuantizeLinear /
DequantizeLinear helpers, and the model assembly (clebench.runtimes.export walks the fx graph and calls these)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from clebench.quant.encoding import Encoding

_INT_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


@dataclass(frozen=True)
class Quantized:
    """An integer tensor in the graph and the encoding that maps it back to float."""

    name: str
    scale: str
    zero_point: str
    encoding: Encoding

    def renamed(self, name: str) -> Quantized:
        """Another integer tensor on the same grid (what a value-preserving op makes of this one)."""
        return Quantized(name, self.scale, self.zero_point, self.encoding)


@dataclass(frozen=True)
class Value:
    """A float tensor in the graph; `quantized` when it is DequantizeLinear of an integer tensor."""

    name: str
    quantized: Quantized | None = None


@dataclass(frozen=True)
class Dim:
    """A python int that depends on the batch size (x.size(0) and what is computed from it): int64 [1] in the graph."""

    name: str


@dataclass(frozen=True)
class ShapeOf:
    """x.shape / x.size() of a graph tensor whose batch size is dynamic: indexed into Dim or static ints."""

    value: Value
    static: tuple[int, ...]  # the sizes seen at the first probe batch
    dynamic: tuple[bool, ...]  # which dims change with the batch size


def container(bits: int, signed: bool) -> type:
    """numpy integer type holding a `bits`-bit grid: 8 bits for 2-8 (weights only), 16 for 9-16."""
    width = 8 if bits <= 8 else 16
    return _INT_TYPES[(width, signed)]


def grid(encoding: Encoding, dtype: type, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale, `dtype` zero point) of `encoding` for Quantize/DequantizeLinear: 1-D [C] per channel,
    0-D per tensor. Runtime fuses DQ -> Add -> Q into QLinearAdd (and the other QLinear ops) only when per-tensor
    parameters are scalars; a [1]-shaped scale leaves the Add in float between a DequantizeLinear and a
    QuantizeLinear."""
    shape = (-1,) if per_channel else ()
    return (encoding.scale.numpy().astype(np.float32).reshape(shape),
            encoding.zero_point.numpy().astype(dtype).reshape(shape))


class GraphBuilder:
    """Collects ONNX nodes, initializers and graph inputs / outputs with unique tensor names."""

    def __init__(self, onnx: ModuleType, opset: int) -> None:
        self.onnx = onnx
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        """`base`, or `base_<i>` with the first free i, reserved."""
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

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        """One node `op` with one output, named after it; returns the output's (unique) name."""
        return self.node_outputs(op, inputs, [self.name(output)], **attributes)[0]

    def node_outputs(self, op: str, inputs: list[str], outputs: list[str], **attributes) -> list[str]:
        """One node `op` with several outputs, already named by `name`; the node is named after the first."""
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=outputs[0], **attributes))
        return outputs

    def reduce(self, op: str, source: str, axes: list[int], keepdims: bool, output: str) -> str:
        """ReduceMean / ReduceL2 ...: axes are an attribute up to opset 17, an input from opset 18."""
        if self.opset >= 18:
            axes_name = self.constant(f"{output}_axes", np.array(axes, dtype=np.int64))
            return self.node(op, [source, axes_name], output, keepdims=int(keepdims))
        return self.node(op, [source], output, axes=axes, keepdims=int(keepdims))

    # -- quantization ---------------------------------------------------------------------------------------------
    def quantize(self, source: str, encoding: Encoding, base: str) -> Value:
        """QuantizeLinear -> DequantizeLinear of float tensor `source` on a per-tensor activation grid."""
        return self.dequantize(self.quantize_integers(source, encoding, f"{base}_quantized"), base)

    def quantize_integers(self, source: str, encoding: Encoding, output: str) -> Quantized:
        """QuantizeLinear of float tensor `source` on a per-tensor 8- or 16-bit activation grid."""
        scale, zero_point = grid(encoding, container(encoding.bits, encoding.symmetric), per_channel=False)
        scale = self.constant(f"{source}_scale", scale)
        zero_point = self.constant(f"{source}_zero_point", zero_point)
        return Quantized(self.node("QuantizeLinear", [source, scale, zero_point], output), scale, zero_point, encoding)

    def dequantize(self, quantized: Quantized, base: str) -> Value:
        """DequantizeLinear of an integer tensor, named <base>_dq."""
        name = self.node("DequantizeLinear", [quantized.name, quantized.scale, quantized.zero_point], f"{base}_dq")
        return Value(name, quantized)

    def integer_tensor(self, values: torch.Tensor, encoding: Encoding, base: str, axis: int | None) -> str:
        """Integer initializer of the float `values` already on `encoding`'s grid (per channel along `axis`),
        + DequantizeLinear -> float."""
        shape = [1] * values.dim()
        if axis is not None:
            shape[axis] = -1
        scale, zero_point = encoding.scale.view(shape), encoding.zero_point.view(shape)
        live = scale > 0  # a zero-scale grid (an all-zero channel, a bias on a constant input) holds only zero
        integers = (torch.round(values.detach().float().cpu() / torch.where(live, scale, 1.0)) + zero_point)
        integers = torch.where(live, integers, zero_point.float()).clamp(encoding.quant_min, encoding.quant_max)
        dtype = np.int32 if encoding.bits == 32 else container(encoding.bits, encoding.symmetric)
        data = self.constant(base, integers.numpy().astype(dtype))
        scale, zero_point = grid(encoding, dtype, per_channel=axis is not None)
        scale_name = self.constant(f"{base}_scale", scale)
        zero_name = self.constant(f"{base}_zero_point", zero_point)
        attributes = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [data, scale_name, zero_name], f"{base}_dq", **attributes)

    # -- graph ----------------------------------------------------------------------------------------------------
    def add_input(self, name: str, shape: list) -> Value:
        """A float graph input `name` (reserved as it is) of `shape` (a str for a dynamic dim)."""
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, shape))
        self.name(name)
        return Value(name)

    def add_output(self, source: str, name: str, shape: list) -> None:
        """A float graph output `name`, Identity of `source`, of `shape` (str or None for dynamic dims)."""
        output = self.node("Identity", [source], name)
        self.outputs.append(self.onnx.helper.make_tensor_value_info(output, self.onnx.TensorProto.FLOAT, shape))

    def model(self, graph_name: str, producer: str) -> object:
        """The ModelProto of what the outputs depend on (ir_version at most 10: readable by onnxruntime >= 1.17)."""
        helper = self.onnx.helper
        nodes, initializers = _reachable(self.nodes, self.initializers, self.outputs)
        graph = helper.make_graph(nodes, graph_name, self.inputs, self.outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name=producer)
        model.ir_version = min(model.ir_version, 10)
        return model


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
