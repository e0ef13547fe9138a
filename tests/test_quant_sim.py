"""QuantSim: quantizer placement, exact fake-quant semantics, FP32 calibration, no side effects on the model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_batch_norms
from torch import nn

from clebench import graph, ops
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import equalize_model
from clebench.quant import ActivationQuantizer, QuantConfig, QuantSim, quantize_weight

# torchvision ResNet18, BN folded: input, stem conv+relu, maxpool, per block conv1+relu, conv2, add+relu,
# 3 downsample convs, avgpool, fc (the flatten gets none)
RESNET18_ACTIVATION_QUANTIZERS = 1 + 1 + 1 + 8 * 3 + 3 + 1 + 1
# torchvision MobileNetV2: input, stem, block 1 (dw, project), 16 blocks x (expand, dw, project), 10 residual adds,
# last 1x1 conv, pooling, classifier
MOBILENET_V2_ACTIVATION_QUANTIZERS = 1 + 1 + 2 + 16 * 3 + 10 + 1 + 1 + 1


class Toy(nn.Module):
    """conv -> relu -> conv -> (+ skip) -> relu -> maxpool -> flatten -> linear, with functional ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = F.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def inputs(n: int = 8, seed: int = 0, size: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_toy_placement_and_names():
    sim = QuantSim(toy(), inputs(1))
    assert sim.quantizer_names() == [
        "x", "relu", "conv2", "relu_1", "pool", "fc", "conv1.weight", "conv2.weight", "fc.weight"
    ]  # conv1 and the add are fused with their ReLUs; conv2 feeds the add, so it is quantized itself


def test_toy_output_equals_a_hand_written_reference():
    model, x = toy(), inputs()
    sim = QuantSim(model, x[:1])
    sim.calibrate([x], progress=False)
    enc = sim.encodings()

    def fq(name, t):
        e = enc[name]
        return torch.fake_quantize_per_tensor_affine(t, e["scale"], e["zero_point"], 0, 255)

    w = {name: quantize_weight(getattr(model, name), QuantConfig()) for name in ("conv1", "conv2", "fc")}
    y = fq("relu", torch.relu(F.conv2d(fq("x", x), w["conv1"], model.conv1.bias, padding=1)))
    y = fq("relu_1", F.relu(fq("conv2", F.conv2d(y, w["conv2"], model.conv2.bias, padding=1)) + y))
    expected = fq("fc", F.linear(torch.flatten(fq("pool", F.max_pool2d(y, 2)), 1), w["fc"], model.fc.bias))
    assert torch.equal(sim.model(x), expected)


def test_calibration_sees_fp32_activations():
    model, x = toy(), inputs()
    sim = QuantSim(model, x[:1], QuantConfig(weight_bits=2))
    sim.calibrate([x], progress=False)
    fp32_relu = torch.relu(model.conv1(x))
    assert sim.encodings()["relu"]["scale"] == pytest.approx(fp32_relu.max().item() / 255, rel=1e-6)


def test_aimet_rules_calibrate_with_quantized_weights():
    model, x = toy(), inputs()
    config = QuantConfig(weight_bits=2, aimet_rules=True)
    sim = QuantSim(model, x[:1], config)
    sim.calibrate([x], progress=False)
    quantized_relu = torch.relu(F.conv2d(x, quantize_weight(model.conv1, config), model.conv1.bias, padding=1))
    assert sim.encodings()["relu"]["scale"] == pytest.approx(quantized_relu.max().item() / 255, rel=1e-6)
    assert quantized_relu.max().item() != pytest.approx(torch.relu(model.conv1(x)).max().item(), rel=1e-3)


def test_observed_ranges_serve_every_weight_setting_and_must_name_every_quantizer():
    model, x = toy(), inputs()
    ranges = QuantSim(model, x[:1], QuantConfig(weight_bits=8)).observe([x], progress=False)
    shared, own = QuantSim(model, x[:1], QuantConfig(weight_bits=4)), QuantSim(model, x[:1], QuantConfig(weight_bits=4))
    shared.set_activation_ranges(ranges)
    own.calibrate([x], progress=False)
    assert shared.encodings() == own.encodings() and torch.equal(shared.model(x), own.model(x))
    with pytest.raises(ValueError, match=r"missing \['x'\], unknown \['y'\]"):
        shared.set_activation_ranges({**{k: v for k, v in ranges.items() if k != "x"}, "y": (0.0, 1.0)})


def test_batches_may_be_tensors_or_labelled_tuples():
    model, x = toy(), inputs()
    a, b = QuantSim(model, x[:1]), QuantSim(model, x[:1])
    a.calibrate([x[:4], x[4:]], progress=False)
    b.calibrate([(x[:4], torch.zeros(4)), (x[4:], torch.zeros(4))], progress=False)
    assert a.encodings() == b.encodings()


def test_deterministic_encodings_and_outputs():
    model, x = toy(), inputs()
    runs = []
    for _ in range(2):
        sim = QuantSim(model, x[:1], QuantConfig(calibration="mse"))
        sim.calibrate([x], progress=False)
        runs.append((sim.encodings(), sim.model(x)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_the_fp32_model_is_never_modified():
    model = randomize_batch_norms(torchvision.models.resnet18(num_classes=10))
    model.train()
    modules_before = list(model.modules())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = QuantSim(model, inputs(1, size=32), QuantConfig(weight_bits=4, per_channel=True, int32_bias=True))
    sim.calibrate([inputs(2, size=32)], progress=False)
    sim.model(inputs(2, size=32))
    assert list(model.modules()) == modules_before and all(a is b for a, b in zip(model.modules(), modules_before))
    assert model.training
    assert state_before.keys() == model.state_dict().keys()
    assert all(torch.equal(state_before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_weights_are_quantized_once_at_build_time(monkeypatch):
    model, x = toy(), inputs()
    config = QuantConfig(weight_bits=4, per_channel=True)
    sim = QuantSim(model, x[:1], config)
    sim.calibrate([x], progress=False)
    assert torch.equal(sim.model.conv2.weight, quantize_weight(model.conv2, config))
    calls = []
    monkeypatch.setattr(torch, "fake_quantize_per_channel_affine", lambda *a: calls.append(a))
    sim.model(x)
    assert calls == []


def test_float_activations_quantize_weights_only():
    model, x = toy(), inputs()
    sim = QuantSim(model, x[:1], QuantConfig(weight_bits=6, act_bits=None))
    assert sim.quantizer_names() == ["conv1.weight", "conv2.weight", "fc.weight"]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (reference.conv1, reference.conv2, reference.fc):
            layer.weight.copy_(quantize_weight(layer, QuantConfig(weight_bits=6)))
    assert torch.equal(sim.model(x), reference(x))  # no calibration needed


def test_int32_bias_lies_on_input_scale_times_weight_scale():
    model, x = toy(), inputs()
    sim = QuantSim(model, x[:1], QuantConfig(per_channel=True, int32_bias=True))
    sim.calibrate([x], progress=False)
    enc = sim.encodings()
    scale = torch.tensor(enc["conv2.weight"]["scale"]) * enc["relu"]["scale"]  # conv2 reads relu's grid
    assert enc["conv2.bias"]["scale"] == pytest.approx(scale.tolist())
    levels = sim.model.conv2.bias.double() / scale.double()
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert not torch.equal(sim.model.conv2.bias, model.conv2.bias)


def test_conv_transpose_per_channel_weights():
    model = nn.Sequential(nn.ConvTranspose2d(3, 6, 2, stride=2), nn.ReLU()).eval()
    sim = QuantSim(model, inputs(1), QuantConfig(per_channel=True, act_bits=None))
    expected = model[0].weight.detach().abs().amax(dim=(0, 2, 3)) / 127  # weight [in, out, kh, kw]
    assert sim.encodings()["0.weight"]["scale"] == pytest.approx(expected.tolist())


def test_percentile_and_mse_ranges_lie_within_minmax():
    model, x = toy(), inputs(64)
    encodings = {}
    configs = (QuantConfig(), QuantConfig(calibration="percentile", percentile=99.0), QuantConfig(calibration="mse"))
    for config in configs:
        sim = QuantSim(model, x[:1], config)
        sim.calibrate([x], progress=False)
        encodings[config.calibration] = sim.encodings()
    for name in ("relu", "relu_1", "fc"):
        minmax = encodings["minmax"][name]
        for method in ("percentile", "mse"):
            assert encodings[method][name]["max"] <= minmax["max"] * (1 + 1e-6)
            assert encodings[method][name]["min"] >= minmax["min"] * (1 + 1e-6)
    assert encodings["percentile"]["relu"]["max"] < encodings["minmax"]["relu"]["max"]


def test_encodings_are_json_serialisable():
    sim = QuantSim(toy(), inputs(1), QuantConfig(per_channel=True, int32_bias=True))
    sim.calibrate([inputs()], progress=False)
    decoded = json.loads(json.dumps(sim.encodings()))
    assert decoded["x"]["bits"] == 8 and decoded["conv1.bias"]["bits"] == 32
    assert set(decoded["relu"]) >= {"scale", "offset", "zero_point", "min", "max", "bits", "symmetric", "per_channel"}


def test_multi_input_model_gets_one_quantizer_per_input():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, a, b):
            return torch.cat([self.conv(a), b], dim=1).mean(dim=(2, 3))

    x = inputs(2)
    sim = QuantSim(TwoInputs().eval(), (x, x))
    assert sim.quantizer_names() == ["a", "b", "conv", "cat", "mean", "conv.weight"]
    sim.calibrate([((x, x), torch.zeros(2))], progress=False)
    assert sim.model(x, x).shape == (2, 6)
    assert [n.op for n in sim.model.graph.nodes][:2] == ["placeholder", "placeholder"]


def test_uncalibrated_use_is_a_clear_error():
    sim = QuantSim(toy(), inputs(1))
    with pytest.raises(RuntimeError, match="calibrate"):
        sim.model(inputs())
    with pytest.raises(RuntimeError, match="calibrate"):
        sim.encodings()


@pytest.mark.parametrize("batches, error", [([], "no batches"), (["not a tensor"], "calibration batch")])
def test_bad_calibration_batches(batches, error):
    sim = QuantSim(toy(), inputs(1))
    with pytest.raises((ValueError, TypeError), match=error):
        sim.calibrate(batches, progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        sim.model(inputs())  # a failed calibration leaves the sim uncalibrated
    sim.calibrate([inputs()], progress=False)
    encodings = sim.encodings()
    with pytest.raises((ValueError, TypeError), match=error):
        sim.calibrate(batches, progress=False)
    assert sim.encodings() == encodings  # ... or with its previous encodings


def test_bad_arguments():
    with pytest.raises(ValueError, match="dummy_input"):
        QuantSim(toy(), torch.randn(1, 5, 4, 4))
    with pytest.raises(TypeError, match="QuantConfig"):
        QuantSim(toy(), inputs(1), config="w8a8_per_tensor_minmax")
    with pytest.raises(TypeError, match="nn.Module"):
        QuantSim(lambda x: x, inputs(1))


# -- torchvision networks ---------------------------------------------------------------------------------------


def _folded(name: str, equalize: bool = False, relu6: str = "replace") -> nn.Module:
    model = randomize_batch_norms(getattr(torchvision.models, name)(num_classes=10))
    if relu6 == "clip":
        model = graph.prepare_model(model)
    if equalize:
        equalize_model(model, relu6=relu6)
    else:
        fold_all_batch_norms(model)
    return model


def activation_names(sim: QuantSim) -> list[str]:
    return [n for n in sim.quantizer_names() if not n.endswith((".weight", ".bias"))]


def _assert_fused_activations_only(sim: QuantSim) -> None:
    """No quantizer sits between a layer / add and the activation that solely consumes it."""
    modules = dict(sim.model.named_modules())
    for node in sim.model.graph.nodes:
        if ops.activation_kind(node, modules) is None:
            continue
        source = node.args[0]
        while ops.is_identity(source, modules):
            source = source.args[0]
        assert not isinstance(graph.module_of(source, modules), ActivationQuantizer), f"quantizer before {node.name}"


def _assert_one_quantizer_after_each_add(sim: QuantSim) -> None:
    modules = dict(sim.model.named_modules())
    adds = [n for n in sim.model.graph.nodes if n.op == "call_function" and n.target.__name__ in ("add", "iadd")]
    assert adds
    for node in adds:
        (user,) = node.users
        if ops.activation_kind(user, modules) is not None:
            (user,) = user.users
        assert isinstance(graph.module_of(user, modules), ActivationQuantizer), f"{node.name} is not quantized"
        assert not isinstance(graph.module_of(next(iter(user.users)), modules), ActivationQuantizer)


@pytest.mark.parametrize("equalize", [False, True])
def test_resnet18_placement(equalize):
    sim = QuantSim(_folded("resnet18", equalize), inputs(1, size=32))
    names = activation_names(sim)
    assert len(names) == RESNET18_ACTIVATION_QUANTIZERS
    assert names[:4] == ["x", "relu", "maxpool", "layer1_0_relu"]
    assert {"layer1_0_conv2", "layer1_0_relu_1", "layer2_0_downsample_0", "avgpool", "fc"} <= set(names)
    assert not {"layer1_0_conv1", "add", "flatten"} & set(names)  # fused into their ReLU, or value-preserving
    assert sum(n.endswith(".weight") for n in sim.quantizer_names()) == 21
    _assert_fused_activations_only(sim)
    _assert_one_quantizer_after_each_add(sim)


@pytest.mark.parametrize("equalize, relu6", [(False, "keep"), (True, "replace"), (True, "clip")])
def test_mobilenet_v2_placement(equalize, relu6):
    sim = QuantSim(_folded("mobilenet_v2", equalize, relu6), inputs(1, size=32))
    names = activation_names(sim)
    assert len(names) == MOBILENET_V2_ACTIVATION_QUANTIZERS
    assert names[:4] == ["x", "features_0_2", "features_1_conv_0_2", "features_1_conv_1"]
    assert names[-3:] == ["features_18_2", "adaptive_avg_pool2d", "classifier_1"]
    assert sum(name.startswith("add") for name in names) == 10
    assert sum(n.endswith(".weight") for n in sim.quantizer_names()) == 53
    _assert_fused_activations_only(sim)
    _assert_one_quantizer_after_each_add(sim)
