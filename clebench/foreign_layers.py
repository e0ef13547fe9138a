"""Subclasses of torch's conv, linear and BatchNorm classes that other libraries define (timm, EfficientNet ports).

A subclass whose `forward` is its torch base class's *is* the base class. One with a `forward` of its own would be
folded, scaled, quantized and exported as the base class, and the network silently changed (timm's BatchNormAct2d
applies its activation inside `forward`: folded as a BatchNorm, the activation went with it). So each is run once on
a probe input and must prove to compute one of:

    plain        the base class's output (a forward copied from torch's, as timm's norm layers have)
    padded_conv  the base conv on a zero-padded input: a fixed `static_padding` module (EfficientNet ports) or
                 TensorFlow's SAME padding (timm's Conv2dSame). BN folds backward into it and CLS scales it; the
                 exporter writes the pads; it never takes a forward fold (a fold's constant would meet the padding)
    norm_act     a BatchNorm, then its own `drop` and `act` submodules (timm's BatchNormAct2d). A backward fold
                 replaces it by its tail (`act`, with `drop` if it is not an identity), which CLE then treats as the
                 activation it is; `split_norm_acts` makes the BN and the tail separate graph nodes

Anything else raises ForeignModuleError naming the module, e.g. timm's StdConv2d, whose forward standardizes the
weight (a fold or a scale of that weight would be undone by it).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clebench import layers
from clebench.errors import UserError

__all__ = ["ForeignModuleError", "Kind", "kind", "check_model", "is_norm_act", "norm_act_tail", "folded_replacement",
           "split_norm_acts"]

Kind = Literal["plain", "padded_conv", "norm_act"]
_BASES = layers.LAYER_TYPES + layers.BN_TYPES
_PROBE_SEED = 0
_TOLERANCE = 1e-5  # relative to the output's largest magnitude: float32 kernels differ by reduction order only
_MAX_LISTED = 3
_kinds: weakref.WeakKeyDictionary[nn.Module, Kind | str] = weakref.WeakKeyDictionary()  # module -> kind or refusal


class ForeignModuleError(UserError):
    """A subclass of a conv / linear / BatchNorm class whose forward computes something clebench does not know."""


def torch_base(module: nn.Module) -> type | None:
    """The torch.nn class among LAYER_TYPES + BN_TYPES that `module` derives from (None: none of them)."""
    return next((base for base in _BASES if isinstance(module, base)), None)


def _has_own_forward(module: nn.Module) -> bool:
    base = torch_base(module)
    return base is not None and type(module).forward is not base.forward


def kind(module: nn.Module) -> Kind:
    """What `module` computes in eval mode (see the module docstring); ForeignModuleError if none of the kinds."""
    found = _classified(module)
    if found not in ("plain", "padded_conv", "norm_act"):
        raise ForeignModuleError(f"{type(module).__name__}: {found}")
    return found


def _classified(module: nn.Module) -> Kind | str:
    """The kind, or why the module is refused; probed once per module object."""
    if not _has_own_forward(module):
        return "plain"
    if module not in _kinds:
        _kinds[module] = _probe(module)
    return _kinds[module]


def check_model(model: nn.Module) -> None:
    """Raise ForeignModuleError naming the modules of `model` that clebench would treat wrongly, by class."""
    refused: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if _classified(module) not in ("plain", "padded_conv", "norm_act"):
            refused.setdefault(type(module).__name__, []).append(name)
    if refused:
        classes = "; ".join(f"{cls} ({len(names)}: {_listed(names)})" for cls, names in refused.items())
        first = model.get_submodule(next(iter(refused.values()))[0])
        raise ForeignModuleError(
            f"{type(model).__name__} has layers that subclass a torch class but compute something else: {classes}; "
            f"{_classified(first)}. clebench would fold, scale and quantize them as the torch class and change the "
            "network: replace them by torch modules that compute the same "
            "(clebench.utils.replace_modules_of_type1_with_type2), or leave the model out"
        )


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")


def is_norm_act(module: nn.Module) -> bool:
    return isinstance(module, layers.BN_TYPES) and _classified(module) == "norm_act"


def norm_act_tail(module: nn.Module) -> nn.Module:
    """What a norm_act module applies after its BatchNorm: `act`, preceded by `drop` unless that is an identity."""
    drop = getattr(module, "drop", None)
    if drop is None or _is_identity(drop):
        return module.act
    return nn.Sequential(OrderedDict(drop=drop, act=module.act))


def folded_replacement(bn: nn.Module) -> nn.Module:
    """The module that takes a BN's place once its affine map is folded into a layer."""
    return norm_act_tail(bn) if is_norm_act(bn) else nn.Identity()


