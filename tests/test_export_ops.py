"""Every op kind of clebench.ops, exported: ONNX Runtime's float kernels give the simulator's outputs bit for bit where
float32 arithmetic is exact (power-of-two scales), within one output step where the runtime's own transcendental
functions are used; quantizers sit on the tensors the simulator quantizes, each with its own encoding."""
from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import require_extra
from torch import nn

onnx = require_extra("onnx")
require_extra("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from clebench import graph, ops  # noqa: E402
from clebench.quant import ActivationQuantizer, QuantConfig, QuantSim  # noqa: E402
from clebench.runtimes.export import ExportError, export_onnx  # noqa: E402
from clebench.runtimes.onnxruntime import make_session  # noqa: E402

GRID = (-8.0, 7.9375)  # 8-bit asymmetric, scale exactly 1/16
STEP = 1 / 16
INPUT = torch.zeros(1, 3, 4, 4)


class Fn(nn.Module):
    """conv (exact k/64 weights) -> fn: fx traces into fn, so each case is the op as a model writes it."""

    def __init__(self, fn, head: nn.Module | None = None, channels: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 1)
        with torch.no_grad():
            weight = torch.randint(-127, 128, self.conv.weight.shape, generator=generator).float()
            weight.view(-1)[0] = 127.0
            self.conv.weight.copy_(weight / 64)
            self.conv.bias.copy_(torch.randint(-512, 512, (channels,), generator=generator).float() / 1024)
        self.fn = fn
        self.head = head if head is not None else nn.Identity()
        self.scale = nn.Parameter(torch.tensor([0.5, 2.0, 0.25, 1.0]).view(1, 4, 1, 1))  # read through get_attr

    def forward(self, x):
        return self.fn(self, self.head(self.conv(x)))


def _swap_halves(m, x):
    first, second = x.chunk(2, dim=1)  # fx unpacks a chunk only by assignment
    return torch.cat((second, first), dim=1)


def _shuffle(m, x):  # ShuffleNet's channel shuffle: size() / view / transpose / contiguous / view
    batch, channels, height, width = x.size()
    x = x.view(batch, 2, channels // 2, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


EXACT = {
    "view_by_size": lambda m, x: x.view(x.size(0), -1),
    "flatten": lambda m, x: torch.flatten(x, 1),
    "reshape_method": lambda m, x: x.reshape(x.shape[0], 2, 2, 16),
    "permute": lambda m, x: x.permute(0, 2, 3, 1),
    "transpose": lambda m, x: x.transpose(1, 3),
    "channel_shuffle": _shuffle,
    "chunk_and_cat": _swap_halves,
    "split_and_stack": lambda m, x: torch.stack(torch.split(x, 2, dim=1), dim=1),
    "getitem_slice": lambda m, x: x[:, 1:3, ::2],
    "getitem_int": lambda m, x: x[:, 0],
    "unsqueeze_expand": lambda m, x: x.unsqueeze(1).expand(-1, 3, -1, -1, -1),
    "mean_spatial": lambda m, x: x.mean([2, 3]),
    "mean_keepdim": lambda m, x: x.mean(dim=(-2, -1), keepdim=True),
    "mean_channels": lambda m, x: torch.mean(x, 1),
    "adaptive_pool_divides": lambda m, x: F.adaptive_avg_pool2d(x, 2),
    "adaptive_pool_overlapping": lambda m, x: F.adaptive_avg_pool2d(x, 3),  # windows of 2: weights 1/2, exact
    "max_pool": lambda m, x: F.max_pool2d(x, 2),
    "avg_pool": lambda m, x: F.avg_pool2d(x, 2),
    "sub": lambda m, x: x - x[:, :1],
    "mul_tensors": lambda m, x: x * x,
    "mul_by_parameter": lambda m, x: x * m.scale,
    "div_by_two": lambda m, x: x / 2,
    "stochastic_depth": lambda m, x: torchvision.ops.stochastic_depth(x, 0.5, "row", False) + x,
    "dropout": lambda m, x: F.dropout(x, 0.3, training=False),
    "zero_pad": lambda m, x: F.pad(x, (1, 0, 2, 1)),
    "einsum": lambda m, x: torch.einsum("bchw,bchw->bhw", x, x),
}
TRANSCENDENTAL = {
    "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(),
    "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "leaky_relu": nn.LeakyReLU(0.1),
    "elu": nn.ELU(), "prelu": nn.PReLU(4, 0.25), "softmax": nn.Softmax(dim=1),
}
FUNCTIONAL = {
    "squeeze_excitation": lambda m, x: torch.sigmoid(F.adaptive_avg_pool2d(x, 1)) * x,
    "layer_norm_channels_last": lambda m, x: F.layer_norm(x.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2),
}


def exact_sim(model: nn.Module) -> QuantSim:
    sim = QuantSim(model.eval(), INPUT, QuantConfig())
    sim.set_activation_ranges({name: GRID for name in sim.quantizer_names() if not name.endswith((".weight", ".bias"))})
    return sim


def run_both(sim: QuantSim, tmp_path, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(ONNX Runtime sim-mode output, torch simulation output) on random inputs of another batch size than the
    export's, so a batch size baked into the graph fails."""
    path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    inputs = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    session = make_session(path, "sim", threads=1)
    actual = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    with torch.no_grad():
        return actual, sim.model(inputs)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_value_moving_and_exact_ops_reproduce_the_simulator_bit_for_bit(tmp_path, name):
    actual, expected = run_both(exact_sim(Fn(EXACT[name])), tmp_path)
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", sorted(TRANSCENDENTAL) + sorted(FUNCTIONAL))
def test_activations_and_normalisations_are_within_one_output_step(tmp_path, name):
    model = Fn(lambda m, x: x, head=TRANSCENDENTAL[name]) if name in TRANSCENDENTAL else Fn(FUNCTIONAL[name])
    actual, expected = run_both(exact_sim(model), tmp_path)
    assert actual.shape == expected.shape
    difference = (actual - expected).abs()
    assert difference.max() <= STEP + 1e-6
    assert (difference == 0).float().mean() >= 0.9  # a step apart only where a value sits on a rounding boundary


def test_the_exported_ops_are_the_tables_lowerings(tmp_path):
    """Non-ReLU activations run in float between a DequantizeLinear and a QuantizeLinear, as the sim quantizes around
    them; value-moving ops run on the integer tensor (no quantizer after them)."""
    sim = exact_sim(Fn(lambda m, x: torch.flatten(x, 1), head=nn.Hardswish()))
    graph = onnx.load(str(export_onnx(sim, INPUT, tmp_path / "m.onnx"))).graph
    by_output = {node.output[0]: node for node in graph.node}
    hardswish = next(node for node in graph.node if node.op_type == "HardSwish")
    assert by_output[hardswish.input[0]].op_type == "DequantizeLinear"
    (consumer,) = [node for node in graph.node if hardswish.output[0] in node.input]
    assert consumer.op_type == "QuantizeLinear"
    reshape = next(node for node in graph.node if node.op_type == "Reshape")
    assert by_output[reshape.input[0]].op_type == "QuantizeLinear"  # the integers are reshaped


def test_each_quantizer_gets_its_own_encoding_in_its_own_place(tmp_path):
    """Every activation quantizer has a different range here: a QuantizeLinear with another quantizer's scale or zero
    point (two encodings swapped) fails."""
    model = Fn(lambda m, x: torch.sigmoid(x) * x + m.scale, head=nn.ReLU())
    sim = QuantSim(model.eval(), INPUT, QuantConfig())
    names = [n for n in sim.quantizer_names() if not n.endswith((".weight", ".bias"))]
    assert len(names) >= 4
    sim.set_activation_ranges({name: (-1.0 - i, 2.0 + 3 * i) for i, name in enumerate(names)})
    path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantize = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
    modules = dict(sim.model.named_modules())
    for node in sim.model.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], ActivationQuantizer):
            source = node.args[0].name  # a fused ReLU is quantized before its clip on the integers
            (q,) = [quantize[n] for n in (f"{source}_quantized", f"{source}_unclipped_quantized") if n in quantize]
            encoding = modules[node.target].encoding
            assert values[q.input[1]] == np.float32(encoding.scale), node.name
            assert values[q.input[2]] == int(encoding.zero_point), node.name
    assert len(quantize) == len(names)


def test_an_op_without_a_lowering_names_the_node_and_the_torch_engine(tmp_path):
    sim = exact_sim(Fn(lambda m, x: torch.roll(x, 1, 2)))
    with pytest.raises(ExportError, match=r"node 'roll' \(call_function roll\).*torch engine"):
        export_onnx(sim, INPUT, tmp_path / "m.onnx")


def test_stochastic_depth_is_an_identity_in_eval_mode_and_refused_in_training_mode(tmp_path):
    model = Fn(lambda m, x: x, head=torchvision.ops.StochasticDepth(0.5, "row")).train()
    traced_in_training = graph.trace(model)  # a GraphModule is taken as it is: its graph says training=True
    sim = QuantSim(model, INPUT, QuantConfig())  # traces the model in eval mode
    assert model.training
    sim.set_activation_ranges({name: GRID for name in sim.quantizer_names() if not name.endswith((".weight", ".bias"))})
    actual, expected = run_both(sim, tmp_path)
    assert torch.equal(actual, expected)
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(exact_sim(traced_in_training), INPUT, tmp_path / "m.onnx")


def test_the_op_table_is_the_only_list_and_classifies_what_the_zoo_uses():
    assert ops.module_op(nn.ReLU6()).family == "clip" and ops.module_op(nn.PReLU()).family == "relu"
    assert ops.module_op(nn.Hardswish()).family == "other"
    assert ops.function_op(operator.add).role == "compute" and ops.function_op(torch.flatten).role == "value_preserving"
    assert ops.METHOD_OPS["contiguous"].role == "identity" and ops.METHOD_OPS["size"].role == "shape"
    assert ops.function_op(F.hardtanh) is ops.CLIP and ops.functional_relu6_bound(F.hardtanh, (None, -1.0, 1.0), {}) is None


def test_each_lowering_is_registered_once_against_an_op_table_name():
    from clebench.runtimes.export import lowers
    from clebench.runtimes.lowerings import LOWERINGS, register

    assert set(LOWERINGS) <= ops.NAMES and lowers(ops.module_op(nn.Conv2d(1, 1, 1))) and not lowers(None)
    assert LOWERINGS["flatten"] is LOWERINGS["reshape"] and not lowers(ops.function_op(F.conv2d))
    with pytest.raises(ValueError, match="not in clebench.ops"):
        register("roll")
    with pytest.raises(ValueError, match="lowered twice"):
        register("conv")(lambda ex, node: None)
    assert LOWERINGS["conv"].__name__ == "lower_conv"


def test_16_bit_grids_move_the_graph_to_opset_21_with_reductions_taking_axes_as_an_input(tmp_path):
    sim = QuantSim(Fn(EXACT["mean_channels"]).eval(), INPUT, QuantConfig(act_bits=16))
    sim.set_activation_ranges({name: (-8.0, 8.0 - 2**-12) for name in sim.quantizer_names()
                               if not name.endswith((".weight", ".bias"))})  # scale 2^-12: still exact
    actual, expected = run_both(sim, tmp_path)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.opset_import[0].version == 21
    (reduce,) = [node for node in model.graph.node if node.op_type == "ReduceMean"]
    assert len(reduce.input) == 2 and not reduce.attribute[0].name == "axes"
    assert torch.equal(actual, expected)


def test_a_zero_scale_grid_exports_its_zero_point_without_invalid_casts(tmp_path):
    model = Fn(lambda m, x: x)
    with torch.no_grad():
        model.conv.weight[1].zero_()  # a dead channel: its per-channel weight scale is 0
    sim = QuantSim(model.eval(), INPUT, QuantConfig(per_channel=True, int32_bias=True))
    sim.set_activation_ranges({name: GRID for name in sim.quantizer_names() if not name.endswith((".weight", ".bias"))})
    with np.errstate(invalid="raise"):
        path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}["conv.weight"]
    assert (weights[1] == 0).all()
    actual, expected = run_both(sim, tmp_path)
    assert torch.equal(actual, expected)
