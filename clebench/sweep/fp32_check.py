"""The sweep's FP32 check: every step that must keep the network's function is checked on a probe batch as it runs.

    bn_fold, cls, cls_relu6_keep, cls_relu6_clip   exact up to float32 rounding: rel <= 1e-4, or the unit stops
    cls_regions, cls_regions_relu6_clip            (the same)
    act_equalize, act_equalize_relu6_clip          (the same)
    brevitas_equalize(_no_merge_bias)              (the same: BN merge and equalization; Brevitas' ReLU6 -> ReLU is
                                                   the sweep's relu6_to_relu step, unchecked like it)
    hbf                                            approximate by design (exact only where a pre-activation stays
                                                   above beta - 3|gamma| and no zero padding meets it): measured, not
                                                   bounded. It moved EfficientNet-Lite0's logits by rel 0.14 on 64
                                                   ImageNet-sample images (1 top-1 of 64 flipped), so no bound both
                                                   passes correct models and catches a broken one
    aimet_cle                                      measured like hbf: AIMET's pipeline ends in its high-bias fold
    other steps (relu6_to_relu, a config's own)    change the function on purpose: neither

rel = max|y' - y| / max|y| of the logits after the step against those before it. An exact step past its bound stops
the unit with FP32StepError, naming the first value of the graph where the two models part (see `first_divergence`).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from clebench import ops
from clebench.errors import UserError
from clebench.sweep.results import CHECK_COLUMNS
from clebench.sweep.steps import ACT_EQUALIZE_STEPS, BREVITAS_STEPS, CLS_STEPS, REGION_STEPS

EXACT_TOLERANCE = 1e-4
TOLERANCES = {"bn_fold": EXACT_TOLERANCE,
              **{step: EXACT_TOLERANCE for step in (*CLS_STEPS, *REGION_STEPS, *ACT_EQUALIZE_STEPS, *BREVITAS_STEPS)}}
MEASURED = ("hbf", "aimet_cle")  # the steps that high-bias fold: recorded in their own column, not bounded
PROBE_IMAGES = 4  # of the first calibration batch: 16 cost 2 % of the CIFAR CI sweep; 4 show a mangled layer as well


class FP32StepError(UserError):
    """A step that must keep the FP32 function changed it."""


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    """max|after - before| / max|before| (inf if either is not finite)."""
    if not (torch.isfinite(after).all() and torch.isfinite(before).all()):
        return float("inf")
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))


def check_step(step: str, model_name: str, before: nn.Module, after: nn.Module, probe: torch.Tensor,
               before_output: torch.Tensor, after_output: torch.Tensor) -> float:
    """The step's relative change of the logits; FP32StepError if it is past the step's bound (if it has one)."""
    change = relative_change(after_output, before_output)
    bound = TOLERANCES.get(step)
    if bound is not None and not change <= bound:
        where = first_divergence(before, after, probe, bound)
        place = f"; the first value that differs is {where[0]} (rel {where[1]:.1e})" if where else ""
        raise FP32StepError(
            f"{model_name}: step {step} changed the FP32 output by rel {change:.1e} (> {bound:g}) on "
            f"{len(probe)} calibration images{place}. The step broke the model: report it with the model, or leave "
            "the step out"
        )
    return change


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, probe: torch.Tensor,
                     tolerance: float) -> tuple[str, float] | None:
    """(description, rel) of the first value in `after`'s graph that differs from `before`'s value of the same node by
    more than `tolerance`, among the values no FP32 step may rescale: not a layer's output, nor one reached from a
    layer through ReLU-like activations, identities and moves alone (CLS and HBF change those on purpose)."""
    values = [_node_values(model, probe) for model in (before, after)]
    modules = dict(after.named_modules())
    rescalable: set[str] = set()
    for node in after.graph.nodes:
        if _rescalable(node, modules, rescalable):
            rescalable.add(node.name)
            continue
        first, second = values[0].get(node.name), values[1].get(node.name)
        if node.op == "output" or not (torch.is_tensor(first) and torch.is_tensor(second)):
            continue
        if first.shape != second.shape:
            return _describe(node), float("inf")
        change = relative_change(second, first)
        if change > tolerance:
            return _describe(node), change
    return None


def _rescalable(node: fx.Node, modules: dict[str, nn.Module], rescalable: set[str]) -> bool:
    op = ops.op_of(node, modules)
    if op is None:
        return False
    if op.role == "layer":
        return True
    through = op.role in ("identity", "value_preserving") or (op.role == "activation" and op.family in ("relu", "clip"))
    inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
    return through and bool(inputs) and inputs[0].name in rescalable


def _node_values(model: fx.GraphModule, probe: torch.Tensor) -> dict[str, object]:
    values: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            values[node.name] = result = super().run_node(node)
            return result

    with torch.no_grad():
        Recorder(model).run(probe)
    return values


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"the output of {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    inputs = ", ".join(str(n.target) if n.op in ("call_module", "get_attr") else n.name for n in node.all_input_nodes)
    return f"{target}({inputs})"


def row_columns(changes: dict[str, float]) -> dict[str, float | None]:
    """A row's CHECK_COLUMNS from its steps' changes: the largest of the exact steps' (0.0 where it has none) and
    that of its high-bias-folding step, hbf or aimet_cle (None where it has none: a row must equal itself, which NaN
    does not)."""
    exact = [change for step, change in changes.items() if step in TOLERANCES]
    folding = next((changes[step] for step in MEASURED if step in changes), None)
    return dict(zip(CHECK_COLUMNS, (max(exact, default=0.0), folding)))