def split_norm_acts(model: nn.Module) -> nn.Module:
    """Replace every norm_act module of `model` (in place) by Sequential(bn, [drop,] act) with a plain BatchNorm
    sharing its parameters and statistics; the network computes the same. Returns `model`."""
    for name, module in list(model.named_modules()):
        if name and is_norm_act(module):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attribute, _split(module))
    return model


def _split(module: nn.Module) -> nn.Sequential:
    bn = torch_base(module)(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                            track_running_stats=module.track_running_stats)
    bn.weight, bn.bias = module.weight, module.bias
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, buffer, getattr(module, buffer))
    bn.train(module.training)
    tail = norm_act_tail(module)
    parts = [("bn", bn), *(tail.named_children() if isinstance(tail, nn.Sequential) else [("act", tail)])]
    return nn.Sequential(OrderedDict(parts))


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.modules.dropout._DropoutNd) and not module.training)


# -- probing -------------------------------------------------------------------------------------------------------

def _probe(module: nn.Module) -> Kind | str:
    """Run `module` in eval mode on a random input and compare with what each kind would compute."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if isinstance(module, layers.BN_TYPES):
                return _probe_norm(module, generator)
            if isinstance(module, layers.CONV_TYPES):
                return _probe_conv(module, generator)
            if isinstance(module, nn.Linear):
                x = torch.randn(3, module.in_features, generator=generator, dtype=module.weight.dtype)
                return _match(module, x, {"plain": lambda: nn.Linear.forward(module, x)})
            return "its forward differs from torch's, and transposed convs are not probed"
    finally:
        module.train(was_training)


def _probe_norm(bn: nn.Module, generator: torch.Generator) -> Kind | str:
    spatial = {nn.BatchNorm1d: (), nn.BatchNorm2d: (5, 5), nn.BatchNorm3d: (3, 3, 3)}[torch_base(bn)]
    x = torch.randn(4, bn.num_features, *spatial, generator=generator, dtype=_dtype(bn))
    plain = lambda: torch_base(bn).forward(bn, x.clone())  # noqa: E731
    candidates = {"plain": plain}
    if isinstance(getattr(bn, "act", None), nn.Module):
        candidates["norm_act"] = lambda: norm_act_tail(bn)(plain())
    return _match(bn, x, candidates)


def _probe_conv(conv: nn.Module, generator: torch.Generator) -> Kind | str:
    """Two input sizes (odd and even) so that SAME padding, which depends on the size, is told from fixed pads."""
    base = torch_base(conv)
    reach = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    for extra in (3, 4):
        sizes = [r + s * extra for r, s in zip(reach, conv.stride)]
        x = torch.randn(2, conv.in_channels, *sizes, generator=generator, dtype=_dtype(conv))
        candidates = {"plain": lambda: base.forward(conv, x),
                      "padded_conv": lambda: base.forward(conv, _same_pad(conv, x))}
        static = getattr(conv, "static_padding", None)
        if isinstance(static, nn.Module):
            candidates["padded_conv"] = lambda: base.forward(conv, static(x))
        found = _match(conv, x, candidates)
        if found not in candidates:
            return found
    return found


def _same_pad(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x zero-padded as TensorFlow's SAME padding does it (the extra pixel at the end)."""
    pads = []
    for size, stride, kernel, dilation in zip(reversed(x.shape[2:]), reversed(conv.stride),
                                              reversed(conv.kernel_size), reversed(conv.dilation)):
        total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _match(module: nn.Module, x: torch.Tensor, candidates: dict) -> Kind | str:
    try:
        output = module(x.clone())
    except Exception as error:  # the module's own code: any failure means clebench cannot tell what it computes
        return f"its forward fails on a probe input {list(x.shape)} ({type(error).__name__}: {error})"
    for name, reference in candidates.items():
        try:
            expected = reference()
        except Exception:  # a candidate that cannot even run (e.g. pads larger than the probe) is not the one
            continue
        if expected.shape == output.shape and _close(output, expected):
            return name
    return f"its forward computes neither {' nor '.join(_describe(name) for name in candidates)}"


def _close(output: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = expected.abs().max().clamp_min(1e-12)
    return bool(((output - expected).abs().max() / scale) <= _TOLERANCE)


def _describe(kind_name: str) -> str:
    return {"plain": "the torch class's output", "padded_conv": "the torch conv on a zero-padded input",
            "norm_act": "its BatchNorm followed by its `act`"}[kind_name]


def _dtype(module: nn.Module) -> torch.dtype:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return torch.float32 if tensor is None or not tensor.is_floating_point() else tensor.dtype
