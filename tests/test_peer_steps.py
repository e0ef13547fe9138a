"""The peer steps (clebench.peers): AIMET's CLE and Brevitas' equalization as sweep steps; their rules, options, FP32
check, missing extras and meta.json record. Tests that run a peer skip where it is not installed, except under CI,
which installs the `bench` / `brevitas` extras (conftest.require_extra)."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import randomize_batch_norms, relative_error, require_extra
from clebench import cli, graph, layers
from clebench.errors import MissingExtraError
from clebench.sweep import fp32_check, steps
from clebench.sweep.config import ConfigError, parse_config
from clebench.sweep.run import peer_versions, run_sweep

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 8, 8)
PEER_MODULES = {"aimet_cle": ("aimet_torch", "aimet-torch", "bench"),
                "brevitas_equalize": ("brevitas", "brevitas", "brevitas")}


def small_net(activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """conv-BN-act, depthwise conv-BN-act, 1x1 conv-BN-act, linear on every pixel; realistic BN statistics."""
    torch.manual_seed(0)
    return randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), activation(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), activation(),
        nn.Flatten(), nn.Linear(4 * SHAPE[2] * SHAPE[3], 3)))


def state_of(model: nn.Module) -> steps.PipelineState:
    return steps.PipelineState(graph.prepare_model(model).eval(), input_shape=SHAPE)


def applied(combination: str, model: nn.Module, **options) -> steps.PipelineState:
    state = state_of(model)
    for step in steps.parse_combination(combination):
        steps.apply_fp32_step(step, state, **options)
    return state


PROBE = 3 * torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE)


def weights(model: nn.Module) -> list[torch.Tensor]:
    """Every conv / linear layer's weight and bias, in module order."""
    return [p.detach() for m in model.modules() if layers.is_layer(m) for p in (m.weight, m.bias)]


# -- rules ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["aimet_cle", "relu6_to_relu+aimet_cle", "brevitas_equalize+adaround",
                                  "brevitas_equalize_no_merge_bias+bias_correction_empirical",
                                  "relu6_to_relu+aimet_cle+adaround+bias_correction_empirical"])
def test_a_peer_step_takes_relu6_to_relu_before_it_and_adaround_or_empirical_correction_after(text):
    assert steps.combination_name(steps.parse_combination(text)) == text


@pytest.mark.parametrize("text, message", [
    ("bn_fold+aimet_cle", "bn_fold with aimet_cle: the peer step runs its toolkit's whole pipeline"),
    ("brevitas_equalize+cls+hbf", "cls and hbf with brevitas_equalize"),
    ("aimet_cle+bias_correction", "analytical bias correction reads the BN statistics"),
    ("aimet_cle+brevitas_equalize", "choose one peer step at most"),
    ("aimet_cle+relu6_to_relu", "out of order"),
])
def test_a_peer_step_refuses_clebench_s_own_equalization_around_it(text, message):
    with pytest.raises(steps.StepError, match=re.escape(message)):
        steps.parse_combination(text)


def test_peer_steps_stay_out_of_the_presets():
    listed = {step for name in [*steps.PRESETS, "all"] for combination in steps.preset(name) for step in combination}
    assert not listed & set(steps.PEER_STEPS)


def test_brevitas_steps_are_bounded_by_the_fp32_check_and_aimet_cle_is_measured_as_hbf():
    assert all(fp32_check.TOLERANCES[step] == fp32_check.EXACT_TOLERANCE for step in steps.BREVITAS_STEPS)
    assert "aimet_cle" not in fp32_check.TOLERANCES
    assert fp32_check.row_columns({"aimet_cle": 0.25}) == {"fp32_step_change": 0.0, "hbf_fp32_change": 0.25}
    assert fp32_check.row_columns({"brevitas_equalize": 1e-6}) == {"fp32_step_change": 1e-6, "hbf_fp32_change": None}


# -- the [brevitas] options -----------------------------------------------------------------------------------------

def config(steps_: list[str], **brevitas) -> dict:
    raw = {"models": ["resnet18_cifar10"], "steps": steps_, "quant": ["w8a8_per_tensor_minmax"],
           "data": {"dataset": "cifar10", "limit": 100}}
    return raw | ({"brevitas": brevitas} if brevitas else {})


