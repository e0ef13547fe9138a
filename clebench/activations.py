"""Activation kinds as CLE sees them, and the per-channel clipped ReLU that makes scaling across ReLU6 exact.

Scaling channel c of a layer's output by 1/s_c turns ReLU6 into min(max(x, 0), 6/s_c) for that channel, so
cross-layer scaling through a ReLU6 preserves the FP32 function exactly once the ReLU6 becomes a
`ChannelClippedReLU` with per-channel upper bounds 6/s.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn


class ChannelClippedReLU(nn.Module):
    """y = clamp(x, 0, upper[c]) for channel c on `channel_axis` (1 after a conv, -1 after a Linear).

    `upper` has shape [C] and lives in a buffer, so it follows `.to(device)` and the state_dict.
    """

    def __init__(self, upper: torch.Tensor, channel_axis: int = 1) -> None:
        super().__init__()
        self.channel_axis = channel_axis
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return torch.clamp(x, self.upper.new_zeros(()), self.upper.view(shape))  # one pass; min(relu(x), u) takes two

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, channel_axis={self.channel_axis}"


RELU_MODULES = (nn.ReLU, nn.PReLU)
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.prelu, torch.prelu}
RELU_METHODS = {"relu", "relu_"}
RELU6_FUNCTIONS = {F.relu6, F.hardtanh, F.hardtanh_}
VALUE_PRESERVING_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem}


def relu6_upper_bound(module: nn.Module) -> torch.Tensor | float | None:
    """The upper clip bound of a ReLU6-like module (ReLU6, Hardtanh(0, m), ChannelClippedReLU), else None."""
    if isinstance(module, ChannelClippedReLU):
        return module.upper
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val > 0.0:
        return float(module.max_val)
    return None


def functional_relu6_bound(target, args: tuple, kwargs: dict) -> float | None:
    """Upper bound of a functional F.relu6 / F.hardtanh(x, 0, m) call, else None."""
    if target is F.relu6:
        return 6.0
    if target in (F.hardtanh, F.hardtanh_):
        lower = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        upper = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        if lower == 0.0 and isinstance(upper, (int, float)) and upper > 0:
            return float(upper)
    return None
