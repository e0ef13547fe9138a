"""Check BN fold + CLS + high-bias fold on every torchvision classifier, clebench's own models and one timm CNN per
family, against an independent reference, and write the markdown report (results/zoo_coverage.md; the timm models
alone: results/zoo_coverage_timm.md).

    python scripts/zoo/zoo_coverage.py [--models REGEX ...] [--output results/zoo_coverage.md] [--threads 1]
    python scripts/zoo/zoo_coverage.py --models 'timm:.*' --output results/zoo_coverage_timm.md

Each model gets random weights (seed 0), randomized BN statistics and a 1x3xSxS input, S = max(64, the smallest
input its torchvision weights accept); nothing is downloaded. Per model:
  keep  fold_all_batch_norms + CrossLayerScaling.scale_model(relu6="keep") on a copy
  clip  graph.prepare_model + fold_all_batch_norms + scale_model(relu6="clip")
  hbf   graph.prepare_model + equalize_model(relu6="clip"), i.e. BN fold + CLS + high-bias fold
and checks that fold + CLS keeps the FP32 output (max|dy| / max|y| <= 1e-4, the sweep's bound for exact steps), that
every parameter and buffer stays finite, and that the layer links CLS scaled are exactly those an independent
reference finds by recording the eager forward pass op by op (`reference_links`), so a silent no-op cannot pass. A
model fx cannot trace must fail with clebench.graph.UntraceableModelError, one with a layer subclass clebench cannot
treat as its base with clebench.foreign_layers.ForeignModuleError. The hbf model is then exported as a W8A8 QuantSim
and run by ONNX Runtime's float kernels against the torch simulation (`check_export`).

One model failing does not stop the run; the report is rewritten after every model. Exit status 1 if any model FAILs.

Output: prints one line per model to stdout and writes the markdown report to --output (rewritten after every model).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import math
import os
import platform
import re
import shlex
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from clebench import foreign_layers, graph, layers, ops, timing
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import ClsSetInfo, CrossLayerScaling, equalize_model
from clebench.errors import UserError
from clebench.models import MobileNetV2, load_spec_model
from clebench.models.cifar import CIFAR10_BUILDERS
from clebench.models.sources import TIMM_PREFIX
from clebench.models.torchvision_imagenet import torchvision_model_names
from clebench.quant import QuantConfig, QuantSim
from clebench.quant.sim import quantizer_of
from clebench.runtimes.export import ExportError, export_onnx, require
from clebench.sweep.config import ModelSpec
from clebench.sweep.fp32_check import EXACT_TOLERANCE, relative_change

MIN_INPUT = 64
EXPORT_INPUTS = 8
MAX_COMPARED_PARAMETERS = 400_000_000  # larger models are exported, not run: ~20 bytes per parameter in this check
EXPORT_STEPS = 2  # ONNX Runtime's float kernels must reproduce the torch simulation's logits within this many steps


@dataclass
class PolicyResult:
    """fold_all_batch_norms + CrossLayerScaling.scale_model under one ReLU6 policy ("keep" or "clip")."""

    bn_folds: int = 0
    rel_fold: float = float("nan")  # max|dy| / max|y| after the BN fold alone
    links: tuple[int, int] = (0, 0)  # (reference links, clebench hops)
    sets: tuple[int, int] = (0, 0)  # (pairs, triples) scaled
    rel: float = float("nan")  # after BN fold + CLS


@dataclass
class ExportResult:
    """The BN-folded + CLS + HBF model as a W8A8 per-tensor QuantSim, exported to ONNX and run by ONNX Runtime's
    float kernels ("sim" mode) on EXPORT_INPUTS random inputs: its logits against the torch simulation's."""

    exported: bool | None = None  # None: not tried (the onnx extra is missing, or an earlier check failed)
    error: str = ""  # the ExportError users see
    max_steps: float = float("nan")  # max |ONNX Runtime - torch sim| of the logits, in output-quantizer steps
    share_over_2_steps: float = float("nan")  # fraction of logits more than 2 steps apart
    # the same differences against the simulation run in float64 (same grids, exact-er sums): how far float32
    # summation order alone moves the torch simulation, and ONNX Runtime, from it
    sim_float64_steps: float = float("nan")
    runtime_float64_steps: float = float("nan")


