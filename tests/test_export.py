"""ONNX QDQ export: the graph encodes the sim's quantizers exactly, bad input is refused by name, caches are verified."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ClippedNet  # noqa: E402

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from clebench.errors import MissingExtraError
from clebench.runtimes.export import (  # noqa: E402
    ExportError,
    aimet_encodings,
    cached_export,
    export_encodings,
    export_onnx,
    require,
)
from clebench.quant import QuantConfig, QuantSim  # noqa: E402

INPUT = torch.zeros(1, 3, 8, 8)


def make_sim(config: QuantConfig = QuantConfig(), model: nn.Module | None = None, seed: int = 0) -> QuantSim:
    torch.manual_seed(seed)
    sim = QuantSim((model or ClippedNet()).eval(), INPUT, config)
    sim.calibrate([torch.randn(16, 3, 8, 8) * 2 for _ in range(2)], progress=False)
    return sim


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight_bits=4, per_channel=True),
                                    QuantConfig(weight_bits=12, weight_symmetric=False)], ids=lambda c: c.name)
def test_weights_are_integers_whose_dequantized_values_are_the_sims_weights(tmp_path, config):
    sim = make_sim(config)
    values = initializers(export_onnx(sim, INPUT, tmp_path / "m.onnx"))
    encodings = sim.encodings()
    for layer in ("conv1", "conv2", "conv3", "fc"):
        integers = values[f"{layer}.weight"]
        entry = encodings[f"{layer}.weight"]
        low, high = (-(2 ** (config.weight_bits - 1)), 2 ** (config.weight_bits - 1) - 1) if config.weight_symmetric \
            else (0, 2**config.weight_bits - 1)
        assert integers.dtype == {4: np.int8, 8: np.int8, 12: np.uint16}[config.weight_bits]
        assert low <= integers.min() and integers.max() <= high
        shape = [-1] + [1] * (integers.ndim - 1)
        scale = np.asarray(entry["scale"], dtype=np.float32).reshape(shape if config.per_channel else [])
        zero_point = np.asarray(entry["zero_point"]).reshape(shape if config.per_channel else [])
        dequantized = ((integers.astype(np.int64) - zero_point).astype(np.float32) * scale)
        assert np.array_equal(dequantized, sim.model.get_submodule(layer).weight.detach().numpy())
        assert values[f"{layer}.bias"].dtype == np.float32  # float biases unless int32 biases are asked for


def test_activation_quantizers_sit_where_the_sim_has_them_with_its_scales(tmp_path):
    sim = make_sim()
    path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    values = initializers(path)
    activations = {name: e for name, e in sim.encodings().items() if e["kind"] == "activation"}
    quantize_nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == len(activations)  # one QuantizeLinear per activation quantizer, no more
    for node in quantize_nodes:
        scale, zero_point = values[node.input[1]], values[node.input[2]]
        assert zero_point.dtype == np.uint8
        assert any(scale == np.float32(e["scale"]) and zero_point == e["zero_point"] for e in activations.values())
    # a ReLU before a zero-point-0 grid is the grid's own saturation, and so is ReLU6's bound 6 on a grid ending
    # below 6; the per-channel clip is done on the integers
    assert "Relu" not in ops(path) and "Clip" not in ops(path)
    assert ops(path).count("Min") == 1 + (sim.encodings()["relu6"]["max"] > 6)


def test_int32_biases_are_input_scale_times_weight_scale(tmp_path):
    sim = make_sim(QuantConfig(int32_bias=True))
    values = initializers(export_onnx(sim, INPUT, tmp_path / "m.onnx"))
    entry = sim.encodings()["conv3.bias"]
    assert values["conv3.bias"].dtype == np.int32
    assert np.array_equal(values["conv3.bias"].astype(np.float32) * np.float32(entry["scale"]),
                          sim.model.get_submodule("conv3").bias.detach().numpy())
    # a float-bias sim can still be exported with int32 biases (what int8 kernels run)
    plain = make_sim()
    assert initializers(export_onnx(plain, INPUT, tmp_path / "b.onnx", int32_bias=True))["conv3.bias"].dtype == np.int32


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.custom = Custom()

    def forward(self, x):
        return torch.flatten(self.custom(self.conv(x)), 1)


def test_an_unsupported_module_is_refused_naming_the_node(tmp_path):
    from clebench import graph

    class Leafy(graph._LeafTracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Custom) or super().is_leaf_module(m, name)

    model = WithCustom().eval()
    gm = torch.fx.GraphModule(model, Leafy().trace(model))
    sim = make_sim(model=gm)
    with pytest.raises(ExportError, match=r"node 'custom' \(Custom 'custom'\).*torch engine"):
        export_onnx(sim, INPUT, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits", [4, 6])
def test_activations_without_an_onnx_type_are_refused(tmp_path, bits):
    with pytest.raises(ExportError, match=f"{bits} bits.*only act_bits 8 and 16.*torch engine"):
        export_onnx(make_sim(QuantConfig(act_bits=bits)), INPUT, tmp_path / "m.onnx")


def test_cached_export_reuses_a_verified_file_and_rewrites_a_corrupt_one(tmp_path):
    sim = make_sim()
    path = cached_export(sim, INPUT, tmp_path)
    written = path.stat().st_mtime_ns
    assert cached_export(sim, INPUT, tmp_path) == path and path.stat().st_mtime_ns == written
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert cached_export(sim, INPUT, tmp_path) == path
    onnx.checker.check_model(str(path))
    path.unlink()
    assert cached_export(sim, INPUT, tmp_path).is_file()
    other = make_sim(QuantConfig(weight_bits=4))  # another sim gets another file
    assert cached_export(other, INPUT, tmp_path) != path


def test_aimet_encodings_use_aimets_offsets_and_one_entry_per_channel(tmp_path):
    sim = make_sim(QuantConfig(per_channel=True))
    data = json.loads(export_encodings(sim, tmp_path / "e.json").read_text())
    assert data == json.loads(json.dumps(aimet_encodings(sim)))
    assert data["version"] == "0.6.1"
    weight = data["param_encodings"]["conv1.weight"]
    assert len(weight) == 4 and all(e["offset"] == -128 and e["is_symmetric"] == "True" for e in weight)
    assert weight[0]["min"] == pytest.approx(-128 * weight[0]["scale"])
    assert weight[0]["max"] == pytest.approx(127 * weight[0]["scale"])
    activation = data["activation_encodings"]["x"][0]  # the model input
    encoding = sim.encodings()["x"]
    assert activation["offset"] == -encoding["zero_point"] and activation["scale"] == encoding["scale"]
    assert activation["bitwidth"] == 8 and activation["is_symmetric"] == "False"
    assert set(data["activation_encodings"]) == {k for k, e in sim.encodings().items() if e["kind"] == "activation"}


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[onnx\]"'):
        require("onnxruntime")


@pytest.mark.slow
def test_the_cli_exports_a_checkpoint_and_refuses_4_bit_activations(tmp_path, data_root, models_dir, capsys):
    from clebench.cli import main

    common = ["--data-root", str(data_root), "--models-dir", str(models_dir), "--calibration", "20"]
    out = tmp_path / "m.onnx"
    assert main(["export", "resnet18_cifar10", "--steps", "bn_fold+cls+hbf", "--out", str(out), *common]) == 0
    onnx.checker.check_model(str(out))
    encodings = json.loads((tmp_path / "m.encodings.json").read_text())
    assert encodings["param_encodings"]["conv1.weight"][0]["bitwidth"] == 8
    assert main(["export", "resnet18_cifar10", "--quant", "w8a4_per_tensor_minmax", "--out", str(tmp_path / "b.onnx"),
                 *common]) == 2
    assert "4 bits" in capsys.readouterr().err
