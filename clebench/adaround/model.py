"""AdaRound over a whole model: every conv / linear layer in forward order, each from cached inputs and targets.

Which data each layer learns from (as AIMET 2.42 does it, read from its source): its input comes from the model
with the weights of the layers before it quantized (AdaRounded) and activations in float; its target is the
FP32 model's output of the same layer, both passed through the activation that directly follows the layer.
Both models run once, node by node over an fx trace, on all calibration batches: when the walk reaches a layer,
its input and target batches are at hand, the layer is optimized, and the walk goes on with the rounded weight,
so each model costs one forward pass in all (AIMET runs both models up to each layer again, per layer).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import fx, nn
from tqdm import tqdm

from clebench import graph, layers, ops
from clebench.adaround.layer import AdaroundError, AdaroundSettings, optimize_layer
from clebench.quant.config import QuantConfig
from clebench.quant.encoding import Encoding, weight_encoding

Inputs = tuple[torch.Tensor, ...]
logger = logging.getLogger(__name__)


def apply_adaround_to_model(
    model: nn.Module,
    config: QuantConfig,
    batches: Sequence[Inputs],
    settings: AdaroundSettings = AdaroundSettings(),
    *,
    layer_configs: Mapping[str, QuantConfig] | None = None,
    skip: Collection[str] = (),
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Encoding]]:
    """AdaRound every conv / linear weight of `model` (not modified); return (a rounded copy, its weight encodings).

    config: the weight grid (weight_bits, per_channel, weight_symmetric, aimet_rules); each layer's encoding is
        `weight_encoding(layer, config)` of its FP32 weight, the one a QuantSim of the FP32 model would use, and
        the rounded weight lies on it. Freeze these encodings in the QuantSim of the rounded model
        (`QuantSim.freeze_param_encodings`): recomputed from the rounded weight, the range could shrink.
    batches: the calibration data, each a tuple of model input tensors (dim 0: samples).
    layer_configs: {layer name: config} overrides (e.g. another weight_bits). skip: layer names left in FP32.
    Returns ({"<layer>.weight": Encoding} for the rounded layers). Layers called at several places are left in FP32.
    This is the function a sweep step calls; `Adaround.apply_adaround` is AIMET's API around it.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a clebench.quant.QuantConfig, got {type(config).__name__}")
    if not isinstance(settings, AdaroundSettings):
        raise TypeError(f"settings must be an AdaroundSettings, got {type(settings).__name__}")
    batches = [tuple(batch) for batch in batches]
    if not batches:
        raise AdaroundError("AdaRound got no calibration batches: pass at least one batch of model inputs")
    rounded = copy.deepcopy(graph.unwrap(model)).eval()
    fp32_graph, rounded_graph = graph.trace(graph.unwrap(model)), graph.trace(rounded)
    targets = _layers_to_round(rounded_graph, set(skip))
    unknown = sorted(set(layer_configs or {}) - {node.target for node in targets})
    if unknown:
        raise AdaroundError(f"layer_configs names no layer AdaRound rounds: {unknown}")
    generator = torch.Generator().manual_seed(settings.seed)
    encodings: dict[str, Encoding] = {}
    bar = tqdm(total=len(targets), desc="AdaRound", unit="layer", disable=not progress)

    def round_layer(node: fx.Node, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        layer = rounded_graph.get_submodule(node.target)
        encoding = weight_encoding(layer, (layer_configs or {}).get(node.target, config))
        activation = _following_activation(node, dict(rounded_graph.named_modules()))
        target = torch.cat(outputs)
        if activation is not None:
            target = activation(target)
        rounding = optimize_layer(layer, encoding, torch.cat(inputs), target, activation, settings, generator)
        with torch.no_grad():
            layer.weight.copy_(rounding.hard())
        encodings[f"{node.target}.weight"] = encoding
        bar.update()

    was_training = model.training
    model.eval()
    try:
        _walk(fp32_graph, rounded_graph, batches, {node.name for node in targets}, round_layer)
    finally:
        model.train(was_training)
        bar.close()
    return rounded, encodings


def _layers_to_round(gm: fx.GraphModule, skip: set[str]) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    nodes = [node for node in gm.graph.nodes if layers.is_layer(graph.module_of(node, modules))]
    if not nodes:
        raise AdaroundError(f"{type(gm).__name__} has no conv / linear layer for AdaRound to round")
    unknown = sorted(skip - {node.target for node in nodes})
    if unknown:
        raise AdaroundError(f"layers to skip that are not conv / linear layers of the model: {unknown}")
    sites = graph.call_sites(gm)
    shared = sorted({node.target for node in nodes if sites[node.target] > 1})
    if shared:
        logger.info("AdaRound leaves layers called at several places in FP32: %s", shared)
    return [node for node in nodes if node.target not in skip and sites[node.target] == 1]


def _following_activation(node: fx.Node, modules: dict[str, nn.Module]) -> Callable | None:
    """The ReLU / ReLU6-like activation that consumes the layer output (through identities only), as a callable."""
    current = node
    while (user := graph.sole_user(current)) is not None:
        if ops.activation_kind(user, modules) is not None:
            if any(source is not current for source in user.all_input_nodes):
                return None  # e.g. a functional prelu, whose weight is another graph value
            args, kwargs = user.args[1:], user.kwargs
            if user.op == "call_module":
                return modules[user.target]
            if user.op == "call_function":
                return lambda y: user.target(y, *args, **kwargs)
            return lambda y: getattr(y, user.target)(*args, **kwargs)
        if not ops.is_identity(user, modules):
            return None
        current = user
    return None


def _walk(fp32: fx.GraphModule, rounded: fx.GraphModule, batches: list[Inputs], names: set[str],
          round_layer: Callable[[fx.Node, list[torch.Tensor], list[torch.Tensor]], None]) -> None:
    """Run both graphs node by node on every batch; call round_layer(node, x_q batches, FP32 output batches) for
    each layer in `names` before the rounded graph computes that node. Values are freed after their last use."""
    last_use = {}
    for index, node in enumerate(rounded.graph.nodes):
        for source in node.all_input_nodes:
            last_use[source.name] = index
    placeholders = [node.name for node in rounded.graph.nodes if node.op == "placeholder"]
    if len(placeholders) > min(len(batch) for batch in batches):
        raise AdaroundError(f"the model takes {len(placeholders)} inputs {placeholders}, but a batch holds fewer tensors")
    device = next((p.device for p in rounded.parameters()), torch.device("cpu"))
    fp32_env: dict[str, list] = {}
    rounded_env: dict[str, list] = {}
    with torch.no_grad():
        for index, (fp32_node, node) in enumerate(zip(fp32.graph.nodes, rounded.graph.nodes)):
            if node.op == "output":
                break
            if node.op == "placeholder":
                position = placeholders.index(node.name)
                fp32_env[node.name] = rounded_env[node.name] = [batch[position].to(device) for batch in batches]
                continue
            fp32_env[node.name] = [_run(fp32, fp32_node, fp32_env, b) for b in range(len(batches))]
            if node.name in names:
                round_layer(node, rounded_env[node.args[0].name], fp32_env[node.name])
                names = names - {node.name}
                if not names:
                    return  # nothing after the last layer to round is needed
            rounded_env[node.name] = [_run(rounded, node, rounded_env, b) for b in range(len(batches))]
            for env in (fp32_env, rounded_env):
                for name in [name for name in env if last_use.get(name, -1) <= index]:
                    del env[name]


def _run(gm: fx.GraphModule, node: fx.Node, env: dict[str, list], b: int) -> object:
    """The value of (non-placeholder) `node` for batch number b, its inputs taken from env."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n.name][b])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    value = gm  # get_attr
    for part in node.target.split("."):
        value = getattr(value, part)
    return value
