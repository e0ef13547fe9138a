"""Batch-norm folding (DFQ paper sec. 4 preliminaries; AIMET `aimet_torch.batch_norm_fold` API).

Backward fold, layer -> BN (always exact in eval mode), with sigma = sqrt(running_var + eps):
    W'[o] = W[o] * gamma[o] / sigma[o]
    b'[o] = beta[o] - (mu[o] - b[o]) * gamma[o] / sigma[o]
Forward fold, BN -> layer (exact only without padding, groups or transposition), with a = gamma / sigma and
c = beta - mu * a:
    W'[:, i] = W[:, i] * a[i]
    b'       = b + sum_{i, kernel} W[:, i, kernel] * c[i]
Each folded BN is replaced by nn.Identity; a BN with its own activation (timm's BatchNormAct2d) by that activation
(clebench.foreign_layers), and it folds backward only. A layer without bias gets one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clebench import foreign_layers, graph, layers
from clebench.layers import describe

LayerBnPair = tuple[nn.Module, nn.Module]


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) such that bn(x) = a * x + c per channel, in eval mode."""
    sigma = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(sigma)
    beta = bn.bias if bn.affine else torch.zeros_like(sigma)
    a = gamma.detach() / sigma
    return a, beta.detach() - bn.running_mean * a


def fold_backward(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn`, which consumes `layer`'s output, into `layer` (in place; `bn` is left untouched)."""
    a, c = _bn_affine(bn)
    with torch.no_grad():
        bias = layers.ensure_bias(layer)
        layers.scale_output_channels(layer, a)  # also multiplies the bias by a
        bias.add_(c)


def fold_forward(bn: nn.Module, layer: nn.Module) -> None:
    """Fold `bn`, whose output `layer` consumes, into `layer` (in place; `bn` is left untouched)."""
    a, c = _bn_affine(bn)
    with torch.no_grad():
        bias = layers.ensure_bias(layer)
        bias.add_(layers.constant_input_response(layer, c))  # the constant part c, before rescaling W
        layers.scale_input_channels(layer, a)


def _check_pair(
    first: nn.Module, second: nn.Module, folds: graph.BnFolds | None, names: dict[nn.Module, str]
) -> tuple[str, nn.Module, nn.Module]:
    """Validate one user-given pair; return ('backward' | 'forward', layer, bn)."""
    if layers.is_layer(first) and isinstance(second, layers.BN_TYPES):
        direction, layer, bn = "backward", first, second
        channels = layers.out_channels(layer)
    elif isinstance(first, layers.BN_TYPES) and layers.is_layer(second):
        direction, bn, layer = "forward", first, second
        channels = layers.in_channels(layer)
        if foreign_layers.is_norm_act(bn):
            raise ValueError(
                f"cannot fold {names.get(bn, describe(bn))} forward into {names.get(layer, describe(layer))}: its "
                f"activation ({type(bn.act).__name__}) sits between the BN and the layer"
            )
        if not graph.forward_foldable(layer):
            raise ValueError(
                f"cannot fold {names.get(bn, describe(bn))} forward into {names.get(layer, describe(layer))}: "
                "a BN folds exactly into a following layer only if it is an unpadded, ungrouped, non-transposed conv or a Linear"
            )
    else:
        raise TypeError(
            f"a fold pair is (layer, bn) or (bn, layer) with layer one of "
            f"{[t.__name__ for t in layers.LAYER_TYPES]} and bn a BatchNorm; got ({describe(first)}, {describe(second)})"
        )
    for module in (layer, bn):
        if module not in names:
            raise ValueError(f"{describe(module)} given in a fold pair is not a submodule of the model")
    if bn.num_features != channels or bn.running_mean is None:
        raise ValueError(
            f"{names.get(bn, describe(bn))} does not match {names.get(layer, describe(layer))}: "
            f"{bn.num_features} BN features vs {channels} layer channels (or the BN keeps no running statistics)"
        )
    if folds is not None:
        key = (names[layer], names[bn]) if direction == "backward" else (names[bn], names[layer])
        if key not in (folds.backward if direction == "backward" else folds.forward):
            order = "follow" if direction == "backward" else "precede"
            raise ValueError(f"{names[bn]} does not directly {order} {names[layer]} (alone) in the model graph; cannot fold it")
    return direction, layer, bn


def fold_given_batch_norms(model: nn.Module, layer_pairs: Sequence[LayerBnPair]) -> None:
    """Fold user-given pairs: (layer, bn) folds backward, (bn, layer) folds forward; each BN becomes nn.Identity.

    Every pair is validated before anything changes, so on an error the model is left as it was. Where the model
    can be traced, each pair is also checked against the graph (the BN must be the layer's sole consumer or input).
    """
    model = graph.unwrap(model)
    names = {module: name for name, module in model.named_modules()}
    try:
        folds = graph.find_bn_folds(graph.trace(model))
    except graph.UntraceableModelError:
        folds = None  # manual mode works without a graph; only the layer/BN shapes are checked
    checked = [_check_pair(first, second, folds, names) for first, second in layer_pairs]
    _apply(model, checked, names)


def _apply(model: nn.Module, checked: list[tuple[str, nn.Module, nn.Module]], names: dict[nn.Module, str]) -> None:
    for _, _, bn in checked:  # all checks first, so an error leaves the model unchanged
        degenerate = int((bn.running_var + bn.eps <= 0).sum())
        if degenerate:
            raise ValueError(
                f"cannot fold {names[bn]}: running_var + eps <= 0 in {degenerate} channel(s), so the BN divides by zero; "
                "give the BN a positive eps or fix its statistics"
            )
    for direction, layer, bn in checked:
        if direction == "backward":
            fold_backward(layer, bn)
        else:
            fold_forward(bn, layer)
        graph.set_submodule(model, names[bn], foreign_layers.folded_replacement(bn))


def fold_all_batch_norms(
    model: nn.Module,
    input_shapes: tuple | Sequence[tuple] | None = None,
    dummy_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> list[LayerBnPair]:
    """Find every foldable BN from the model graph and fold it in place (backward folds first).

    Returns the folded pairs in graph order: (layer, bn) for backward folds -- the {layer: bn} map high-bias
    folding and bias correction need -- and (bn, layer) for forward folds. `input_shapes` / `dummy_input` are
    accepted for AIMET compatibility; the fx trace is symbolic and needs neither.
    """
    _check_inputs(input_shapes, dummy_input)
    model = graph.unwrap(model)
    gm = graph.trace(model)
    folds = graph.find_bn_folds(gm)
    modules = dict(gm.named_modules())
    folds = _drop_linear_folds_on_sequences(gm, folds, modules, input_shapes, dummy_input)
    names = {module: name for name, module in modules.items()}
    checked = [("backward", modules[layer], modules[bn]) for layer, bn in folds.backward]
    checked += [("forward", modules[layer], modules[bn]) for bn, layer in folds.forward]
    _apply(model, checked, names)  # gm's leaves are model's modules, under the same names
    return [(modules[layer], modules[bn]) for layer, bn in folds.backward] + [
        (modules[bn], modules[layer]) for bn, layer in folds.forward
    ]


def _drop_linear_folds_on_sequences(gm, folds: graph.BnFolds, modules, input_shapes, dummy_input) -> graph.BnFolds:
    """Keep Linear <-> BatchNorm1d folds only where the tensor between them is [N, C].

    On [N, L, C] inputs a Linear acts on the last axis but BatchNorm1d on axis 1, so folding would be wrong. The
    rank is known only from an example input; without one, [N, C] is assumed (the classifier-head case).
    """
    linear_pairs = [pair for pair in folds.backward + folds.forward if any(isinstance(modules[n], nn.Linear) for n in pair)]
    if not linear_pairs or (dummy_input is None and input_shapes is None):
        return folds
    ranks = graph.output_ranks(gm, _example_inputs(gm, input_shapes, dummy_input))
    bn_names = {name for pair in linear_pairs for name in pair if isinstance(modules[name], layers.BN_TYPES)}
    wrong = {name for name in bn_names if ranks.get(name) != 2}
    keep = lambda pair: not (set(pair) & wrong)  # noqa: E731
    return graph.BnFolds([p for p in folds.backward if keep(p)], [p for p in folds.forward if keep(p)])


def _example_inputs(gm, input_shapes, dummy_input) -> tuple[torch.Tensor, ...]:
    if dummy_input is not None:
        return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    device = next(gm.parameters()).device
    shapes = [input_shapes] if isinstance(input_shapes[0], int) else list(input_shapes)
    return tuple(torch.randn(*shape, device=device) for shape in shapes)


def backward_fold_map(folded_pairs: Sequence[LayerBnPair]) -> dict[nn.Module, nn.Module]:
    """{layer: bn} of the backward folds among `fold_all_batch_norms`' pairs: what HBF and bias correction need."""
    return {layer: bn for layer, bn in folded_pairs if isinstance(bn, layers.BN_TYPES)}


def _check_inputs(input_shapes, dummy_input) -> None:
    """Reject malformed AIMET-style input descriptions early, with a clear message."""
    if dummy_input is not None or input_shapes is None:
        return
    shapes = [input_shapes] if input_shapes and isinstance(input_shapes[0], int) else list(input_shapes)
    for shape in shapes:
        if not (isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise ValueError(f"input_shapes must be a shape such as (1, 3, 224, 224) or a list of shapes; got {input_shapes!r}")
