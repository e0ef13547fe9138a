"""Per-layer quantization sensitivity of one calibrated QuantSim (AIMET QuantAnalyzer's questions, on a subset).

A unit is a conv / linear layer (its weight quantizer and the activation quantizer on its output, after a fused
activation) or an activation quantizer no layer owns (the model input, adds, pooling ...). For every unit the sim is
run on the same images with
    only      this unit quantized, everything else FP32
    all_but   every quantizer but this unit's
    weight_only / act_only   only this unit's weight / output activation quantizer
and compared with the FP32 model: output SQNR = 10 log10(sum logits_fp32^2 / sum (logits - logits_fp32)^2) in dB,
and top-1 in %. sim_layer_sqnr_db is the SQNR of the layer's output in the fully quantized sim against FP32 (the
error accumulated up to that layer).

Why SQNR of the logits ranks: top-1 on N images moves in steps of 100 / N points and most single-layer changes flip
no image on a few hundred, so top-1 ties; the logit SQNR is continuous and falls monotonically with the added noise
power, and the noise of independent parts adds (which the "sum of parts" row states next to the whole). Top-1 is
reported beside it. Cost: up to 4 partial forward passes of the subset per layer (only the part downstream of the
layer is recomputed; the rest comes from one recorded FP32 and one recorded quantized pass), 2 per other unit, so
it scales with the number of images chosen.

Quantizers are switched off from the outside: a weight gets its FP32 value back (QuantSim._float_parameters), an
activation quantizer is swapped for nn.Identity while it is off.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import fx, nn
from tqdm import tqdm

from clebench import graph, layers, ops, ranges
from clebench.quant.sim import ActivationQuantizer, QuantSim

UNIT_COLUMNS = [
    "unit", "kind", "rank", "only_sqnr_db", "only_top1", "all_but_sqnr_db", "all_but_top1",
    "weight_only_sqnr_db", "weight_only_top1", "act_only_sqnr_db", "act_only_top1", "sim_layer_sqnr_db",
]  # fmt: skip
WHOLE_MODEL, SUM_OF_PARTS = "(whole model)", "(sum of single-unit parts)"
MODES = ("only", "all_but", "weight_only", "act_only")


@dataclass(frozen=True)
class Unit:
    """A layer (its '<layer>.weight', and '<layer>.bias' under int32_bias) with its output activation quantizer, or
    an activation quantizer no layer owns (parameters empty)."""

    name: str
    kind: str
    parameters: tuple[str, ...]
    activation: str | None

    @property
    def quantizers(self) -> frozenset[str]:
        return frozenset(self.parameters + ((self.activation,) if self.activation else ()))


def quantizer_nodes(sim: QuantSim) -> dict[str, str]:
    """{activation quantizer name (as QuantSim.quantizer_names): its qualified module name in sim.model}."""
    return {target.rpartition(".")[2]: target for target, module in sim.model.named_modules()
            if isinstance(module, ActivationQuantizer)}


def _is_parameter(name: str) -> bool:
    return name.endswith((".weight", ".bias"))


def units(sim: QuantSim) -> list[Unit]:
    """The sim's units in graph order: each layer with the quantizer on its output, then unowned quantizers."""
    gm, modules = sim.model, dict(sim.model.named_modules())
    owned, found, seen = set(), [], set()
    names = sim.quantizer_names()
    for node in gm.graph.nodes:
        layer = graph.module_of(node, modules)
        if not layers.is_layer(layer) or node.target in seen or f"{node.target}.weight" not in names:
            continue
        seen.add(node.target)
        output = _output_quantizer(node, modules)
        owned.add(output)
        parameters = tuple(f"{node.target}.{p}" for p in ("weight", "bias") if f"{node.target}.{p}" in names)
        found.append(Unit(node.target, ranges.layer_kind(layer), parameters, output))
    for node in gm.graph.nodes:
        module = graph.module_of(node, modules)
        name = node.target.rpartition(".")[2] if isinstance(module, ActivationQuantizer) else None
        if name is not None and name not in owned:
            found.append(Unit(name, f"activation ({_op_name(node.args[0], modules)})", (), name))
    return found


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    module = graph.module_of(node, modules)
    if module is not None:
        return type(module).__name__
    return node.op if node.op == "placeholder" else getattr(node.target, "__name__", str(node.target))


