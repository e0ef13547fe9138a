"""AIMET's AdaRound API (`aimet_torch.adaround.adaround_weight`, aimet-torch 2.42): an AIMET script runs on clebench
by changing the import to `from clebench.adaround.adaround_weight import Adaround, AdaroundParameters`.

What differs from AIMET, on purpose:
* default_num_iterations=None means clebench's DEFAULT_ITERATIONS (1,000), not AIMET's 10,000 (>= 8-bit weights) /
  15,000 (below), which take hours per CIFAR network on a 2-core CPU;
* bit widths 2-16 (AIMET: 4-31); weight encodings are min/max for every quant scheme (AIMET searches a range with
  post_training_tf_enhanced), with AIMET's symmetric scale rule (`QuantConfig.aimet_rules`);
* of an AIMET quantsim config file, only what decides the weight grid is read: `defaults.params.is_symmetric` and
  `per_channel_quantization` (defaults, and op_type Conv / ConvTranspose / Gemm). None is AIMET's default config:
  symmetric, per output channel for conv and linear weights.
The encodings file is AIMET's: {"param_encodings": {"<layer>.weight": [entries]}} in <path>/<prefix>.encodings.
"""
from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clebench import layers
from clebench.adaround.layer import DEFAULT_ITERATIONS, AdaroundError, AdaroundSettings
from clebench.adaround.model import apply_adaround_to_model
from clebench.quant.aimet_format import aimet_entries
from clebench.quant.config import MAX_BITS, MIN_BITS, QuantConfig
from clebench.quant.encoding import Encoding
from clebench.quant.sim import batch_inputs

_CALIBRATIONS = {"post_training_tf": "minmax", "min_max": "minmax", "post_training_tf_enhanced": "mse",
                 "post_training_percentile": "percentile"}
_OP_TYPES = {nn.Linear: "Gemm", **{t: "Conv" for t in layers.CONV_TYPES},
             **{t: "ConvTranspose" for t in layers.CONV_TRANSPOSE_TYPES}}


class QuantScheme(enum.Enum):
    """AIMET's quantization schemes (aimet_torch.common.defs.QuantScheme); AIMET's own members are accepted too."""

    post_training_tf = 1
    post_training_tf_enhanced = 2
    post_training_percentile = 6


