"""The sweep's `adaround` step: validation, the `ptq` preset, frozen encodings exported exactly, AdaRound + bias
correction's meaning, determinism and memoization, the [adaround] config table and the config hash."""
from __future__ import annotations

import tomllib

import pytest
import torch
from torch import nn

from conftest import randomize_batch_norms, require_extra
from sweeps import CONFIG as SWEEP_CONFIG
from clebench import graph
from clebench.adaround import AdaroundSettings
from clebench.data.datasets import ImageSet
from clebench.models import Preprocessing
from clebench.quant import QuantConfig
from clebench.quant.encoding import quantize_weight
from clebench.sweep import steps
from clebench.sweep.config import ConfigError, parse_config
from clebench.sweep.execute import Memo, ModelInputs, Resources, Settings, execute_unit
from clebench.sweep.plan import plan
from clebench.sweep.run import run_sweep

W4 = QuantConfig.from_name("w4a8_per_tensor_minmax")
FEW = AdaroundSettings(iterations=20)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    return randomize_batch_norms(model)


def folded_state() -> steps.PipelineState:
    state = steps.PipelineState(graph.prepare_model(tiny_model()).eval())
    steps.apply_fp32_step("bn_fold", state)
    return state


def calibration(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 6, 6, generator=generator), torch.zeros(16, dtype=torch.long)) for _ in range(count)]


def rounding_of(state: steps.PipelineState, quant: QuantConfig = W4) -> steps.Rounding:
    return steps.adaround_rounding(state.model, quant, [(x,) for x, _ in calibration()], FEW)


# -- steps and presets ---------------------------------------------------------------------------------------------


def test_adaround_runs_after_any_fp32_prefix_and_before_bias_correction():
    for text in ("adaround", "bn_fold+adaround", "bn_fold+cls+hbf+adaround", "bn_fold+cls_relu6_clip+hbf+adaround",
                 "bn_fold+cls+hbf+adaround+bias_correction"):
        assert steps.uses_adaround(steps.parse_combination(text))
    assert steps.split_combination(("bn_fold", "cls", "hbf", "adaround", "bias_correction")) == \
        (("bn_fold", "cls", "hbf"), "bias_correction")
    with pytest.raises(steps.StepError, match="out of order"):
        steps.parse_combination("bn_fold+bias_correction+adaround")
    with pytest.raises(steps.StepError, match="out of order"):
        steps.parse_combination("bn_fold+adaround+cls")
    with pytest.raises(steps.StepError, match="unknown step 'ada_round'.*adaround"):
        steps.parse_combination("bn_fold+ada_round")


def test_ptq_preset_is_the_ladder_and_all_leaves_adaround_out():
    assert [steps.combination_name(c) for c in steps.preset("ptq")] == [
        "bn_fold", "bn_fold+cls+hbf", "bn_fold+cls+hbf+bias_correction", "bn_fold+cls+hbf+adaround",
        "bn_fold+cls_relu6_clip+hbf", "bn_fold+cls_relu6_clip+hbf+bias_correction",
        "bn_fold+cls_relu6_clip+hbf+adaround", "bn_fold+adaround"]
    assert not any(steps.uses_adaround(c) for c in steps.all_combinations())


# -- the quantized model and its sim --------------------------------------------------------------------------------


# asymmetric weights: a rounded weight's own min / max can lie inside the grid it was rounded on, so an unfrozen
# encoding would requantize it
@pytest.mark.parametrize("quant", [W4, QuantConfig.from_name("w4a8_per_channel_minmax_wasym")], ids=lambda q: q.name)
def test_sim_weights_are_the_rounded_weights_bit_for_bit_and_export_exactly(tmp_path, quant):
    pytest.importorskip("onnx")
    from onnx import numpy_helper
    import onnx

    from clebench.runtimes.export import export_onnx

    state = folded_state()
    rounding = rounding_of(state, quant)
    batches = calibration()
    sim = steps.quant_sim(steps.quantized_model(state, quant, None, rounding, batches), batches[0][0][:1], quant,
                          rounding)
    sim.calibrate(batches, progress=False)
    parameters = dict(sim.model.named_parameters())
    moved = 0
    for name, weight in rounding["weights"].items():
        assert torch.equal(parameters[name].detach(), weight), name
        nearest = nearest_rounding(state, name, quant)
        moved += int((nearest != weight).sum())
    assert moved > 0, "AdaRound kept the nearest rounding everywhere: the test would not see an unfrozen encoding"
    path = export_onnx(sim, batches[0][0][:1], tmp_path / "ada.onnx")
    values = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, weight in rounding["weights"].items():
        encoding = rounding["encodings"][name]
        integers = torch.from_numpy(values[name].astype("int64"))
        shape = [-1] + [1] * (integers.dim() - 1) if encoding["axis"] is not None else []  # axis 0: output channels
        zero_point, scale = encoding["zero_point"].reshape(shape), encoding["scale"].reshape(shape)
        dequantized = (integers - zero_point).float() * scale
        assert torch.equal(dequantized, weight), name


