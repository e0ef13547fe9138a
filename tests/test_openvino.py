"""OpenVINO as a runtime: it reproduces the simulator where float arithmetic is exact, its int8 mode really runs
integer convolutions (and a layer left in float is counted, for both runtimes), a missing extra is a one-line error,
and `clebench gap` lines up every activation of the simulation with the runtime's."""
from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import INPUT, exact_sim, loader, require_extra

require_extra("onnxruntime")
require_extra("openvino")

from clebench.errors import MissingExtraError  # noqa: E402
from clebench.quant import QuantConfig  # noqa: E402
from clebench.runtimes import RUNTIMES  # noqa: E402
from clebench.runtimes.engines import LayerPrecision, evaluate_quantized, runtime  # noqa: E402
from clebench.runtimes.export import export_onnx  # noqa: E402
from clebench.runtimes.gap import Gap, layer_gap, sqnr_db  # noqa: E402
from clebench.runtimes.openvino import compile_model, evaluate_onnx, runtime_info  # noqa: E402


@pytest.mark.parametrize("mode", ["sim", "int8"])
def test_both_modes_give_the_simulators_logits_bit_for_bit_when_arithmetic_is_exact(tmp_path, mode):
    sim = exact_sim(QuantConfig(int32_bias=True))
    path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    inputs = torch.cat([x for x, _ in loader()])
    with torch.no_grad():
        expected = sim.model(inputs).numpy()
    request = compile_model(path, mode, threads=1).create_infer_request()
    request.infer({0: inputs.numpy()})
    np.testing.assert_array_equal(request.get_output_tensor(0).data, expected)


def test_the_engines_return_evaluates_dict_and_agree_with_torch(tmp_path):
    sim = exact_sim(QuantConfig(int32_bias=True))
    reference = evaluate_quantized(sim, INPUT, loader(), engine="torch", progress=False, workdir=tmp_path)
    for engine in ("openvino-sim", "openvino-int8"):
        result = evaluate_quantized(sim, INPUT, loader(), engine=engine, workdir=tmp_path, threads=1, progress=False)
        assert set(result) == {"top1", "top5", "n", "predictions"} and result["n"] == 96
        assert torch.equal(result["predictions"], reference["predictions"])


def test_int8_mode_runs_every_layer_on_integers_and_sim_mode_none(tmp_path):
    path = export_onnx(exact_sim(), INPUT, tmp_path / "m.onnx", int32_bias=True)  # 3 convs and a linear layer
    for name in RUNTIMES:
        int8 = runtime(name).layer_precision(path, "int8")
        sim = runtime(name).layer_precision(path, "sim")
        assert (int8.integer, int8.float_layers) == (4, ()), name
        assert (sim.integer, len(sim.float_layers)) == (0, 4), name


def test_a_layer_left_in_float_is_counted_by_both_runtimes(tmp_path):
    """Q -> DQ -> Conv (int8 weights) -> Q runs on integers; the next Conv has float weights: a float layer."""
    onnx = pytest.importorskip("onnx")
    helper, tensor = onnx.helper, onnx.numpy_helper.from_array
    weights = np.random.default_rng(0).integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w1q", "ws"], ["w1"]),
        helper.make_node("Conv", ["x_dq", "w1"], ["integer_conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["integer_conv", "s", "zp"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "zp"], ["h_dq"]),
        helper.make_node("Conv", ["h_dq", "w2"], ["y"], name="float_conv"),
    ]
    initializers = [tensor(np.array(1 / 16, np.float32), "s"), tensor(np.array(128, np.uint8), "zp"),
                    tensor(weights, "w1q"), tensor(np.array(1 / 64, np.float32), "ws"),
                    tensor(np.full((2, 4, 1, 1), 0.5, np.float32), "w2")]
    graph = helper.make_graph(nodes, "fallback", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers)
    path = tmp_path / "fallback.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    for name in RUNTIMES:
        precision = runtime(name).layer_precision(path, "int8")
        assert (precision.integer, len(precision.float_layers)) == (1, 1), (name, precision)
        assert "in float:" in str(precision)


def test_a_runtime_that_is_not_installed_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingExtraError, match=r'^openvino is not installed: pip install -e "\.\[openvino\]"'):
        runtime_info()
    with pytest.raises(ValueError, match="runtime must be one of onnxruntime, openvino"):
        runtime("tensorrt")


def test_a_corrupt_or_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_onnx(tmp_path / "missing.onnx", loader(), mode="sim")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="OpenVINO cannot read"):
        evaluate_onnx(tmp_path / "bad.onnx", loader(), mode="sim")
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_onnx(tmp_path / "bad.onnx", loader(), mode="fp16")


def test_runtime_info_names_the_version_and_the_cpu():
    info = runtime_info()
    assert info["version"] == __import__("openvino").__version__ and info["cpu"]
    assert "INT8" in info["optimization_capabilities"]


def test_sqnr_by_hand():
    assert sqnr_db(np.array([1.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(10 * math.log10(5))
    assert sqnr_db(np.ones(3), np.ones(3)) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(np.ones(3), np.ones(4))


@pytest.mark.parametrize("name", RUNTIMES)
def test_gap_lines_up_every_activation_with_the_runtimes(name):
    sim = exact_sim(QuantConfig(int32_bias=True))
    gap = layer_gap(sim, torch.cat([x for x, _ in loader()]), runtime_name=name, threads=1)
    # the input, conv1..3 outputs (clipped ReLUs fused on the grid), the residual add, the pooled, the logits ...
    assert len(gap.table) >= 6 and gap.table["tensor"].iloc[-1] == "logits"
    observed = gap.table.dropna(subset=["sqnr_db"])
    assert len(observed) >= len(gap.table) - 1  # at most one tensor merged away by a frontend
    assert gap.agreement == 100.0 and gap.plain == gap.probed and gap.plain.float_layers == ()
    assert gap.table["sqnr_db"].iloc[-1] == math.inf  # the logits: bit for bit
    if name == "onnxruntime":  # QuantizeLinear as ONNX defines it: every tensor bit for bit
        assert (observed["sqnr_db"] == math.inf).all() and (observed["max_abs_diff"] == 0).all()
        assert gap.first_below(30) is None
    else:  # FakeQuantize rounds (x - low) / scale: x + 8 drops x's last bits, so a value within ~2^-20 of a
        # rounding tie can land one grid step (1/16) away, here on a handful of 24,576 elements
        assert (observed["max_abs_diff"] <= 1 / 16 * 2).all() and (observed["off_grid_%"].fillna(0) < 0.05).all()
        assert gap.first_below(50) is None


def test_first_below_names_the_first_tensor_in_graph_order():
    table = pd.DataFrame({"index": [0, 1, 2], "tensor": ["a_dq", "b_dq", "c_dq"], "sqnr_db": [math.inf, 25.0, 12.0],
                          "max_abs_diff": [0, 1, 2], "off_grid_%": [0, 1, 2]})
    gap = Gap(table, 100.0, LayerPrecision(2), LayerPrecision(2))
    assert gap.first_below(30) == "b_dq" and gap.first_below(20) == "c_dq" and gap.first_below(10) is None
