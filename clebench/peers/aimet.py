"""AIMET (aimet-torch, pip extra `bench`): its modules loaded on demand, and its CLE as the sweep's `aimet_cle` step.

`equalize` is AIMET's own `cross_layer_equalization.equalize_model`: BN fold, cross-layer scaling and high-bias
folding as AIMET runs them. AIMET >= 2.4 keeps ReLU6 and does not scale across it (a conv -> ReLU6 -> conv pair is
left alone, as clebench's cls_relu6_keep); the sweep's relu6_to_relu step before it gives the pre-2.4 behaviour.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from clebench.peers import import_peer, peer_version

__all__ = ["AIMET_PER_TENSOR_CONFIG", "load_aimet", "equalize"]

AIMET_PER_TENSOR_CONFIG = "default_config.json"  # in aimet_torch/common/quantsim_config/
# Warnings AIMET 2.42 triggers on every graph build or calibration; `load_aimet` silences them for the process.
AIMET_WARNINGS = (r"`torch\.jit\.trace(_method)?` is deprecated", r"To copy construct from a tensor")
MODULES = ("cross_layer_equalization", "batch_norm_fold", "model_preparer", "quantsim")


def load_aimet() -> SimpleNamespace:
    """AIMET's CLE, BN-fold, model-preparer and QuantSim modules, its per-tensor config file and its version;
    MissingExtraError where aimet-torch is not installed.

    Also quiets AIMET for the rest of the process: its loggers to ERROR, and the AIMET_WARNINGS filtered out.
    """
    modules = {name: import_peer("aimet", f"aimet_torch.{name}") for name in MODULES}
    import_peer("aimet", "aimet_torch.common.utils").AimetLogger.set_level_for_all_areas(logging.ERROR)
    for noise in AIMET_WARNINGS:
        warnings.filterwarnings("ignore", message=noise)
    package = Path(modules["quantsim"].__file__).resolve().parents[1]
    config = package / "common" / "quantsim_config" / AIMET_PER_TENSOR_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"AIMET's per-tensor quantsim config {config} is missing: reinstall aimet-torch")
    return SimpleNamespace(**modules, per_tensor_config=str(config), version=peer_version("aimet"))


def equalize(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """AIMET's equalize_model on `model` (in place: BN layers become Identity), traced on zeros of `input_shape`."""
    aimet = load_aimet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aimet.cross_layer_equalization.equalize_model(model, dummy_input=torch.zeros(tuple(input_shape)))
    return model
