"""What cross-layer equalization did, per CLS set, and which layers it left alone and why.

`cls_set_rows`: one row per scaled set (the columns of cle_sets.csv but model / steps): its layers, the scale factors
(min / median / max over channels; S12 and S23 together for a triple), each layer's weight range ratio
max_c r_c / min_c r_c before and after (clebench.ranges.range_ratio), the growth of the per-channel activation
ranges that feed the set's second (and third) layer on calibration data, and the bias high-bias folding absorbed.

`region_rows`: one row per region of region equalization (clebench.region_equalization): its source and sink
layers, its channels and its final scale (min / median / max over channels).

`changed_layers`: how many conv / linear layers a step changed (the sweep's step_costs.csv).

`skipped_layers`: every conv / linear layer in no set, with the reason, found by walking the same predicates
`clebench.graph.find_cls_chains` walks (sole_user, is_scalable, ops.activation_kind, ops.is_identity), so a layer has no
output-side reason exactly when the discovery found a hop out of it (tested on the zoo models).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import fx, nn

from clebench import graph, layers, ops, ranges
from clebench.cross_layer_equalization import ClsSetInfo
from clebench.region_equalization import Region
from clebench.quant.sim import batch_inputs

CLE_SET_COLUMNS = [
    "set", "layers", "channels", "scale_min", "scale_median", "scale_max",
    "weight_range_ratios_before", "weight_range_ratios_after",
    "act_range_growth_median", "act_range_growth_max", "act_tensor_range_growth",
    "hbf", "hbf_channels", "absorbed_bias_max",
]  # fmt: skip
REGION_COLUMNS = ["region", "sources", "sinks", "channels", "scale_min", "scale_median", "scale_max"]
SKIPPED_COLUMNS = ["layer", "kind", "reason", "output_side", "input_side"]
SKIP_REASONS = {
    "not_scalable": "a grouped (not depthwise) conv: CLS cannot scale it",
    "shared": "called at several places or weights tied to another module: scaling would change the other uses",
    "depthwise_chain_end": "its chain ends at a depthwise conv, which has no next layer to absorb its scale",
    "relu6_chain_end": "a ReLU6 kept as a chain end (relu6 policy 'keep')",
    "activation": "an activation CLS does not scale across (not positive-homogeneous)",
    "branch": "a tensor with several consumers (a branch)",
    "merge": "an op with several data inputs (add, concat, ...)",
    "other_op": "an op that is not channel-wise (pooling, flatten, ...)",
    "next_not_scalable": "the next layer is a grouped (not depthwise) conv",
    "next_shared": "the next layer is called at several places or has tied weights",
    "linear_after_conv": "a Linear reads a conv's output (its channels are mixed with space)",
    "channel_mismatch": "the next layer's input channels differ from this layer's output channels",
    "model_input": "the model input",
    "model_output": "the model output",
}
HBF_STATES = ("not run", "folded", "nothing to absorb", "no folded BN", "no bias")


def _fraction_text(values: Iterable[float]) -> str:
    return " / ".join(f"{v:.3g}" for v in values)


def _node_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    module = graph.module_of(node, modules)
    if module is not None:
        return f"{type(module).__name__} {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _stop(code: str, node: fx.Node | None, modules: dict[str, nn.Module]) -> tuple[str, str]:
    where = f" at {_node_label(node, modules)}" if node is not None else ""
    return code, f"{SKIP_REASONS[code]}{where}"


def _walk_out(node: fx.Node, modules: dict[str, nn.Module], single_use: set[str], relu6: str) -> tuple[str, str] | None:
    """Why no CLS hop leaves the layer call `node`; None when `graph._next_hop` finds one (same steps, same tests)."""
    layer = modules[node.target]
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return _stop("branch", current, modules) if users else _stop("model_output", None, modules)
        (user,) = users
        if user.op == "output":
            return _stop("model_output", None, modules)
        if graph.sole_user(current) is None:
            return _stop("merge", user, modules)
        candidate = graph.module_of(user, modules)
        if layers.is_layer(candidate):
            if not graph.is_scalable(candidate):
                return _stop("next_not_scalable", user, modules)
            if user.target not in single_use:
                return _stop("next_shared", user, modules)
            if isinstance(layer, nn.Linear) != isinstance(candidate, nn.Linear):
                return _stop("linear_after_conv", user, modules)
            if layers.in_channels(candidate) != layers.out_channels(layer):
                return _stop("channel_mismatch", user, modules)
            return None
        kind = ops.activation_kind(user, modules)
        if kind == "relu6" and relu6 != "clip":
            return _stop("relu6_chain_end", user, modules)
        if kind is None and not ops.is_identity(user, modules):
            return _stop("activation" if _is_activation(user, modules) else "other_op", user, modules)
        current = user


def _walk_in(node: fx.Node, modules: dict[str, nn.Module], single_use: set[str], relu6: str) -> tuple[str, str]:
    """Why no CLS hop enters the layer call `node` (called only where none does)."""
    current = node
    while True:
        data = [n for n in current.all_input_nodes if n.op != "get_attr"]
        if len(data) != 1:
            return _stop("merge", current, modules)
        (source,) = data
        if source.op == "placeholder":
            return _stop("model_input", None, modules)
        if len(source.users) > 1:
            return _stop("branch", source, modules)
        module = graph.module_of(source, modules)
        if layers.is_layer(module):
            if not graph.is_scalable(module):
                return _stop("not_scalable", source, modules)
            if source.target not in single_use:
                return _stop("shared", source, modules)
            return _walk_out(source, modules, single_use, relu6) or _stop("depthwise_chain_end", source, modules)
        kind = ops.activation_kind(source, modules)
        if kind == "relu6" and relu6 != "clip":
            return _stop("relu6_chain_end", source, modules)
        if kind is None and not ops.is_identity(source, modules):
            multi = len([n for n in source.all_input_nodes if n.op != "get_attr"]) > 1
            return _stop("merge" if multi else "activation" if _is_activation(source, modules) else "other_op", source, modules)
        current = source


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An activation of the op table that CLS does not scale across (Hardswish, SiLU, a clip not from 0 ...)."""
    return ops.role(node, modules) == "activation"


