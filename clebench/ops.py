"""The op table: what every op clebench meets in a torch.fx graph (or an eager forward pass) is, in one place.

Graph discovery (which ops CLS may scale across), the simulator (where it quantizes), the exporter (how each op
lowers to ONNX) and the zoo-coverage reference all read this table; no other list of op kinds exists in the package.

Each op has a `role`:

    layer             conv / linear modules: weights quantized; output quantized, or fused into a following ReLU-like
    batch_norm        an unfolded BatchNorm: new values, quantized output
    activation        element-wise nonlinearity; `family` says what CLE and the sim make of it:
                        relu   positive-homogeneous per channel (ReLU, PReLU): CLS scales across it, the sim fuses it
                               with the layer / add before it
                        clip   ReLU6 / Hardtanh(0, m) / per-channel clip: fused like relu; CLS across it per policy
                        other  anything else (Hardswish, SiLU, GELU ...): ends a CLS chain, quantized on both sides
    identity          returns its input unchanged in eval mode (dropout, Identity, stochastic depth): CLS looks through
    value_preserving  every output value is an input value, moved (reshape, permute, getitem, chunk ...): no quantizer,
                      and the exporter runs it on the integer tensor
    compute           new float values (add, mul, mean, pooling, concat, LayerNorm, attention ...): quantized output
                      (max pooling too: it gets a quantizer of its own, as integer accelerators run it)
    shape             python values about shapes (size, dim, getattr .shape, int arithmetic, asserts): no tensor data

`name` is the op's lowering key: clebench.runtimes.lowerings registers one ONNX lowering per name.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from clebench import layers
from clebench.activations import ChannelClippedReLU

Role = Literal["layer", "batch_norm", "activation", "identity", "value_preserving", "compute", "shape"]
Family = Literal["relu", "clip", "other"]


@dataclass(frozen=True)
class Op:
    name: str  # lowering key (clebench.runtimes.lowerings)
    role: Role
    family: Family | None = None  # activations only


def _op(name: str, role: Role, family: Family | None = None) -> Op:
    return Op(name, role, family)


def _activation(name: str, family: Family = "other") -> Op:
    return Op(name, "activation", family)


IDENTITY = _op("identity", "identity")
RELU = _activation("relu", "relu")
CLIP = _activation("clip", "clip")  # ReLU6 / Hardtanh: family refined per node by `hardtanh_bounds`

# Module types, matched with isinstance in this order (subclasses such as a "same-padding" Conv2d match their base).
MODULE_OPS: tuple[tuple[tuple[type, ...], Op], ...] = (
    (layers.CONV_TYPES + layers.CONV_TRANSPOSE_TYPES, _op("conv", "layer")),
    ((nn.Linear,), _op("linear", "layer")),
    (layers.BN_TYPES, _op("batch_norm", "batch_norm")),
    ((nn.ReLU,), RELU),
    ((nn.PReLU,), _activation("prelu", "relu")),
    ((ChannelClippedReLU,), _activation("channel_clip", "clip")),
    ((nn.Hardtanh,), CLIP),  # nn.ReLU6 is a Hardtanh
    ((nn.Hardswish,), _activation("hardswish")),
    ((nn.Hardsigmoid,), _activation("hardsigmoid")),
    ((nn.SiLU,), _activation("silu")),
    ((nn.Sigmoid,), _activation("sigmoid")),
    ((nn.GELU,), _activation("gelu")),
    ((nn.Tanh,), _activation("tanh")),
    ((nn.LeakyReLU,), _activation("leaky_relu")),
    ((nn.ELU,), _activation("elu")),
    ((nn.Softmax,), _op("softmax", "compute")),
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), IDENTITY),
    ((torchvision.ops.StochasticDepth,), _op("stochastic_depth", "identity")),
    ((nn.Flatten,), _op("flatten", "value_preserving")),
    ((nn.Unflatten,), _op("reshape", "value_preserving")),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), _op("adaptive_avg_pool", "compute")),
    ((nn.AvgPool1d, nn.AvgPool2d), _op("avg_pool", "compute")),
    ((nn.MaxPool1d, nn.MaxPool2d), _op("max_pool", "compute")),  # quantized after, as a new tensor
    ((nn.LayerNorm,), _op("layer_norm", "compute")),
    ((nn.MultiheadAttention,), _op("multihead_attention", "compute")),
)

_RESHAPE = _op("reshape", "value_preserving")
FUNCTION_OPS: dict[object, Op] = {
    # activations
    F.relu: RELU, torch.relu: RELU, torch.relu_: RELU, torch.Tensor.relu: RELU, torch.Tensor.relu_: RELU,
    F.prelu: _activation("prelu", "relu"), torch.prelu: _activation("prelu", "relu"),
    F.relu6: CLIP, F.hardtanh: CLIP, F.hardtanh_: CLIP,
    F.hardswish: _activation("hardswish"), F.hardsigmoid: _activation("hardsigmoid"), F.silu: _activation("silu"),
    torch.sigmoid: _activation("sigmoid"), F.sigmoid: _activation("sigmoid"), F.gelu: _activation("gelu"),
    torch.tanh: _activation("tanh"), F.tanh: _activation("tanh"), F.leaky_relu: _activation("leaky_relu"),
    F.elu: _activation("elu"),
    # identities in eval mode
    F.dropout: IDENTITY, F.dropout1d: IDENTITY, F.dropout2d: IDENTITY, F.dropout3d: IDENTITY,
    F.alpha_dropout: IDENTITY, F.feature_alpha_dropout: IDENTITY, torch.dropout: IDENTITY,
    torch.detach: IDENTITY, torch.clone: IDENTITY,
    torchvision.ops.stochastic_depth: _op("stochastic_depth", "identity"),
    # values moved, not computed
    torch.flatten: _op("flatten", "value_preserving"), torch.reshape: _RESHAPE,
    operator.getitem: _op("getitem", "value_preserving"),
    torch.squeeze: _op("squeeze", "value_preserving"), torch.unsqueeze: _op("unsqueeze", "value_preserving"),
    torch.permute: _op("permute", "value_preserving"), torch.transpose: _op("transpose", "value_preserving"),
    torch.swapaxes: _op("transpose", "value_preserving"), torch.t: _op("transpose", "value_preserving"),
    torch.movedim: _op("movedim", "value_preserving"), torch.narrow: _op("narrow", "value_preserving"),
    torch.select: _op("select", "value_preserving"), torch.split: _op("split", "value_preserving"),
    torch.chunk: _op("chunk", "value_preserving"), torch.unbind: _op("unbind", "value_preserving"),
    F.pad: _op("pad", "compute"),  # zero padding keeps the grid (zero is on every grid), other values need not
    # new values
    operator.add: _op("add", "compute"), operator.iadd: _op("add", "compute"), torch.add: _op("add", "compute"),
    operator.sub: _op("sub", "compute"), operator.isub: _op("sub", "compute"), torch.sub: _op("sub", "compute"),
    operator.mul: _op("mul", "compute"), operator.imul: _op("mul", "compute"), torch.mul: _op("mul", "compute"),
    operator.truediv: _op("div", "compute"), torch.div: _op("div", "compute"),
    operator.matmul: _op("matmul", "compute"), torch.matmul: _op("matmul", "compute"),
    torch.bmm: _op("matmul", "compute"),
    torch.mean: _op("mean", "compute"), torch.cat: _op("cat", "compute"), torch.concat: _op("cat", "compute"),
    torch.stack: _op("stack", "compute"), torch.einsum: _op("einsum", "compute"), F.softmax: _op("softmax", "compute"),
    torch.softmax: _op("softmax", "compute"), F.layer_norm: _op("layer_norm", "compute"),
    F.adaptive_avg_pool1d: _op("adaptive_avg_pool", "compute"),
    F.adaptive_avg_pool2d: _op("adaptive_avg_pool", "compute"),
    F.avg_pool2d: _op("avg_pool", "compute"), F.max_pool2d: _op("max_pool", "compute"),
    F.conv1d: _op("functional_conv", "compute"), F.conv2d: _op("functional_conv", "compute"),
    F.conv3d: _op("functional_conv", "compute"), F.linear: _op("functional_linear", "compute"),
    torch.conv_transpose1d: _op("functional_conv", "compute"),
    torch.conv_transpose2d: _op("functional_conv", "compute"),
    torch.conv_transpose3d: _op("functional_conv", "compute"),
    # python values about shapes
    getattr: _op("getattr", "shape"), operator.floordiv: _op("int_arithmetic", "shape"),
    operator.eq: _op("int_arithmetic", "shape"), torch._assert: _op("assert", "shape"),
}
_SWIN = getattr(torchvision.models, "swin_transformer", None)
if _SWIN is not None:  # functions torchvision wraps for fx: they are single call_function nodes in a trace
    FUNCTION_OPS[_SWIN.shifted_window_attention] = _op("shifted_window_attention", "compute")
    FUNCTION_OPS[_SWIN._patch_merging_pad] = _op("patch_merging_pad", "value_preserving")
    FUNCTION_OPS[_SWIN._get_relative_position_bias] = _op("relative_position_bias", "compute")

METHOD_OPS: dict[str, Op] = {
    "relu": RELU, "relu_": RELU, "sigmoid": _activation("sigmoid"), "tanh": _activation("tanh"),
    "contiguous": IDENTITY, "detach": IDENTITY, "clone": IDENTITY,
    "view": _RESHAPE, "view_as": _op("reshape_as", "value_preserving"), "reshape": _RESHAPE,
    "reshape_as": _op("reshape_as", "value_preserving"), "flatten": _op("flatten", "value_preserving"),
    "unflatten": _op("unflatten", "value_preserving"), "permute": _op("permute", "value_preserving"),
    "transpose": _op("transpose", "value_preserving"), "t": _op("transpose", "value_preserving"),
    "movedim": _op("movedim", "value_preserving"), "squeeze": _op("squeeze", "value_preserving"),
    "unsqueeze": _op("unsqueeze", "value_preserving"), "expand": _op("expand", "value_preserving"),
    "expand_as": _op("expand_as", "value_preserving"), "narrow": _op("narrow", "value_preserving"),
    "select": _op("select", "value_preserving"), "split": _op("split", "value_preserving"),
    "chunk": _op("chunk", "value_preserving"), "unbind": _op("unbind", "value_preserving"),
    "add": _op("add", "compute"), "add_": _op("add", "compute"), "sub": _op("sub", "compute"),
    "mul": _op("mul", "compute"), "mul_": _op("mul", "compute"), "div": _op("div", "compute"),
    "matmul": _op("matmul", "compute"), "mean": _op("mean", "compute"), "softmax": _op("softmax", "compute"),
    "size": _op("size", "shape"), "dim": _op("dim", "shape"),
}

# every op's name (its lowering key in clebench.runtimes.lowerings)
NAMES: frozenset[str] = frozenset(
    op.name for op in (*(op for _, op in MODULE_OPS), *FUNCTION_OPS.values(), *METHOD_OPS.values())
)
ACTIVATION_MODULE_TYPES = tuple(t for types, op in MODULE_OPS if op.role == "activation" for t in types)
# fx leaves besides torch.nn's own: layers, BNs and activations (also subclasses, e.g. a "same-padding" Conv2d)
LEAF_TYPES = layers.LAYER_TYPES + layers.BN_TYPES + ACTIVATION_MODULE_TYPES


def module_op(module: nn.Module) -> Op | None:
    for types, op in MODULE_OPS:
        if isinstance(module, types):
            return op
    return None


def function_op(function: object) -> Op | None:
    """The op of a function as fx records it (call_function target) or as an eager TorchFunctionMode sees it."""
    try:
        return FUNCTION_OPS.get(function)
    except TypeError:  # unhashable target
        return None


def op_of(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    """The table's entry for an fx node; None for placeholders, outputs, get_attr and ops the table does not know."""
    if node.op == "call_module":
        return module_op(modules[node.target])
    if node.op == "call_function":
        return function_op(node.target)
    if node.op == "call_method":
        return METHOD_OPS.get(node.target)
    return None


