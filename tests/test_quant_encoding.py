"""Grid math: hand-computed encodings, exact round trips on the grid, bounded error off it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from clebench.quant import (
    QuantConfig,
    asymmetric_encoding,
    full_signed_range_encoding,
    quantize_weight,
    symmetric_encoding,
    tensor_encoding,
)
from clebench.quant import encoding
from clebench.quant.encoding import MIN_SCALE, fake_quantize_per_tensor, weight_encoding


def test_symmetric_8bit_hand_computed():
    encoding = tensor_encoding(torch.tensor([-0.5, 0.25, 1.27]), bits=8, symmetric=True)
    assert float(encoding.scale) == pytest.approx(1.27 / 127)
    assert int(encoding.zero_point) == 0
    assert (encoding.quant_min, encoding.quant_max) == (-128, 127)
    assert float(encoding.max) == pytest.approx(1.27)
    assert float(encoding.min) == pytest.approx(-128 * 1.27 / 127)


@pytest.mark.parametrize("values, scale", [
    ([-1.0, 0.5], 1.0 / 8),  # negative side dominates: -1 is exactly the level -8 (scale -min / 2^(b-1))
    ([1.0, -0.5], 1.0 / 7),  # positive side dominates: the DFQ rule max / (2^(b-1) - 1)
    ([-0.875, 1.0], 1.0 / 7),  # 0.875 * 8 = 7 < 1.0 * 7: still the positive side
])
def test_full_signed_range_4bit_hand_computed(values, scale):
    """AIMET 2.x's symmetric rule, which the DFQ rule (max|x| / 7 for all three) does not follow."""
    encoding = tensor_encoding(torch.tensor(values), bits=4, symmetric=True, full_signed_range=True)
    assert float(encoding.scale) == pytest.approx(scale)
    assert (int(encoding.zero_point), encoding.quant_min, encoding.quant_max) == (0, -8, 7)
    assert float(tensor_encoding(torch.tensor(values), bits=4, symmetric=True).scale) == pytest.approx(1.0 / 7)
    per_channel = full_signed_range_encoding(torch.tensor([-1.0, -0.5]), torch.tensor([0.5, 1.0]), 4, axis=0)
    assert per_channel.scale.tolist() == pytest.approx([1.0 / 8, 1.0 / 7])


def test_weight_encoding_follows_the_configs_aimet_rules():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, 0.5]]))
    assert float(weight_encoding(layer, QuantConfig(weight_bits=4)).scale) == pytest.approx(1.0 / 7)
    assert float(weight_encoding(layer, QuantConfig(weight_bits=4, aimet_rules=True)).scale) == pytest.approx(1.0 / 8)


def test_asymmetric_8bit_hand_computed():
    # range [-1, 3]: scale = 4 / 255, zero point = round(255 / 4) = 64; the range is re-derived from both
    encoding = tensor_encoding(torch.tensor([-1.0, 0.5, 3.0]), bits=8, symmetric=False)
    scale = 4.0 / 255
    assert float(encoding.scale) == pytest.approx(scale)
    assert int(encoding.zero_point) == 64
    assert float(encoding.min) == pytest.approx(-64 * scale)
    assert float(encoding.max) == pytest.approx(191 * scale)


def test_all_positive_range_is_widened_to_zero():
    encoding = tensor_encoding(torch.tensor([2.0, 5.1]), bits=8, symmetric=False)
    assert int(encoding.zero_point) == 0
    assert float(encoding.scale) == pytest.approx(5.1 / 255)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_negative_tensor(symmetric):
    x = torch.tensor([-3.0, -1.5, -0.2])
    encoding = tensor_encoding(x, bits=4, symmetric=symmetric)
    if symmetric:
        assert float(encoding.scale) == pytest.approx(3.0 / 7)
        assert int(encoding.zero_point) == 0
    else:  # [-3, 0] on [0, 15]: zero point at the top of the grid
        assert float(encoding.scale) == pytest.approx(3.0 / 15)
        assert int(encoding.zero_point) == 15
        assert float(encoding.max) == 0.0
    assert torch.allclose(encoding.fake_quantize(x)[0], x[0])  # the extreme value is on the grid


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_tensor_gives_a_valid_grid(symmetric):
    x = torch.zeros(2, 3)
    encoding = tensor_encoding(x, bits=8, symmetric=symmetric)
    assert float(encoding.scale) == MIN_SCALE
    assert int(encoding.zero_point) == 0
    out = encoding.fake_quantize(x)
    assert torch.equal(out, x)
    assert torch.isfinite(encoding.min).all() and torch.isfinite(encoding.max).all()