def _output_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation quantizer reached from `node` through its sole users (fused activations, reshapes)."""
    current = node
    while True:
        quantizers = [u for u in current.users if isinstance(graph.module_of(u, modules), ActivationQuantizer)]
        if quantizers:
            return quantizers[0].target.rpartition(".")[2]
        user = graph.sole_user(current)
        if user is None or not (ops.activation_kind(user, modules) or ops.is_value_preserving(user, modules)):
            return None
        current = user


@contextlib.contextmanager
def quantized_only(sim: QuantSim, enabled: frozenset[str]) -> Iterator[None]:
    """Run `sim` with only the quantizers named in `enabled` active (names as QuantSim.quantizer_names)."""
    disabled = [target for name, target in quantizer_nodes(sim).items() if name not in enabled]
    held = {target: sim.model.get_submodule(target) for target in disabled}
    float_parameters = [n for n in sim.quantizer_names() if _is_parameter(n) and n not in enabled]
    try:
        for target in disabled:
            graph.set_submodule(sim.model, target, nn.Identity())
        with sim._float_parameters(float_parameters):
            yield
    finally:
        for target, module in held.items():
            graph.set_submodule(sim.model, target, module)


class _Replay(fx.Interpreter):
    """Runs a GraphModule, taking the value of every node outside `dirty` from `cache` (node -> value), or, with
    cache None, recording every node's value into `record` (tensors cloned: a later in-place op must not change them)."""

    def __init__(self, gm: fx.GraphModule, cache: dict | None = None, dirty: frozenset = frozenset(),
                 record: dict | None = None) -> None:
        super().__init__(gm)
        self.cache, self.dirty, self.record = cache, dirty, record

    def run_node(self, node: fx.Node):
        if self.cache is not None and node not in self.dirty and node.op != "output":
            return self.cache[node]
        value = super().run_node(node)
        if self.record is not None:
            self.record[node] = value.clone() if torch.is_tensor(value) else value
        return value


