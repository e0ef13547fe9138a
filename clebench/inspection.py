"""`clebench inspect`: what graph discovery sees in a model before any sweep.

On the model as a sweep prepares it (clebench.graph.prepare_model): the BatchNorms that `bn_fold` folds and into
which layer (clebench.graph.find_bn_folds) and those it leaves; after the fold (and ReLU6 -> ReLU for the `replace`
policy), the cross-layer-scaling sets of clebench.graph.find_cls_chains / chain_to_cls_sets, and every conv / linear
layer in no set with the reason (clebench.cle_diagnostics.skipped_layers); the graph nodes the ONNX exporter has no
lowering for (clebench.runtimes.export.lowers), and whether a W8A8 QuantSim of the folded model exports.
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from clebench import cle_diagnostics, graph, layers, models, ops
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.errors import UserError
from clebench.models.sources import TIMM_PREFIX
from clebench.sweep.config import ModelSpec
from clebench.utils import replace_modules_of_type1_with_type2

DEFAULT_INPUT_SIZE = (3, 224, 224)  # for a model that says nothing about its input


@dataclass
class Inspection:
    """What `inspect_model` found; plain data (the --json output is asdict of it)."""

    model: str
    input_shape: list[int]
    relu6: str
    bn_folds: list[dict] = field(default_factory=list)  # {"bn", "layer", "direction": "backward" | "forward"}
    bn_unfolded: list[dict] = field(default_factory=list)  # {"bn", "reason"}
    cls_sets: list[dict] = field(default_factory=list)  # {"kind": "pair" | "triple", "layers", "activations"}
    skipped: list[dict] = field(default_factory=list)  # cle_diagnostics.SKIPPED_COLUMNS, plus "why" in words
    layers: int = 0  # conv / linear layers (call sites of distinct modules)
    export_gaps: list[dict] = field(default_factory=list)  # {"node", "what"}: nodes without an ONNX lowering
    export: str = ""  # the trial export's outcome


def model_spec(text: str, checkpoint: str | None = None, input_size: tuple[int, int, int] | None = None) -> ModelSpec:
    """The [[models]] entry a command line's MODEL names: a registry or entry-point name, "timm:<name>", or a factory
    "module:callable" / "file.py:callable" (a file relative to the working directory)."""
    factory = text if ":" in text and not text.startswith(TIMM_PREFIX) else None
    return ModelSpec(text, None if checkpoint is None else str(Path(checkpoint).expanduser().resolve()),
                     factory=factory, base_dir=str(Path.cwd().resolve()) if factory else None,
                     input_size=None if input_size is None else tuple(input_size))


def load(spec: ModelSpec, models_dir: str | Path | None = None) -> tuple[nn.Module, tuple[int, int, int, int]]:
    """The entry's model and the (1, C, H, W) input it is inspected on: `input_size`, else the crop of its
    preprocessing, else DEFAULT_INPUT_SIZE; a one-line error if the model rejects that input."""
    model = models.load_spec_model(spec, models_dir)
    preprocessing = models.spec_preprocessing(spec)
    size = spec.input_size or ((3, *preprocessing.crop_size) if preprocessing is not None else DEFAULT_INPUT_SIZE)
    models.probe_output_count(model, size, spec.name)
    return model, (1, *size)


def _node_text(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op in ("placeholder", "output"):
        return f"the model {'input' if node.op == 'placeholder' else 'output'}"
    module = graph.module_of(node, modules)
    if module is not None:
        return f"{type(module).__name__} {node.target}"
    return f"{getattr(node.target, '__name__', str(node.target))} ({node.name})"


def _unfolded_reason(node: fx.Node, modules: dict[str, nn.Module], calls: int) -> str:
    """Why bn_fold leaves the BN called at `node`, naming what is on either side of it."""
    if calls > 1:
        return f"called at {calls} places: folding would change the others"
    before = ", ".join(_node_text(source, modules) for source in node.all_input_nodes)
    after = ", ".join(_node_text(user, modules) for user in node.users)
    return (f"between {before} and {after}: it folds only into a layer whose sole consumer it is, or into an "
            "unpadded, ungrouped conv or a linear layer that is its sole consumer")


def _bn_records(gm: fx.GraphModule) -> tuple[list[dict], list[dict]]:
    """(folds, BNs left in the model with the reason) of the sweep's bn_fold step."""
    folds = graph.find_bn_folds(gm)
    folded = [{"bn": bn, "layer": layer, "direction": "backward"} for layer, bn in folds.backward]
    folded += [{"bn": bn, "layer": layer, "direction": "forward"} for bn, layer in folds.forward]
    done = {record["bn"] for record in folded}
    modules, calls = dict(gm.named_modules()), graph.call_sites(gm)
    unfolded, seen = [], set()
    for node in gm.graph.nodes:
        if isinstance(graph.module_of(node, modules), layers.BN_TYPES) and node.target not in done | seen:
            seen.add(node.target)
            unfolded.append({"bn": node.target, "reason": _unfolded_reason(node, modules, calls[node.target])})
    return folded, unfolded


def _activation_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    module = graph.module_of(node, modules)
    return type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))


def _cls_records(gm: fx.GraphModule, relu6: str) -> list[dict]:
    modules = dict(gm.named_modules())
    records = []
    for chain in graph.find_cls_chains(gm, "clip" if relu6 == "clip" else "keep"):
        for hops in graph.chain_to_cls_sets(chain, modules):
            records.append({"kind": "pair" if len(hops) == 1 else "triple",
                            "layers": [hops[0].layer, *(hop.next_layer for hop in hops)],
                            "activations": [[_activation_label(n, modules) for n in hop.activations] for hop in hops]})
    return records


