"""NNCF (pip extra `nncf`): its post-training quantization of the sweep's FP32 model, as the nncf_quantize steps.

NNCF's channel alignment and SmoothQuant are not FP32 steps a simulator could score: they run inside
`nncf.quantize`, which quantizes an OpenVINO model in its own scheme. So an NNCF row runs NNCF where it lives: the
FP32 model (after the row's FP32 steps) is converted with `openvino.convert_model`, quantized by `nncf.quantize` on
the sweep's calibration images (one image per item, as NNCF's examples feed it; `subset_size` = all of them) and
saved as OpenVINO IR, which the sweep scores on OpenVINO's int8 CPU kernels (clebench.runtimes.openvino, "int8").

NNCF's defaults everywhere else: the `performance` preset (symmetric weights and activations), its range
estimators, its fast bias correction. From the row's quantization setting it takes only per-channel or per-tensor
weights; it quantizes to 8 bits, so the sweep runs NNCF rows under 8-bit-weight, 8-bit-activation settings only.

Variants (`VARIANTS`, step -> what it turns on):
* nncf_quantize: `nncf.quantize` as it defaults (channel alignment off).
* nncf_quantize_channel_alignment: `AdvancedQuantizationParameters(disable_channel_alignment=False)`.
* nncf_quantize_smooth_quant: SmoothQuant on convolutions with NNCF's own convolution alpha (0.05). NNCF's pipeline
  runs SmoothQuant only for `model_type=TRANSFORMER`, which this variant therefore sets (it also adds NNCF's
  transformer ignored patterns, none of which occur in a CNN); SmoothQuant on matmuls is left off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from clebench.errors import UserError
from clebench.peers import import_peer, peer_version

__all__ = ["VARIANTS", "SMOOTH_QUANT_CONV_ALPHA", "NNCFFailure", "quantize"]

VARIANTS = ("nncf_quantize", "nncf_quantize_channel_alignment", "nncf_quantize_smooth_quant")
SMOOTH_QUANT_CONV_ALPHA = 0.05  # nncf.quantization.algorithms.smooth_quant.algorithm.ALPHA_MAP["convolution"]


class NNCFFailure(UserError):
    """nncf.quantize itself raised (a fault inside NNCF, e.g. 3.4.0's channel alignment on MobileNetV2)."""


def quantize_options(variant: str, per_channel: bool) -> dict:
    """The keyword arguments of nncf.quantize (besides model and data) that `variant` runs with."""
    if variant not in VARIANTS:
        raise ValueError(f"NNCF variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    nncf = import_peer("nncf", "nncf")
    advanced = import_peer("nncf", "nncf.quantization.advanced_parameters")
    options = {"disable_channel_alignment": variant != "nncf_quantize_channel_alignment",
               "weights_quantization_params": advanced.QuantizationParameters(per_channel=per_channel)}
    extra = {}
    if variant == "nncf_quantize_smooth_quant":
        options["smooth_quant_alphas"] = advanced.AdvancedSmoothQuantParameters(convolution=SMOOTH_QUANT_CONV_ALPHA,
                                                                                matmul=-1)
        extra["model_type"] = nncf.ModelType.TRANSFORMER
    return {"advanced_parameters": advanced.AdvancedQuantizationParameters(**options), **extra}


def quantize(model: nn.Module, calibration: torch.Tensor, variant: str, *, per_channel: bool,
             path: str | os.PathLike, progress: bool = True) -> Path:
    """NNCF's int8 model of `model` (FP32, eval mode; not modified) written as OpenVINO IR to `path` (.xml + .bin).

    calibration: normalized model inputs [N, C, H, W], fed to NNCF one image per item (all N are used).
    progress: NNCF's own progress bars (on stdout); off, NNCF is also quiet below errors.
    """
    nncf = import_peer("nncf", "nncf")
    nncf.set_log_level(logging.INFO if progress else logging.ERROR)
    ov = import_peer("nncf", "openvino")
    images = calibration.detach().cpu().float()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert_model traces with torch.jit, which warns that it is deprecated
        float_model = ov.convert_model(model.eval(), example_input=images[:1])
    dataset = nncf.Dataset([images[i:i + 1].numpy() for i in range(len(images))])
    with contextlib.ExitStack() as quiet:
        if not progress:
            quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
        try:
            quantized = nncf.quantize(float_model, dataset, subset_size=len(images),
                                      **quantize_options(variant, per_channel))
        except Exception as error:  # NNCF's own fault: one line naming where it broke, not NNCF's traceback
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
            raise NNCFFailure(f"nncf {peer_version('nncf')} failed in {variant}: {type(error).__name__}: {error} "
                              f"(at {where})") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path
