"""One layer's AdaRound optimization: learn which weights round up by reconstructing the layer's output.

    minimize over V:  || act(layer(x_q; soft(V))) - act(layer(x_fp)) ||^2  +  lambda * f_reg(h(V), beta)
x_q: the layer's input in the weight-quantized model, x_fp its input in the FP32 model (so the target is the FP32
layer's output), act: the activation right after the layer (if any). The squared error is summed over the output
channels (axis 1) and averaged over everything else (batch, positions), as AIMET's loss. Each iteration draws
`batch_size` samples of the cached data at random; Adam updates V, by default with learning rate 10 / iterations:
AIMET's 1e-3 at its 10,000 iterations, and large enough at fewer iterations for V to travel as far (with 1e-3,
1,000 steps leave many h(V) between 0 and 1), but at most 0.1: below 100 iterations larger steps overshoot, and
5 iterations at 10 / 5 rounded worse than nearest rounding. beta anneals from beta_range[0] to
beta_range[1] after a warm start without the regularizer, which drives every h(V) to 0 or 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clebench.adaround.rounding import CPU_SLICE, RoundingVariable, annealed_beta
from clebench.errors import UserError
from clebench.quant.encoding import Encoding

DEFAULT_ITERATIONS = 1000
DEFAULT_BATCH_SIZE = 32  # samples per iteration (AIMET's)
STEP_BUDGET = 10.0  # default learning rate x iterations: AIMET's Adam learning rate 1e-3 x its 10,000 iterations
MAX_LEARNING_RATE = 0.1  # the default's cap, reached at 100 iterations


class AdaroundError(UserError):
    """Bad AdaRound input: a model without layers to round, a bad setting, too little data."""


@dataclass(frozen=True)
class AdaroundSettings:
    """iterations: optimization steps per layer; reg_param: lambda; beta_range: (start, end) of beta's annealing;
    warm_start: fraction of the iterations without the regularizer; batch_size: samples per step; seed: the
    sampling seed (same seed and data: same rounding); learning_rate: Adam's (None: STEP_BUDGET / iterations, at most
    MAX_LEARNING_RATE)."""

    iterations: int = DEFAULT_ITERATIONS
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise AdaroundError(f"AdaRound {name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                                    f"int, got {value!r}")
        if not _number(self.reg_param) or self.reg_param < 0:
            raise AdaroundError(f"AdaRound reg_param must be a number >= 0, got {self.reg_param!r}")
        beta = self.beta_range
        if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and all(_number(b) and b > 0 for b in beta)):
            raise AdaroundError(f"AdaRound beta_range must be (start, end) with positive numbers, got {beta!r}")
        if not _number(self.warm_start) or not 0 <= self.warm_start < 1:
            raise AdaroundError(f"AdaRound warm_start must be a fraction in [0, 1), got {self.warm_start!r}")
        if self.learning_rate is not None and not (_number(self.learning_rate) and self.learning_rate > 0):
            raise AdaroundError(f"AdaRound learning_rate must be a positive number or None, got {self.learning_rate!r}")

    @property
    def adam_learning_rate(self) -> float:
        if self.learning_rate is None:
            return min(STEP_BUDGET / self.iterations, MAX_LEARNING_RATE)
        return self.learning_rate


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over axis 1 (channels), averaged over the other axes."""
    return (output - target).pow(2).sum() * _averaging_scale(output)


def _averaging_scale(output: torch.Tensor) -> float:
    """1 / the number of positions the loss averages over: channels (axis 1) / all elements."""
    return output.shape[1] / output.numel()


class _SquaredError(torch.autograd.Function):
    """reconstruction_loss with its gradient written out and, on a CPU, computed in slices that stay in cache.

    Autograd's version streams the [B, C, H, W] output through memory about eight times per step (difference,
    square, sum, and the gradient's power, products) and allocates as many fresh tensors; on EfficientNet-Lite0's
    112 x 112 layers that costs more than the convolution. The gradient is the product autograd computes,
    (grad x scale) x (2 (output - target)), so its bits are the same (tests/test_adaround.py); the loss value is
    summed in another order.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output, target = output.contiguous(), target.contiguous()
        ctx.save_for_backward(output, target)
        total = output.new_zeros(())
        for out, tgt in zip(*_slices(output, target)):
            total += (out - tgt).pow(2).sum()
        return total * _averaging_scale(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        output, target = ctx.saved_tensors
        factor = grad * _averaging_scale(output)
        grad_output = torch.empty_like(output)
        for out, tgt, result in zip(*_slices(output, target, grad_output)):
            torch.mul(factor, 2 * (out - tgt), out=result)
        return grad_output, None


def _slices(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Flat views of same-shaped contiguous tensors, in CPU_SLICE pieces on a CPU (one piece elsewhere)."""
    flat = [tensor.view(-1) for tensor in tensors]
    size = CPU_SLICE if tensors[0].device.type == "cpu" else max(1, flat[0].numel())
    return [tensor.split(size) for tensor in flat]


