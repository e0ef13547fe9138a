"""Activation equalization (SmoothQuant-style migration): hand-computed scales and weights on a tiny conv -> ReLU ->
conv, the alpha limits, the ReLU6 policies, FP32 kept on a residual CNN and on MobileNetV2, the sweep steps' rules,
their determinism in a sweep and the [act_equalize] config table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import assert_layer, randomize_batch_norms, relative_error, set_weight
from torch import nn

import clebench
from clebench import graph, layers
from clebench.activation_equalization import equalize_activations
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cle_diagnostics import channel_extrema_at
from clebench.sweep import fp32_check, steps
from clebench.sweep.api import build_config
from clebench.sweep.config import ConfigError, parse_config
from clebench.sweep.plan import plan
from clebench.sweep.run import prefix_identities

# x over both batches is {1, 2, -3}; the tiny net's activations (after ReLU) are then
#   channel 0: relu(2x)      -> 2, 4, 0  -> a = 4
#   channel 1: relu(3x + 3)  -> 6, 9, 0  -> a = 9
#   channel 2: relu(0x - 1)  -> 0, 0, 0  -> a = 0 (a dead channel)
BATCHES = [(torch.tensor([1.0, -3.0]).view(2, 1, 1, 1),), (torch.tensor([2.0]).view(1, 1, 1, 1),)]


class Tiny(nn.Module):
    """conv1 (1 -> 3, 1x1) -> activation -> conv2 (3 -> 2, 1x1); max|W2[:, c]| = 1, 4, 5."""

    def __init__(self, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = set_weight(nn.Conv2d(1, 3, 1), [2.0, 3.0, 0.0], [0.0, 3.0, -1.0])
        self.act = activation or nn.ReLU()
        self.conv2 = set_weight(nn.Conv2d(3, 2, 1), [[1.0, -4.0, 5.0], [0.5, 2.0, -1.0]], [0.5, -1.0])

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*batch) for batch in BATCHES])


def test_tiny_pair_hand_computed():
    model = Tiny()
    expected = outputs(model)
    (pair,) = equalize_activations(model, BATCHES)
    # s = sqrt(a / w) = sqrt(4 / 1), sqrt(9 / 4); the dead channel's s = 0 becomes 1
    assert (pair.layer1, pair.layer2) == ("conv1", "conv2")
    torch.testing.assert_close(pair.scale, torch.tensor([2.0, 1.5, 1.0]))
    assert_layer(model.conv1, [[1.0], [2.0], [0.0]], [0.0, 2.0, -1.0])  # W1[c] / s, b1[c] / s
    assert_layer(model.conv2, [[2.0, -6.0, 5.0], [1.0, 3.0, -1.0]], [0.5, -1.0])  # W2[:, c] * s, b2 untouched
    torch.testing.assert_close(outputs(model), expected)


@pytest.mark.parametrize("alpha, scale, conv1, conv2", [
    # alpha = 1: s = a = 4, 9 -> every live activation channel's max becomes 1
    (1.0, [4.0, 9.0, 1.0], ([[0.5], [1 / 3], [0.0]], [0.0, 1 / 3, -1.0]), [[4.0, -36.0, 5.0], [2.0, 18.0, -1.0]]),
    # alpha = 0: s = 1 / w = 1, 1/4, 1/5 -> every weight column's max becomes 1 (the dead channel's too: a^0 = 1)
    (0.0, [1.0, 0.25, 0.2], ([[2.0], [12.0], [0.0]], [0.0, 12.0, -5.0]), [[1.0, -1.0, 1.0], [0.5, 0.5, -0.2]]),
])
def test_alpha_limits(alpha, scale, conv1, conv2):
    model = Tiny()
    expected = outputs(model)
    (pair,) = equalize_activations(model, BATCHES, alpha=alpha)
    torch.testing.assert_close(pair.scale, torch.tensor(scale))
    assert_layer(model.conv1, *conv1)
    assert_layer(model.conv2, conv2, [0.5, -1.0])
    low, high = channel_extrema_at(model, ["conv2"], BATCHES)["conv2"]
    activation_max, weight_max = torch.maximum(-low, high), layers.channel_abs_max(model.conv2.weight, 1)
    if alpha == 1.0:
        torch.testing.assert_close(activation_max, torch.tensor([1.0, 1.0, 0.0]))
    else:
        torch.testing.assert_close(weight_max, torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(outputs(model), expected)


def test_relu6_is_skipped_under_keep_and_clipped_per_channel_under_clip():
    kept = Tiny(nn.ReLU6())
    assert equalize_activations(kept, BATCHES, relu6="keep") == []
    assert_layer(kept.conv1, [[2.0], [3.0], [0.0]], [0.0, 3.0, -1.0])
    model = graph.prepare_model(Tiny(nn.ReLU6()))
    expected = outputs(model)
    (pair,) = equalize_activations(model, BATCHES, relu6="clip")
    # channel 1 is clipped at 6, so a = 4, 6, 0 and s = 2, sqrt(6 / 4), 1; the clip bounds become 6 / s
    torch.testing.assert_close(pair.scale, torch.tensor([2.0, 1.2247449, 1.0]))
    assert isinstance(model.act, ChannelClippedReLU)
    torch.testing.assert_close(model.act.upper, torch.tensor([3.0, 4.8989795, 6.0]))
    torch.testing.assert_close(outputs(model), expected)


def conv_bn(inputs: int, outputs: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False, groups=groups), nn.BatchNorm2d(outputs))


class Residual(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a depthwise separable pair, then Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.depthwise, self.pointwise = conv_bn(8, 8, groups=8), nn.Conv2d(8, 16, 1)
        self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def folded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    prepared = graph.prepare_model(randomize_batch_norms(model.eval()))
    fold_all_batch_norms(prepared)
    return prepared


@pytest.mark.parametrize("build, relu6, pairs", [
    (Residual, "keep", {("a.0", "b.0"), ("depthwise.0", "pointwise"), ("fc1", "fc2")}),
    (torchvision.models.mobilenet_v2, "clip", None),
])
def test_networks_keep_their_fp32_outputs(build, relu6, pairs):
    model = folded(build())
    generator = torch.Generator().manual_seed(3)
    calibration = [(torch.randn(4, 3, 32, 32, generator=generator),) for _ in range(2)]
    probe = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = model(probe)
    found = equalize_activations(model, calibration, relu6=relu6)
    with torch.no_grad():
        actual = model(probe)
    assert relative_error(actual, expected) <= 1e-4
    assert all(pair.scale.sub(1).abs().max() > 0.01 for pair in found)
    if pairs is not None:
        assert {(pair.layer1, pair.layer2) for pair in found} == pairs
    else:  # 17 blocks of two pairs through a ReLU6 (into and out of the depthwise conv), each ReLU6 now a clip, and
        # the 2 project -> expand pairs that no residual add interrupts
        assert len(found) == 36 and sum(isinstance(m, ChannelClippedReLU) for m in model.modules()) == 34


# -- the sweep steps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination, message", [
    ("act_equalize", "needs bn_fold first"),
    ("bn_fold+act_equalize+act_equalize_relu6_clip", "choose one activation-equalization step"),
    ("bn_fold+act_equalize+hbf", "out of order"),
    ("bn_fold+cls+act_equalize+bias_correction", "bias_correction after act_equalize"),
])
def test_impossible_combinations_are_one_line_errors(combination, message):
    with pytest.raises(steps.StepError, match=message) as error:
        steps.parse_combination(combination)
    assert "\n" not in str(error.value)


def test_steps_are_exact_ordered_after_hbf_and_out_of_the_presets():
    assert steps.parse_combination("bn_fold+cls+hbf+act_equalize+adaround+bias_correction_empirical")
    assert steps.parse_combination("bn_fold+cls_regions_relu6_clip+act_equalize_relu6_clip")
    act_steps = set(steps.ACT_EQUALIZE_STEPS)
    assert not any(act_steps & set(combination) for combination in steps.all_combinations())
    assert not any(act_steps & set(text.split("+")) for texts in steps.PRESETS.values() for text in texts)
    assert fp32_check.TOLERANCES["act_equalize"] == fp32_check.TOLERANCES["act_equalize_relu6_clip"] == 1e-4
    with pytest.raises(steps.StepError, match="act_equalize needs calibration images"):
        steps.apply_fp32_step("act_equalize", steps.PipelineState(Tiny()))


def test_apply_fp32_step_passes_the_data_and_alpha():
    state = steps.PipelineState(Tiny())
    assert steps.apply_fp32_step("act_equalize", state, calibration=BATCHES, alpha=1.0)
    assert_layer(state.model.conv2, [[4.0, -36.0, 5.0], [2.0, 18.0, -1.0]], [0.5, -1.0])


class SweepNet(nn.Module):
    """A CIFAR-sized net with BNs for the sweep: conv-BN-ReLU twice, pooling, a Linear to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def images(count: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator), k % 10) for k in range(count)]


