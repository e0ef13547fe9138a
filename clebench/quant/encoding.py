"""Quantization grids and encodings, and the torch fake-quantize calls that apply them.

An encoding maps a real range onto an integer grid [quant_min, quant_max] with a scale and an integer zero point:
    fake_quant(x) = (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale
Symmetric: signed grid [-2^(b-1), 2^(b-1) - 1], zero point 0, scale = max|x| / (2^(b-1) - 1) (the non-strict grid
of the DFQ setting: -2^(b-1) is representable, and x reaches it only by rounding). AIMET 2.x instead takes the
smallest scale whose whole signed grid covers [min, max] (`full_signed_range_encoding`), so a tensor whose negative
side dominates uses -2^(b-1) and gets a finer scale. Asymmetric: unsigned grid [0, 2^b - 1], the range
widened to include 0, scale = (max - min) / (2^b - 1), zero point round(-min / scale); the representable range is
then re-derived from the scale and the integer zero point, so that 0 is exactly on the grid.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from clebench import layers
from clebench.quant.config import QuantConfig, check_bits

_QUINT8_NOTICE = r"torch\.quantize_per_tensor"  # start of torch's deprecation notice for the quint8 kernels

# A floor on every scale (as torch.ao's observers use): an all-zero tensor or channel gets a valid grid on which 0 is
# exact; a channel with max|w| below 127 * MIN_SCALE keeps an absolute error under MIN_SCALE / 2.
MIN_SCALE = float(torch.finfo(torch.float32).eps)
BIAS_BITS = 32


def fake_quantize_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int
) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine, computed as quantize -> dequantize where that gives the same numbers.

    On CPU, torch's fake-quantize kernel is scalar: about 10x slower than its vectorised quint8 quantize + dequantize
    pair, which for the 8-bit unsigned grid gives bit-identical results (tests/test_quant_encoding.py checks it, ties
    included). That pair is deprecated (torch 2.14) and carries no gradient, so fake-quantize runs where torch no
    longer has it or autograd needs a gradient.
    """
    if (quant_min, quant_max) == (0, 255) and x.dtype == torch.float32 and x.device.type == "cpu" and not (
        x.requires_grad and torch.is_grad_enabled()
    ) and quint8_available():
        return _quint8_round_trip(x, scale, zero_point)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


def _quint8_round_trip(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """quantize_per_tensor(x, quint8).dequantize(), torch's deprecation notice silenced for this call only.

    torch gives that notice once per process (the probe in `_quint8_probe` takes it), so calls only pay for the
    suppression where torch repeats it: with torch.set_warn_always(True), or a torch that warns on every call.
    """
    if _quint8_probe()[1] or torch.is_warn_always_enabled():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_QUINT8_NOTICE, category=UserWarning)
            return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).dequantize()
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).dequantize()


def quint8_available() -> bool:
    """Whether this torch still has the (deprecated) quint8 quantize kernels and they reproduce fake-quantize."""
    return _quint8_probe()[0]