def optimize_layer(layer: nn.Module, encoding: Encoding, inputs: torch.Tensor, targets: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor] | None, settings: AdaroundSettings,
                   generator: torch.Generator) -> RoundingVariable:
    """Learn the rounding of `layer.weight` on `encoding`'s grid (the layer is not modified).

    inputs: [N, ...] the layer's inputs x_q; targets: [N, ...] act(FP32 layer output), the same N samples.
    generator: draws the samples of each step.
    A Linear or zero-padded Conv2d without activation has a quadratic loss; where its input moments cost less over
    the whole optimization than the sampled steps (`moments_pay_off`), each step uses the exact loss over all N
    samples instead (same minimum, no sampling noise).
    """
    use_moments = activation is None and moments_pay_off(layer, targets, settings)
    moments = _moments(layer, inputs, targets) if use_moments else None
    if moments is None:
        count = inputs.shape[0]

        def loss(weight: torch.Tensor) -> torch.Tensor:
            index = torch.randperm(count, generator=generator)[: settings.batch_size]
            output = functional_call(layer, {"weight": weight}, (inputs.index_select(0, index),))
            return _SquaredError.apply(output if activation is None else activation(output),
                                       targets.index_select(0, index))
    else:
        second, cross, constant = moments

        def loss(weight: torch.Tensor) -> torch.Tensor:
            grouped = weight.reshape(second.shape[0], -1, second.shape[1])  # [groups, out / groups, K]
            return ((grouped @ second) * grouped).sum() - 2 * (grouped * cross).sum() + constant

    with torch.enable_grad():
        return _optimize(RoundingVariable(layer.weight, encoding), loss, settings)


MOMENTS_SLOWDOWN = 2.0  # a moment multiply-add costs about twice a convolution's here (unfold copies, small matmuls)


def moments_pay_off(layer: nn.Module, targets: torch.Tensor, settings: AdaroundSettings) -> bool:
    """Whether the exact loss from input moments costs fewer multiply-adds over all iterations than sampled steps.

    With K = Cin / groups x kernel size inputs per output, g groups, P output positions per sample, N samples
    (M = N x P rows) and B = min(batch_size, N): the moments cost g K^2 M + out K M once and 2 out K^2 per step
    (loss and gradient), a sampled step 2 out K B P (forward and weight gradient).
    targets: [N, out, ...] for a conv, [N, ..., out] for a linear layer.
    """
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return False
    out, size = layer.weight.shape[0], layer.weight[0].numel()
    groups = getattr(layer, "groups", 1)
    samples = targets.shape[0]
    positions = targets.numel() // (samples * out)
    rows = samples * positions
    moments = groups * size ** 2 * rows + out * size * rows + settings.iterations * 2 * out * size ** 2
    sampled = settings.iterations * 2 * out * size * min(settings.batch_size, samples) * positions
    return MOMENTS_SLOWDOWN * moments < sampled


def _moments(layer: nn.Module, inputs: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(E[x x^T] [g, K, K], E[(t - b) x^T] [g, out / g, K], E[|t - b|^2]) over the N x positions rows of a Linear or
    zero-padded Conv2d with g groups, so that the loss of weight W is sum(W E[x x^T] W^T) - 2 sum(W E[(t-b) x^T]) +
    E[|t-b|^2]; None for other layers."""
    if isinstance(layer, nn.Linear):
        rows, groups = inputs.reshape(-1, inputs.shape[-1]), 1
        outputs = targets.reshape(-1, targets.shape[-1])
    elif isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        rows = torch.cat([F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
                          .reshape(-1, layer.weight[0].numel() * layer.groups) for x in inputs.split(64)])
        groups, outputs = layer.groups, targets.movedim(1, -1).reshape(-1, targets.shape[1])
    else:
        return None
    size = layer.weight[0].numel()
    if layer.bias is not None:
        outputs = outputs - layer.bias.detach()
    grouped = rows.reshape(rows.shape[0], groups, size).transpose(0, 1)  # [g, M, K]
    grouped_out = outputs.reshape(outputs.shape[0], groups, -1).transpose(0, 1)  # [g, M, out / g]
    count = rows.shape[0]
    return (grouped.transpose(1, 2) @ grouped / count, grouped_out.transpose(1, 2) @ grouped / count,
            outputs.pow(2).sum() / count)


def _optimize(rounding: RoundingVariable, reconstruction: Callable[[torch.Tensor], torch.Tensor],
              settings: AdaroundSettings) -> RoundingVariable:
    fused = rounding.v.device.type in ("cpu", "cuda")  # one pass over V per step instead of several
    optimizer = torch.optim.Adam([rounding.v], lr=settings.adam_learning_rate, fused=fused)
    for iteration in range(settings.iterations):
        beta = annealed_beta(iteration, settings.iterations, settings.beta_range, settings.warm_start)
        weight, regularizer = rounding.soft(beta)
        loss = reconstruction(weight) + settings.reg_param * regularizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rounding