def skipped_layers(model: nn.Module, relu6: str, scaled: Iterable[str]) -> pd.DataFrame:
    """Every conv / linear layer of `model` (before CLS) not in `scaled` (names of the layers of the scaled sets),
    in graph order, with SKIPPED_COLUMNS: reason (a SKIP_REASONS key: why no set starts at it, else why none ends
    at it), output_side / input_side (what ends a chain on each side of it, in words; empty where one continues).

    relu6: the policy `CrossLayerScaling.scale_model` ran with ('keep' or 'clip').
    """
    gm = graph.trace(model)
    modules = dict(gm.named_modules())
    single_use = graph.single_use_modules(gm)
    scaled, rows, seen = set(scaled), [], set()
    hop_targets = {hop.next_layer for chain in graph.find_cls_chains(gm, relu6) for hop in chain}
    for node in gm.graph.nodes:
        layer = graph.module_of(node, modules)
        if not layers.is_layer(layer) or node.target in scaled or node.target in seen:
            continue
        seen.add(node.target)
        if not graph.is_scalable(layer):
            reason, out_side, in_side = "not_scalable", "", ""
        elif node.target not in single_use:
            reason, out_side, in_side = "shared", "", ""
        else:
            out_stop = _walk_out(node, modules, single_use, relu6)
            in_stop = None if node.target in hop_targets else _walk_in(node, modules, single_use, relu6)
            out_side, in_side = (stop[1] if stop else "" for stop in (out_stop, in_stop))
            if out_stop is None or in_stop is None:  # on a chain, but in none of its sets
                reason = "depthwise_chain_end"
            else:
                reason = out_stop[0]
        rows.append({"layer": node.target, "kind": ranges.layer_kind(layer), "reason": reason,
                     "output_side": out_side, "input_side": in_side})
    return pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


