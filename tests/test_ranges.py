"""Per-output-channel weight statistics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from clebench.ranges import channel_stats, first_depthwise_conv, layer_ranges, weight_sqnr_db


def _set(layer: nn.Module, weight: list) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32).reshape(layer.weight.shape))
    return layer


def _only_row(model: nn.Module, bits: int = 8) -> dict:
    frame = layer_ranges(model, bits)
    assert len(frame) == 1
    return frame.iloc[0].to_dict()


def test_conv_ranges_and_ratio_skip_dead_channels():
    conv = _set(nn.Conv2d(1, 3, (1, 2)), [[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    row = _only_row(nn.Sequential(conv))
    assert row["layer"] == "0" and row["kind"] == "conv" and row["out_channels"] == 3
    assert row["range_min"] == 0.0
    assert row["range_max"] == 2.0
    assert row["range_ratio"] == 4.0  # 2 / 0.5: the dead channel is left out


def test_sqnr_is_infinite_for_weights_on_the_grid():
    # max |W| = 127 / 16, so the int8 scale is exactly 1 / 16 and every k / 16 is representable.
    conv = _set(nn.Conv2d(1, 1, (1, 5)), [127 / 16, -64 / 16, 3 / 16, 0.0, -127 / 16])
    assert _only_row(nn.Sequential(conv))["sqnr_db"] == math.inf


@pytest.mark.parametrize("bits, level", [(8, 38), (4, 2)])
def test_sqnr_matches_hand_computation(bits: int, level: int):
    # W = [1, 0.3], scale = 1 / (2^(b-1) - 1): 0.3 rounds to 38 / 127 (8 bit) or 2 / 7 (4 bit); 1 is on the grid.
    linear = _set(nn.Linear(2, 1), [[1.0, 0.3]])
    w = float(torch.tensor(0.3))
    expected = 10 * math.log10((1 + w**2) / (w - level / (2 ** (bits - 1) - 1)) ** 2)
    row = _only_row(nn.Sequential(linear), bits)
    assert row["kind"] == "linear"
    assert row["sqnr_db"] == pytest.approx(expected, abs=1e-3)


def test_sqnr_of_random_weights_tracks_the_6db_per_bit_rule():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    gain = weight_sqnr_db(weight, 9) - weight_sqnr_db(weight, 8)
    assert gain == pytest.approx(6.02, abs=0.3)


def test_conv_transpose_uses_axis_1():
    # weight [in=2, out=3, 1, 1]: the output channels are the columns.
    deconv = _set(nn.ConvTranspose2d(2, 3, 1), [[1.0, -4.0, 0.5], [0.25, 2.0, 0.1]])
    row = _only_row(nn.Sequential(deconv))
    assert row["kind"] == "conv_transpose" and row["out_channels"] == 3
    assert (row["range_min"], row["range_max"], row["range_ratio"]) == (0.5, 4.0, 8.0)


def test_grouped_conv_transpose_channels():
    # weight [in=4, out/g=2, 1, 1], groups 2: output channel 2g + j is column j of rows 2g, 2g + 1.
    deconv = _set(nn.ConvTranspose2d(4, 4, 1, groups=2), [[1.0, 2.0], [-0.5, 0.0], [3.0, 0.0], [0.0, -4.0]])
    stats = channel_stats(nn.Sequential(deconv), ["0"])
    assert stats["max"].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert stats["min"].tolist() == [-0.5, 0.0, 0.0, -4.0]
    row = _only_row(nn.Sequential(deconv))
    assert (row["out_channels"], row["range_min"], row["range_max"]) == (4, 1.0, 4.0)


def test_all_zero_layer_is_defined():
    conv = nn.Conv2d(2, 2, 3)
    nn.init.zeros_(conv.weight)
    row = _only_row(nn.Sequential(conv))
    assert (row["range_min"], row["range_max"], row["range_ratio"], row["sqnr_db"]) == (0.0, 0.0, 1.0, math.inf)


def test_rows_follow_named_modules_and_skip_non_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 2))
    frame = layer_ranges(model)
    assert frame["layer"].tolist() == ["0", "3", "4", "6"]
    assert frame["kind"].tolist() == ["conv", "depthwise", "conv", "linear"]
    assert frame["out_channels"].tolist() == [8, 8, 4, 2]
    assert list(frame.columns) == ["layer", "kind", "out_channels", "range_min", "range_max", "range_ratio", "sqnr_db"]


def test_dataparallel_names_are_unwrapped():
    model = nn.DataParallel(nn.Sequential(nn.Linear(3, 2)))
    assert layer_ranges(model)["layer"].tolist() == ["0"]


def test_bad_input_errors():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight[0] = float("nan")
    with pytest.raises(ValueError, match="'0'.*NaN"):
        layer_ranges(nn.Sequential(conv))
    with pytest.raises(ValueError, match="bits"):
        layer_ranges(nn.Sequential(nn.Linear(2, 2)), bits=1)


def test_channel_stats_quantiles():
    # Linear interpolation: sorted [1, 2, 3, 4] -> q1 1.75, median 2.5, q3 3.25; [0, 1, 2, 10] -> 0.75, 1.5, 4.
    conv = _set(nn.Conv2d(1, 2, (1, 4)), [[4.0, 1.0, 3.0, 2.0], [0.0, 10.0, 2.0, 1.0]])
    linear = _set(nn.Linear(2, 1), [[-1.0, 1.0]])
    stats = channel_stats(nn.Sequential(conv, nn.Flatten(), linear), ["0", "2"])
    assert stats["layer"].tolist() == ["0", "0", "2"]
    assert stats["channel"].tolist() == [0, 1, 0]
    expected = [[1.0, 1.75, 2.5, 3.25, 4.0], [0.0, 0.75, 1.5, 4.0, 10.0], [-1.0, -0.5, 0.0, 0.5, 1.0]]
    assert stats[["min", "q1", "median", "q3", "max"]].to_numpy().tolist() == expected


def test_channel_stats_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="no submodule 'conv1'.*0"):
        channel_stats(model, ["conv1"])
    with pytest.raises(TypeError, match="BatchNorm2d"):
        channel_stats(model, ["1"])
    with pytest.raises(TypeError, match="list"):
        channel_stats(model, "0")
    assert channel_stats(model, []).empty


def test_first_depthwise_conv():
    assert first_depthwise_conv(torchvision.models.mobilenet_v2()) == "features.1.conv.0.0"
    assert first_depthwise_conv(torchvision.models.resnet18()) is None
    grouped_only = nn.Sequential(nn.Conv2d(4, 8, 1, groups=2), nn.Conv2d(8, 8, 3, groups=8))
    assert first_depthwise_conv(grouped_only) == "1"