def nearest_rounding(state: steps.PipelineState, name: str, quant: QuantConfig = W4) -> torch.Tensor:
    """The nearest rounding of the FP32 weight `name` on quant's grid."""
    return quantize_weight(state.model.get_submodule(name.removesuffix(".weight")), quant)


def test_bias_correction_after_adaround_removes_the_rounded_weights_error():
    # The first conv's input is the model input x, so its correction is exactly mean over samples and positions of
    # conv(x; W_rounded - W) per output channel; the weights stay the rounded ones.
    state, batches = folded_state(), calibration()
    rounding = rounding_of(state)
    both = steps.quantized_model(state, W4, "bias_correction_empirical", rounding, batches)
    rounded_only = steps.quantized_model(state, W4, None, rounding, batches)
    first = "0"
    error = rounding["weights"][f"{first}.weight"] - state.model.get_submodule(first).weight.detach()
    x = torch.cat([inputs for inputs, _ in batches])
    expected = nn.functional.conv2d(x, error, padding=1).mean(dim=(0, 2, 3))
    shift = rounded_only.get_submodule(first).bias - both.get_submodule(first).bias
    assert torch.allclose(shift, expected, atol=1e-6)
    nearest_error = nearest_rounding(state, f"{first}.weight") - state.model.get_submodule(first).weight.detach()
    assert not torch.allclose(expected, nn.functional.conv2d(x, nearest_error, padding=1).mean(dim=(0, 2, 3)))
    for name, weight in rounding["weights"].items():
        assert torch.equal(dict(both.named_parameters())[name].detach(), weight)
    assert state.model.get_submodule(first).bias is not None  # BN fold gave it one
    assert not torch.equal(state.model.get_submodule(first).weight, rounding["weights"][f"{first}.weight"])


# -- a work unit: determinism and memoization -------------------------------------------------------------------


CONFIG = {
    "models": ["tiny"],
    "steps": ["bn_fold", "bn_fold+adaround", "bn_fold+adaround+bias_correction_empirical"],
    "quant": ["w4a8_per_tensor_minmax", "w4a16_per_tensor_minmax", "w4a8_per_channel_minmax"],
    "data": {"dataset": "cifar10", "calibration": 32, "batch_size": 16},
    "adaround": {"iterations": 10, "seed": 3},
}