class AdaroundParameters:
    """AdaRound's data and schedule (AIMET's signature).

    data_loader: yields batches (inputs, or (inputs, labels)); it needs len() >= num_batches. num_batches: how many
    batches to learn from. default_num_iterations: steps per layer (None: DEFAULT_ITERATIONS). default_reg_param:
    lambda. default_beta_range: (start, end) beta. default_warm_start: fraction of steps without the regularizer.
    forward_fn(model, batch): runs the model on a batch, where a batch is not (inputs, labels).
    """

    def __init__(self, data_loader: Iterable, num_batches: int, default_num_iterations: int | None = None,
                 default_reg_param: float = 0.01, default_beta_range: tuple[float, float] = (20, 2),
                 default_warm_start: float = 0.2, forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise AdaroundError(f"num_batches must be a positive int, got {num_batches!r}")
        try:
            available = len(data_loader)
        except TypeError:
            raise AdaroundError(f"data_loader must have a length (a DataLoader or a list), got "
                                f"{type(data_loader).__name__}") from None
        if available < num_batches:
            raise AdaroundError(f"cannot fetch {num_batches} batches from a data loader of length {available}")
        if forward_fn is not None and not callable(forward_fn):
            raise AdaroundError(f"forward_fn must be callable(model, batch), got {type(forward_fn).__name__}")
        self.data_loader = data_loader
        self.num_batches = num_batches
        self.num_iterations = default_num_iterations
        self.reg_param = default_reg_param
        self.beta_range = default_beta_range
        self.warm_start = default_warm_start
        self.forward_fn = forward_fn
        self.settings()  # bad values fail here, not after the data is read

    def settings(self) -> AdaroundSettings:
        return AdaroundSettings(
            iterations=DEFAULT_ITERATIONS if self.num_iterations is None else self.num_iterations,
            reg_param=self.reg_param, beta_range=tuple(self.beta_range), warm_start=self.warm_start,
        )


class _Stop(Exception):
    """Raised by the forward pre-hook that captures a model's inputs: the forward pass itself is not needed."""


def _model_inputs(model: nn.Module, batch: object, forward_fn: Callable | None) -> tuple[torch.Tensor, ...]:
    """The input tensors the model receives for `batch` (through forward_fn, if given)."""
    if forward_fn is None:
        return batch_inputs(batch)
    captured = []

    def hook(module: nn.Module, args: tuple) -> None:
        captured.append(tuple(a.detach() for a in args))
        raise _Stop

    handle = model.register_forward_pre_hook(hook)
    try:
        forward_fn(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise AdaroundError("forward_fn(model, batch) did not call the model")
    return captured[0]


def _read_batches(model: nn.Module, params: AdaroundParameters) -> list[tuple[torch.Tensor, ...]]:
    batches = []
    for batch in params.data_loader:
        if len(batches) == params.num_batches:
            break
        batches.append(_model_inputs(model, batch, params.forward_fn))
    if len(batches) < params.num_batches:
        raise AdaroundError(f"the data loader yielded {len(batches)} batches, AdaRound needs num_batches="
                            f"{params.num_batches}")
    return batches


def _weight_rules(config_file: str | os.PathLike | None) -> tuple[bool, dict[str, bool]]:
    """(symmetric weights, {op type: per channel}) from an AIMET quantsim config file (None: AIMET's default)."""
    if config_file is None:
        return True, {"Conv": True, "ConvTranspose": True, "Gemm": True}
    try:
        config = json.loads(Path(config_file).read_text())
        defaults = config["defaults"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise AdaroundError(f"default_config_file {config_file}: not an AIMET quantsim config ({error})") from None
    truth = lambda value: str(value) == "True"  # noqa: E731  (AIMET writes booleans as strings)
    per_channel = truth(defaults.get("per_channel_quantization", "False"))
    op_types = config.get("op_type", {})
    return truth(defaults.get("params", {}).get("is_symmetric", "True")), {
        op: truth(op_types.get(op, {}).get("per_channel_quantization", per_channel))
        for op in ("Conv", "ConvTranspose", "Gemm")
    }


def _checked_bits(bits: object, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise AdaroundError(f"{what} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def _calibration(scheme: object) -> str:
    name = getattr(scheme, "name", scheme)
    if name not in _CALIBRATIONS:
        raise AdaroundError(f"default_quant_scheme must be one of {sorted(_CALIBRATIONS)}, got {scheme!r}")
    return _CALIBRATIONS[name]


def write_param_encodings(encodings: dict[str, Encoding], path: str | os.PathLike, filename_prefix: str) -> Path:
    """Write AIMET's AdaRound file <path>/<filename_prefix>.encodings and return its path."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{filename_prefix}.encodings"
    content = {"param_encodings": {name: aimet_entries(e.to_dict()) for name, e in encodings.items()}}
    file.write_text(json.dumps(content, sort_keys=True, indent=4) + "\n")
    return file


class Adaround:
    """AIMET's entry point: `Adaround.apply_adaround(...)`."""

    @classmethod
    def apply_adaround(cls, model: nn.Module, dummy_input: torch.Tensor | tuple[torch.Tensor, ...],
                       params: AdaroundParameters, path: str, filename_prefix: str, default_param_bw: int = 4,
                       param_bw_override_list: list[tuple[nn.Module, int]] | None = None,
                       ignore_quant_ops_list: list[nn.Module] | None = None,
                       default_quant_scheme: object = QuantScheme.post_training_tf_enhanced,
                       default_config_file: str | None = None) -> nn.Module:
        """A copy of `model` (not modified) with every conv / linear weight AdaRounded to `default_param_bw` bits
        (or the bits in param_bw_override_list); ignore_quant_ops_list: modules whose layers stay FP32. Writes the
        weight encodings to <path>/<filename_prefix>.encodings for `QuantSim.set_and_freeze_param_encodings`.
        dummy_input: an input the model accepts; checked before the data is read."""
        if not isinstance(params, AdaroundParameters):
            raise AdaroundError(f"params must be AdaroundParameters, got {type(params).__name__}")
        bits = _checked_bits(default_param_bw, "default_param_bw")
        symmetric, per_channel = _weight_rules(default_config_file)
        calibration = _calibration(default_quant_scheme)
        names = {module: name for name, module in model.named_modules()}
        overrides = {}
        for module, override in param_bw_override_list or []:
            if module not in names:
                raise AdaroundError(f"param_bw_override_list names a module that is not in the model: {module}")
            overrides[names[module]] = _checked_bits(override, f"the bit width of {names[module]!r}")
        ignored = list(ignore_quant_ops_list or [])
        if any(module not in names for module in ignored):
            raise AdaroundError("ignore_quant_ops_list holds a module that is not in the model")
        skip = {names[m] for root in ignored for m in root.modules() if layers.is_layer(m)}
        base = dict(weight_bits=bits, act_bits=None, weight_symmetric=symmetric, calibration=calibration,
                    aimet_rules=True)
        layer_configs = {
            name: QuantConfig(**{**base, "weight_bits": overrides.get(name, bits),
                                 "per_channel": per_channel[_OP_TYPES[type(module)]]})
            for name, module in model.named_modules() if layers.is_layer(module) and name not in skip
        }
        dummy = (dummy_input,) if torch.is_tensor(dummy_input) else tuple(dummy_input)
        with torch.no_grad():
            model(*dummy)
        rounded, encodings = apply_adaround_to_model(model, QuantConfig(**base), _read_batches(model, params),
                                                     params.settings(), layer_configs=layer_configs, skip=skip)
        write_param_encodings(encodings, path, filename_prefix)
        return rounded
