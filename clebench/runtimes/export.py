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
import os
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from clebench import ops
from clebench.errors import MissingExtraError, UserError
from clebench.quant.aimet_format import aimet_entries
from clebench.quant.encoding import Encoding
from clebench.quant.sim import ActivationQuantizer, QuantSim
from clebench.runtimes import EXPORTABLE_ACT_BITS
from clebench.runtimes.lowerings import LOWERINGS
from clebench.runtimes.onnx_graph import Dim, GraphBuilder, Quantized, Value

EXPORT_FORMAT = 1  # bump when the written graph changes, so cached exports are rebuilt
ONNX_EXTRA_HINT = 'pip install -e ".[onnx]"'
AIMET_ENCODING_VERSION = "0.6.1"
HINT = "evaluate this model with the torch engine (engine='torch' / --engine torch)"


class ExportError(UserError):
    """A model, op or setting that has no exact ONNX QDQ encoding."""


def require(module: str):
    """Import onnx / onnxruntime (the optional `onnx` extra) or raise a one-line MissingExtraError."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(f"{module} is not installed: {ONNX_EXTRA_HINT} (the optional onnx extra)") from None


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"node {node.name!r} ({type(modules[node.target]).__name__} {node.target!r})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {target})"


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
    """Walks the sim's fx graph and writes the matching ONNX nodes: each op through its lowering in
    clebench.runtimes.lowerings.LOWERINGS, each activation quantizer as QuantizeLinear -> DequantizeLinear.

    The lowerings read the graph through this object: `first` / `second` are every node's output for a batch of 2
    and of 3 (what differs follows the batch size), `values` what the export made of each node so far.
    """

    def __init__(self, sim: QuantSim, int32_bias: bool, dummy: tuple[torch.Tensor, ...]) -> None:
        self.gm = sim.model
        self.modules = dict(self.gm.named_modules())
        self.encodings = sim.encodings()
        self.int32_bias = int32_bias
        self.dummy = dummy
        wide = any(entry["bits"] > 8 for entry in self.encodings.values() if entry["kind"] != "bias")
        # 16-bit QuantizeLinear / DequantizeLinear need opset 21
        self.builder = GraphBuilder(require("onnx"), opset=21 if wide else 17)
        self.values: dict[fx.Node, object] = {}
        self.constants: dict[int, str] = {}  # id of a folded tensor -> its initializer
        self.first, self.second = _probe(self.gm, dummy)

    def fail(self, node: fx.Node, why: str) -> ExportError:
        return ExportError(f"cannot export {_describe(node, self.modules)} to ONNX: {why}; {HINT}")

    def run(self) -> object:
        """The ONNX ModelProto: inputs [batch, ...] as the dummy input's, one output (the logits)."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, self.dummy):
            self.values[node] = self.builder.add_input(node.name, ["batch", *example.shape[1:]])
        for node in self.gm.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method", "get_attr"):
                self.values[node] = self.convert(node)
            elif node.op == "output":
                self.output(node)
        return self.builder.model("clebench_qdq", producer="clebench")

    def convert(self, node: fx.Node) -> object:
        """What node `node` is in the graph: its probe value if constant, else what its lowering writes."""
        if self.is_constant(node):
            return self.first[node]
        if node.op == "get_attr":
            raise self.fail(node, "a module attribute that changes with the input")
        module = self.module(node)
        if isinstance(module, ActivationQuantizer):
            return self.quantize_activation(node, module)
        op = ops.op_of(node, self.modules)
        if not lowers(op):
            what = "this op" if op is None else f"op {op.name!r}"
            raise self.fail(node, f"no ONNX mapping for {what} (clebench.ops lists what the exporter lowers)")
        return LOWERINGS[op.name](self, node)

    def output(self, node: fx.Node) -> None:
        result = node.args[0]
        if not isinstance(result, fx.Node) or not isinstance(self.values.get(result), Value):
            raise self.fail(node, "the model must return one tensor (logits)")
        rank = self.first[result].dim()
        self.builder.add_output(self.values[result].name, "logits", ["batch"] + [None] * (rank - 1))

    # -- quantizers -------------------------------------------------------------------------------------------
    def quantize_activation(self, node: fx.Node, quantizer: ActivationQuantizer) -> Value:
        source = node.args[0]
        value = self.value(node, source)
        if value.quantized is not None and value.quantized.encoding is quantizer.encoding:
            return value  # a fused activation already rounded onto this grid
        quantized = self.quantize_integers(value.name, quantizer.encoding, f"{source.name}_quantized")
        return self.builder.dequantize(quantized, source.name)

    def quantize_integers(self, source: str, encoding: Encoding, output: str) -> Quantized:
        """QuantizeLinear of float tensor `source` on a per-tensor activation grid of 8 or 16 bits."""
        if encoding.bits not in EXPORTABLE_ACT_BITS:
            raise ExportError(
                f"activation {source!r} has {encoding.bits} bits; ONNX QuantizeLinear saturates at its 8- or 16-bit "
                f"type's bounds, so only act_bits 8 and 16 export exactly; {HINT}"
            )
        return self.builder.quantize_integers(source, encoding, output)

    # -- arguments --------------------------------------------------------------------------------------------
    def is_constant(self, node: fx.Node) -> bool:
        """Its output is the same for every input (parameters, shapes' static parts, tensors made from them)."""
        return node.op != "placeholder" and _same(self.first.get(node), self.second.get(node))

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a call_module node calls; None for other nodes."""
        return self.modules.get(node.target) if node.op == "call_module" else None

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

    def setting(self, node: fx.Node, name: str, index: int, default=None):
        """Attribute `name` of the node's module, or (a functional call) its argument `index` / keyword `name`."""
        module = self.module(node)
        return getattr(module, name) if module is not None else self.arg(node, index, name, default)

    def value(self, node: fx.Node, argument) -> Value:
        """A tensor argument as a graph value (a folded constant becomes an initializer)."""
        resolved = self.resolve(argument)
        if isinstance(resolved, Value):
            return resolved
        if torch.is_tensor(resolved):
            return Value(self.tensor_constant(resolved, f"{node.name}_constant"))
        raise self.fail(node, f"argument {argument!r} is not a tensor computed by the graph")

    def tensor_constant(self, tensor: torch.Tensor, base: str) -> str:
        """The initializer of a folded tensor (float tensors as float32), written once per tensor."""
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

    # -- shapes -----------------------------------------------------------------------------------------------
    def int64(self, node: fx.Node, values) -> str:
        """An int64 [n] ONNX input from python ints and Dims (a shape, axes, split sizes)."""
        values = [values] if isinstance(values, (int, Dim)) else list(values)
        if all(isinstance(v, int) for v in values):
            return self.builder.constant(f"{node.name}_ints", np.array(values, dtype=np.int64))
        parts = [v.name if isinstance(v, Dim) else self.builder.constant(f"{node.name}_int", np.array([v], np.int64))
                 for v in values]
        return self.builder.node("Concat", parts, f"{node.name}_shape", axis=0)

    def dim(self, node: fx.Node, value: Value, index: int) -> Dim:
        """Size `index` of a graph tensor, as int64 [1]."""
        return Dim(self.builder.node("Shape", [value.name], f"{node.name}_shape{index}", start=index, end=index + 1))

    def shape_of(self, node: fx.Node, argument) -> list:
        """The sizes of a tensor argument: static ints, and a Dim for each dim that follows the batch size."""
        source = argument if isinstance(argument, fx.Node) else None
        first, second = self.first[source].shape, self.second[source].shape
        value = self.value(node, argument)
        return [self.dim(node, value, i) if a != b else a for i, (a, b) in enumerate(zip(first, second))]

    def output_shape(self, node: fx.Node) -> list:
        """This node's output sizes: static ints, -1 for the one dim that follows the batch size."""
        first, second = self.first[node].shape, self.second[node].shape
        dynamic = [a != b for a, b in zip(first, second)]
        if sum(dynamic) > 1:
            raise self.fail(node, "more than one output dim follows the batch size")
        return [-1 if d else int(a) for a, d in zip(first, dynamic)]


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
    return op is not None and op.name in LOWERINGS


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
