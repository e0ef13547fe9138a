"""Brevitas (pip extra `brevitas`): its pre-quantization pipeline as the sweep's brevitas_equalize steps.

`equalize` runs `brevitas.graph.quantize.preprocess_for_quantize` as Brevitas' ImageNet PTQ benchmark
(brevitas_examples/imagenet_classification/ptq/ptq_evaluate.py) does by default: trace, functional calls to modules,
BN merge, graph equalization over Brevitas' regions (residual adds included) for `iterations` rounds, merge_bias on
(the bias joins the weight in the scale), no channel splitting. Brevitas treats ReLU6 as scale-varying: it ends a
region, as clebench's cls_relu6_keep. Its benchmark replaces ReLU6 by ReLU first (relu6_to_relu=True); the sweep
leaves that to its own relu6_to_relu step, so that the equalization step itself keeps the FP32 function exactly.
"""
from __future__ import annotations

import copy

from torch import nn

from clebench.errors import UserError
from clebench.peers import import_peer

__all__ = ["DEFAULT_ITERATIONS", "check_iterations", "equalize"]

DEFAULT_ITERATIONS = 20  # ptq_evaluate.py's --graph-eq-iterations


def check_iterations(iterations: object) -> int:
    """`iterations` if it is a positive integer, else a UserError naming the option."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserError(f"iterations must be a positive integer (Brevitas' benchmark: {DEFAULT_ITERATIONS}), "
                        f"got {iterations!r}")
    return iterations


def equalize(model: nn.Module, *, iterations: int = DEFAULT_ITERATIONS, merge_bias: bool = True) -> nn.Module:
    """Brevitas' preprocess_for_quantize of `model` (in eval mode; not modified), ReLU6 kept: a new torch.fx
    GraphModule."""
    quantize = import_peer("brevitas", "brevitas.graph.quantize")
    return quantize.preprocess_for_quantize(copy.deepcopy(model), relu6_to_relu=False, merge_bn=True,
                                            equalize_iters=check_iterations(iterations),
                                            equalize_merge_bias=merge_bias)
