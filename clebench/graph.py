"""Graph discovery with torch.fx: which layers feed which BN, activation and layer.

Everything that needs the model's data flow -- BN fold pairs, cross-layer-scaling chains, quantizer
placement -- reads it from one `torch.fx` trace made here. Layers, BNs and activations are fx leaves
(also subclasses such as a "same-padding" Conv2d), so each call site of a module is one graph node, and
a module instance reused at several places in `forward` shows up once per place.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from clebench import foreign_layers, layers, ops
from clebench.errors import UserError

Relu6Policy = Literal["replace", "keep", "clip"]
RELU6_POLICIES: tuple[str, ...] = ("replace", "keep", "clip")


def check_relu6_policy(relu6: str) -> None:
    if relu6 not in RELU6_POLICIES:
        raise ValueError(f"relu6 policy must be one of {RELU6_POLICIES}, got {relu6!r}")


class UntraceableModelError(UserError):
    """torch.fx could not trace the model; auto mode needs a trace, manual mode does not."""


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ops.LEAF_TYPES) or super().is_leaf_module(module, qualified_name)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DataParallel / DistributedDataParallel wrapper (else the model itself)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def trace(model: nn.Module) -> fx.GraphModule:
    """An fx.GraphModule over the same module objects (editing a leaf edits `model`).

    A GraphModule is returned as it is, so graph edits on it stay in place. ForeignModuleError if a subclass of a
    torch layer or BatchNorm computes something else (clebench.foreign_layers).
    """
    model = unwrap(model)
    if isinstance(model, fx.GraphModule):
        return model
    foreign_layers.check_model(model)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # fx raises many types; all mean "not symbolically traceable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {first_line}). "
            "Auto mode needs a traceable model; use manual mode instead: "
            "batch_norm_fold.fold_given_batch_norms(model, [(conv, bn), ...]) and "
            "CrossLayerScaling.scale_cls_sets([(conv1, conv2), (conv, depthwise, conv), ...])."
        ) from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def call_sites(gm: fx.GraphModule) -> Counter:
    """How many graph nodes call each submodule (by qualified name)."""
    return Counter(node.target for node in gm.graph.nodes if node.op == "call_module")


def single_use_modules(gm: fx.GraphModule) -> set[str]:
    """Modules called at exactly one graph node whose parameters belong to no other module.

    Editing any other module (one reused at several call sites, or one with weights tied to another module's)
    would change more than the one place in the graph that an edit is meant for.
    """
    owners: dict[int, int] = Counter()
    for _, module in gm.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                owners[id(parameter)] += 1
    tied = {
        name
        for name, module in gm.named_modules()
        if any(p is not None and owners[id(p)] > 1 for p in module._parameters.values())
    }
    return {name for name, count in call_sites(gm).items() if count == 1 and name not in tied}


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _only_input(node: fx.Node) -> fx.Node | None:
    inputs = node.all_input_nodes
    if node.op == "call_function" and ops.activation_kind(node, {}) == "relu" and len(inputs) == 2:
        inputs = inputs[:1]  # F.prelu(x, weight): the weight is a get_attr node, not data
    return inputs[0] if len(inputs) == 1 else None


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that consumes `node` (and nothing else), else None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if _only_input(user) is node else None


def _matching_bn(layer: nn.Module, bn: nn.Module) -> bool:
    """A BatchNorm of the layer's dimensionality (Linear <-> BatchNorm1d) with running statistics."""
    if not isinstance(bn, layers.BN_TYPES) or bn.running_mean is None:
        return False
    spatial_dims = layer.weight.dim() - 2
    expected = nn.BatchNorm1d if isinstance(layer, nn.Linear) else layers.BN_TYPES[max(spatial_dims, 1) - 1]
    return type(bn) is expected or isinstance(bn, expected)


def forward_foldable(layer: nn.Module) -> bool:
    """BN -> layer folds exactly only into an ungrouped, unpadded, plain conv or a Linear."""
    plain_forwards = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
    if type(layer).forward not in plain_forwards:
        return False  # transposed convs, or subclasses that pad inside forward
    if isinstance(layer, nn.Linear):
        return True
    padding = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,)
    return layer.groups == 1 and all(p in (0, "valid") for p in padding)