def test_dead_channel_per_channel():
    weight = torch.stack([torch.zeros(3), torch.tensor([-1.0, 0.5, 2.0])])
    encoding = tensor_encoding(weight, bits=8, symmetric=True, axis=0)
    assert encoding.scale.tolist() == pytest.approx([MIN_SCALE, 2.0 / 127])
    out = encoding.fake_quantize(weight)
    assert torch.isfinite(out).all() and torch.equal(out[0], weight[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        tensor_encoding(torch.tensor([0.0, bad]), bits=8, symmetric=False)


@pytest.mark.parametrize("bits", [1, 17, 8.5])
def test_bad_bit_widths_are_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        symmetric_encoding(torch.tensor(1.0), bits)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_round_trip_exact_on_grid_and_bounded_off_grid(bits, symmetric):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=generator) * 3 + (0 if symmetric else 1)
    encoding = tensor_encoding(x, bits, symmetric)
    levels = torch.arange(encoding.quant_min, encoding.quant_max + 1, dtype=torch.float32)[::max(1, 2 ** (bits - 8))]
    on_grid = (levels - float(encoding.zero_point)) * encoding.scale
    assert torch.equal(encoding.fake_quantize(on_grid), on_grid)
    out = encoding.fake_quantize(x)
    inside = (x >= encoding.min) & (x <= encoding.max)
    assert inside.float().mean() > 0.99  # min / max of x itself: only the re-derived asymmetric edges clip
    # x * (1 / scale) is rounded in float32: up to ~2^bits * 2^-23 grid units off before rounding to the grid
    assert (out[inside] - x[inside]).abs().max() <= float(encoding.scale) / 2 * (1 + 2.0 ** (bits - 22))
    beyond = torch.tensor([float(encoding.max) + 10, float(encoding.min) - 10])
    assert torch.allclose(encoding.fake_quantize(beyond), torch.stack([encoding.max, encoding.min]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_round_trip_and_error_bound(symmetric):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, 3, 3, generator=generator) * torch.tensor([0.01, 0.1, 1, 10, 100, 0.5]).view(6, 1, 1, 1)
    encoding = tensor_encoding(weight, 6, symmetric, axis=0)
    assert encoding.scale.shape == (6,)
    out = encoding.fake_quantize(weight)
    scale = encoding.scale.view(6, 1, 1, 1)
    assert ((out - weight).abs() <= scale / 2 * (1 + 1e-5)).all()  # exact min / max: nothing clips
    on_grid = (torch.randint(encoding.quant_min, encoding.quant_max + 1, weight.shape, generator=generator)
               - encoding.zero_point.view(6, 1, 1, 1)) * scale
    assert torch.equal(encoding.fake_quantize(on_grid), on_grid)


def test_per_channel_on_conv_transpose_uses_output_axis_1():
    layer = nn.ConvTranspose2d(4, 3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 3, 2, 2) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1))
    encoding = weight_encoding(layer, QuantConfig(per_channel=True))
    assert encoding.axis == 1
    expected = layer.weight.detach().abs().amax(dim=(0, 2, 3)) / 127
    assert torch.allclose(encoding.scale, expected)
    assert torch.equal(quantize_weight(layer, QuantConfig(per_channel=True)),
                       torch.fake_quantize_per_channel_affine(layer.weight.detach(), expected.float(),
                                                              torch.zeros(3, dtype=torch.int32), 1, -128, 127))


def test_quantize_weight_leaves_the_layer_alone():
    layer = nn.Conv2d(2, 4, 3)
    before = layer.weight.detach().clone()
    quantized = quantize_weight(layer, QuantConfig(weight_bits=4))
    assert torch.equal(layer.weight, before)
    assert not torch.equal(quantized, before)
    assert quantized.unique().numel() <= 16


def test_fast_8bit_path_and_fallback_are_bit_identical_to_torch_fake_quantize(monkeypatch):
    assert encoding.quint8_available()  # this torch still has the kernels: the fast path is the one tested first
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        scale = float(torch.rand(1, generator=generator)) * 0.1 + 1e-4
        zero_point = int(torch.randint(0, 256, (1,), generator=generator))
        k = torch.arange(-300, 300, dtype=torch.float32)  # grid points, ties (x.5) and clamping at both ends
        x = torch.cat([(k + 0.5) * scale, k * scale, torch.randn(5000, generator=generator) * scale * 200])
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
        assert torch.equal(encoding._quint8_round_trip(x, scale, zero_point), expected)
        with monkeypatch.context() as patch:
            patch.setattr(encoding, "quint8_available", lambda: False)
            assert torch.equal(fake_quantize_per_tensor(x, scale, zero_point, 0, 255), expected)
        assert torch.equal(fake_quantize_per_tensor(x, scale, zero_point, 0, 255), expected)


def test_deprecation_notice_is_silenced_only_inside_the_call():
    # A fresh process with warnings as errors: clebench's own call stays quiet, and the user's own call still raises
    # because importing clebench installs no process-wide filter (torch warns once per process unless warn_always).
    user_then_ours = (
        "import torch\n"
        "from clebench.quant.encoding import fake_quantize_per_tensor\n"
        "fake_quantize_per_tensor(torch.randn(100), 0.01, 128, 0, 255)\n"
        "torch.set_warn_always(True)\n"
        "fake_quantize_per_tensor(torch.randn(100), 0.01, 128, 0, 255)\n"
        "torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8)\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", user_then_ours],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "UserWarning: torch.quantize_per_tensor" in result.stderr, result.stderr


def test_no_quint8_kernels_means_the_fallback(monkeypatch):
    encoding._quint8_probe.cache_clear()
    monkeypatch.delattr(torch, "quint8")
    try:
        assert not encoding.quint8_available()
        x = torch.linspace(-3, 3, 1001)
        assert torch.equal(fake_quantize_per_tensor(x, 0.01, 128, 0, 255),
                           torch.fake_quantize_per_tensor_affine(x, 0.01, 128, 0, 255))
    finally:
        encoding._quint8_probe.cache_clear()


def test_fake_quantize_keeps_gradients_when_asked():
    x = torch.randn(10, requires_grad=True)
    fake_quantize_per_tensor(x, 0.01, 128, 0, 255).sum().backward()
    assert x.grad is not None


def test_to_dict_is_json_serialisable_and_consistent():
    per_tensor = asymmetric_encoding(torch.tensor(-1.0), torch.tensor(3.0), 8).to_dict()
    per_channel = symmetric_encoding(torch.tensor([1.0, 2.0]), 4, axis=0).to_dict()
    assert json.loads(json.dumps(per_tensor))["zero_point"] == 64
    assert per_tensor["offset"] == -64 and per_tensor["per_channel"] is False and per_tensor["symmetric"] is False
    assert per_channel["scale"] == pytest.approx([1 / 7, 2 / 7]) and per_channel["per_channel"] is True
    assert json.dumps(per_channel)