def test_brevitas_options_are_hashed_only_where_a_brevitas_step_runs():
    plain = parse_config(config(["bn_fold"]))
    assert "brevitas" not in plain.to_dict() and plain.peers == []
    assert parse_config(config(["bn_fold"], iterations=3)).hash == plain.hash
    default, three = (parse_config(config(["brevitas_equalize"], **options)) for options in ({}, {"iterations": 3}))
    assert default.to_dict()["brevitas"] == {"iterations": 20} and three.brevitas.iterations == 3
    assert default.hash != three.hash
    assert parse_config(config(["relu6_to_relu+aimet_cle", "brevitas_equalize"])).peers == ["aimet", "brevitas"]


@pytest.mark.parametrize("table, message", [({"iterations": 0}, "brevitas.iterations must be a positive integer"),
                                            ({"iterations": True}, "brevitas.iterations must be a positive integer"),
                                            ({"merge_bias": False}, "unknown key 'merge_bias' in [brevitas]")])
def test_bad_brevitas_options_are_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(config(["brevitas_equalize"], **table))


# -- a peer that is not installed -----------------------------------------------------------------------------------

def hide(monkeypatch, module: str) -> None:
    """Make `module` and its submodules unimportable for the test."""
    for name in [name for name in sys.modules if name == module or name.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("step", list(PEER_MODULES))
def test_a_peer_that_is_not_installed_is_one_line_naming_its_extra(monkeypatch, step):
    module, distribution, extra = PEER_MODULES[step]
    hide(monkeypatch, module)
    expected = rf'^{distribution} is not installed: pip install -e "\.\[{extra}\]" \(the optional {extra} extra\)$'
    with pytest.raises(MissingExtraError, match=expected):
        steps.apply_fp32_step(step, state_of(small_net()))
    with pytest.raises(MissingExtraError, match=expected):  # run_metadata: before the sweep loads a model
        peer_versions(parse_config(config([step])))


def test_a_sweep_with_a_missing_peer_stops_before_any_work_with_one_line(monkeypatch, tmp_path, capsys, data_root,
                                                                        models_dir):
    hide(monkeypatch, "brevitas")
    path = tmp_path / "peers.toml"
    path.write_text('models = ["resnet18_cifar10"]\nsteps = ["bn_fold", "brevitas_equalize"]\n'
                    'quant = ["w8a8_per_tensor_minmax"]\n[data]\ndataset = "cifar10"\nlimit = 10\n')
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    assert stderr == ('clebench sweep: error: brevitas is not installed: pip install -e ".[brevitas]" '
                      "(the optional brevitas extra)\n")
    assert not (tmp_path / "out").exists()


# -- AIMET ----------------------------------------------------------------------------------------------------------

def test_aimet_cle_is_aimet_s_equalize_model_on_the_pipeline_s_model():
    cle = require_extra("aimet_torch.cross_layer_equalization")
    expected = state_of(small_net()).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cle.equalize_model(expected, dummy_input=torch.zeros(SHAPE))
    state = applied("aimet_cle", small_net())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in state.model.modules())
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), expected.state_dict().values()))
    folded = applied("bn_fold", small_net())
    assert any(not torch.allclose(a, b) for a, b in zip(weights(state.model), weights(folded.model)))  # it scaled


@pytest.mark.parametrize("activation, ours", [(nn.ReLU, "bn_fold+cls+hbf"), (nn.ReLU6, "bn_fold+cls_relu6_keep+hbf")])
def test_aimet_cle_builds_the_network_of_clebench_s_aimet_api_pipeline(activation, ours):
    require_extra("aimet_torch")
    theirs, mine = applied("aimet_cle", small_net(activation)), applied(ours, small_net(activation))
    for a, b in zip(weights(theirs.model), weights(mine.model)):
        assert relative_error(a, b) < 1e-5
    assert relative_error(output(theirs.model), output(mine.model)) < 1e-5