@dataclass(frozen=True)
class BnFolds:
    """BN fold candidates by qualified module name, in graph order."""

    backward: list[tuple[str, str]]  # (layer, bn): layer -> BN
    forward: list[tuple[str, str]]  # (bn, layer): BN -> layer


def find_bn_folds(gm: fx.GraphModule) -> BnFolds:
    """Every layer whose sole consumer is a BN (backward), then every remaining BN consumed only by a layer.

    Modules called at more than one place are skipped: folding would change the other call sites too.
    """
    modules = dict(gm.named_modules())
    single_use = single_use_modules(gm)
    single = lambda node: node.op == "call_module" and node.target in single_use  # noqa: E731
    backward, folded = [], set()
    for node in gm.graph.nodes:
        layer = module_of(node, modules)
        if not (single(node) and layers.is_layer(layer)):
            continue
        user = sole_user(node)
        if user is not None and single(user) and _matching_bn(layer, modules.get(user.target)):
            if modules[user.target].num_features == layers.out_channels(layer):
                backward.append((node.target, user.target))
                folded.add(user.target)
    forward = []
    for node in gm.graph.nodes:
        bn = module_of(node, modules)
        if not (single(node) and isinstance(bn, layers.BN_TYPES)) or node.target in folded:
            continue
        if foreign_layers.is_norm_act(bn):
            continue  # its activation sits between the BN and the layer
        user = sole_user(node)
        layer = module_of(user, modules) if user is not None else None
        if layer is not None and single(user) and layers.is_layer(layer) and forward_foldable(layer):
            if _matching_bn(layer, bn) and bn.num_features == layers.in_channels(layer):
                forward.append((node.target, user.target))
    return BnFolds(backward, forward)


def is_scalable(layer: nn.Module | None) -> bool:
    """Layers CLS can scale: ungrouped convs / transposed convs / Linear, and depthwise convs."""
    if not layers.is_layer(layer):
        return False
    return layers.groups(layer) == 1 or layers.is_depthwise(layer)


@dataclass(frozen=True)
class Hop:
    """`layer` feeds `next_layer` through nothing but element-wise activations (and identities)."""

    layer: str
    next_layer: str
    activations: tuple[fx.Node, ...]


def _next_hop(node: fx.Node, modules: dict[str, nn.Module], single_use: set[str], relu6: Relu6Policy) -> Hop | None:
    layer = modules[node.target]
    activations = []
    current = node
    while (user := sole_user(current)) is not None:
        candidate = module_of(user, modules)
        if is_scalable(candidate):
            if user.target not in single_use or isinstance(layer, nn.Linear) != isinstance(candidate, nn.Linear):
                return None  # shared weights, or a Linear reading a conv's last (spatial) axis
            if layers.in_channels(candidate) != layers.out_channels(layer):
                return None
            return Hop(node.target, user.target, tuple(activations))
        kind = ops.activation_kind(user, modules)
        if kind == "relu" or (kind == "relu6" and relu6 == "clip"):
            activations.append(user)
        elif not ops.is_identity(user, modules):
            return None
        current = user
    return None


def find_cls_chains(gm: fx.GraphModule, relu6: Relu6Policy = "keep") -> list[list[Hop]]:
    """Maximal chains of scalable layers linked only by ReLU/PReLU (and ReLU6 when relu6 == 'clip').

    Anything else -- an add, a concat, pooling, a flatten, a tensor consumed twice -- ends a chain, so nothing
    is equalized across residual connections.
    """
    check_relu6_policy(relu6)
    modules = dict(gm.named_modules())
    single_use = single_use_modules(gm)
    hops: dict[str, Hop] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in single_use and is_scalable(modules[node.target]):
            hop = _next_hop(node, modules, single_use, relu6)
            if hop is not None:
                hops[hop.layer] = hop
    heads = set(hops) - {hop.next_layer for hop in hops.values()}
    chains = []
    for node in gm.graph.nodes:  # graph order makes the result deterministic
        if node.op == "call_module" and node.target in heads:
            chain, name = [], node.target
            while name in hops:
                chain.append(hops[name])
                name = hops[name].next_layer
            chains.append(chain)
    return chains


