"""The NNCF steps (clebench.peers.nncf): NNCF's own int8 quantization of the FP32 model, scored on OpenVINO.

The rules (where they may stand, which settings they run under) need no NNCF; the rows do (extra `nncf`, installed
in CI, where a missing one fails instead of skipping).
"""
from __future__ import annotations

import pytest

from clebench.quant import QuantConfig
from clebench.sweep import plan, steps
from clebench.sweep.config import parse_config
from conftest import load_script, require_extra


@pytest.mark.parametrize("text, message", [
    ("bn_fold+nncf_quantize+nncf_quantize_channel_alignment", "choose one NNCF step at most"),
    ("bn_fold+adaround+nncf_quantize", "adaround with nncf_quantize"),
    ("bn_fold+bias_correction_empirical+nncf_quantize_smooth_quant", "bias_correction_empirical with"),
    ("nncf_quantize+bn_fold", "out of order"),
])
def test_an_nncf_step_is_last_and_alone_as_quantizer(text, message):
    with pytest.raises(steps.StepError, match=message) as error:
        steps.parse_combination(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["nncf_quantize", "bn_fold+cls+hbf+nncf_quantize_channel_alignment",
                                  "relu6_to_relu+aimet_cle+nncf_quantize", "brevitas_equalize+nncf_quantize"])
def test_an_nncf_step_follows_any_fp32_pipeline(text):
    combination = steps.parse_combination(text)
    assert steps.quantizer_step(combination) == combination[-1]
    assert steps.split_combination(combination) == (combination[:-1], None)


def test_nncf_rows_exist_only_at_8_bit_weights_and_activations():
    config = parse_config({"models": ["resnet18_cifar10"], "steps": ["bn_fold", "bn_fold+nncf_quantize"],
                           "quant": ["w8a8_per_tensor_minmax", "w8a8_per_channel_minmax", "w4a8_per_tensor_minmax",
                                     "w8a4_per_tensor_minmax"], "data": {"dataset": "cifar10"}})
    rows = plan.row_order(config, {"resnet18_cifar10": config.combinations})
    assert [(key.steps, key.quant) for key in rows if key.steps != "bn_fold"] == [
        ("bn_fold+nncf_quantize", "w8a8_per_tensor_minmax"), ("bn_fold+nncf_quantize", "w8a8_per_channel_minmax")]
    assert len([key for key in rows if key.steps == "bn_fold"]) == 4
    assert "nncf" in config.peers
    assert not steps.runs_under(("nncf_quantize",), QuantConfig(weight_bits=8, act_bits=16))


def test_each_variant_turns_on_what_its_name_says():
    require_extra("nncf")
    from nncf import ModelType

    from clebench.peers.nncf import SMOOTH_QUANT_CONV_ALPHA, quantize_options

    default = quantize_options("nncf_quantize", per_channel=True)
    assert default["advanced_parameters"].disable_channel_alignment is True and "model_type" not in default
    assert default["advanced_parameters"].weights_quantization_params.per_channel is True
    aligned = quantize_options("nncf_quantize_channel_alignment", per_channel=False)
    assert aligned["advanced_parameters"].disable_channel_alignment is False
    assert aligned["advanced_parameters"].weights_quantization_params.per_channel is False
    smooth = quantize_options("nncf_quantize_smooth_quant", per_channel=True)
    assert smooth["model_type"] == ModelType.TRANSFORMER
    alphas = smooth["advanced_parameters"].smooth_quant_alphas
    assert (alphas.convolution, alphas.matmul) == (SMOOTH_QUANT_CONV_ALPHA, -1)
    with pytest.raises(ValueError, match="nncf_quantize, nncf_quantize_channel_alignment"):
        quantize_options("nncf", per_channel=True)


@pytest.mark.slow
def test_an_nncf_row_equals_nncf_run_standalone(tmp_path, data_root, models_dir, capsys):
    """The quick NNCF row CI runs: nncf_quantize on ResNet18-CIFAR in a sweep equals scripts/peers/nncf_standalone.py
    (NNCF called directly, no sweep code) on the same images; its W4A8 setting has no NNCF row, and says so."""
    require_extra("nncf")
    from clebench.sweep.run import run_sweep

    images = {"limit": 100, "calibration": 32, "batch_size": 100}
    raw = {"models": ["resnet18_cifar10"], "steps": ["nncf_quantize"],
           "quant": ["w8a8_per_channel_minmax", "w4a8_per_tensor_minmax"],
           "data": {"dataset": "cifar10", **images}, "eval": {"deploy": ["openvino"]}}
    table = run_sweep(parse_config(raw), tmp_path / "sweep", data_root=data_root, models_dir=models_dir,
                      progress=False).table
    assert "no rows for 1 step x quant pairs" in capsys.readouterr().err
    assert list(table["quant"]) == ["w8a8_per_channel_minmax"]
    row = table.iloc[0]
    assert row["quant_top1"] == row["openvino_top1"] and row["openvino_agreement"] == 100.0
    assert row["openvino_integer_layers"] == 21 and row["openvino_float_layers"] == 0  # 20 convs and the head
    script = load_script("nncf_standalone")
    script.main(["--model", "resnet18_cifar10", "--data", str(data_root), "--models-dir", str(models_dir),
                 *[f"--{key.replace('_', '-')}={value}" for key, value in images.items()]])
    printed = capsys.readouterr().out
    assert f"FP32 top-1 {row['fp32_top1']:.2f} on 100 test images, 32 calibration images" in printed
    assert f"NNCF int8 on OpenVINO: top-1 {row['quant_top1']:.2f}" in printed
    meta = (tmp_path / "sweep" / "meta.json").read_text()
    assert '"nncf": "' in meta
    costs = (tmp_path / "sweep" / "step_costs.csv").read_text()
    assert "resnet18_cifar10,nncf_quantize,nncf_quantize," in costs


def test_an_nncf_row_has_no_per_layer_sensitivity():
    from clebench.sweep.config import ConfigError

    raw = {"models": ["resnet18_cifar10"], "steps": ["bn_fold+nncf_quantize"], "quant": ["w8a8_per_tensor_minmax"],
           "data": {"dataset": "cifar10"}, "sensitivity": {"rows": [
               {"model": "resnet18_cifar10", "steps": "bn_fold+nncf_quantize", "quant": "w8a8_per_tensor_minmax"}]}}
    with pytest.raises(ConfigError, match="an NNCF row has no simulation"):
        parse_config(raw)


def test_a_fault_inside_nncf_is_one_line_naming_the_variant_and_where(monkeypatch, tmp_path):
    nncf = require_extra("nncf")
    from torch import nn
    import torch

    from clebench.peers import nncf as peer

    def broken(*args, **kwargs):
        raise KeyError("numpy.float32")

    monkeypatch.setattr(nncf, "quantize", broken)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(peer.NNCFFailure, match=r"failed in nncf_quantize_channel_alignment: KeyError: "
                                               r"'numpy.float32' \(at .*test_nncf_steps.py:\d+\)") as error:
        peer.quantize(model, torch.randn(4, 3, 8, 8), "nncf_quantize_channel_alignment", per_channel=True,
                      path=tmp_path / "m.xml", progress=False)
    assert "\n" not in str(error.value)