def _downstream(gm: fx.GraphModule, targets: set[str]) -> frozenset[fx.Node]:
    """The call_module nodes of `targets` and every node that reads them, directly or not."""
    dirty: set[fx.Node] = set()
    for node in gm.graph.nodes:  # topological order
        if (node.op == "call_module" and node.target in targets) or any(i in dirty for i in node.all_input_nodes):
            dirty.add(node)
    return frozenset(dirty)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; inf for no noise."""
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


@dataclass
class _Score:
    """Sums over the images: squared logit error against FP32, correct top-1 count."""

    noise: float = 0.0
    correct: int = 0


def sensitivity(sim: QuantSim, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, chunk: int = 25,
                progress: bool = True) -> pd.DataFrame:
    """The UNIT_COLUMNS table of a calibrated `sim` on the (images, labels) `batches`, against its FP32 model (the
    sim with every quantizer off, which is the FP32 function exactly).

    One row per unit, ranked by only_sqnr_db (rank 1: the unit whose quantization alone costs most), then the
    WHOLE_MODEL row (only_*: every quantizer; weight_only_*: every weight; act_only_*: every activation quantizer)
    and the SUM_OF_PARTS row (each column: the single-unit noise powers summed, as SQNR, and the single-unit top-1
    drops summed), so the parts can be read next to the whole.

    Cost: per `chunk` images, one FP32 and one fully quantized pass are recorded node by node; each unit's passes
    then recompute only the nodes downstream of the unit (about half the network on average).
    """
    gm = sim.model.eval()
    everything = frozenset(sim.quantizer_names())
    parameters = frozenset(n for n in everything if _is_parameter(n))
    found = units(sim)
    nodes = quantizer_nodes(sim)
    dirty = {u.name: _downstream(gm, {u.name, nodes.get(u.activation)}) for u in found}
    modes = {u.name: _unit_modes(u, everything) for u in found}
    whole = {"only": everything, "weight_only": parameters, "act_only": everything - parameters}
    layer_nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in dirty
                   and any(u.name == n.target and u.parameters for u in found)}
    scores = {(u.name, mode): _Score() for u in found for mode in modes[u.name]}
    scores |= {("whole", mode): _Score() for mode in whole}
    layer_power = {name: [0.0, 0.0] for name in layer_nodes}  # FP32 output power, squared error of the full sim
    signal, fp32_correct, count = 0.0, 0, 0
    chunks = [(images[i:i + chunk], labels[i:i + chunk]) for images, labels in batches for i in range(0, len(images), chunk)]
    bar = tqdm(total=len(chunks) * len(found), desc="sensitivity", unit="unit", disable=not progress)
    with torch.inference_mode(), bar:
        for images, labels in chunks:
            fp32_values, full_values = {}, {}
            with quantized_only(sim, frozenset()):
                reference = _Replay(gm, record=fp32_values).run(images).double()
            with quantized_only(sim, everything):
                _Replay(gm, record=full_values).run(images)
            signal += reference.square().sum().item()
            fp32_correct += _correct(reference, labels)
            count += len(labels)
            for name, node in layer_nodes.items():
                expected = fp32_values[node].double()
                layer_power[name][0] += expected.square().sum().item()
                layer_power[name][1] += (full_values[node].double() - expected).square().sum().item()
            for mode, enabled in whole.items():
                with quantized_only(sim, enabled):
                    _add(scores[("whole", mode)], gm(images), reference, labels)
            for unit in found:
                for mode, enabled in modes[unit.name].items():
                    cache = full_values if mode == "all_but" else fp32_values
                    with quantized_only(sim, enabled):
                        _add(scores[(unit.name, mode)], _Replay(gm, cache, dirty[unit.name]).run(images), reference, labels)
                bar.update()
    return _table(found, scores, layer_power, signal, 100.0 * fp32_correct / count, count)


def _unit_modes(unit: Unit, everything: frozenset[str]) -> dict[str, frozenset[str]]:
    """The quantizer sets a unit is measured with; weight_only / act_only only where they differ from only."""
    modes = {"only": unit.quantizers, "all_but": everything - unit.quantizers}
    if unit.parameters and unit.activation:
        modes |= {"weight_only": frozenset(unit.parameters), "act_only": frozenset([unit.activation])}
    return modes


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())


def _add(score: _Score, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> None:
    score.noise += (logits.double() - reference).square().sum().item()
    score.correct += _correct(logits, labels)


def _table(found: list[Unit], scores: dict, layer_power: dict, signal: float, fp32_top1: float, count: int) -> pd.DataFrame:
    def columns(score: _Score, mode: str) -> dict:
        return {f"{mode}_sqnr_db": sqnr_db(signal, score.noise), f"{mode}_top1": 100.0 * score.correct / count}

    rows, parts = [], {mode: [0.0, 0.0] for mode in ("only", "weight_only", "act_only")}  # noise, top-1 drop
    for unit in found:
        row = {"unit": unit.name, "kind": unit.kind}
        for mode in MODES:
            score = scores.get((unit.name, mode))
            if score is None:  # the same as only, or nothing to quantize in this mode
                same = (mode == "weight_only") == bool(unit.parameters)
                score = scores[(unit.name, "only")] if same else _Score(0.0, round(fp32_top1 * count / 100))
            row |= columns(score, mode)
            if mode in parts:
                parts[mode][0] += score.noise
                parts[mode][1] += fp32_top1 - row[f"{mode}_top1"]
        power = layer_power.get(unit.name)
        row["sim_layer_sqnr_db"] = sqnr_db(*power) if power else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table["rank"] = table["only_sqnr_db"].rank(method="first", ascending=True).astype(int)
    whole = {"unit": WHOLE_MODEL, "kind": "model"}
    for mode in parts:
        whole |= columns(scores[("whole", mode)], mode)
    summed = {"unit": SUM_OF_PARTS, "kind": "model"}
    for mode, (noise, drop) in parts.items():
        summed |= {f"{mode}_sqnr_db": sqnr_db(signal, noise), f"{mode}_top1": fp32_top1 - drop}
    table = pd.concat([table.sort_values("rank"), pd.DataFrame([whole, summed])], ignore_index=True)
    table["rank"] = table["rank"].astype("Int64")
    return table.reindex(columns=UNIT_COLUMNS).assign(fp32_top1=fp32_top1, n_images=count)