def chain_to_cls_sets(chain: list[Hop], modules: dict[str, nn.Module]) -> list[tuple[Hop, ...]]:
    """Split a chain into CLS sets as AIMET does: (conv, depthwise, conv) triples, otherwise pairs.

    Consecutive sets share a layer. A depthwise conv that ends a chain is left alone.
    """
    sets, i = [], 0
    while i < len(chain):
        if layers.is_depthwise(modules[chain[i].next_layer]):
            if i + 1 == len(chain):
                break
            sets.append((chain[i], chain[i + 1]))
            i += 2
        else:
            sets.append((chain[i],))
            i += 1
    return sets


def output_ranks(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Rank of each call_module node's output tensor (by module name), from one eval-mode forward pass."""
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            ranks[name] = output.dim()

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in gm.named_modules() if isinstance(module, ops.LEAF_TYPES)]
    was_training = gm.training
    try:
        with torch.no_grad():
            gm.eval()(*inputs)
    finally:
        gm.train(was_training)
        for hook in hooks:
            hook.remove()
    return ranks


def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at `qualified_name` (e.g. 'layer1.0.bn1')."""
    parent_name, _, attribute = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attribute, module)


def copy_leaves(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put every module that `gm`'s graph calls into `model` under the same name, where it was replaced on `gm`.

    `trace` shares leaf modules with the model, so in-place edits of a leaf reach both; replacing a leaf (a BN by
    Identity, a ReLU6 by a clip) changes only the hierarchy it is made on.
    """
    if gm is model:
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and model.get_submodule(node.target) is not gm.get_submodule(node.target):
            set_submodule(model, node.target, gm.get_submodule(node.target))


def prepare_model(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` in which every activation call site owns its own module.

    Functional ReLU / ReLU6 / hardtanh(0, m) calls become modules and activation modules reused at several
    places are duplicated, so that per-call-site edits (ReLU6 -> per-channel clip) can be made in place.
    Norm + activation modules (timm's BatchNormAct2d) become a BatchNorm node and activation nodes
    (foreign_layers.split_norm_acts). The FP32 function is unchanged; `model` itself is not modified.
    """
    gm = trace(foreign_layers.split_norm_acts(copy.deepcopy(unwrap(model))))
    modules = dict(gm.named_modules())
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        kind = ops.activation_kind(node, modules)
        if kind is None or node.op == "call_method":
            continue
        module = module_of(node, modules)
        if module is not None and node.target not in seen:
            seen.add(node.target)
            continue
        replacement = copy.deepcopy(module) if module is not None else _activation_module(node)
        if replacement is None:
            continue
        name = _free_name(gm, f"{node.target if module is not None else node.name}_site")
        gm.add_submodule(name, replacement)
        with gm.graph.inserting_after(node):
            new_node = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new_node)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _activation_module(node: fx.Node) -> nn.Module | None:
    """The module equivalent of a functional ReLU / ReLU6 / hardtanh(0, m) call, keeping its in-place flag."""
    inplace = node.target in (torch.relu_, F.hardtanh_) or bool(node.kwargs.get("inplace", False))
    if node.target in (torch.relu, torch.relu_, F.relu):
        inplace = inplace or (len(node.args) > 1 and bool(node.args[1]))
        return nn.ReLU(inplace=inplace)
    bound = ops.functional_relu6_bound(node.target, node.args, node.kwargs)
    if bound is None:
        return None  # functional PReLU keeps its weight node; leave it functional
    positional_inplace = {F.relu6: 1, F.hardtanh: 3}.get(node.target)
    if positional_inplace is not None and len(node.args) > positional_inplace:
        inplace = inplace or bool(node.args[positional_inplace])
    return nn.ReLU6(inplace=inplace) if bound == 6.0 else nn.Hardtanh(0.0, bound, inplace=inplace)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    names = dict(gm.named_modules())
    name, i = base, 0
    while name in names or hasattr(gm, name):
        i += 1
        name = f"{base}{i}"
    return name
