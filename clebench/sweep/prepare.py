"""One sweep row's model, built outside a sweep: a zoo model after a step combination, as a calibrated QuantSim."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from clebench import graph

from clebench.sweep import steps
from clebench.bias_correction import correct_bias
from clebench.models import load_model
from clebench.quant import QuantConfig, QuantSim


def prepare_fp32(model_name: str, combination: str, *, models_dir: str | None = None,
                 checkpoint: str | None = None) -> steps.PipelineState:
    """The zoo model `model_name` after the FP32 steps of `combination` (e.g. "bn_fold+cls_relu6_clip+hbf")."""
    parsed = steps.parse_combination(combination)
    state = steps.PipelineState(graph.prepare_model(load_model(model_name, models_dir=models_dir, checkpoint=checkpoint)).eval())
    steps.check_for_model(parsed, state.model, model_name)
    for step in steps.split_combination(parsed)[0]:
        steps.apply_fp32_step(step, state)
    return state


def calibrated_sim(state: steps.PipelineState, combination: str, quant: QuantConfig | str,
                   calibration: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> QuantSim:
    """A QuantSim of `state`'s model under `quant`, bias-corrected if `combination` asks, calibrated on the
    (inputs, labels) batches `calibration` (also the empirical bias correction's data)."""
    quant = QuantConfig.from_name(quant) if isinstance(quant, str) else quant
    correction = steps.split_combination(steps.parse_combination(combination))[1]
    model: nn.Module = state.model
    if correction is not None:
        corrected = copy.deepcopy(state)
        method = steps.BIAS_CORRECTION_STEPS[correction]
        correct_bias(corrected.model, quant, bn_map=corrected.bn_map, cls_set_infos=corrected.cls_infos, method=method,
                     batches=calibration if method == "empirical" else None)
        model = corrected.model
    sim = QuantSim(model, calibration[0][0][:1], quant)
    sim.calibrate(calibration, progress=False)
    return sim
