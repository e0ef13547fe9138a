"""The sweep's named, composable equalization steps, their dependency rules and presets.

A step combination is a tuple of step names in pipeline order, e.g. ("bn_fold", "relu6_to_relu", "cls", "hbf").
FP32 steps transform the model once per combination prefix; `adaround` and the bias-correction steps depend on the
quantization grid, so they run per quantization setting, right before quantization, in that order: AdaRound learns
the rounding of the FP32 weights (their encodings frozen in the QuantSim), then bias correction removes the expected
output error that the rounded weights leave (E[(W_rounded - W) x], instead of the nearest rounding's).

The activation-equalization steps (act_equalize, act_equalize_relu6_clip: clebench.activation_equalization) are FP32
steps that read data: they run on the sweep's calibration images, given to `apply_fp32_step` as `calibration`. They
come after hbf: high-bias folding reads the CLS scales, which a later scaling would make stale, while CLS before them
is meaningful (it balances the weights, then activation range moves into them).

The peer steps (aimet_cle, brevitas_equalize, brevitas_equalize_no_merge_bias: clebench.peers) run another toolkit's
whole equalization pipeline, BN fold included, in place of bn_fold / cls / hbf; relu6_to_relu may come before them,
AdaRound and empirical bias correction after them (analytical bias correction reads the BN statistics and CLS scales
that clebench's own steps record and a peer's pipeline does not). Their toolkit is imported only when they run.

The NNCF steps (nncf_quantize, nncf_quantize_channel_alignment, nncf_quantize_smooth_quant: clebench.peers.nncf)
quantize instead of clebench's simulation: NNCF's own int8 quantization of the FP32 model, scored on OpenVINO. They
come last, after any FP32 steps, and only under 8-bit-weight, 8-bit-activation settings (`runs_under`); AdaRound and
clebench's bias correction, which feed the simulation, do not combine with them (NNCF corrects biases itself).

A config's own FP32 steps (clebench.sweep.custom_steps) are passed explicitly as `custom`, a sequence of CustomStep:
each sits in pipeline order right after its `after` step; presets hold built-in steps only.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from clebench import graph, ops, utils
from clebench.activation_equalization import DEFAULT_ALPHA, equalize_activations
from clebench.adaround import AdaroundSettings, apply_adaround_to_model
from clebench.bias_correction import correct_bias
from clebench.errors import UserError
from clebench.batch_norm_fold import backward_fold_map, fold_all_batch_norms
from clebench.cross_layer_equalization import ClsSetInfo, CrossLayerScaling, HighBiasFold
from clebench.peers import aimet, brevitas, nncf
from clebench.region_equalization import Region, equalize_regions
from clebench.quant import QuantConfig, QuantSim
from clebench.quant.encoding import Encoding

if TYPE_CHECKING:
    from clebench.sweep.custom_steps import CustomStep

STEP_ORDER = (
    "bn_fold",
    "relu6_to_relu",
    "aimet_cle",
    "brevitas_equalize",
    "brevitas_equalize_no_merge_bias",
    "cls",
    "cls_relu6_keep",
    "cls_relu6_clip",
    "cls_regions",
    "cls_regions_relu6_clip",
    "hbf",
    "act_equalize",
    "act_equalize_relu6_clip",
    "adaround",
    "bias_correction",
    "bias_correction_empirical",
    "nncf_quantize",
    "nncf_quantize_channel_alignment",
    "nncf_quantize_smooth_quant",
)
CLS_STEPS = {"cls": "keep", "cls_relu6_keep": "keep", "cls_relu6_clip": "clip"}  # step -> ReLU6 policy of scale_model
# Region equalization (clebench.region_equalization): step -> ReLU6 policy of equalize_regions. Kept out of the `all`
# preset (all_combinations), whose committed results must not change.
REGION_STEPS = {"cls_regions": "keep", "cls_regions_relu6_clip": "clip"}
# Activation equalization: step -> ReLU6 policy of equalize_activations. It reads the calibration images; kept out of
# the `all` preset and PRESETS, whose committed results must not change.
ACT_EQUALIZE_STEPS = {"act_equalize": "keep", "act_equalize_relu6_clip": "clip"}
# Peer pipelines (clebench.peers): step -> the peer it runs. Kept out of the `all` preset and PRESETS.
BREVITAS_STEPS = {"brevitas_equalize": True, "brevitas_equalize_no_merge_bias": False}  # step -> merge_bias
PEER_STEPS = {"aimet_cle": "aimet", **dict.fromkeys(BREVITAS_STEPS, "brevitas")}
# Quantizers besides clebench's simulation: step -> the peer that quantizes (clebench.peers.nncf.VARIANTS).
QUANTIZER_STEPS = dict.fromkeys(nncf.VARIANTS, "nncf")
STEP_PEERS = {**PEER_STEPS, **QUANTIZER_STEPS}  # every step that runs a peer toolkit -> that peer
BIAS_CORRECTION_STEPS = {"bias_correction": "analytical", "bias_correction_empirical": "empirical"}
ADAROUND = "adaround"
FP32_STEPS = tuple(s for s in STEP_ORDER if s not in BIAS_CORRECTION_STEPS and s != ADAROUND and s not in QUANTIZER_STEPS)
NO_STEPS = "none"

Combination = tuple[str, ...]


class StepError(UserError):
    """An unknown step, an impossible order or a missing dependency."""


@dataclass
class PipelineState:
    """An FP32 model part-way through the pipeline, with what later steps need to know about earlier ones."""

    model: nn.Module
    bn_map: dict[nn.Module, nn.Module] = field(default_factory=dict)  # layer -> the BN folded backward into it
    cls_infos: list[ClsSetInfo] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)  # what a region step equalized
    input_shape: tuple[int, ...] | None = None  # (N, C, H, W) of the model's input, for custom steps


def combination_name(combination: Combination) -> str:
    return "+".join(combination) if combination else NO_STEPS


def pipeline_order(custom: Sequence[CustomStep] = ()) -> tuple[str, ...]:
    """STEP_ORDER with each custom step right after its `after` step (several after one step: in their order)."""
    return tuple(name for step in STEP_ORDER for name in (step, *(c.name for c in custom if c.after == step)))


def parse_combination(text: str, custom: Sequence[CustomStep] = ()) -> Combination:
    """'bn_fold+cls' -> ('bn_fold', 'cls'); 'none' -> (); validated."""
    if not isinstance(text, str) or not text.strip():
        raise StepError(f"a step combination is a string such as 'bn_fold+cls+hbf' (or 'none'), got {text!r}")
    combination = () if text.strip() == NO_STEPS else tuple(part.strip() for part in text.split("+"))
    validate(combination, custom)
    return combination


def validate(combination: Combination, custom: Sequence[CustomStep] = ()) -> None:
    """Raise StepError naming the offending step and the allowed values if the combination cannot run."""
    order = pipeline_order(custom)
    for step in combination:
        if step not in order:
            raise StepError(f"unknown step {step!r}; allowed steps (in pipeline order): {', '.join(order)}")
    positions = [order.index(step) for step in combination]
    if positions != sorted(set(positions)):
        raise StepError(
            f"steps {combination_name(combination)!r} are repeated or out of order; the pipeline order is {' -> '.join(order)}"
        )
    present = set(combination)
    cls_steps = present & (set(CLS_STEPS) | set(REGION_STEPS))
    if len(cls_steps) > 1 or len(present & set(BIAS_CORRECTION_STEPS)) > 1:
        raise StepError(f"{combination_name(combination)!r}: choose one cross-layer-scaling step and one bias-correction step at most")
    act_steps = present & set(ACT_EQUALIZE_STEPS)
    if len(act_steps) > 1:
        raise StepError(f"{combination_name(combination)!r}: choose one activation-equalization step at most")
    _validate_quantizer(combination)
    if present & set(PEER_STEPS):
        _validate_peer(combination)
        return
    needs_bn_fold = present & (set(CLS_STEPS) | set(REGION_STEPS) | {"hbf"} | set(BIAS_CORRECTION_STEPS) | act_steps)
    if needs_bn_fold and "bn_fold" not in present:
        raise StepError(
            f"{', '.join(sorted(needs_bn_fold))}: needs bn_fold first (BN layers sit between the convs and hold the statistics)"
        )
    if "hbf" in present and not cls_steps:
        raise StepError("hbf needs a cross-layer-scaling step (cls, cls_relu6_keep or cls_relu6_clip) before it")
    region_step = next(iter(present & set(REGION_STEPS)), None)
    if region_step is not None and present & {"hbf", "bias_correction"}:
        raise StepError(
            f"{' and '.join(sorted(present & {'hbf', 'bias_correction'}))} after {region_step}: high-bias folding and "
            "analytical bias correction read the pairwise CLS sets' scales, which region equalization does not record; "
            "use cls / cls_relu6_clip before them, or bias_correction_empirical"
        )
    if act_steps and "bias_correction" in present:
        raise StepError(
            f"bias_correction after {act_steps.pop()}: analytical bias correction reads the folded BN statistics and the "
            "CLS scales, which activation equalization changes without recording; use bias_correction_empirical"
        )
    if "relu6_to_relu" in present and cls_steps - {"cls", "cls_regions"}:
        raise StepError(f"relu6_to_relu contradicts {cls_steps.pop()}, which handles ReLU6 itself; use cls after relu6_to_relu")


def _validate_quantizer(combination: Combination) -> None:
    """An NNCF step quantizes in NNCF's scheme, not clebench's simulation: one of them, and no AdaRound or bias
    correction (which feed the simulation; NNCF runs its own bias correction)."""
    quantizers = [step for step in combination if step in QUANTIZER_STEPS]
    if len(quantizers) > 1:
        raise StepError(f"{combination_name(combination)!r}: choose one NNCF step at most")
    simulation_steps = [step for step in combination if step in BIAS_CORRECTION_STEPS or step == ADAROUND]
    if quantizers and simulation_steps:
        raise StepError(
            f"{' and '.join(simulation_steps)} with {quantizers[0]}: the NNCF step quantizes with NNCF (its own bias "
            "correction included) instead of clebench's simulation, which adaround and bias correction feed; "
            "put only FP32 steps before it"
        )


def _validate_peer(combination: Combination) -> None:
    """A peer step runs its toolkit's whole pipeline: only relu6_to_relu before it, AdaRound and empirical bias
    correction after it."""
    peers = [step for step in combination if step in PEER_STEPS]
    if len(peers) > 1:
        raise StepError(f"{combination_name(combination)!r}: choose one peer step at most")
    allowed = (*peers, "relu6_to_relu", ADAROUND, "bias_correction_empirical", *QUANTIZER_STEPS)
    others = [step for step in combination if step in STEP_ORDER and step not in allowed]  # custom steps may join
    if others:
        raise StepError(
            f"{' and '.join(others)} with {peers[0]}: the peer step runs its toolkit's whole pipeline (BN fold and "
            "equalization); combine it only with relu6_to_relu before it and adaround / bias_correction_empirical "
            "after it (analytical bias correction reads the BN statistics and CLS scales of clebench's own steps)"
        )


def check_for_model(combination: Combination, model: nn.Module, model_name: str) -> None:
    """Model-dependent rule: plain `cls` on a network with ReLU6 needs relu6_to_relu first."""
    if "cls" in combination and "relu6_to_relu" not in combination and has_relu6(model):
        raise StepError(
            f"{model_name} has ReLU6 activations: {combination_name(combination)!r} must replace them first "
            "(add relu6_to_relu), keep them as chain ends (cls_relu6_keep) or scale across them exactly (cls_relu6_clip)"
        )


def has_relu6(model: nn.Module) -> bool:
    """Whether a ReLU6-like clip runs anywhere in `model`, also inside a norm + activation module."""
    gm = graph.prepare_model(model)
    modules = dict(gm.named_modules())
    return any(ops.activation_kind(node, modules) == "relu6" for node in gm.graph.nodes)


def apply_fp32_step(step: str, state: PipelineState, custom: Sequence[CustomStep] = (), *,
                    calibration: Sequence[tuple[torch.Tensor, ...]] = (), alpha: float = DEFAULT_ALPHA,
                    brevitas_iterations: int = brevitas.DEFAULT_ITERATIONS) -> bool:
    """Apply one FP32 step (built-in, or one of `custom`) to `state`; return whether it changed the model.

    calibration: model-input tuples, the data of the activation-equalization steps; alpha: their migration strength.
    brevitas_iterations: the graph-equalization rounds of the brevitas_equalize steps.
    """
    for definition in custom:
        if definition.name == step:
            return definition.apply(state)
    if step == "bn_fold":
        pairs = fold_all_batch_norms(state.model)
        state.bn_map.update(backward_fold_map(pairs))
        return bool(pairs)
    if step == "relu6_to_relu":
        changed = any(isinstance(m, nn.ReLU6) for m in state.model.modules())
        utils.replace_modules_of_type1_with_type2(state.model, nn.ReLU6, nn.ReLU)
        return changed
    if step in CLS_STEPS:
        infos = CrossLayerScaling.scale_model(state.model, relu6=CLS_STEPS[step])
        state.cls_infos.extend(infos)
        return bool(infos)
    if step in PEER_STEPS:
        return _apply_peer(step, state, brevitas_iterations)
    if step in REGION_STEPS:
        regions = equalize_regions(state.model, relu6=REGION_STEPS[step])
        state.regions.extend(regions)
        return bool(regions)
    if step in ACT_EQUALIZE_STEPS:
        if not calibration:
            raise StepError(f"{step} needs calibration images: run it in a sweep (or pass calibration=)")
        return bool(equalize_activations(state.model, calibration, alpha, relu6=ACT_EQUALIZE_STEPS[step]))
    if step == "hbf":
        HighBiasFold.bias_fold(state.cls_infos, state.bn_map)
        return any(
            pair.absorbed_bias is not None and bool(pair.absorbed_bias.any())
            for info in state.cls_infos
            for pair in info.cls_pair_info_list
        )
    raise StepError(f"{step!r} is not an FP32 step")


def _apply_peer(step: str, state: PipelineState, brevitas_iterations: int) -> bool:
    """Run a peer step's pipeline on `state`'s model (a peer that is not installed: MissingExtraError)."""
    if step == "aimet_cle":
        if state.input_shape is None:
            raise StepError("aimet_cle traces the model on an input: give the PipelineState its input_shape")
        aimet.equalize(state.model, state.input_shape)
    else:
        state.model = brevitas.equalize(state.model, iterations=brevitas_iterations,
                                        merge_bias=BREVITAS_STEPS[step]).eval()
    return True


def split_combination(combination: Combination) -> tuple[Combination, str | None]:
    """(FP32 steps, custom ones included; the bias-correction step or None) of a validated combination."""
    fp32 = tuple(s for s in combination if s not in BIAS_CORRECTION_STEPS and s != ADAROUND and s not in QUANTIZER_STEPS)
    correction = next((s for s in combination if s in BIAS_CORRECTION_STEPS), None)
    return fp32, correction


def quantizer_step(combination: Combination) -> str | None:
    """The combination's NNCF step (a key of QUANTIZER_STEPS), or None: clebench's simulation quantizes it."""
    return next((s for s in combination if s in QUANTIZER_STEPS), None)


def runs_under(combination: Combination, quant: QuantConfig) -> bool:
    """Whether the sweep has a row of `combination` under `quant`: NNCF steps only at 8-bit weights and activations
    (NNCF quantizes to int8); everything else under every setting."""
    return quantizer_step(combination) is None or (quant.weight_bits == 8 and quant.act_bits == 8)


def uses_adaround(combination: Combination) -> bool:
    return ADAROUND in combination


# -- the steps that run per quantization setting ------------------------------------------------------------------
# A rounding is plain data (tensors, numbers, dicts), so the sweep's on-disk memo stores it:
#     {"weights": {"<layer>.weight": rounded weight}, "encodings": {"<layer>.weight": encoding_state(Encoding)}}
Rounding = dict[str, dict]


def weight_grid(quant: QuantConfig) -> str:
    """What of a quantization setting decides the weight grids (and so AdaRound's result)."""
    return (f"w{quant.weight_bits}|per_channel={quant.per_channel}|symmetric={quant.weight_symmetric}|"
            f"aimet_rules={quant.aimet_rules}")


def encoding_state(encoding: Encoding) -> dict:
    return {"scale": encoding.scale, "zero_point": encoding.zero_point, "bits": encoding.bits,
            "symmetric": encoding.symmetric, "axis": encoding.axis}


def adaround_rounding(model: nn.Module, quant: QuantConfig, batches: Sequence[tuple[torch.Tensor, ...]],
                      settings: AdaroundSettings, progress: bool = False) -> Rounding:
    """AdaRound every conv / linear weight of `model` (not modified) on `quant`'s weight grids (activations float,
    as AIMET); batches: model input tuples (dim 0: samples)."""
    rounded, encodings = apply_adaround_to_model(model, quant, batches, settings, progress=progress)
    parameters = dict(rounded.named_parameters())
    return {"weights": {name: parameters[name].detach().clone() for name in encodings},
            "encodings": {name: encoding_state(encoding) for name, encoding in encodings.items()}}


def quantized_model(state: PipelineState, quant: QuantConfig, correction: str | None, rounding: Rounding | None,
                    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]], progress: bool = False) -> nn.Module:
    """The model to quantize: `state`'s (not modified), bias-corrected for `quant` if `correction` names a method,
    with AdaRound's weights if `rounding` is given. With both, the correction removes the expected output error of the
    rounded weights (the bias is corrected on the FP32 weights, then the rounded weights replace them).
    calibration: (inputs, labels) batches, the empirical correction's data."""
    if correction is None and rounding is None:
        return state.model
    result = copy.deepcopy(state)
    weights = None if rounding is None else rounding["weights"]
    if correction is not None:
        method = BIAS_CORRECTION_STEPS[correction]
        correct_bias(result.model, quant, bn_map=result.bn_map, cls_set_infos=result.cls_infos, method=method,
                     batches=calibration if method == "empirical" else None, progress=progress,
                     quantized_weights=weights)
    if weights is not None:
        parameters = dict(graph.unwrap(result.model).named_parameters())
        with torch.no_grad():
            for name, weight in weights.items():
                parameters[name].copy_(weight)
    return result.model