@dataclass
class ZooResult:
    """What CLE did to one model; rel_hbf is max|dy| / max|y| after equalize_model(relu6="clip")."""

    model: str
    input_size: int
    traceable: bool = False
    foreign: bool = False  # refused with ForeignModuleError (a layer subclass clebench cannot treat as its base)
    error: str = ""  # the UntraceableModelError / ForeignModuleError message, or an unexpected exception (a bug)
    bn_total: int = 0
    keep: PolicyResult = field(default_factory=PolicyResult)
    clip: PolicyResult = field(default_factory=PolicyResult)
    rel_hbf: float = float("nan")
    finite: bool = True
    export: ExportResult = field(default_factory=lambda: ExportResult())
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        if self.foreign:
            return "refused (clear error)"
        return "ok" if self.traceable else "untraceable (clear error)"


# ---- the models ----------------------------------------------------------------------------------------------------

def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet  # the zoo extra

    return EfficientNet.from_name("efficientnet-lite0")


# clebench's own architectures (clebench.models, random weights here) and their input sides
PROJECT_MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    **{name: (builder, 32) for name, builder in CIFAR10_BUILDERS.items()},
    "efficientnet_lite0": (_efficientnet_lite0, MIN_INPUT),
    "mobilenet_v2_tonylins": (MobileNetV2, 224),
}

