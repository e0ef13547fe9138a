"""QuantSim: a fake-quantized copy of a model, with quantizers placed as an integer accelerator would run it.

Placement, on an fx trace of a deep copy (the given model is never modified):
* every float model input gets an activation quantizer, and so does every op that computes new float values
  (layers, add, mul, concat, pooling, mean, activations, unfolded BN, ...);
* except a layer or add whose output goes straight (through value-preserving ops only) and solely into a
  ReLU / ReLU6 / clip: that pair is one fused op, quantized after the activation;
* and except value-preserving ops (reshape, flatten, dropout, identity, getitem, permute, ...; roles in clebench.ops),
  whose output is already on their input's grid.
Conv / linear weights are fake-quantized once, when the sim is built; biases stay float unless int32_bias. Fold
batch norms first (`batch_norm_fold.fold_all_batch_norms`) to simulate conv + BN as one op, as DFQ does.
"""
from __future__ import annotations

import contextlib
import copy
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from tqdm import tqdm

from clebench import foreign_layers, graph, layers, ops
from clebench.quant.aimet_format import encoding_from_aimet_entries
from clebench.quant.config import QuantConfig
from clebench.quant.encoding import (
    Encoding,
    asymmetric_encoding,
    bias_encoding,
    fake_quantize_per_tensor,
    weight_encoding,
)
from clebench.quant.observers import MinMaxObserver, make_observer

def _fused_into_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A layer / add whose sole consumer (past value-preserving ops) is a ReLU-like activation."""
    if not (layers.is_layer(graph.module_of(node, modules)) or ops.is_add(node, modules)):
        return False
    current = node
    while (user := graph.sole_user(current)) is not None:
        if ops.activation_kind(user, modules) is not None:
            return True
        if not ops.is_value_preserving(user, modules):
            return False
        current = user
    return False


def _outputs_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _needs_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "placeholder":
        return _outputs_float_tensor(node)
    if node.op not in ("call_module", "call_function", "call_method") or not _outputs_float_tensor(node):
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]  # an item of a tuple-returning op that is not a split / chunk is new data
        return isinstance(source, fx.Node) and not (
            isinstance(source.meta.get("tensor_meta"), TensorMetadata) or ops.is_value_preserving(source, modules)
        )
    return not (ops.is_value_preserving(node, modules) or _fused_into_activation(node, modules))


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric fake-quantizer; passes values through and observes them while calibrating."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.observer: MinMaxObserver | None = None
        self.encoding: Encoding | None = None
        self._qparams: tuple[float, int, int, int] | None = None  # scale, zero point, quant min, quant max

    def freeze(self, encoding: Encoding) -> None:
        self.observer = None
        self.encoding = encoding
        self._qparams = (float(encoding.scale), int(encoding.zero_point), encoding.quant_min, encoding.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self._qparams is None:
            raise RuntimeError("activation quantizer has no encoding yet: call QuantSim.calibrate(batches) first")
        return fake_quantize_per_tensor(x, *self._qparams)

    def extra_repr(self) -> str:
        if self.encoding is None:
            return f"bits={self.bits}, uncalibrated"
        return f"bits={self.bits}, min={float(self.encoding.min):.4g}, max={float(self.encoding.max):.4g}"


def batch_inputs(batch: object) -> tuple[torch.Tensor, ...]:
    """The model inputs of a batch: an input tensor, or (inputs, labels, ...) with inputs a tensor or tensor tuple."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if not inputs or not all(torch.is_tensor(x) for x in inputs):
        raise TypeError(
            "a calibration batch must be an input tensor or an (inputs, labels) tuple whose inputs are a tensor or a "
            f"tuple of tensors; got {type(batch).__name__}"
        )
    return inputs


def _free_attribute(module: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}{i}"
    return name