def quant_sim(model: nn.Module, dummy_input: torch.Tensor, quant: QuantConfig, rounding: Rounding | None) -> QuantSim:
    """An uncalibrated QuantSim of `model`; with a rounding, AdaRound's weight encodings are frozen in it, so the
    sim's weights are the rounded weights exactly (their own min/max range could be narrower than the grid)."""
    sim = QuantSim(model, dummy_input, quant)
    if rounding is not None:
        sim.freeze_param_encodings({name: Encoding(**state) for name, state in rounding["encodings"].items()})
    return sim


def all_combinations() -> list[Combination]:
    """Every valid combination of the equalization steps, in pipeline order (the `all` preset). AdaRound, which
    learns for minutes per row, is left out: the `ptq` preset and explicit lists run it."""
    valid = []
    equalization = tuple(step for step in STEP_ORDER if step != ADAROUND and step not in REGION_STEPS
                         and step not in ACT_EQUALIZE_STEPS and step not in STEP_PEERS)
    for mask in itertools.product((False, True), repeat=len(equalization)):
        combination = tuple(step for step, keep in zip(equalization, mask) if keep)
        try:
            validate(combination)
        except StepError:
            continue
        valid.append(combination)
    return sorted(valid, key=lambda c: (len(c), [STEP_ORDER.index(s) for s in c]))