def channel_ranges_at(model: nn.Module, layer_names: Sequence[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """{layer: per-channel range (max - min) of its input over `batches`}, shape [C_in] each (channel axis 1, or -1
    for a Linear), from eval-mode FP32 forward passes."""
    return {name: high - low for name, (low, high) in channel_extrema_at(model, layer_names, batches).items()}


def channel_extrema_at(model: nn.Module, layer_names: Sequence[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """{layer: per-channel (min, max) of its input over `batches`}, shape [2, C_in] each (row 0 the minima; channel
    axis 1, or -1 for a Linear), from eval-mode FP32 forward passes."""
    wanted = set(layer_names)
    found: dict[str, torch.Tensor] = {}

    def hook(name: str, linear: bool):
        def record(module, args) -> None:
            x = args[0].detach()
            axis = x.dim() - 1 if linear else 1
            flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
            low, high = flat.amin(dim=1), flat.amax(dim=1)
            if name in found:
                low, high = torch.minimum(low, found[name][0]), torch.maximum(high, found[name][1])
            found[name] = torch.stack([low, high])

        return record

    handles = [module.register_forward_pre_hook(hook(name, isinstance(module, nn.Linear)))
               for name, module in model.named_modules() if name in wanted]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in batches:
                model(*(x.to(device) for x in batch_inputs(batch)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: value.cpu() for name, value in found.items()}


def _set_layer_names(info: ClsSetInfo, names: dict[int, str]) -> list[str]:
    pairs = info.cls_pair_info_list
    return [names[id(pairs[0].layer1)]] + [names[id(pair.layer2)] for pair in pairs]


def _hbf_state(info: ClsSetInfo, bn_map: dict[nn.Module, nn.Module], hbf_ran: bool) -> str:
    if not hbf_ran:
        return "not run"
    absorbed = [pair.absorbed_bias for pair in info.cls_pair_info_list if pair.absorbed_bias is not None]
    if absorbed:
        return "folded" if any(bool(a.any()) for a in absorbed) else "nothing to absorb"
    first = info.cls_pair_info_list[0]
    return "no folded BN" if first.layer1 not in bn_map else "no bias"


def _growth(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """after / before per channel, over the channels with a non-zero range before (dead channels have none)."""
    live = before > 0
    return (after[live] / before[live]).double()


def cls_set_rows(infos: Sequence[ClsSetInfo], before: nn.Module, after: nn.Module, calibration: Sequence,
                 bn_map: dict[nn.Module, nn.Module], hbf_ran: bool) -> pd.DataFrame:
    """One row per set of `infos` (made by scaling `before` into `after`, whose modules the infos hold), with
    CLE_SET_COLUMNS. Activation ranges: per channel of each activation inside the set (the input of its second and
    third layer), over the (inputs, labels) `calibration` batches, before and after: act_range_growth_median / _max
    over those channels of after / before (a ratio; 1 means unchanged) and act_tensor_range_growth, the growth of the
    widest channel's range (what a per-tensor activation quantizer's grid follows)."""
    names = {id(module): name for name, module in after.named_modules()}
    before_modules = dict(before.named_modules())
    sets = [_set_layer_names(info, names) for info in infos]
    inner = sorted({name for set_names in sets for name in set_names[1:]})
    ranges_before = channel_ranges_at(before, inner, calibration)
    ranges_after = channel_ranges_at(after, inner, calibration)
    rows = []
    for index, (info, set_names) in enumerate(zip(infos, sets)):
        scales = np.concatenate([np.asarray(pair.scale_factor, dtype=np.float64).ravel() for pair in info.cls_pair_info_list])
        growth = torch.cat([_growth(ranges_before[n], ranges_after[n]) for n in set_names[1:]])
        tensor_growth = max(ranges_after[n].max().item() / max(ranges_before[n].max().item(), 1e-30) for n in set_names[1:])
        absorbed = [pair.absorbed_bias for pair in info.cls_pair_info_list if pair.absorbed_bias is not None]
        rows.append({
            "set": index,
            "layers": " → ".join(set_names),
            "channels": len(info.cls_pair_info_list[0].scale_factor),
            "scale_min": scales.min(), "scale_median": float(np.median(scales)), "scale_max": scales.max(),
            "weight_range_ratios_before": _fraction_text(_range_ratio(before_modules[n]) for n in set_names),
            "weight_range_ratios_after": _fraction_text(_range_ratio(after.get_submodule(n)) for n in set_names),
            "act_range_growth_median": growth.quantile(0.5).item() if growth.numel() else float("nan"),
            "act_range_growth_max": growth.max().item() if growth.numel() else float("nan"),
            "act_tensor_range_growth": tensor_growth,
            "hbf": _hbf_state(info, bn_map, hbf_ran),
            "hbf_channels": int(sum(int((a > 0).sum()) for a in absorbed)),
            "absorbed_bias_max": max((a.max().item() for a in absorbed), default=0.0),
        })
    return pd.DataFrame(rows, columns=CLE_SET_COLUMNS)


def _range_ratio(layer: nn.Module) -> float:
    return ranges.range_ratio(ranges.output_channel_rows(layer).abs().amax(dim=1))


def changed_layers(before: nn.Module, after: nn.Module) -> int:
    """How many conv / linear layers of `after` hold another weight or bias than the layer of that name in `before`
    (a layer `before` lacks counts as changed)."""
    previous = dict(ranges.named_layers(before))
    return sum(1 for name, layer in ranges.named_layers(after)
               if name not in previous or not _same_parameters(previous[name], layer))


def _same_parameters(first: nn.Module, second: nn.Module) -> bool:
    pairs = [(first.weight, second.weight), (first.bias, second.bias)]
    return all((a is None) == (b is None) and (a is None or (a.shape == b.shape and torch.equal(a, b))) for a, b in pairs)


def region_rows(regions: Sequence[Region]) -> pd.DataFrame:
    """One row per region with REGION_COLUMNS: sources / sinks as ", "-joined layer names (graph order), the scale
    statistics over the region's channels (a source's output channel c was divided by the scale of channel c)."""
    rows = [{
        "region": index, "sources": ", ".join(region.sources), "sinks": ", ".join(region.sinks),
        "channels": region.channels, "scale_min": region.scale.min().item(),
        "scale_median": region.scale.quantile(0.5).item(), "scale_max": region.scale.max().item(),
    } for index, region in enumerate(regions)]
    return pd.DataFrame(rows, columns=REGION_COLUMNS)