def quantizer_of(value: object, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ActivationQuantizer call whose grid the graph value `value` lies on, looking back through value-preserving
    ops (view, flatten, ...); None if another op (or no node) comes first."""
    while isinstance(value, fx.Node):
        if isinstance(graph.module_of(value, modules), ActivationQuantizer):
            return value
        if not ops.is_value_preserving(value, modules):
            return None
        value = value.args[0]
    return None


class QuantSim:
    """Simulated quantization of `model` under `config` (AIMET QuantizationSimModel-like).

    model: the FP32 model (not modified). dummy_input: an input tensor (or tuple of tensors) it accepts, used to
    find which ops output float tensors. `.model` is the fake-quantized nn.Module (eval mode); activations need
    `.calibrate(batches)` before it can run unless config.act_bits is None.
    """

    def __init__(self, model: nn.Module, dummy_input: torch.Tensor | tuple[torch.Tensor, ...],
                 config: QuantConfig = QuantConfig()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a clebench.quant.QuantConfig, got {type(config).__name__}")
        self.config = config
        try:
            copied = foreign_layers.split_norm_acts(copy.deepcopy(graph.unwrap(model)))
            gm = graph.trace(copied.eval()).eval()  # eval first: fx bakes self.training in
        except graph.UntraceableModelError as error:
            raise ValueError(
                f"QuantSim places quantizers on a torch.fx trace of the model, and {type(model).__name__} cannot be "
                "traced (the cause is above); make its forward free of data-dependent Python control flow"
            ) from error
        dummy = (dummy_input,) if torch.is_tensor(dummy_input) else tuple(dummy_input)
        if not dummy or not all(torch.is_tensor(x) for x in dummy):
            raise TypeError(
                f"dummy_input must be a tensor or a tuple of tensors (one per model input), got {dummy_input!r:.80}"
            )
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*dummy)
        except Exception as error:  # any failure here means the dummy input does not fit the model
            raise ValueError(
                f"dummy_input (shapes {[tuple(x.shape) for x in dummy]}) does not run through "
                f"{type(model).__name__}: {type(error).__name__}: {error}"
            ) from None
        modules = dict(gm.named_modules())
        self._layer_nodes = [n for n in gm.graph.nodes if layers.is_layer(graph.module_of(n, modules))]
        self._weight_encodings: dict[str, Encoding] = {}
        self._bias_encodings: dict[str, Encoding] = {}
        self._fp32_values: dict[str, torch.Tensor] = {}  # FP32 value of every tensor replaced by its fake-quantized one
        self._quantize_weights(modules)
        self._quantizers: dict[str, ActivationQuantizer] = {}
        if config.act_bits is not None:
            self._insert_activation_quantizers(gm, modules)
        self.model = gm

    def _quantize_weights(self, modules: dict[str, nn.Module]) -> None:
        for node in self._layer_nodes:
            if node.target in self._weight_encodings:
                continue  # a layer called at several places is quantized once
            layer = modules[node.target]
            encoding = weight_encoding(layer, self.config)
            self._weight_encodings[node.target] = encoding
            self._replace(f"{node.target}.weight", layer.weight, encoding)

    def _replace(self, name: str, parameter: nn.Parameter, encoding: Encoding) -> None:
        """Make `parameter` hold its fake-quantized FP32 value (the FP32 value is kept, also across recalibrations)."""
        fp32 = self._fp32_values.setdefault(name, parameter.data)
        with torch.no_grad():
            parameter.data = encoding.fake_quantize(fp32.to(parameter.device))

    def freeze_param_encodings(self, encodings: Mapping[str, Encoding]) -> None:
        """Quantize weights on given encodings {"<layer>.weight": Encoding} instead of their own min/max ones.

        The sim keeps them for its lifetime (AdaRound's encodings: a rounded weight's own range can be narrower than
        the grid it was rounded on). Weights not named keep their encodings. ValueError for a name that is not a
        weight quantizer or an encoding whose channels do not fit the layer.
        """
        modules = dict(self.model.named_modules())
        unknown = sorted(set(encodings) - {f"{name}.weight" for name in self._weight_encodings})
        if unknown:
            raise ValueError(f"parameter encodings for {unknown}: the sim has no such weight quantizer "
                             f"(it quantizes {sorted(self._weight_encodings)[:5]}... as '<layer>.weight')")
        for name, encoding in encodings.items():
            layer_name = name.removesuffix(".weight")
            layer = modules[layer_name]
            channels = layer.weight.shape[layers.output_axis(layer)]
            if encoding.axis is not None and (encoding.axis != layers.output_axis(layer) or encoding.scale.numel() != channels):
                raise ValueError(f"{name}: a per-channel encoding needs {channels} scales on axis "
                                 f"{layers.output_axis(layer)}, got {encoding.scale.numel()} on axis {encoding.axis}")
            self._weight_encodings[layer_name] = encoding
            self._replace(name, layer.weight, encoding)
        if self.config.int32_bias and self._quantizers and all(q.encoding for q in self._quantizers.values()):
            self._quantize_biases()  # their scales derive from the weight scales

    def set_and_freeze_param_encodings(self, encoding_path: str | os.PathLike) -> None:
        """AIMET's: load the "param_encodings" of an AIMET encodings JSON (as AdaRound writes it) and freeze them."""
        try:
            content = json.loads(Path(encoding_path).read_text())
            params = content["param_encodings"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{encoding_path}: not an AIMET encodings JSON with param_encodings ({error})") from None
        modules = dict(self.model.named_modules())
        encodings = {}
        for name, entries in params.items():
            layer = modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if not layers.is_layer(layer):
                raise ValueError(f"{encoding_path}: {name!r} is not the weight of a conv / linear layer of the sim")
            try:
                encodings[name] = encoding_from_aimet_entries(entries, layers.output_axis(layer) if len(entries) > 1 else None)
            except ValueError as error:
                raise ValueError(f"{encoding_path}: {name}: {error}") from None
        self.freeze_param_encodings(encodings)

    def _insert_activation_quantizers(self, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
        container = _free_attribute(gm, "activation_quantizers")
        gm.add_module(container, nn.ModuleDict())
        nodes = [node for node in gm.graph.nodes if _needs_quantizer(node, modules)]
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        for node in nodes:
            quantizer = ActivationQuantizer(self.config.act_bits)
            getattr(gm, container)[node.name] = quantizer
            self._quantizers[node.name] = quantizer
            anchor = placeholders[-1] if node.op == "placeholder" else node  # inputs stay the first nodes
            with gm.graph.inserting_after(anchor):
                quantized = gm.graph.call_module(f"{container}.{node.name}", (node,))
            node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
        gm.graph.lint()
        gm.recompile()

    def quantizer_names(self) -> list[str]:
        """Activation quantizers (fx node names, graph order), then '<layer>.weight' (and '<layer>.bias')."""
        return list(self._quantizers) + [f"{name}.weight" for name in self._weight_encodings] + [
            f"{name}.bias" for name in self._bias_encodings
        ]

    def encodings(self) -> dict[str, dict]:
        """{quantizer name: {scale, offset, zero_point, min, max, bits, symmetric, per_channel, kind}}, JSON-ready."""
        uncalibrated = [name for name, q in self._quantizers.items() if q.encoding is None]
        if uncalibrated:
            raise RuntimeError(
                f"{len(uncalibrated)} activation quantizers are uncalibrated: call calibrate(batches) first"
            )
        result = {name: {**q.encoding.to_dict(), "kind": "activation"} for name, q in self._quantizers.items()}
        result.update({f"{n}.weight": {**e.to_dict(), "kind": "weight"} for n, e in self._weight_encodings.items()})
        result.update({f"{n}.bias": {**e.to_dict(), "kind": "bias"} for n, e in self._bias_encodings.items()})
        return result

    @contextlib.contextmanager
    def _float_parameters(self, names: Iterable[str]) -> Iterator[None]:
        """Temporarily give the quantized parameters `names` their FP32 values back."""
        parameters = dict(self.model.named_parameters())
        held = {name: parameters[name].data for name in names}
        try:
            for name, value in held.items():
                parameters[name].data = self._fp32_values[name].to(value.device)
            yield
        finally:
            for name, value in held.items():
                parameters[name].data = value

    def calibrate(self, batches: Iterable, *, progress: bool = True) -> None:
        """Find and freeze every activation encoding from FP32 forward passes over `batches` (one pass).

        With config.aimet_rules the passes use the quantized weights (biases stay FP32), as AIMET calibrates.

        batches: input tensors, or (inputs, labels) tuples such as a DataLoader yields. Calling it again
        recalibrates from scratch; on an error the previous encodings stay.
        """
        self.set_activation_ranges(self.observe(batches, progress=progress))

    def observe(self, batches: Iterable, *, progress: bool = True) -> dict[str, tuple[float, float]]:
        """{activation quantizer name: (min, max) to encode}, from one pass over `batches`; encodings are untouched.

        The ranges depend on the FP32 model and the activation settings (act_bits, calibration, percentile) only, not
        on the weight settings (except under config.aimet_rules), so one observation can serve several sims.
        """
        if not self._quantizers:
            return {}
        try:
            return self._observe(batches, progress)
        finally:
            for quantizer in self._quantizers.values():
                quantizer.observer = None

    def set_activation_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Freeze every activation encoding from {quantizer name: (min, max)}, as `observe` returns them."""
        if set(ranges) != set(self._quantizers):
            missing, unknown = sorted(set(self._quantizers) - set(ranges)), sorted(set(ranges) - set(self._quantizers))
            raise ValueError(f"activation ranges must name every quantizer once: missing {missing}, unknown {unknown}")
        for name, (low, high) in ranges.items():
            encoding = asymmetric_encoding(torch.tensor(low), torch.tensor(high), self.config.act_bits)
            self._quantizers[name].freeze(encoding)
        if self.config.int32_bias:
            self._quantize_biases()

    def _observe(self, batches: Iterable, progress: bool) -> dict[str, tuple[float, float]]:
        for quantizer in self._quantizers.values():
            quantizer.observer = make_observer(self.config)
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else None
        seen = 0
        # AIMET's rules observe with the quantized weights; only (int32) biases get their FP32 values back
        restored = [f"{name}.bias" for name in self._bias_encodings] if self.config.aimet_rules else self._fp32_values
        with self._float_parameters(restored), torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                self.model(*(x.to(device) for x in batch_inputs(batch)))
                seen += 1
        if not seen:
            raise ValueError("calibrate() got no batches: pass a non-empty iterable of input batches")
        ranges = {}
        for name, quantizer in self._quantizers.items():
            try:
                ranges[name] = quantizer.observer.range()
            except ValueError as error:
                raise ValueError(f"activation quantizer {name!r}: {error}") from None
        return ranges

    def _input_quantizer(self, node: fx.Node, modules: dict[str, nn.Module]) -> str:
        """The activation quantizer whose grid the layer call `node` reads."""
        source = quantizer_of(node.args[0], modules)
        if source is None:
            raise ValueError(
                f"int32_bias: the input of layer {node.target!r} is not the output of one activation quantizer"
            )
        return source.target.rpartition(".")[2]

    def _quantize_biases(self) -> None:
        modules = dict(self.model.named_modules())
        inputs: dict[str, set[str]] = {}
        for node in self._layer_nodes:
            if modules[node.target].bias is not None:
                inputs.setdefault(node.target, set()).add(self._input_quantizer(node, modules))
        for name, quantizers in inputs.items():
            if len(quantizers) > 1:
                raise ValueError(
                    f"int32_bias: layer {name!r} is called on inputs with different encodings ({sorted(quantizers)}); "
                    "its one bias cannot have one scale per call; use int32_bias=False"
                )
            layer = modules[name]
            input_scale = float(self._quantizers[quantizers.pop()].encoding.scale)
            encoding = bias_encoding(input_scale, self._weight_encodings[name], layer.bias.numel())
            self._bias_encodings[name] = encoding
            self._replace(f"{name}.bias", layer.bias, encoding)