@functools.cache
def _quint8_probe() -> tuple[bool, bool]:
    """(the quint8 kernels exist and match fake-quantize, they warn on every call rather than once per process).

    Checked once, on values holding grid points, ties (x.5 steps) and values clamped at both ends.
    """
    if not (hasattr(torch, "quint8") and hasattr(torch, "quantize_per_tensor")):
        return False, False
    scale, zero_point = 0.1, 3
    probe = torch.arange(-20, 520, dtype=torch.float32) * (scale / 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fast = torch.quantize_per_tensor(probe, scale, zero_point, torch.quint8).dequantize()
            caught.clear()
            torch.quantize_per_tensor(probe, scale, zero_point, torch.quint8)
        except (RuntimeError, NotImplementedError, TypeError):
            return False, False
    warns_each_call = any(re.match(_QUINT8_NOTICE, str(w.message)) for w in caught)
    return torch.equal(fast, torch.fake_quantize_per_tensor_affine(probe, scale, zero_point, 0, 255)), warns_each_call


def signed_grid(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_grid(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


@dataclass(frozen=True)
class Encoding:
    """scale / zero_point: 0-dim tensors (per-tensor, axis None) or [C] tensors along `axis` (per-channel)."""

    scale: torch.Tensor
    zero_point: torch.Tensor  # int32
    bits: int
    symmetric: bool
    axis: int | None = None

    @property
    def quant_min(self) -> int:
        return (signed_grid if self.symmetric else unsigned_grid)(self.bits)[0]

    @property
    def quant_max(self) -> int:
        return (signed_grid if self.symmetric else unsigned_grid)(self.bits)[1]

    @property
    def min(self) -> torch.Tensor:
        """Smallest representable value (same shape as scale)."""
        return (self.quant_min - self.zero_point) * self.scale

    @property
    def max(self) -> torch.Tensor:
        """Largest representable value (same shape as scale)."""
        return (self.quant_max - self.zero_point) * self.scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize `x` (any shape; per-channel: channels on `self.axis`)."""
        if self.axis is None:
            return fake_quantize_per_tensor(x, float(self.scale), int(self.zero_point), self.quant_min, self.quant_max)
        return torch.fake_quantize_per_channel_affine(
            x, self.scale.to(x.device), self.zero_point.to(x.device), self.axis, self.quant_min, self.quant_max
        )

    def to_dict(self) -> dict:
        """JSON-serialisable: floats / ints for per-tensor, lists for per-channel."""
        values = lambda t: t.tolist()  # noqa: E731  (a 0-dim tensor gives a scalar)
        return {
            "scale": values(self.scale.double()),
            "offset": values(-self.zero_point.long()),
            "zero_point": values(self.zero_point.long()),
            "min": values(self.min.double()),
            "max": values(self.max.double()),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "per_channel": self.axis is not None,
        }


def _checked(values: torch.Tensor, what: str) -> torch.Tensor:
    values = values.detach().float()
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} holds NaN or infinite values; a quantization range needs finite numbers")
    return values


def symmetric_encoding(abs_max: torch.Tensor, bits: int, axis: int | None = None) -> Encoding:
    """Signed, zero point 0, scale = abs_max / (2^(b-1) - 1). abs_max: 0-dim, or [C] along `axis`."""
    check_bits(bits, "bits")
    abs_max = _checked(abs_max, "abs_max").abs()
    scale = (abs_max / signed_grid(bits)[1]).clamp_min(MIN_SCALE)
    return Encoding(scale, torch.zeros_like(scale, dtype=torch.int32), bits, True, axis)


def full_signed_range_encoding(minimum: torch.Tensor, maximum: torch.Tensor, bits: int, axis: int | None = None) -> Encoding:
    """Signed, zero point 0, scale = max(max / (2^(b-1) - 1), -min / 2^(b-1)) (AIMET 2.x): 0-dim, or [C] along `axis`."""
    check_bits(bits, "bits")
    low, high = signed_grid(bits)
    minimum = _checked(torch.as_tensor(minimum), "minimum").clamp_max(0.0)
    maximum = _checked(torch.as_tensor(maximum), "maximum").clamp_min(0.0)
    scale = torch.maximum(maximum / high, minimum / low).clamp_min(MIN_SCALE)
    return Encoding(scale, torch.zeros_like(scale, dtype=torch.int32), bits, True, axis)


def asymmetric_encoding(minimum: torch.Tensor, maximum: torch.Tensor, bits: int, axis: int | None = None) -> Encoding:
    """Unsigned grid covering [min(minimum, 0), max(maximum, 0)]; 0-dim, or [C] along `axis`."""
    check_bits(bits, "bits")
    minimum = _checked(torch.as_tensor(minimum), "minimum").clamp_max(0.0)
    maximum = _checked(torch.as_tensor(maximum), "maximum").clamp_min(0.0)
    if (minimum > maximum).any():
        raise ValueError(f"minimum {minimum.tolist()} exceeds maximum {maximum.tolist()}")
    quant_max = unsigned_grid(bits)[1]
    scale = ((maximum - minimum) / quant_max).clamp_min(MIN_SCALE)
    zero_point = torch.round(-minimum / scale).clamp(0, quant_max).to(torch.int32)
    return Encoding(scale, zero_point, bits, False, axis)


def tensor_encoding(
    x: torch.Tensor, bits: int, symmetric: bool, axis: int | None = None, *, full_signed_range: bool = False
) -> Encoding:
    """The exact min/max encoding of `x`, per tensor (axis None) or per slice along `axis`.

    full_signed_range: symmetric encodings use AIMET's rule (`full_signed_range_encoding`) instead of max|x|.
    """
    x = _checked(x, "the tensor to encode")
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    if not x.numel():
        return (symmetric_encoding(torch.tensor(0.0), bits, axis) if symmetric
                else asymmetric_encoding(torch.tensor(0.0), torch.tensor(0.0), bits, axis))
    if symmetric and not full_signed_range:
        return symmetric_encoding(x.abs().amax(dim=dims), bits, axis)
    make = full_signed_range_encoding if symmetric else asymmetric_encoding
    return make(x.amin(dim=dims), x.amax(dim=dims), bits, axis)


def weight_encoding(layer: nn.Module, config: QuantConfig) -> Encoding:
    """Encoding of a conv / linear weight under `config` (per output channel: axis layers.output_axis(layer)).

    For a grouped ConvTranspose the output axis holds out_channels / groups entries, shared by the groups.
    """
    if not layers.is_layer(layer):
        supported = [t.__name__ for t in layers.LAYER_TYPES]
        raise TypeError(f"weight quantization supports {supported}, got {type(layer).__name__}")
    axis = layers.output_axis(layer) if config.per_channel else None
    try:
        return tensor_encoding(
            layer.weight, config.weight_bits, config.weight_symmetric, axis, full_signed_range=config.aimet_rules
        )
    except ValueError as error:
        raise ValueError(f"weight of {layers.describe(layer)}: {error}") from None


def quantize_weight(layer: nn.Module, config: QuantConfig) -> torch.Tensor:
    """The layer's weight fake-quantized under `config` (a new tensor; the layer is untouched)."""
    with torch.no_grad():
        return weight_encoding(layer, config).fake_quantize(layer.weight.detach())


def bias_encoding(input_scale: float, weight: Encoding, channels: int) -> Encoding:
    """Signed 32-bit grid with scale = input scale * weight scale, per output channel if the weight is.

    channels: the bias length; per-channel weight scales of a grouped ConvTranspose (out / groups of them) repeat.
    """
    scale = (weight.scale.double() * input_scale).float().clamp_min(torch.finfo(torch.float32).tiny)
    if scale.dim():
        scale = scale.repeat(channels // scale.numel())
    return Encoding(scale, torch.zeros_like(scale, dtype=torch.int32), BIAS_BITS, True, None if scale.dim() == 0 else 0)
