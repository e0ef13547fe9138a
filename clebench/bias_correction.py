"""Bias correction (DFQ paper sec. 4.3): undo the mean output shift that weight quantization causes.

A layer y = W x + b whose weights are quantized to W_q = W + eps has E[y_q] - E[y] = eps E[x] per output channel
(eps summed over the kernel; border padding ignored). Subtracting eps E[x] from b makes the quantized layer
unbiased. E[x] comes from
* analytical (data-free): the preceding layer's folded BN says its pre-activation output channel c is
  N(beta_c, gamma_c^2); cross-layer scaling divided that output by the pair's scale factor s and high-bias folding
  shifted it by -absorbed_bias, so it is N(beta / s - absorbed, (gamma / s)^2); E[x] is then the mean of the
  activation of that normal (clipped-normal formulas below);
* empirical: the calibration data, as the mean output difference between the FP32 and weight-quantized layer.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call
from tqdm import tqdm

from clebench import graph, layers, ops
from clebench.ops import functional_relu6_bound, relu6_upper_bound
from clebench.cross_layer_equalization import ClsSetInfo
from clebench.quant.config import QuantConfig
from clebench.quant.encoding import quantize_weight
from clebench.quant.sim import batch_inputs

METHODS = ("analytical", "empirical")
logger = logging.getLogger(__name__)


def relu_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[max(X, 0)] for X ~ N(mean, std^2), element-wise: std phi(mean / std) + mean Phi(mean / std)."""
    std = std.abs()
    safe = std.clamp_min(torch.finfo(std.dtype).tiny)
    z = mean / safe
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return torch.where(std > 0, safe * pdf + mean * cdf, mean.clamp_min(0))


def clipped_normal_mean(
    mean: torch.Tensor, std: torch.Tensor, upper: torch.Tensor | float | None = None
) -> torch.Tensor:
    """E[clamp(X, 0, upper)] for X ~ N(mean, std^2), element-wise; upper None means ReLU (no upper clip).

    clamp(x, 0, u) = max(x, 0) - max(x - u, 0) for u >= 0, so the mean is relu_normal_mean(m, s) -
    relu_normal_mean(m - u, s).
    """
    relu = relu_normal_mean(mean, std)
    if upper is None:
        return relu
    return relu - relu_normal_mean(mean - torch.as_tensor(upper, dtype=mean.dtype, device=mean.device), std)


def correct_bias(
    model: nn.Module,
    config: QuantConfig,
    *,
    bn_map: Mapping[nn.Module, nn.Module] | None,
    cls_set_infos: Sequence[ClsSetInfo] | None = None,
    method: str = "analytical",
    batches: Iterable | None = None,
    progress: bool = True,
    quantized_weights: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Correct the bias of every conv / linear layer of the BN-folded FP32 `model` in place; return how many.

    config: the weight quantization (weight_bits, per_channel, weight_symmetric) whose error is corrected.
    bn_map: {layer: the BN folded into it} (needed by 'analytical'): the backward pairs of fold_all_batch_norms,
        {layer: bn for layer, bn in pairs if isinstance(bn, clebench.layers.BN_TYPES)}.
    cls_set_infos: what `CrossLayerScaling.scale_model` (and `HighBiasFold.bias_fold`) did to the model.
    batches: calibration inputs (tensors or (inputs, labels)) for 'empirical'; held in memory while correcting.
    Layers called at several places, and (analytical) layers whose input is not a BN-folded layer's output through
    element-wise activations only, are skipped (logged). A layer without bias gets one.
    quantized_weights: {"<layer>.weight": the weight the quantized model uses} in place of the nearest rounding on
        config's grid, e.g. AdaRound's rounded weights: the correction then removes their expected output error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a clebench.quant.QuantConfig, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    gm = graph.trace(model)
    modules = dict(gm.named_modules())
    sites = graph.call_sites(gm)
    candidates = [n for n in gm.graph.nodes if layers.is_layer(graph.module_of(n, modules)) and sites[n.target] == 1]
    shared = [n.target for n in gm.graph.nodes if layers.is_layer(graph.module_of(n, modules)) and sites[n.target] > 1]
    if shared:
        logger.info("bias correction skips layers called at several places: %s", sorted(set(shared)))
    quantized = _quantized_weights(candidates, modules, config, quantized_weights or {})
    if method == "analytical":
        _check_analytical_arguments(bn_map, batches)
        return _correct_analytical(candidates, modules, quantized, bn_map, cls_set_infos or [])
    if batches is None:
        raise ValueError("method='empirical' needs calibration batches (batches=)")
    return _correct_empirical(model, candidates, modules, quantized, batches, progress)


def _quantized_weights(candidates: Sequence[fx.Node], modules: dict[str, nn.Module], config: QuantConfig,
                       given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer name: its quantized weight}: the given one, else the nearest rounding on config's grid."""
    names = {f"{node.target}.weight" for node in candidates}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"quantized_weights names no weight that bias correction corrects: {unknown}")
    quantized = {}
    for node in candidates:
        layer = modules[node.target]
        weight = given.get(f"{node.target}.weight")
        if weight is not None and weight.shape != layer.weight.shape:
            raise ValueError(f"quantized_weights[{node.target + '.weight'!r}] has shape {tuple(weight.shape)}, "
                             f"the layer's weight {tuple(layer.weight.shape)}")
        quantized[node.target] = (quantize_weight(layer, config) if weight is None
                                  else weight.detach().to(layer.weight))
    return quantized


