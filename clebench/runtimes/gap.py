"""Where a deployment gap comes from: per quantized activation, in graph order, how far a runtime's tensor is from
the simulation's, for the same images.

The export names every activation DequantizeLinear output `<fx node name>_dq` (clebench.runtimes.export); the runtime
returns those tensors as extra graph outputs, the simulation's come from running its fx graph node by node. SQNR is
10 log10(sum sim^2 / sum (sim - runtime)^2) in dB (inf: identical); `off_grid_%` is the share of elements that land
on another grid point of the activation's quantizer (|difference| > scale / 2). The first row below a threshold is
where the two part. A tensor the runtime merged away (OpenVINO's frontend drops some names) has NaN columns.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import fx

from clebench.quant.sim import ActivationQuantizer, QuantSim
from clebench.runtimes.engines import LayerPrecision, runtime
from clebench.runtimes.export import export_onnx, require

GAP_COLUMNS = ["index", "tensor", "sqnr_db", "max_abs_diff", "off_grid_%"]
LOGITS = "logits"


@dataclass
class Gap:
    """One row's comparison: the per-tensor table (GAP_COLUMNS), the top-1 agreement of the logits (% of images),
    and which layers the runtime ran on integers without (`plain`) and with (`probed`) the extra outputs."""

    table: pd.DataFrame
    agreement: float
    plain: LayerPrecision
    probed: LayerPrecision

    def first_below(self, sqnr_db: float) -> str | None:
        """The first tensor whose SQNR is below `sqnr_db` (None: none is)."""
        below = self.table[self.table["sqnr_db"] < sqnr_db]
        return None if below.empty else str(below.iloc[0]["tensor"])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB; inf when they are equal."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    noise = float(np.sum((reference - test) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def activation_tensors(onnx_path: str | os.PathLike) -> list[str]:
    """Outputs of the activation DequantizeLinear nodes (those not reading an initializer), in graph order."""
    graph = require("onnx").load(str(onnx_path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [node.output[0] for node in graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] not in constants and node.output[0].endswith("_dq")]


def _sim_nodes(sim: QuantSim, tensors: list[str]) -> dict[str, tuple[fx.Node, float | None]]:
    """{tensor: (the sim's fx node computing it, its quantizer's scale)}: the quantizer reading `<name>` for a
    tensor `<name>_dq`, else node `<name>` itself (an activation the export rounds onto the grid in place)."""
    modules = dict(sim.model.named_modules())
    nodes = {node.name: node for node in sim.model.graph.nodes}
    readers = {node.args[0].name: node for node in sim.model.graph.nodes if node.op == "call_module"
               and isinstance(modules[node.target], ActivationQuantizer) and isinstance(node.args[0], fx.Node)}
    found = {}
    for tensor in tensors:
        base = tensor.removesuffix("_dq")
        node = readers.get(base, nodes.get(base))
        if node is None:
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        scale = float(module.encoding.scale) if isinstance(module, ActivationQuantizer) else None
        found[tensor] = (node, scale)
    return found


def sim_tensors(sim: QuantSim, inputs: torch.Tensor, nodes: list[fx.Node]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({node name: output}, logits) of the simulation on `inputs`, node by node."""
    wanted, captured = {node.name for node in nodes}, {}

    class Capture(fx.Interpreter):
        def run_node(self, node: fx.Node):
            value = super().run_node(node)
            if node.name in wanted:
                captured[node.name] = value.detach().cpu().numpy()
            return value

    with torch.no_grad():
        logits = Capture(sim.model).run(inputs)
    return captured, logits.detach().cpu().numpy()


def layer_gap(sim: QuantSim, inputs: torch.Tensor, *, runtime_name: str, mode: str = "int8",
              threads: int | None = None, workdir: str | os.PathLike | None = None) -> Gap:
    """Compare `sim` with runtime `runtime_name` in `mode` on `inputs` [B, ...] (normalized images), tensor by tensor.

    The int8 mode exports int32 biases, as the deployed model has them; a sim without them differs by that rounding
    from the first biased layer on (quant settings ending in _int32bias remove it).
    """
    module = runtime(runtime_name)
    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(sim, inputs[:1], Path(workdir or scratch) / "gap.onnx",
                           int32_bias=True if mode == "int8" else None)
        located = _sim_nodes(sim, activation_tensors(path))
        names = list(located)
        plain = module.layer_precision(path, mode, threads)
        probed, probed_precision = module.tensors(path, inputs, [*names, LOGITS], mode=mode, threads=threads)
    reference, sim_logits = sim_tensors(sim, inputs, [node for node, _ in located.values()])
    rows = []
    for index, (tensor, (node, scale)) in enumerate(located.items()):
        if tensor not in probed:  # merged away by the runtime's frontend: not observable
            rows.append({"index": index, "tensor": tensor, "sqnr_db": math.nan, "max_abs_diff": math.nan,
                         "off_grid_%": math.nan})
            continue
        ours, theirs = reference[node.name], probed[tensor]
        difference = np.abs(ours.astype(np.float64) - theirs)
        rows.append({"index": index, "tensor": tensor, "sqnr_db": sqnr_db(ours, theirs),
                     "max_abs_diff": float(difference.max()),
                     "off_grid_%": 100 * float(np.mean(difference > scale / 2)) if scale else float("nan")})
    logits = probed[LOGITS]
    rows.append({"index": len(rows), "tensor": LOGITS, "sqnr_db": sqnr_db(sim_logits, logits),
                 "max_abs_diff": float(np.abs(sim_logits - logits).max()), "off_grid_%": float("nan")})
    agreement = 100 * float(np.mean(sim_logits.argmax(1) == logits.argmax(1)))
    return Gap(pd.DataFrame(rows, columns=GAP_COLUMNS), agreement, plain, probed_precision)


def format_gap(gap: Gap, title: str, threshold_db: float) -> str:
    """The gap as text: a header, the per-tensor table, and the first tensor below `threshold_db`."""
    first = gap.first_below(threshold_db)
    lines = [title,
             f"top-1 agreement with the sim on these images: {gap.agreement:.1f} %",
             f"runtime as deployed: {gap.plain}",
             f"runtime with the tensors as extra outputs: {gap.probed}",
             "",
             gap.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
             "",
             f"first tensor below {threshold_db:g} dB: {first}" if first else f"every tensor is at or above {threshold_db:g} dB"]
    if gap.probed.integer != gap.plain.integer:
        lines.append("note: the extra outputs changed which layers run on integers; the probed tensors may differ "
                     "from the deployed model's")
    return "\n".join(lines)