class TinyResources(Resources):
    """Resources for the tiny model on random 6x6 images (no checkpoint, no files)."""

    def _prepare(self, spec):
        generator = torch.Generator().manual_seed(2)
        images = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8, generator=generator)
        image_set = ImageSet(images, torch.arange(32) % 10, [str(i) for i in range(32)], "random", "cifar10")
        preprocessing = Preprocessing(None, 6, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
        batches = [(images[i:i + 16].float() / 64 - 2, image_set.labels[i:i + 16]) for i in (0, 16)]
        state = steps.PipelineState(graph.prepare_model(tiny_model()).eval())
        return ModelInputs(state, preprocessing, image_set, image_set, batches, [(x,) for x, _ in batches])


def run_units(config_table: dict, memo: Memo) -> tuple[dict, int]:
    config = parse_config(config_table)
    settings = Settings(config, data_root=None, progress=False)
    resources = TinyResources(settings)
    rows, runs = {}, 0
    for unit in plan(config, {"tiny": config.combinations}):
        result = execute_unit(unit, settings, resources, memo)
        rows |= {key: {k: v for k, v in row.items() if k != "seconds"} for key, row in result.rows.items()}
        runs += result.work.adaround_runs
    return rows, runs


def test_adaround_runs_once_per_weight_grid_and_the_same_seed_gives_the_same_rows():
    rows, runs = run_units(CONFIG, Memo())
    assert len(rows) == 9
    # 6 AdaRound rows on 2 weight grids (w4 per tensor, for a8 and a16; w4 per channel): 2 optimizations
    assert runs == 2
    again, _ = run_units(CONFIG, Memo())
    assert again == rows
    other_seed, runs = run_units({**CONFIG, "adaround": {"iterations": 10, "seed": 4}}, Memo())
    assert runs == 2


# -- the [adaround] table and the config hash --------------------------------------------------------------------


def base_config(**changes) -> dict:
    return {"models": ["resnet18_cifar10"], "steps": ["bn_fold", "bn_fold+adaround"],
            "quant": ["w4a8_per_tensor_minmax"], "data": {"dataset": "cifar10"}, **changes}


def test_adaround_defaults_are_the_librarys_and_options_reach_the_settings():
    assert parse_config(base_config()).adaround.settings() == AdaroundSettings()
    spec = parse_config(base_config(adaround={"iterations": 50, "calibration_images": 256, "reg_param": 0.1,
                                              "beta_range": [10, 1], "warm_start": 0.1, "seed": 5})).adaround
    assert spec.settings() == AdaroundSettings(iterations=50, reg_param=0.1, beta_range=(10.0, 1.0), warm_start=0.1,
                                               seed=5)
    assert spec.calibration_images == 256


@pytest.mark.parametrize("table, key", [
    ({"iterations": 0}, "adaround.iterations"), ({"iterations": 1.5}, "adaround.iterations"),
    ({"calibration_images": -1}, "adaround.calibration_images"), ({"reg_param": -1}, "adaround.reg_param"),
    ({"beta_range": [20]}, "adaround.beta_range"), ({"beta_range": [20, 0]}, "adaround.beta_range"),
    ({"warm_start": 1.0}, "adaround.warm_start"), ({"seed": -2}, "adaround.seed"), ({"lambda": 1}, "'lambda'"),
])
def test_bad_adaround_options_are_errors_naming_the_key(table, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(base_config(adaround=table))


def test_the_hash_covers_adaround_options_only_where_a_row_runs_adaround():
    without = base_config(steps=["bn_fold"])
    assert parse_config(without).hash == parse_config({**without, "adaround": {"iterations": 5}}).hash
    assert "adaround" not in parse_config(without).to_dict()
    hashes = {parse_config(base_config(adaround=table)).hash
              for table in ({}, {"iterations": 5}, {"seed": 1}, {"beta_range": [10, 2]}, {"calibration_images": 64})}
    assert len(hashes) == 5
    assert parse_config(base_config()).hash == parse_config(base_config(adaround={"iterations": 1000})).hash


@pytest.mark.slow
def test_a_sweep_runs_adaround_once_for_two_rows_and_deploys_them(tmp_path, data_root, models_dir):
    require_extra("onnxruntime")
    text = (SWEEP_CONFIG.replace('steps = ["bn_fold", "bn_fold+relu6_to_relu", "bn_fold+cls_relu6_clip", '
                                 '"bn_fold+cls_relu6_clip+hbf+bias_correction"]',
                                 'steps = ["bn_fold+cls_relu6_clip+hbf+adaround", '
                                 '"bn_fold+cls_relu6_clip+hbf+adaround+bias_correction"]')
            .replace(', "w4a8_per_tensor_minmax"]', "]").replace('"w8a8_per_tensor_minmax"', '"w4a8_per_tensor_minmax"'))
    config = parse_config(tomllib.loads(text + '[eval]\ndeploy = ["onnxruntime"]\n[adaround]\niterations = 3\n'))
    assert [len(c) for c in config.combinations] == [4, 5] and config.quant == ("w4a8_per_tensor_minmax",)
    outcome = run_sweep(config, tmp_path / "out", data_root=data_root, models_dir=models_dir, progress=False)
    assert outcome.work.adaround_runs == 1  # both rows share one AdaRound
    rows = outcome.table
    assert len(rows) == 2 and rows["quant_top1"].notna().all()
    # the rounded weights export exactly: every layer on ONNX Runtime's integers, its predictions the sim's
    assert (rows["onnxruntime_integer_layers"] == 53).all() and (rows["onnxruntime_float_layers"] == 0).all()
    assert (rows["onnxruntime_agreement"] >= 90).all()