# One timm CNN per family (and the variants whose layers differ: TF "same" padding, BN + activation modules, mixed
# kernels, weight-standardized convs), checked as "timm:<name>" with random weights.
TIMM_MODELS = (
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "skresnet18", "res2net50_14w_8s", "resnest14d",
    "cspresnet50", "cspdarknet53", "dla34", "dpn68", "densenet121", "vgg11_bn", "regnetx_002", "regnety_002",
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnet_lite0", "tf_efficientnet_b0", "efficientnetv2_rw_t", "mixnet_s", "mnasnet_100", "semnasnet_100",
    "fbnetc_100", "spnasnet_100", "hardcorenas_a", "tinynet_a", "lcnet_050", "ghostnet_100", "rexnet_100",
    "ese_vovnet19b_dw", "selecsls42b", "gernet_s", "repvgg_a0", "mobileone_s0", "hrnet_w18_small", "inception_v3",
    "xception41", "convmixer_768_32", "resnetv2_50x1_bit", "nf_resnet26",
)
# Smallest sides where timm's configs give none: inception_v3's stem leaves less than a 3x3 kernel of 64 px, as
# torchvision's inception_v3 (min_size 75) does.
TIMM_MIN_INPUT = {"inception_v3": 75}


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, in place; returns the model in eval mode.

    beta reaches 3, above 3 |gamma| for about one channel in six, so high-bias folding has something to absorb.
    """
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda n, low, high: torch.rand(n, generator=generator) * (high - low) + low  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(uniform(n, -1.0, 1.0))
                module.running_var.copy_(uniform(n, 0.5, 2.0))
                module.weight.copy_(uniform(n, 0.25, 1.25))
                module.bias.copy_(uniform(n, -1.0, 3.0))
    return model.eval()


def input_size(name: str) -> int:
    """A project model's own input side; a timm model's fixed input side, else MIN_INPUT (or TIMM_MIN_INPUT); else
    max(MIN_INPUT, the smallest side its torchvision weights accept)."""
    if name in PROJECT_MODELS:
        return PROJECT_MODELS[name][1]
    if name.startswith(TIMM_PREFIX):
        import timm

        config = timm.models.get_pretrained_cfg(name.removeprefix(TIMM_PREFIX))
        fixed = config is not None and config.fixed_input_size
        return config.input_size[-1] if fixed else TIMM_MIN_INPUT.get(name.removeprefix(TIMM_PREFIX), MIN_INPUT)
    sizes = [w.meta["min_size"][0] for w in torchvision.models.get_model_weights(name)]
    return max(MIN_INPUT, min(sizes))


def build(name: str) -> nn.Module:
    """Model `name` with random weights (seed 0) and randomized BN statistics: a project model, a "timm:<name>"
    (clebench.models.load_spec_model, pretrained = false) or a torchvision classifier."""
    torch.manual_seed(0)
    if name in PROJECT_MODELS:
        model = PROJECT_MODELS[name][0]()
    elif name.startswith(TIMM_PREFIX):
        model = load_spec_model(ModelSpec(name))
    else:
        model = torchvision.models.get_model(name, weights=None)
    return randomize_batch_norms(model)


def select(patterns: list[str] | None) -> list[str]:
    """Model names matching any regex in `patterns` (all models if None); a pattern matching nothing is an error."""
    names = torchvision_model_names() + list(PROJECT_MODELS)
    if importlib.util.find_spec("timm") is not None:
        names += [TIMM_PREFIX + name for name in TIMM_MODELS]
    if not patterns:
        return names
    for pattern in patterns:
        if not any(re.fullmatch(pattern, n) for n in names):
            choices = ", ".join(names)
            raise UserError(f"--models {pattern!r} matches no torchvision classification or clebench model; choose from: "
                            f"{choices}")
    return [n for n in names if any(re.fullmatch(p, n) for p in patterns)]


# ---- the independent reference: CLS links from the eager forward pass, without fx ---------------------------------

def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class _OpRecorder(TorchFunctionMode):
    """Records every tensor-producing torch call of an eager forward pass: (function, args, kwargs, outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Callable, tuple, dict, list[torch.Tensor]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if outputs:
            self.ops.append((func, args, kwargs, outputs))
        return out


def _activation(func: Callable, args: tuple, kwargs: dict) -> str | None:
    op = ops.function_op(func)
    if op is None or op.role != "activation":
        return None
    if op.family == "relu":
        return "relu"
    return "relu6" if op.family == "clip" and ops.functional_relu6_bound(func, args, kwargs) is not None else None


def _role(func: Callable) -> str | None:
    op = ops.function_op(func)
    return None if op is None else op.role


def _is_layer_call(func: Callable) -> bool:
    op = ops.function_op(func)
    return op is not None and op.name in ("functional_conv", "functional_linear")


def _linkable(first: nn.Module, second: nn.Module) -> bool:
    same_kind = isinstance(first, nn.Linear) == isinstance(second, nn.Linear)
    return same_kind and layers.out_channels(first) == layers.in_channels(second)


def reference_links(model: nn.Module, inputs: tuple[torch.Tensor, ...], relu6: bool) -> tuple[set[tuple[str, str]], list[torch.Tensor]]:
    """Layer pairs CLS may scale, found without fx: (layer1, layer2) module names, and the model's outputs.

    Runs the model eagerly and records each torch call. layer2's input must come from layer1 through nothing but
    ReLU/PReLU (and ReLU6 / hardtanh(0, m) when `relu6`), zero padding and eval-mode dropout, each intermediate value read by
    exactly one op, both layers called once, scalable, and matching in channels and in Linear-ness.
    """
    owner = {id(module.weight): (name, module) for name, module in model.named_modules() if graph.is_scalable(module)}
    with torch.no_grad(), _OpRecorder() as recorder:
        outputs = _tensors(model(*inputs))
    recorded = recorder.ops
    producer: dict[int, int] = {}
    sources: list[list[int | None]] = []  # per op: the producing op of each tensor argument, at call time
    readers: Counter = Counter()
    calls: Counter = Counter()
    for index, (func, args, kwargs, out) in enumerate(recorded):
        sources.append([producer.get(id(t)) for t in _tensors(list(args) + list(kwargs.values()))])
        readers.update(s for s in sources[-1] if s is not None)
        if _is_layer_call(func) and id(args[1]) in owner:
            calls[owner[id(args[1])][0]] += 1
        for tensor in out:
            producer[id(tensor)] = index
    readers.update(producer[id(t)] for t in outputs if id(t) in producer)

    def layer_at(index: int) -> tuple[str, nn.Module] | None:
        func, args, _, _ = recorded[index]
        found = owner.get(id(args[1])) if _is_layer_call(func) and len(args) > 1 else None
        return found if found is not None and calls[found[0]] == 1 else None

    links = set()
    for index in range(len(recorded)):
        second = layer_at(index)
        source = sources[index][0] if second is not None else None
        while source is not None and readers[source] == 1:
            first = layer_at(source)
            if first is not None:
                if _linkable(first[1], second[1]):
                    links.add((first[0], second[0]))
                break
            func, args, kwargs, _ = recorded[source]
            kind = _activation(func, args, kwargs)
            if not (kind == "relu" or (kind == "relu6" and relu6) or _role(func) == "identity"
                    or ops.is_zero_pad(func, args, kwargs)):
                break
            source = sources[source][0]
    return links, outputs


# ---- the checks ----------------------------------------------------------------------------------------------------

def clebench_links(model: nn.Module, relu6: bool) -> set[tuple[str, str]]:
    """The (layer, next layer) hops of clebench's CLS chains (clebench.graph.find_cls_chains)."""
    chains = graph.find_cls_chains(graph.trace(model), "clip" if relu6 else "keep")
    return {(hop.layer, hop.next_layer) for chain in chains for hop in chain}


def output_change(outputs: Iterable[torch.Tensor], expected: Iterable[torch.Tensor]) -> float:
    """The largest clebench.sweep.fp32_check.relative_change over a model's outputs (inf if one is not finite)."""
    return max((relative_change(actual, reference) for actual, reference in zip(outputs, expected)), default=0.0)


def all_finite(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def count_sets(infos: list[ClsSetInfo]) -> tuple[int, int]:
    triples = sum(len(info.cls_pair_info_list) == 2 for info in infos)
    return len(infos) - triples, triples


def _check_finite(result: ZooResult, model: nn.Module, stage: str) -> None:
    if not all_finite(model):
        result.finite = False
        result.problems.append(f"{stage}: a parameter or buffer is NaN/inf")


def fold_and_scale(result: ZooResult, model: nn.Module, inputs: tuple, expected: list, policy: str) -> PolicyResult:
    """Fold + scale `model` in place under `policy`; record what was done and append any problem to `result`."""
    relu6 = policy == "clip"
    outcome = PolicyResult(bn_folds=len(fold_all_batch_norms(model)))
    links, after_fold = reference_links(model, inputs, relu6)
    hops = clebench_links(model, relu6)
    infos = CrossLayerScaling.scale_model(model, relu6=policy)
    with torch.no_grad():
        outcome.rel = output_change(_tensors(model(*inputs)), expected)
    outcome.rel_fold, outcome.links, outcome.sets = output_change(after_fold, expected), (len(links), len(hops)), count_sets(infos)
    if links != hops:
        result.problems.append(
            f"{policy}: links only the reference found {sorted(links - hops)[:3]}, only clebench found {sorted(hops - links)[:3]}"
        )
    if not infos and any(not layers.is_depthwise(model.get_submodule(second)) for _, second in links):
        result.problems.append(f"{policy}: silent no-op, {len(links)} scalable links but no CLS set")
    if not outcome.rel <= EXACT_TOLERANCE:
        result.problems.append(f"{policy}: BN fold + CLS changed the FP32 output by {outcome.rel:.2e} (> {EXACT_TOLERANCE:g})")
    _check_finite(result, model, policy)
    return outcome


def _steps_apart(first: torch.Tensor, second: torch.Tensor, step: float) -> torch.Tensor:
    """|first - second| in output-quantizer steps (both sit on that grid: whole steps apart)."""
    return ((first.double() - second.double()).abs() / step).round()


def _output_step(sim: QuantSim) -> float:
    """The scale of the quantizer whose grid the logits are on (past value-preserving ops such as a flatten)."""
    modules = dict(sim.model.named_modules())
    output = next(node for node in reversed(sim.model.graph.nodes) if node.op == "output")
    quantizer = quantizer_of(output.args[0], modules)
    return float("nan") if quantizer is None else float(modules[quantizer.target].encoding.scale)


def check_export(model: nn.Module, size: int) -> ExportResult:
    """Export `model` as a calibrated W8A8 per-tensor QuantSim and compare ONNX Runtime's float kernels with the torch
    simulation on EXPORT_INPUTS random 3x`size`x`size` inputs (the calibration data too)."""
    try:
        require("onnx"), require("onnxruntime")
    except UserError:
        return ExportResult()
    from clebench.runtimes.onnxruntime import make_session

    inputs = torch.randn(EXPORT_INPUTS, 3, size, size, generator=torch.Generator().manual_seed(2))
    parameters = sum(p.numel() for p in model.parameters())
    sim = QuantSim(model, inputs[:1], QuantConfig())
    sim.calibrate([inputs], progress=False)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = export_onnx(sim, inputs[:1], Path(folder) / "model.onnx")
        except ExportError as error:
            return ExportResult(False, str(error))
        if parameters > MAX_COMPARED_PARAMETERS:
            return ExportResult(True, f"exported; not run: {parameters / 1e6:.0f}M parameters in float kernels need more "
                                      "memory than this check may take")
        session = make_session(path, "sim", threads=1)
        logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    with torch.no_grad():
        expected = sim.model(inputs)
        exact = copy.deepcopy(sim.model).double()(inputs.double())
    step = _output_step(sim)
    steps = _steps_apart(logits, expected, step)
    return ExportResult(True, "", float(steps.max()), float((steps > EXPORT_STEPS).float().mean()),
                        float(_steps_apart(expected, exact, step).max()), float(_steps_apart(logits, exact, step).max()))


def check(model: nn.Module, name: str, size: int) -> ZooResult:
    """Run every check on `model` (left unchanged) with a 1x3x`size`x`size` input; errors are recorded, not raised."""
    result = ZooResult(name, size)
    clock = timing.Stopwatch()
    try:
        result.bn_total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        torch.manual_seed(1)
        inputs = (torch.randn(1, 3, size, size),)
        with torch.no_grad():
            expected = _tensors(model(*inputs))
        graph.trace(model)
        result.traceable = True
        result.keep = fold_and_scale(result, copy.deepcopy(model), inputs, expected, "keep")
        result.clip = fold_and_scale(result, graph.prepare_model(model), inputs, expected, "clip")
        equalized = graph.prepare_model(model)
        del model  # the largest zoo models need every copy they can spare on a 24 GiB machine
        equalize_model(equalized, relu6="clip")
        with torch.no_grad():
            result.rel_hbf = output_change(_tensors(equalized(*inputs)), expected)
        _check_finite(result, equalized, "hbf")
        if not math.isfinite(result.rel_hbf):
            result.problems.append("hbf: the output is NaN/inf")
        result.export = check_export(equalized, size)
    except graph.UntraceableModelError as error:
        result.error = str(error)
    except foreign_layers.ForeignModuleError as error:
        result.error, result.foreign = str(error), True
    except Exception as error:  # the run must go on; an unexpected error is reported as a failure
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        result.error = f"{type(error).__name__}: {first_line}"
        result.problems.append(f"unexpected {result.error}")
    result.seconds = clock.seconds
    return result


def check_model(name: str) -> ZooResult:
    """`check` on model `name` (see `build`) with its input side (see `input_size`)."""
    clock = timing.Stopwatch()
    result = check(build(name), name, input_size(name))  # no reference kept here: check frees the model early
    result.seconds = clock.seconds  # building the model included
    return result


# ---- the report ----------------------------------------------------------------------------------------------------

def _number(value: float) -> str:
    return "-" if value != value else f"{value:.1e}"


def _pair(value: tuple[int, int]) -> str:
    return f"{value[0]}/{value[1]}"


def _exported(export: ExportResult) -> str:
    return {None: "-", True: "yes", False: "NO"}[export.exported]


def _steps(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.3f} %"


def _timm_version() -> str:
    import timm

    return timm.__version__


def render(results: list[ZooResult], command: str, threads: int, finished: bool) -> str:
    """The markdown report: header, summary, per-model table, problems and errors."""
    failures = [r for r in results if r.status == "FAIL"]
    untraceable = [r for r in results if r.status.startswith("untraceable")]
    refused = [r for r in results if r.foreign]
    timm_only = all(r.model.startswith(TIMM_PREFIX) for r in results)
    exceptions = ", ".join(f"{side} for {name}" for name, side in TIMM_MIN_INPUT.items())
    sizes = (f"S = {MIN_INPUT} ({exceptions}), or the model's fixed input size" if timm_only else
             "S = max(64, the smallest input the model's torchvision weights accept)")
    refusals = f", {len(refused)} refused with ForeignModuleError" if refused else ""
    lines = [
        f"# CLE coverage of the {'timm CNN families' if timm_only else 'torchvision classification zoo'}",
        "",
        f"Generated by `{command}` (scripts/zoo/zoo_coverage.py; do not edit by hand).",
        f"{'Finished' if finished else 'In progress, written'} {datetime.datetime.now().isoformat(timespec='seconds')} on "
        f"{timing.cpu_name()} ({os.cpu_count()} cores, {threads} torch thread(s)), "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
        f"{f', timm {_timm_version()}' if timm_only else ''}.",
        "",
        f"Random weights (seed 0) with randomized BN statistics, eval mode, one 1x3xSxS input ({sizes}). "
        "`rel` = max|y' - y| / max|y| against the untouched model.",
        "",
        "- **keep**: `fold_all_batch_norms` + `CrossLayerScaling.scale_model(relu6=\"keep\")`; **clip**: "
        "`graph.prepare_model` + fold + `scale_model(relu6=\"clip\")`; both must keep rel <= 1e-4.",
        "- **hbf**: `graph.prepare_model` + `equalize_model(relu6=\"clip\")` (BN fold + CLS + high-bias fold). HBF is exact only "
        "where pre-activations stay above the absorbed bias and no zero padding meets it, so it has no bound here.",
        "- **links ref/cle**: layer pairs CLS may scale, found by an independent eager op recorder / by clebench's fx graph "
        "(they must be equal). **sets**: pairs/triples scaled. **BN**: folded/present (auxiliary heads, which eval mode "
        "never runs, keep theirs).",
        f"- **exported**: the hbf model as a W8A8 per-tensor QuantSim (calibrated on {EXPORT_INPUTS} random inputs) through "
        "`clebench.runtimes.export.export_onnx`; **ORT - sim**: max |ONNX Runtime (float kernels, QDQ fusion off) - torch "
        f"simulation| of the logits on those {EXPORT_INPUTS} inputs, in steps of the output quantizer; **logits > 2 steps**: "
        "the share of logits further apart. Both engines compute the same ops in float32 in different orders, so a value "
        "near a rounding boundary can land one step apart, and with random weights such flips grow with depth.",
        "",
        f"**{len(results)} models: {len(results) - len(failures) - len(untraceable) - len(refused)} ok, "
        f"{len(untraceable)} rejected with UntraceableModelError{refusals}, {len(failures)} FAIL. Export: {sum(r.export.exported is True for r in results)} "
        f"exported, {sum(r.export.exported is False for r in results)} refused; ONNX Runtime's float kernels within "
        f"{EXPORT_STEPS} output-quantizer steps of the torch simulation on every logit for "
        f"{sum(r.export.max_steps <= EXPORT_STEPS for r in results)}.**",
        "",
        "| model | S | traced | BN | rel fold | keep links ref/cle | keep sets | keep rel | clip links ref/cle | clip sets | "
        "clip rel | hbf rel | finite | exported | ORT - sim (steps) | logits > 2 steps | s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.input_size} | {'yes' if r.traceable else 'no'} | {r.keep.bn_folds}/{r.bn_total} | "
            f"{_number(r.keep.rel_fold)} | {_pair(r.keep.links)} | {_pair(r.keep.sets)} | {_number(r.keep.rel)} | "
            f"{_pair(r.clip.links)} | {_pair(r.clip.sets)} | {_number(r.clip.rel)} | {_number(r.rel_hbf)} | "
            f"{'yes' if r.finite else 'NO'} | {_exported(r.export)} | {_steps(r.export.max_steps)} | "
            f"{_percent(r.export.share_over_2_steps)} | {r.seconds:.1f} | {r.status} |"
        )
    not_exported = [r for r in results if r.export.exported is False]
    if not_exported:
        lines += ["", "## Models that do not export (the error users see)", ""] + [
            f"- {r.model}: {r.export.error}" for r in not_exported]
    if failures:
        lines += ["", "## Problems", ""] + [f"- {r.model}: {'; '.join(r.problems)}" for r in failures]
    if untraceable:
        lines += ["", "## Untraceable models (the error users see)", ""] + [f"- {r.model}: {r.error}" for r in untraceable]
    if refused:
        lines += ["", "## Refused models: layers that are not what their class says (the error users see)", ""] + [
            f"- {r.model}: {r.error}" for r in refused]
    return "\n".join(lines) + "\n"


def write_report(path: str, text: str) -> None:
    """Write `text` to `path`, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as file:
        file.write(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--models", nargs="+", help="regexes matched against full model names (default: all)")
    parser.add_argument("--output", default="results/zoo_coverage.md", help="markdown report to write, rewritten after every model (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        names = select(args.models)
    except UserError as error:
        raise SystemExit(str(error)) from None
    command = shlex.join(["python", *sys.argv])  # quoted: a --models regex may hold shell characters
    results = []
    for i, name in enumerate(names, 1):
        result = check_model(name)
        results.append(result)
        print(f"[{i}/{len(names)}] {name}: {result.status} ({result.seconds:.1f} s) {'; '.join(result.problems)}", flush=True)
        write_report(args.output, render(results, command, args.threads, finished=i == len(names)))
    sys.exit(1 if any(r.status == "FAIL" for r in results) else 0)


if __name__ == "__main__":
    main()
