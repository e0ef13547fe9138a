"""The per-channel clipped ReLU that makes scaling across ReLU6 exact (what each activation is: clebench.ops).

Scaling channel c of a layer's output by 1/s_c turns ReLU6 into min(max(x, 0), 6/s_c) for that channel, so
cross-layer scaling through a ReLU6 preserves the FP32 function exactly once the ReLU6 becomes a
`ChannelClippedReLU` with per-channel upper bounds 6/s.
"""
from __future__ import annotations

import torch
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