def _check_analytical_arguments(bn_map: object, batches: object) -> None:
    if batches is not None:
        raise ValueError("batches are only used by method='empirical'; drop them or choose method='empirical'")
    if not isinstance(bn_map, Mapping):
        raise TypeError(
            "method='analytical' needs bn_map={layer: bn}; build it from fold_all_batch_norms' pairs: "
            "{layer: bn for layer, bn in pairs if isinstance(bn, clebench.layers.BN_TYPES)}"
        )
    wrong = sorted({type(bn).__name__ for bn in bn_map.values() if not isinstance(bn, layers.BN_TYPES)})
    if wrong:
        raise TypeError(f"bn_map values must be the folded BatchNorm modules, got {wrong}")


def _subtract(layer: nn.Module, shift: torch.Tensor) -> None:
    with torch.no_grad():
        layers.ensure_bias(layer).sub_(shift.to(layer.weight.dtype))


# -- analytical -------------------------------------------------------------------------------------------------


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[nn.Module, fx.Node | None] | None:
    """(layer feeding `node`'s input, the one activation between them or None), if only identities lie between."""
    source, activation = node.args[0], None
    while isinstance(source, fx.Node):
        module = graph.module_of(source, modules)
        if layers.is_layer(module):
            return module, activation
        if ops.activation_kind(source, modules) is not None:
            if activation is not None:
                return None  # two nonlinearities: the input is no longer a clipped normal
            activation = source
        elif not ops.is_identity(source, modules):
            return None
        source = source.args[0]
    return None


def _pre_activation(
    producer: nn.Module, bn: nn.Module, infos: Sequence[ClsSetInfo]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [C] of the producer's output per channel, after the scaling and high-bias folding in `infos`."""
    weight = producer.weight.detach()
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    mean, std = beta.to(weight).clone(), gamma.to(weight).abs()
    for info in infos:
        for pair in info.cls_pair_info_list:
            if pair.layer1 is producer:
                scale = torch.as_tensor(np.asarray(pair.scale_factor)).to(weight)
                mean, std = mean / scale, std / scale
                if pair.absorbed_bias is not None:
                    mean = mean - pair.absorbed_bias.to(weight)
    return mean, std


def _activation_mean(mean: torch.Tensor, std: torch.Tensor, node: fx.Node | None, modules: dict[str, nn.Module]):
    """E[act(X)] per channel for X ~ N(mean, std^2); None if the activation is not one the formulas cover."""
    if node is None:
        return mean
    module = graph.module_of(node, modules)
    if isinstance(module, nn.PReLU):  # prelu(x) = max(x, 0) - a max(-x, 0)
        slope = module.weight.detach().to(mean)
        return relu_normal_mean(mean, std) - slope * relu_normal_mean(-mean, std)
    if ops.activation_kind(node, modules) == "relu6":
        if module is not None:
            upper = relu6_upper_bound(module)
        else:
            upper = functional_relu6_bound(node.target, node.args, node.kwargs)
        return clipped_normal_mean(mean, std, torch.as_tensor(upper).to(mean))
    if module is None and node.op == "call_function" and len(node.all_input_nodes) > 1:
        return None  # functional prelu: its slope is a graph input
    return relu_normal_mean(mean, std)


def _correct_analytical(candidates, modules, quantized, bn_map, infos) -> int:
    corrected, skipped = 0, []
    for node in candidates:
        layer = modules[node.target]
        found = _producer(node, modules)
        bn = bn_map.get(found[0]) if found is not None else None
        if bn is None or bn.num_features != layers.in_channels(layer):
            skipped.append(node.target)
            continue
        mean, std = _pre_activation(found[0], bn, infos)
        input_mean = _activation_mean(mean, std, found[1], modules)
        if input_mean is None:
            skipped.append(node.target)
            continue
        error = quantized[node.target] - layer.weight.detach()
        _subtract(layer, layers.constant_input_response(layer, input_mean, weight=error))
        corrected += 1
    if skipped:
        logger.info("analytical bias correction skips %d layers (no BN-folded producer): %s", len(skipped), skipped)
    return corrected


# -- empirical --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a forward pre-hook once the layer under correction has its input: the rest is not needed."""


def _layer_input(model: nn.Module, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The input `layer` receives when `model` runs on `inputs` (None if the layer is not reached)."""
    captured = []

    def hook(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(*inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def _output_error(layer: nn.Module, quantized: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over batch and positions of y_q - y per output channel [out], number of positions summed)."""
    error = functional_call(layer, {"weight": quantized}, (x,)) - layer(x)
    axis = error.dim() - 1 if isinstance(layer, nn.Linear) else 1
    per_channel = error.movedim(axis, -1).reshape(-1, error.shape[axis])
    return per_channel.double().sum(0), per_channel.shape[0]


def _correct_empirical(model, candidates, modules, quantized, batches, progress) -> int:
    inputs = [batch_inputs(batch) for batch in batches]
    if not inputs:
        raise ValueError("method='empirical' got no batches: pass a non-empty iterable of calibration batches")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else inputs[0][0].device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for node in tqdm(candidates, desc="bias correction", unit="layer", disable=not progress):
                layer = modules[node.target]
                total, count = 0.0, 0
                for batch in inputs:
                    x = _layer_input(model, layer, tuple(t.to(device) for t in batch))
                    if x is not None:
                        error, positions = _output_error(layer, quantized[node.target], x)
                        total, count = total + error, count + positions
                if count == 0:
                    raise ValueError(f"layer {node.target!r} is not reached by the calibration batches")
                _subtract(layer, total / count)
    finally:
        model.train(was_training)
    return len(candidates)