# -- Brevitas -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", list(steps.BREVITAS_STEPS))
def test_brevitas_equalize_keeps_the_fp32_function_and_equalizes(step):
    require_extra("brevitas")
    before = state_of(small_net()).model
    state = applied(step, small_net(), brevitas_iterations=3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in state.model.modules())
    assert fp32_check.relative_change(output(state.model), output(before)) < fp32_check.EXACT_TOLERANCE
    folded = applied("bn_fold", small_net())
    assert any(not torch.allclose(a, b) for a, b in zip(weights(state.model), weights(folded.model)))


def test_merge_bias_and_iterations_reach_brevitas():
    require_extra("brevitas")
    built = [weights(applied(step, small_net(), brevitas_iterations=iterations).model)
             for step, iterations in [("brevitas_equalize", 1), ("brevitas_equalize", 5),
                                      ("brevitas_equalize_no_merge_bias", 5)]]
    for first, second in [(built[0], built[1]), (built[1], built[2])]:
        assert any(not torch.allclose(a, b) for a, b in zip(first, second))


def test_relu6_to_relu_then_brevitas_equalize_is_brevitas_pipeline_on_the_raw_model():
    quantize = require_extra("brevitas.graph.quantize")
    expected = quantize.preprocess_for_quantize(small_net(nn.ReLU6), equalize_iters=20, equalize_merge_bias=True)
    state = applied("relu6_to_relu+brevitas_equalize", small_net(nn.ReLU6))
    assert not any(isinstance(m, nn.ReLU6) for m in state.model.modules())
    ours, theirs = state.model.state_dict(), expected.state_dict()
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours.values(), theirs.values()))


@pytest.mark.slow
def test_brevitas_rows_equal_the_standalone_script(tmp_path, data_root, models_dir):
    require_extra("brevitas")
    quant, images = "w4a8_per_tensor_minmax", {"limit": 200, "calibration": 64, "batch_size": 100}
    raw = {"models": ["mobilenet_v2_cifar10"], "steps": ["relu6_to_relu+brevitas_equalize"], "quant": [quant],
           "data": {"dataset": "cifar10", **images}, "brevitas": {"iterations": 2}}
    row = run_sweep(parse_config(raw), tmp_path / "sweep", data_root=data_root, models_dir=models_dir,
                    progress=False).table.iloc[0]
    script = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "peers" / "brevitas_standalone.py"), "--model", "mobilenet_v2_cifar10",
         "--quant", quant, "--iterations", "2", "--data", str(data_root), "--models-dir", str(models_dir),
         *[f"--{key.replace('_', '-')}={value}" for key, value in images.items()]],
        capture_output=True, text=True, check=True, timeout=600).stdout
    assert f"FP32 top-1 {row['fp32_top1']:.2f} on 200 test images" in script
    assert f"{quant}: top-1 {row['quant_top1']:.2f}" in script
    meta = (tmp_path / "sweep" / "meta.json").read_text()
    assert '"brevitas": "' in meta


@pytest.mark.slow
def test_an_aimet_cle_row_scores_like_clebench_s_aimet_api_row(tmp_path, data_root, models_dir):
    """The quick AIMET row CI runs: aimet_cle beside bn_fold+cls_relu6_keep+hbf (what AIMET >= 2.4 does to ReLU6) on
    MobileNetV2, the same network up to float rounding, so the same FP32 predictions and at most one image apart."""
    require_extra("aimet_torch")
    raw = {"models": ["mobilenet_v2_cifar10"], "steps": ["aimet_cle", "bn_fold+cls_relu6_keep+hbf"],
           "quant": ["w8a8_per_tensor_minmax"], "data": {"dataset": "cifar10", "limit": 100, "calibration": 32,
                                                         "batch_size": 100}}
    table = run_sweep(parse_config(raw), tmp_path / "sweep", data_root=data_root, models_dir=models_dir,
                      progress=False).table.set_index("steps")
    theirs, ours = table.loc["aimet_cle"], table.loc["bn_fold+cls_relu6_keep+hbf"]
    assert theirs["fp32_top1"] == ours["fp32_top1"]
    assert abs(theirs["quant_top1"] - ours["quant_top1"]) <= 1.0  # 1 image of 100
    assert theirs["hbf_fp32_change"] < fp32_check.EXACT_TOLERANCE
    assert '"aimet-torch": "' in (tmp_path / "sweep" / "meta.json").read_text()