PRESETS: dict[str, list[str]] = {
    # The rows of the DFQ paper's MobileNetV2 ablation (Table 1, + bias correction), and the exact ReLU6-aware variant.
    "paper": [
        "bn_fold",
        "bn_fold+relu6_to_relu",
        "bn_fold+relu6_to_relu+cls",
        "bn_fold+relu6_to_relu+cls+hbf",
        "bn_fold+relu6_to_relu+cls+hbf+bias_correction",
        "bn_fold+cls_relu6_clip",
        "bn_fold+cls_relu6_clip+hbf",
        "bn_fold+cls_relu6_clip+hbf+bias_correction",
    ],
    # The post-training-quantization ladder: BN fold; + CLS + HBF; + bias correction; + AdaRound; AdaRound without
    # CLE. A network runs the CLS variant that fits it (plain cls where it has no ReLU6, else the exact ReLU6 clip;
    # on a network without ReLU6 both build the same model and share every evaluation).
    "ptq": [
        "bn_fold",
        "bn_fold+cls+hbf",
        "bn_fold+cls+hbf+bias_correction",
        "bn_fold+cls+hbf+adaround",
        "bn_fold+cls_relu6_clip+hbf",
        "bn_fold+cls_relu6_clip+hbf+bias_correction",
        "bn_fold+cls_relu6_clip+hbf+adaround",
        "bn_fold+adaround",
    ],
}
SKIPPING_PRESETS = ("all", "ptq")  # presets whose combinations a model cannot run are skipped, not an error


def preset(name: str) -> list[Combination]:
    if name == "all":
        return all_combinations()
    if name not in PRESETS:
        raise StepError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS) + ['all'])}")
    return [parse_combination(text) for text in PRESETS[name]]


def resolve(steps: str | Sequence[str], custom: Sequence[CustomStep] = ()) -> list[Combination]:
    """A preset name or a list of combination strings (which may use the `custom` steps) -> validated combinations."""
    if isinstance(steps, str):
        return preset(steps)
    return [parse_combination(text, custom) for text in steps]