def role(node: fx.Node, modules: dict[str, nn.Module]) -> Role | None:
    op = op_of(node, modules)
    return None if op is None else op.role


def hardtanh_bounds(target, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(min, max) of a functional F.relu6 / F.hardtanh call."""
    if target is F.relu6:
        return 0.0, 6.0
    lower = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    upper = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return lower, upper


def relu6_upper_bound(module: nn.Module) -> torch.Tensor | float | None:
    """The upper clip bound of a ReLU6-like module (ReLU6, Hardtanh(0, m), ChannelClippedReLU), else None."""
    if isinstance(module, ChannelClippedReLU):
        return module.upper
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val > 0.0:
        return float(module.max_val)
    return None


def functional_relu6_bound(target, args: tuple, kwargs: dict) -> float | None:
    """Upper bound of a functional F.relu6 / F.hardtanh(x, 0, m) call, else None."""
    if function_op(target) is not CLIP:
        return None
    lower, upper = hardtanh_bounds(target, args, kwargs)
    if lower == 0.0 and isinstance(upper, (int, float)) and upper > 0:
        return float(upper)
    return None


def activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> Literal["relu", "relu6"] | None:
    """'relu' for the relu family, 'relu6' for clips from 0 to a positive bound, else None (also other activations).

    These are the activations CLS may scale across and the simulator fuses into the op before them.
    """
    op = op_of(node, modules)
    if op is None or op.role != "activation":
        return None
    if op.family == "relu":
        return "relu"
    if op.family != "clip":
        return None
    if node.op == "call_module":
        return "relu6" if relu6_upper_bound(modules[node.target]) is not None else None
    return "relu6" if functional_relu6_bound(node.target, node.args, node.kwargs) is not None else None


def is_zero_pad(function: object, args: tuple, kwargs: dict) -> bool:
    """F.pad with constant zeros: channel-wise positive-homogeneous, like an identity, for CLS."""
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    return function is F.pad and mode == "constant" and not value


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Identity in eval mode, hence channel-wise positive-homogeneous: CLS may look through it."""
    return role(node, modules) == "identity"


def is_value_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Every output value is one of the input values (identities, views, reshapes, getitem ...): no quantizer."""
    return role(node, modules) in ("identity", "value_preserving")


def is_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    op = op_of(node, modules)
    return op is not None and op.name == "add"
