"""AdaRound's learned rounding (Nagel et al., ICML 2020, sec. 4): the rectified sigmoid, the rounding regularizer,
its annealed beta, and a weight whose every element rounds down or up as a learned variable V decides.

For a weight w on a grid with scale s, zero point z and integer range [q_min, q_max]:
    soft(V) = (clamp(floor(w / s) + z + h(V), q_min, q_max) - z) * s,   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
    hard(V) = the same with h = [V >= 0]: a point of the grid, rounded down (h = 0) or up (h = 1)
with zeta = 1.1, gamma = -0.1 (the stretch that lets h reach 0 and 1 exactly). V starts where h(V) equals the
fractional part of w / s, so soft(V) = w up to clamping.
"""
from __future__ import annotations

import math

import torch

from clebench.quant.encoding import Encoding

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), element-wise."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """f_reg = sum over elements of 1 - |2h - 1|^beta: 0 where every h is 0 or 1, largest at h = 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def annealed_beta(iteration: int, iterations: int, beta_range: tuple[float, float], warm_start: float) -> float | None:
    """beta at 0-based `iteration`: None during the warm start (the first warm_start * iterations), then a cosine
    decay from beta_range[0] to beta_range[1] over the remaining iterations (AIMET's schedule)."""
    start = warm_start * iterations
    if iteration < start:
        return None
    progress = (iteration - start) / (iterations - start)
    high, low = beta_range
    return low + 0.5 * (high - low) * (1 + math.cos(progress * math.pi))


CPU_SLICE = 1 << 18  # weights per slice of the element-wise chain on a CPU: its temporaries stay in the core's cache


class _SoftRounding(torch.autograd.Function):
    """(soft(V), f_reg(h(V), beta)) with the gradient in V written out, computed in slices of output channels on a
    CPU. Autograd's ~20 element-wise records over a whole 512-channel weight (2.4 M elements) streamed from memory
    cost twice the layer's convolution per step; this keeps two tensors for the backward pass, which is one
    multiply-add. Same values and gradients as composing rectified_sigmoid, dequantize and rounding_regularizer
    (tests/test_adaround.py); beta None: no regularizer (its value is 0)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, rounding: RoundingVariable, beta: float | None):
        weight, weight_slope = torch.empty_like(v), torch.empty_like(v)
        reg_slope = None if beta is None else torch.empty_like(v)
        regularizer = v.new_zeros(())
        channels = max(1, CPU_SLICE // max(1, v[0].numel())) if v.device.type == "cpu" else v.shape[0]
        for start in range(0, v.shape[0], channels):
            part = slice(start, start + channels)
            regularizer += _soft_rows(v[part], rounding, part, beta, weight[part], weight_slope[part],
                                      None if reg_slope is None else reg_slope[part])
        ctx.save_for_backward(weight_slope, reg_slope)
        return weight, regularizer

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor, grad_regularizer: torch.Tensor):
        weight_slope, reg_slope = ctx.saved_tensors
        grad = grad_weight * weight_slope
        if reg_slope is not None:
            grad = grad.addcmul_(reg_slope, grad_regularizer)
        return grad, None, None


def _soft_rows(v: torch.Tensor, rounding: RoundingVariable, part: slice, beta: float | None, weight: torch.Tensor,
               weight_slope: torch.Tensor, reg_slope: torch.Tensor | None) -> torch.Tensor:
    """Write soft(V), d soft / dV and d f_reg / dV of the rows `part` (v = V[part]) into the given views; return
    their share of f_reg.

    Masks are float 0 / 1 (a comparison into a float tensor is vectorized, one into bool is not), and the grid's
    clamp runs only on rows that can reach the grid's ends: same values as the composed formulas, bit for bit."""
    def rows(grid: torch.Tensor) -> torch.Tensor:  # a per-channel grid on axis 0 is sliced, others broadcast
        return grid[part] if grid.shape[0] > 1 else grid

    scale = rows(rounding.scale)
    sigmoid = torch.sigmoid(v)
    stretched = (sigmoid * (ZETA - GAMMA)).add_(GAMMA)
    h = stretched.clamp(0.0, 1.0)
    # dh/dV = (zeta - gamma) sigmoid (1 - sigmoid) where the clamp passes its input (autograd's convention)
    passed = torch.eq(h, stretched, out=stretched)
    slope = (1 - sigmoid).mul_(sigmoid).mul_(passed).mul_(ZETA - GAMMA)
    level = h + rounding.floor[part]
    if rounding.may_clamp(part):
        clamped = level.clamp(rounding.quant_min, rounding.quant_max)
        torch.mul(slope * scale, torch.eq(clamped, level, out=level), out=weight_slope)
        level = clamped
    else:  # floor + h lies in [floor, floor + 1], inside the grid
        torch.mul(slope, scale, out=weight_slope)
    torch.mul(level.sub_(rows(rounding.zero_point)), scale, out=weight)
    if beta is None:
        return v.new_zeros(())
    centered = h.mul_(2).sub_(1)
    magnitude = centered.abs()
    power = magnitude.pow(beta - 1)  # times |2h - 1|: the regularizer's |2h - 1|^beta
    share = magnitude.numel() - torch.dot(power.flatten(), magnitude.flatten())
    torch.copysign(power, centered, out=reg_slope).mul_(slope.mul_(-2 * beta))
    return share


class RoundingVariable:
    """The learnable rounding of one weight tensor on `encoding`'s grid (per tensor, or per channel on its axis).

    `v` [weight shape] is the leaf tensor to optimize; `dequantize(rectified_sigmoid(v))` is the soft-rounded
    weight (differentiable in v), `hard()` the weight on the grid.
    """

    def __init__(self, weight: torch.Tensor, encoding: Encoding) -> None:
        weight = weight.detach().float()
        shape = [1] * weight.dim()
        if encoding.axis is not None:
            shape[encoding.axis] = -1
        self.scale = encoding.scale.to(weight.device).reshape(shape)
        self.zero_point = encoding.zero_point.to(weight.device).float().reshape(shape)
        self.quant_min, self.quant_max = encoding.quant_min, encoding.quant_max
        scaled = weight / self.scale
        self.floor = torch.floor(scaled) + self.zero_point  # integer level of rounding down, zero point included
        fraction = (scaled - torch.floor(scaled)).clamp(0.0, 1.0)
        self.v = (-torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)).requires_grad_(True)
        outside = (self.floor < self.quant_min) | (self.floor + 1 > self.quant_max)
        self._clamping_rows = outside.reshape(outside.shape[0], -1).any(1).tolist()

    def dequantize(self, h: torch.Tensor) -> torch.Tensor:
        """The weight with each element rounded up by h in [0, 1] (h = 0: down, 1: up), on the grid's range."""
        return (torch.clamp(self.floor + h, self.quant_min, self.quant_max) - self.zero_point) * self.scale

    def soft(self, beta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dequantize(h(V)), rounding_regularizer(h(V), beta), 0 for beta None), both differentiable in V."""
        return _SoftRounding.apply(self.v, self, beta)

    def may_clamp(self, rows: slice) -> bool:
        """Whether some weight in `rows` (of axis 0) can round to a level outside the grid's range."""
        return any(self._clamping_rows[rows])

    def hard(self) -> torch.Tensor:
        """The weight rounded down where V < 0 and up where V >= 0 (no gradient)."""
        with torch.no_grad():
            return self.dequantize(self.round_up().float())

    def round_up(self) -> torch.Tensor:
        """bool [weight shape]: which elements round up."""
        return self.v.detach() >= 0