SWEEP = {"steps": ["bn_fold", "bn_fold+act_equalize", "bn_fold+cls+hbf+act_equalize"],
         "quant": ["w8a4_per_tensor_minmax"], "data": {"limit": 10, "calibration": 10, "batch_size": 5,
                  "preprocess": {"crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}}


def sweep(config: dict, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results without timing, ranges.csv) of `config` on the random SweepNet and images."""
    torch.manual_seed(0)
    table = clebench.benchmark(config, models={"net": randomize_batch_norms(SweepNet())}, out=out,
                               datasets={"eval": images(10, 1), "calibration": images(10, 2)})
    return table.drop(columns=["seconds"]), pd.read_csv(out / "ranges.csv")


def test_a_sweep_gives_the_same_rows_twice_and_alpha_reaches_the_step(tmp_path):
    rows, ranges = sweep(SWEEP, tmp_path / "first")
    again, ranges_again = sweep(SWEEP, tmp_path / "again")
    assert rows["steps"].tolist() == SWEEP["steps"] and rows.equals(again) and ranges.equals(ranges_again)
    assert rows["fp32_top1"].nunique() == 1 and rows["fp32_step_change"].between(1e-9, 1e-4).all()
    other, other_ranges = sweep({**SWEEP, "act_equalize": {"alpha": 1.0}}, tmp_path / "alpha")
    assert other["config_hash"][0] != rows["config_hash"][0]
    equalized = lambda frame: frame[frame["steps"] == "bn_fold+act_equalize"]["range_max"].to_numpy()  # noqa: E731
    assert not np.allclose(equalized(ranges), equalized(other_ranges))


def test_a_ray_plan_gives_each_calibrated_prefix_its_own_unit():
    model = randomize_batch_norms(SweepNet())
    config = build_config(SWEEP, models={"net": model}, datasets={"eval": images(4, 1), "calibration": images(4, 2)})
    usable = {"net": config.combinations}
    identities = prefix_identities(config, {"net": model}, usable)  # what a Ray sweep plans with; no image is read
    assert identities[("net", ("bn_fold", "act_equalize"))] == "unbuilt bn_fold+act_equalize"
    assert identities[("net", ("bn_fold", "cls", "hbf", "act_equalize"))] == "unbuilt bn_fold+cls+hbf+act_equalize"
    assert [unit.prefixes[-1] for unit in plan(config, usable, identities=identities)] == [
        steps.parse_combination(text) for text in SWEEP["steps"]]


# -- the [act_equalize] table ----------------------------------------------------------------------------------------


def config(**changes) -> dict:
    return {"models": ["resnet18_cifar10"], "steps": ["bn_fold", "bn_fold+act_equalize"],
            "quant": ["w8a4_per_tensor_minmax"], "data": {"dataset": "cifar10"}, **changes}


@pytest.mark.parametrize("table, message", [
    ({"alpha": 1.5}, "act_equalize.alpha must be a number in [0, 1]"),
    ({"alpha": "0.5"}, "act_equalize.alpha must be a number in [0, 1]"),
    ({"alpha": True}, "act_equalize.alpha must be a number in [0, 1]"),
    ({"beta": 0.5}, "unknown key 'beta' in [act_equalize]"),
])
def test_bad_act_equalize_options_are_one_line_errors(table, message):
    with pytest.raises(ConfigError) as error:
        parse_config(config(act_equalize=table))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_alpha_is_read_and_hashed_only_where_a_row_runs_the_step():
    assert parse_config(config()).act_equalize.alpha == 0.5
    assert parse_config(config(act_equalize={"alpha": 1})).act_equalize.alpha == 1.0
    without = config(steps=["bn_fold"])
    assert "act_equalize" not in parse_config(without).to_dict()
    assert parse_config(without).hash == parse_config({**without, "act_equalize": {"alpha": 0.2}}).hash
    assert parse_config(config()).hash == parse_config(config(act_equalize={"alpha": 0.5})).hash
    assert parse_config(config()).hash != parse_config(config(act_equalize={"alpha": 0.2})).hash