def _skipped_records(model: nn.Module, relu6: str, sets: list[dict]) -> list[dict]:
    scaled = {name for record in sets for name in record["layers"]}
    table = cle_diagnostics.skipped_layers(model, "clip" if relu6 == "clip" else "keep", scaled)
    return [{**row, "why": cle_diagnostics.SKIP_REASONS[row["reason"]]} for row in table.to_dict("records")]


def _layer_count(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return len({node.target for node in gm.graph.nodes if layers.is_layer(graph.module_of(node, modules))})


def _export_gaps(gm: fx.GraphModule) -> list[dict]:
    """Graph nodes (shape arithmetic aside) that the exporter has no ONNX lowering for."""
    from clebench.runtimes.export import lowers

    modules = dict(gm.named_modules())
    gaps = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        op = ops.op_of(node, modules)
        if op is not None and op.role == "shape" or lowers(op):
            continue
        module = graph.module_of(node, modules)
        what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
        gaps.append({"node": node.name, "what": f"{node.op} {what}" + ("" if op is None else f" (op {op.name!r})")})
    return gaps


def _trial_export(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Whether a calibrated W8A8 per-tensor QuantSim of `model` exports to ONNX QDQ, in words."""
    from clebench.quant import QuantConfig, QuantSim
    from clebench.runtimes.export import ExportError, export_onnx, require

    try:
        require("onnx")
    except UserError as error:
        return f"not tried: {error}"
    inputs = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    sim = QuantSim(model, inputs, QuantConfig())
    sim.calibrate([inputs], progress=False)
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_onnx(sim, inputs, Path(folder) / "model.onnx", int32_bias=True)
        except ExportError as error:
            return f"fails: {error}"
    return "exports (W8A8 per-tensor QuantSim of the folded model as ONNX QDQ, int32 biases)"


def inspect_model(model: nn.Module, name: str, input_shape: tuple[int, ...], relu6: str = "keep",
                  export: bool = True) -> Inspection:
    """What the sweep's graph discovery finds in `model` (not modified) for (N, C, H, W) inputs `input_shape` and a
    ReLU6 policy ('replace': relu6_to_relu then cls; 'keep': cls; 'clip': cls_relu6_clip); export: also try it."""
    graph.check_relu6_policy(relu6)
    prepared = graph.prepare_model(model.eval())
    result = Inspection(name, list(input_shape), relu6, layers=_layer_count(prepared))
    result.bn_folds, result.bn_unfolded = _bn_records(prepared)
    folded = copy.deepcopy(prepared)
    fold_all_batch_norms(folded)
    if relu6 == "replace":
        replace_modules_of_type1_with_type2(folded, nn.ReLU6, nn.ReLU)
    traced = graph.trace(folded)
    result.cls_sets = _cls_records(traced, relu6)
    result.skipped = _skipped_records(folded, relu6, result.cls_sets)
    result.export_gaps = _export_gaps(traced)
    result.export = _trial_export(folded, input_shape) if export else "not tried"
    return result


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _set_line(record: dict) -> str:
    parts = [record["layers"][0]]
    for activations, layer in zip(record["activations"], record["layers"][1:]):
        parts += [*activations, layer]
    return f"  {record['kind']:<7}{' -> '.join(parts)}"


def _skipped_lines(record: dict, width: int) -> list[str]:
    """The layer, its kind and why: what ends a chain on its output side and on its input side, one line each."""
    sides = [f"{side} {record[key]}" for side, key in (("out:", "output_side"), ("in: ", "input_side")) if record[key]]
    head = f"  {record['layer']:<{width}}  {record['kind']:<9}  "
    return [head + (sides or [record["why"]])[0], *(" " * len(head) + side for side in sides[1:])]


def format_inspection(result: Inspection) -> str:
    """Readable sections with counts."""
    backward = [r for r in result.bn_folds if r["direction"] == "backward"]
    forward = [r for r in result.bn_folds if r["direction"] == "forward"]
    triples = sum(r["kind"] == "triple" for r in result.cls_sets)
    total_bns = len(result.bn_folds) + len(result.bn_unfolded)
    width = max((len(r["layer"]) for r in result.skipped), default=0)
    lines = [f"{result.model}: input {'x'.join(map(str, result.input_shape))}, ReLU6 policy {result.relu6!r}, "
             f"{_plural(result.layers, 'conv / linear layer')}", "",
             f"BN fold: {len(result.bn_folds)} of {_plural(total_bns, 'BatchNorm')} folded "
             f"({len(backward)} into the layer before, {len(forward)} into the layer after)"]
    lines += [f"  {r['bn']} into {r['layer']}" for r in backward]
    lines += [f"  {r['bn']} into {r['layer']} (after it)" for r in forward]
    lines += [f"  {r['bn']} left in the model: {r['reason']}" for r in result.bn_unfolded]
    lines += ["", f"CLS sets: {len(result.cls_sets)} ({_plural(len(result.cls_sets) - triples, 'pair')}, "
                  f"{_plural(triples, 'triple')})"] + [_set_line(r) for r in result.cls_sets]
    lines += ["", f"Layers in no CLS set: {len(result.skipped)} of {result.layers}"]
    lines += [line for r in result.skipped for line in _skipped_lines(r, width)]
    lines += ["", f"Export: {_plural(len(result.export_gaps), 'op')} without an ONNX lowering"]
    lines += [f"  {r['node']}: {r['what']}" for r in result.export_gaps] + [f"  trial export {result.export}"]
    return "\n".join(lines)


def to_json(result: Inspection) -> str:
    return json.dumps(asdict(result), indent=1)
