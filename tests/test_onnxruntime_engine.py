"""ONNX Runtime engines: bit-identical to the simulator where float arithmetic is exact, int8 kernels really run,
and on the quick config's rows the torch simulation and onnxruntime-sim agree image by image."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import INPUT, exact_sim, loader, require_extra

require_extra("onnxruntime")

from clebench.evaluation import evaluate  # noqa: E402
from clebench.runtimes.export import export_onnx  # noqa: E402
from clebench.runtimes.engines import evaluate_quantized  # noqa: E402
from clebench.runtimes.onnxruntime import (  # noqa: E402
    evaluate_onnx,
    int8_kernels,
    make_session,
    runtime_info,
)
from clebench.quant import QuantConfig, QuantSim  # noqa: E402

def logits(path, mode: str, inputs: torch.Tensor) -> torch.Tensor:
    session = make_session(path, mode, threads=1)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


@pytest.mark.parametrize("mode", ["sim", "int8"])
def test_both_modes_give_the_simulators_logits_bit_for_bit_when_arithmetic_is_exact(tmp_path, mode):
    sim = exact_sim(QuantConfig(int32_bias=True))  # int32 biases on both sides, as int8 kernels need
    path = export_onnx(sim, INPUT, tmp_path / "m.onnx")
    inputs = torch.cat([x for x, _ in loader()])
    with torch.no_grad():
        expected = sim.model(inputs)
    assert torch.equal(logits(path, mode, inputs), expected)


def test_int8_mode_runs_integer_kernels_and_sim_mode_does_not(tmp_path):
    path = export_onnx(exact_sim(), INPUT, tmp_path / "m.onnx", int32_bias=True)
    int8, sim = int8_kernels(path, "int8"), int8_kernels(path, "sim")
    assert int8.get("QLinearConv") == 3 and "Conv" not in int8
    assert int8.get("QLinearAdd") == 1 and "Add" not in int8  # the residual add: needs 0-D per-tensor parameters
    assert sim.get("Conv") == 3 and "QLinearConv" not in sim


def test_evaluate_onnx_returns_evaluates_dict_and_the_engines_agree(tmp_path):
    sim = exact_sim()
    reference = evaluate(sim.model, loader(), progress=False)
    for engine in ("torch", "onnxruntime-sim", "onnxruntime-int8"):
        result = evaluate_quantized(sim, INPUT, loader(), engine=engine, workdir=tmp_path, threads=1, progress=False)
        assert set(result) == {"top1", "top5", "n", "predictions"} and result["n"] == 96
        assert result["predictions"].dtype == torch.int64
        if engine != "onnxruntime-int8":  # int8 rounds its biases to int32: not the float-bias sim
            assert result["top1"] == reference["top1"] and torch.equal(result["predictions"], reference["predictions"])
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # one export per bias form, reused across calls
    with pytest.raises(ValueError, match="engine must be one of"):
        evaluate_quantized(sim, INPUT, loader(), engine="tensorrt", workdir=tmp_path)


def test_a_corrupt_or_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_onnx(tmp_path / "missing.onnx", loader(), mode="sim")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        evaluate_onnx(tmp_path / "bad.onnx", loader(), mode="sim")
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_onnx(tmp_path / "bad.onnx", loader(), mode="fp16")


def test_runtime_info_names_the_runtime_and_the_cpus_int8_features():
    info = runtime_info()
    assert info["onnxruntime_version"] and set(info["cpu_flags"]) >= {"avx2", "avx512_vnni", "avx_vnni"}
    assert info["vnni"] == any(info["cpu_flags"][f] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_channels_last_evaluation_gives_the_same_predictions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    torch.manual_seed(0)
    contiguous = evaluate(model, loader(), channels_last=False, progress=False)
    channels_last = evaluate(model, loader(), channels_last=True, progress=False)
    assert torch.equal(contiguous["predictions"], channels_last["predictions"])
    assert next(model.parameters()).is_contiguous()  # the caller's model keeps its memory format


# The quick config's images (configs/cifar10_ci.toml: 200 test, 128 calibration) on two of its rows per model:
# BN fold at W8A8, and CLS (across ReLU6 as a per-channel clip for MobileNetV2) + HBF at W4A8.
QUICK_ROWS = [("bn_fold", "w8a8_per_tensor_minmax"), ("bn_fold+cls_relu6_clip+hbf", "w4a8_per_tensor_minmax")]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet18_cifar10", "mobilenet_v2_cifar10"])
def test_onnxruntime_sim_agrees_with_the_torch_simulation_on_the_quick_config(tmp_path, data_root, models_dir,
                                                                              model_name):
    from clebench.data.datasets import batches, load_images
    from clebench.models import model_preprocessing
    from clebench.sweep.prepare import calibrated_sim, prepare_fp32

    preprocessing = model_preprocessing(model_name)
    test = load_images("cifar10", "test", data_root, preprocessing, limit=200, progress=False)
    calibration = list(batches(load_images("cifar10", "train", data_root, preprocessing, limit=128, progress=False),
                               128, preprocessing))
    same = total = 0
    for combination, quant in QUICK_ROWS:
        state = prepare_fp32(model_name, combination, models_dir=models_dir)
        sim = calibrated_sim(state, combination, quant, calibration)
        results = [evaluate_quantized(sim, INPUT.new_zeros(1, 3, 32, 32), batches(test, 200, preprocessing),
                                      engine=engine, workdir=tmp_path, threads=2, progress=False)
                   for engine in ("torch", "onnxruntime-sim")]
        agree = int((results[0]["predictions"] == results[1]["predictions"]).sum())
        # float kernels sum in another order, and a last-bit difference that lands on a rounding boundary moves a
        # value by one grid step; such flips reach the top-1 of a few images per thousand (README, "Real int8")
        assert agree >= 198 and abs(results[0]["top1"] - results[1]["top1"]) <= 1.0, (combination, quant, agree)
        same, total = same + agree, total + 200
    assert same >= 0.995 * total
