"""One sweep row's model, built outside a sweep: a zoo model after a step combination, as a calibrated QuantSim."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from clebench import graph

from clebench.adaround import AdaroundSettings
from clebench.sweep import steps
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
                   calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   adaround: AdaroundSettings = AdaroundSettings()) -> QuantSim:
    """A QuantSim of `state`'s model under `quant`, AdaRounded and bias-corrected if `combination` asks (as the sweep
    does), calibrated on the (inputs, labels) batches `calibration` (also AdaRound's and the empirical bias
    correction's data)."""
    quant = QuantConfig.from_name(quant) if isinstance(quant, str) else quant
    parsed = steps.parse_combination(combination)
    correction = steps.split_combination(parsed)[1]
    rounding = None
    if steps.uses_adaround(parsed):
        rounding = steps.adaround_rounding(state.model, quant, [(inputs,) for inputs, _ in calibration], adaround)
    model = steps.quantized_model(state, quant, correction, rounding, calibration)
    sim = steps.quant_sim(model, calibration[0][0][:1], quant, rounding)
    sim.calibrate(calibration, progress=False)
    return sim
