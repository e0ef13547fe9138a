"""Activation range observers: min/max, percentile and MSE-optimal clipping, all in one calibration pass.

Percentile and MSE read a histogram anchored at 0: bin i covers [(i - B) w, (i - B + 1) w) for i in [0, 2B). When
a batch exceeds the covered range, w doubles as often as needed and adjacent bins merge pairwise, which is exact
because the bin edges stay multiples of w; so the histogram costs O(bins) memory whatever the number of batches.
"""
from __future__ import annotations

import math

import torch

from clebench.quant.config import QuantConfig
from clebench.quant.encoding import unsigned_grid

HALF_BINS = 8192  # B: bins on each side of 0
MSE_STEPS = 100  # candidate clipping fractions per side of the range


class MinMaxObserver:
    """Running min and max of every value seen (AIMET "tf")."""

    def __init__(self) -> None:
        self.minimum = math.inf
        self.maximum = -math.inf

    def update(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        low, high = torch.aminmax(x.detach())
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("an observed activation holds NaN or infinite values; the model's FP32 output is broken")
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)

    @property
    def empty(self) -> bool:
        return self.minimum > self.maximum

    def range(self) -> tuple[float, float]:
        """(min, max) seen; ValueError if nothing was observed."""
        if self.empty:
            raise ValueError("no values were observed: calibrate on at least one batch that reaches this quantizer")
        return self.minimum, self.maximum


class HistogramObserver(MinMaxObserver):
    """Min/max plus a zero-anchored histogram (float64 counts) and the count of exact zeros."""

    def __init__(self, half_bins: int = HALF_BINS) -> None:
        super().__init__()
        self.half_bins = half_bins
        self.width = 0.0  # bin width w; 0 until the first non-empty batch
        self.counts = torch.zeros(2 * half_bins, dtype=torch.float64)
        self.zeros = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if not x.numel():
            return
        x = x.detach().float()
        self._cover(max(-self.minimum, self.maximum))
        edge = self.half_bins * self.width
        self.counts += torch.histc(x, bins=2 * self.half_bins, min=-edge, max=edge).double().cpu()
        self.zeros += int((x == 0).sum())

    def _cover(self, abs_max: float) -> None:
        """Grow the bin width by powers of two until [-B w, B w] holds +-abs_max."""
        if self.width == 0.0:
            # a small margin, so that B * w does not round below abs_max
            self.width = max(abs_max, 1e-30) * (1 + 2**-20) / self.half_bins
        factor = 1
        while self.half_bins * self.width * factor < abs_max:
            factor *= 2
        if factor == 1:
            return
        merge = min(factor, 2 * self.half_bins)  # from here on every old bin lands in signed bin -1 or 0 anyway
        signed = torch.arange(-self.half_bins, self.half_bins)
        target = torch.div(signed, merge, rounding_mode="floor") + self.half_bins
        self.counts = torch.zeros_like(self.counts).index_add_(0, target, self.counts)
        self.width *= factor

    def edges(self) -> torch.Tensor:
        """The 2B + 1 bin edges (float64)."""
        return torch.arange(-self.half_bins, self.half_bins + 1, dtype=torch.float64) * self.width


class PercentileObserver(HistogramObserver):
    """Range = [(100 - p)-th percentile, p-th percentile] of all values (interpolated within a bin)."""

    def __init__(self, percentile: float, half_bins: int = HALF_BINS) -> None:
        super().__init__(half_bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        minimum, maximum = super().range()
        low = self.quantile(1.0 - self.percentile / 100.0)
        high = self.quantile(self.percentile / 100.0)
        return max(low, minimum), min(high, maximum)

    def quantile(self, q: float) -> float:
        """The value below which a fraction q of all observed values lies."""
        cumulative = torch.cumsum(self.counts, 0)
        target = q * float(cumulative[-1])
        index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
        index = min(index, len(cumulative) - 1)
        before = float(cumulative[index - 1]) if index > 0 else 0.0
        inside = float(self.counts[index])
        fraction = (target - before) / inside if inside > 0 else 0.0
        return (index - self.half_bins + fraction) * self.width


class MseObserver(HistogramObserver):
    """Range minimising the expected squared quantization error on a `bits`-bit asymmetric grid.

    Error model per bin (its values at the bin centre): inside the grid's range, uniform rounding noise scale^2 / 12;
    outside, the squared distance to the nearest grid end. Exact zeros cost nothing (0 is on every grid). Candidates
    shrink the observed min and max independently by fractions k / MSE_STEPS; prefix sums of the histogram make
    each candidate's cost O(log bins).
    """

    def __init__(self, bits: int, half_bins: int = HALF_BINS) -> None:
        super().__init__(half_bins)
        self.bits = bits

    def range(self) -> tuple[float, float]:
        minimum, maximum = super().range()
        fractions = torch.arange(1, MSE_STEPS + 1, dtype=torch.float64) / MSE_STEPS
        lows = (fractions * minimum).unique() if minimum < 0 else torch.zeros(1, dtype=torch.float64)
        highs = (fractions * maximum).unique() if maximum > 0 else torch.zeros(1, dtype=torch.float64)
        low, high = (grid.reshape(-1) for grid in torch.meshgrid(lows, highs, indexing="ij"))
        best = int(torch.argmin(self._cost(low, high)))  # the first minimum: deterministic
        return float(low[best]), float(high[best])

    def _cost(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Expected squared error [K] of the grids fitted to candidate ranges [low[k], high[k]]."""
        counts = self.counts.clone()
        counts[self.half_bins] -= self.zeros  # exact zeros sit in the bin [0, w)
        edges = self.edges()
        centres = (edges[:-1] + edges[1:]) / 2
        zero = torch.zeros(1, dtype=torch.float64)
        prefix = [torch.cat([zero, torch.cumsum(counts * centres**p, 0)]) for p in range(3)]  # sums over bins [0, i)
        quant_max = unsigned_grid(self.bits)[1]
        scale = ((high - low) / quant_max).clamp_min(1e-30)
        zero_point = torch.round(-low / scale)
        grid_low, grid_high = -zero_point * scale, (quant_max - zero_point) * scale
        below = torch.searchsorted(centres, grid_low)  # bins [0, below) lie under the grid
        above = torch.searchsorted(centres, grid_high, right=True)  # bins [above, end) lie over it

        def squared_distance(start, stop, to):  # sum of counts * (centre - to)^2 over bins [start, stop)
            s0, s1, s2 = (p[stop] - p[start] for p in prefix)
            return s2 - 2 * to * s1 + to**2 * s0

        end = torch.full_like(above, len(centres))
        inside = prefix[0][above] - prefix[0][below]
        return squared_distance(torch.zeros_like(below), below, grid_low) + squared_distance(above, end, grid_high) + (
            inside * scale**2 / 12
        )


def make_observer(config: QuantConfig) -> MinMaxObserver:
    """The activation observer `config.calibration` asks for."""
    if config.calibration == "minmax":
        return MinMaxObserver()
    if config.calibration == "percentile":
        return PercentileObserver(config.percentile)
    return MseObserver(config.act_bits)
