"""Simulated integer quantization (AIMET QuantizationSimModel-like): configs, encodings, observers, QuantSim."""
from clebench.quant.config import QuantConfig
from clebench.quant.encoding import (
    Encoding,
    asymmetric_encoding,
    full_signed_range_encoding,
    quantize_weight,
    symmetric_encoding,
    tensor_encoding,
)
from clebench.quant.sim import ActivationQuantizer, QuantSim

__all__ = [
    "ActivationQuantizer",
    "Encoding",
    "QuantConfig",
    "QuantSim",
    "asymmetric_encoding",
    "full_signed_range_encoding",
    "quantize_weight",
    "symmetric_encoding",
    "tensor_encoding",
]
