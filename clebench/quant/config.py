"""QuantConfig: what a simulated-quantization run quantizes, and how; round-trips through a compact name."""
from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 2, 16
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "mse")
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel")
FLAGS: tuple[str, ...] = ("wasym", "int32bias", "aimet")  # name suffixes, in this order
DEFAULT_PERCENTILE = 99.99


def check_bits(bits: object, what: str) -> None:
    """ValueError unless `bits` is an int in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Simulated quantization settings; defaults are the DFQ paper's W8A8 setting (AIMET QuantSim defaults).

    weight_bits: signed weight grid [-2^(b-1), 2^(b-1) - 1] (symmetric) or unsigned [0, 2^b - 1] (asymmetric).
    act_bits: unsigned activation grid [0, 2^b - 1] with a zero point; None leaves activations in float.
    per_channel: one weight encoding per output channel instead of one per tensor.
    calibration: how activation ranges are found: "minmax" (AIMET "tf"), "percentile" (the `percentile`-th and
        (100 - `percentile`)-th percentiles), "mse" (clipping range that minimises the expected quantization MSE,
        like AIMET "tf_enhanced"). Weights always use their exact min / max.
    percentile: in (50, 100]; only with calibration="percentile".
    int32_bias: biases on a signed 32-bit grid with scale = input scale * weight scale (needs act_bits).
    aimet_rules: AIMET 2.x's two encoding rules where they differ from the above: a symmetric weight scale of
        max(max / (2^(b-1) - 1), -min / 2^(b-1)), which uses the level -2^(b-1) when the negative side dominates,
        and activation ranges calibrated with the weights already quantized. They move top-1 by about a point at
        W4A8 (scripts/peers/compare_aimet.py).
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    per_channel: bool = False
    weight_symmetric: bool = True
    calibration: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE
    int32_bias: bool = False
    aimet_rules: bool = False

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "QuantConfig.weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "QuantConfig.act_bits (or None for float activations)")
        for field in ("per_channel", "weight_symmetric", "int32_bias", "aimet_rules"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"QuantConfig.{field} must be a bool, got {getattr(self, field)!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"QuantConfig.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        number = isinstance(self.percentile, (int, float)) and not isinstance(self.percentile, bool)
        if not (number and 50 < self.percentile <= 100):
            raise ValueError(f"QuantConfig.percentile must be a number in (50, 100], got {self.percentile!r}")
        if self.calibration != "percentile" and self.percentile != DEFAULT_PERCENTILE:
            raise ValueError(
                f"QuantConfig.percentile={self.percentile} only applies to calibration='percentile' "
                f"(got calibration={self.calibration!r}); drop it or set calibration='percentile'"
            )
        if self.int32_bias and self.act_bits is None:
            raise ValueError(
                "QuantConfig.int32_bias needs quantized activations (the bias scale is input scale * weight scale); "
                "set act_bits or int32_bias=False"
            )

    @property
    def name(self) -> str:
        """E.g. "w8a8_per_tensor_minmax", "w4afp_per_channel_percentile99.9_wasym_int32bias"."""
        acts = "fp" if self.act_bits is None else str(self.act_bits)
        granularity = "per_channel" if self.per_channel else "per_tensor"
        calibration = self.calibration
        if calibration == "percentile":
            calibration += f"{float(self.percentile)!r}".removesuffix(".0")
        flags = [flag for flag, on in zip(FLAGS, (not self.weight_symmetric, self.int32_bias, self.aimet_rules)) if on]
        return "_".join([f"w{self.weight_bits}a{acts}", granularity, calibration, *flags])

    @classmethod
    def from_name(cls, name: str) -> QuantConfig:
        """Inverse of `.name`: "w<bits>a<bits|fp>_<per_tensor|per_channel>_<calibration>[_wasym][_int32bias][_aimet]"."""
        if not isinstance(name, str):
            raise TypeError(f"a QuantConfig name must be a str, got {type(name).__name__}")
        parts = name.split("_")
        bits = re.fullmatch(r"w(\d+)a(\d+|fp)", parts[0])
        if bits is None:
            raise ValueError(f"bad bit-width part {parts[0]!r} in {name!r}: expected w<bits>a<bits> or w<bits>afp")
        granularity = "_".join(parts[1:3])
        if granularity not in GRANULARITIES:
            raise ValueError(f"bad granularity {granularity!r} in {name!r}: expected one of {GRANULARITIES}")
        allowed = "minmax, mse or percentile<p> (e.g. percentile99.99)"
        if len(parts) < 4:
            raise ValueError(f"{name!r} has no calibration part: expected {allowed}")
        calibration = re.fullmatch(r"(minmax|mse)|percentile(\d+(?:\.\d+)?)", parts[3])
        if calibration is None:
            raise ValueError(f"bad calibration {parts[3]!r} in {name!r}: expected {allowed}")
        flags = parts[4:]
        if any(flag not in FLAGS for flag in flags) or flags != [flag for flag in FLAGS if flag in flags]:
            raise ValueError(f"bad flags {flags} in {name!r}: allowed, in this order and at most once each: {FLAGS}")
        percentile = calibration.group(2)
        return cls(
            weight_bits=int(bits.group(1)),
            act_bits=None if bits.group(2) == "fp" else int(bits.group(2)),
            per_channel=granularity == "per_channel",
            weight_symmetric="wasym" not in flags,
            calibration="percentile" if percentile is not None else calibration.group(1),
            percentile=DEFAULT_PERCENTILE if percentile is None else float(percentile),
            int32_bias="int32bias" in flags,
            aimet_rules="aimet" in flags,
        )
