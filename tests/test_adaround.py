"""AdaRound: the rounding math against hand-computed values, the optimization's results, AIMET's API and files."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import require_extra
from torch import nn

from clebench.adaround import (
    Adaround,
    AdaroundError,
    AdaroundParameters,
    AdaroundSettings,
    QuantScheme,
    apply_adaround_to_model,
    optimize_layer,
)
from clebench.adaround.rounding import RoundingVariable, annealed_beta, rectified_sigmoid, rounding_regularizer
from clebench.quant import QuantConfig, QuantSim
from clebench.quant.encoding import weight_encoding

W4 = QuantConfig(weight_bits=4, act_bits=None)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


def image_batches(count: int = 2, size: int = 16) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 6, 6, generator=generator),) for _ in range(count)]


def test_rectified_sigmoid_matches_hand_computed_values():
    v = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    sigmoid_1 = 1 / (1 + math.exp(-1))  # 0.7310586
    expected = torch.tensor([0.0, (1 - sigmoid_1) * 1.2 - 0.1, 0.5, sigmoid_1 * 1.2 - 0.1, 1.0])
    assert torch.allclose(rectified_sigmoid(v), expected, atol=1e-6)
    assert rectified_sigmoid(torch.tensor(-2.5)).item() == 0.0  # sigmoid(-2.5) * 1.2 = 0.091 < 0.1: clipped to 0


def test_regularizer_matches_hand_computed_values():
    h = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert rounding_regularizer(h, 2.0).item() == pytest.approx(0 + 0.75 + 1 + 0)
    assert rounding_regularizer(h, 20.0).item() == pytest.approx(0 + (1 - 0.5**20) + 1 + 0)


@pytest.mark.parametrize("beta", [None, 2.0, 20.0])
@pytest.mark.parametrize("per_channel", [False, True])
def test_soft_rounding_value_and_gradient_equal_the_composed_formulas(beta, per_channel):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    encoding = weight_encoding(_conv_with(weight), QuantConfig(weight_bits=3, act_bits=None, per_channel=per_channel))
    rounding = RoundingVariable(weight, encoding)
    with torch.no_grad():  # spread V so that some h clip at 0 and 1 and some levels at the grid's ends
        rounding.v.mul_(torch.rand_like(rounding.v) * 6).add_(torch.randn_like(rounding.v) * 3)
    upstream = torch.randn_like(weight)
    soft, regularizer = rounding.soft(beta)
    (grad,) = torch.autograd.grad((soft * upstream).sum() + 0.7 * regularizer, rounding.v)
    h = rectified_sigmoid(rounding.v)
    composed = rounding.dequantize(h)
    reg = rounding_regularizer(h, beta) if beta is not None else torch.zeros(())
    (expected,) = torch.autograd.grad((composed * upstream).sum() + 0.7 * reg, rounding.v)
    assert torch.allclose(soft, composed, atol=1e-6)
    assert regularizer.item() == pytest.approx(reg.item(), rel=1e-5, abs=1e-5)
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
    assert (grad == 0).any() and (grad != 0).any()


def test_the_grid_clamp_is_skipped_only_on_rows_whose_weights_cannot_leave_the_grid():
    from clebench.adaround.rounding import CPU_SLICE

    # 60,000 rows of 9 weights: three slices on a CPU. Only the last row holds weights at the grid's ends.
    torch.manual_seed(0)
    weight = torch.rand(60_000, 1, 3, 3) - 0.5
    weight[-1, 0, 0, :] = torch.tensor([-3.0, 2.9, 3.0])
    assert weight.numel() > 2 * CPU_SLICE
    encoding = weight_encoding(_conv_with(weight), QuantConfig(weight_bits=4, act_bits=None, aimet_rules=True))
    rounding = RoundingVariable(weight, encoding)
    assert not rounding.may_clamp(slice(0, 59_999)) and rounding.may_clamp(slice(59_990, 60_000))
    for fill in (-10.0, 10.0):  # every weight rounds down, then up: the largest one would pass quant_max
        with torch.no_grad():
            rounding.v.fill_(fill)
        soft, _ = rounding.soft(2.0)
        assert torch.equal(soft, rounding.dequantize(rectified_sigmoid(rounding.v)))
        levels = soft / encoding.scale + encoding.zero_point
        assert encoding.quant_min <= levels.min() and levels.max() <= encoding.quant_max
    assert (soft[-1, 0, 0, 2] / encoding.scale).item() == pytest.approx(encoding.quant_max - encoding.zero_point)
    with torch.no_grad():  # h inside (0, 1): where sigmoid * 1.2 - 0.1 is within an ulp of 0 or 1, the clamp's
        rounding.v.uniform_(-2.3, 2.3)  # gradient depends on that ulp (the other test covers clamped h)
    upstream = torch.randn_like(weight)
    soft, regularizer = rounding.soft(4.0)
    (grad,) = torch.autograd.grad((soft * upstream).sum() + 0.1 * regularizer, rounding.v)
    h = rectified_sigmoid(rounding.v)
    composed = rounding.dequantize(h)
    (expected,) = torch.autograd.grad((composed * upstream).sum() + 0.1 * rounding_regularizer(h, 4.0), rounding.v)
    assert torch.allclose(soft, composed, atol=1e-6)  # not equal: a vector loop's scalar tail rounds sigmoid apart
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", [None, nn.ReLU6()])
def test_the_written_out_squared_error_has_autograds_gradient_bit_for_bit(activation):
    from clebench.adaround.layer import _SquaredError, reconstruction_loss
    from clebench.adaround.rounding import CPU_SLICE

    torch.manual_seed(0)
    output = torch.randn(3, 5, 190, 190) * 4  # 541,500 elements: three slices, the last one partial
    assert CPU_SLICE < output.numel() < 3 * CPU_SLICE
    target = torch.randn_like(output).clamp(0, 6)
    grads, losses = [], []
    for loss_fn in (_SquaredError.apply, reconstruction_loss):
        leaf = output.clone().requires_grad_()
        loss = loss_fn(leaf if activation is None else activation(leaf), target)
        (grad,) = torch.autograd.grad(loss + 0.5, leaf)
        grads.append(grad)
        losses.append(loss.item())
    assert torch.equal(grads[0], grads[1])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    activated = output if activation is None else activation(output)
    per_position = (activated - target).pow(2).sum().item() / (3 * 190 * 190)  # summed over the 5 channels
    assert losses[0] == pytest.approx(per_position, rel=1e-5)


def _conv_with(weight: torch.Tensor) -> nn.Conv2d:
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_beta_is_off_during_warm_start_then_anneals_from_start_to_end():
    assert annealed_beta(19, 100, (20, 2), 0.2) is None
    assert annealed_beta(20, 100, (20, 2), 0.2) == pytest.approx(20)
    assert annealed_beta(60, 100, (20, 2), 0.2) == pytest.approx(11)
    assert annealed_beta(99, 100, (20, 2), 0.2) == pytest.approx(2, abs=0.01)


def test_rounding_starts_at_the_float_weight_and_hard_rounds_to_neighbouring_grid_points():
    layer = small_model()[0]
    encoding = weight_encoding(layer, W4)
    rounding = RoundingVariable(layer.weight, encoding)
    assert torch.allclose(rounding.dequantize(rectified_sigmoid(rounding.v)), layer.weight, atol=1e-5)
    hard = rounding.hard()
    assert torch.equal(encoding.fake_quantize(hard), hard)
    assert ((hard - layer.weight).abs() <= encoding.scale * (1 + 1e-5)).all()


@pytest.mark.parametrize("iterations", [2, 5])
def test_a_few_iterations_at_the_default_learning_rate_round_about_as_well_as_nearest(iterations):
    from torch.nn.functional import conv2d

    from clebench.adaround.layer import reconstruction_loss

    torch.manual_seed(0)
    layer = nn.Conv2d(32, 64, 3, padding=1)
    x = torch.randn(256, 32, 8, 8)
    x_q = x + 0.02 * torch.randn_like(x)
    with torch.no_grad():
        target = torch.relu(layer(x))
    encoding = weight_encoding(layer, W4)

    def error(weight: torch.Tensor) -> float:
        with torch.no_grad():
            return reconstruction_loss(torch.relu(conv2d(x_q, weight, layer.bias, padding=1)), target).item()

    rounding = optimize_layer(layer, encoding, x_q, target, torch.relu, AdaroundSettings(iterations=iterations),
                              torch.Generator().manual_seed(0))
    assert error(rounding.hard()) < 1.02 * error(encoding.fake_quantize(layer.weight.detach()))


def test_after_optimization_every_decision_is_binary_and_weights_lie_on_the_grid():
    model = small_model()
    layer = model[0]
    x = image_batches(1, 64)[0][0]
    encoding = weight_encoding(layer, W4)
    with torch.no_grad():
        target = torch.relu(layer(x))
    rounding = optimize_layer(layer, encoding, x, target, torch.relu, AdaroundSettings(iterations=500),
                              torch.Generator().manual_seed(0))
    h = rectified_sigmoid(rounding.v.detach())
    assert ((h == 0) | (h == 1)).all(), f"{int(((h > 0) & (h < 1)).sum())} of {h.numel()} decisions are not binary"
    rounded, encodings = apply_adaround_to_model(model, W4, image_batches(), AdaroundSettings(iterations=50))
    assert sorted(encodings) == ["0.weight", "2.weight", "4.weight"]
    for name, encoding in encodings.items():
        weight = rounded.get_submodule(name.removesuffix(".weight")).weight
        levels = weight.detach() / encoding.scale
        assert torch.equal(encoding.fake_quantize(weight), weight)
        assert (levels - levels.round()).abs().max() < 1e-5


def test_a_layer_whose_nearest_rounding_is_worse_gets_an_optimal_rounding():
    # w = [7, 0.45, 0.35] on the 4-bit grid with scale 1; the input is always (r, 1, 1), so the output is 7r + 0.8.
    # Rounding to nearest, (0, 0), misses by 0.8, both up by 1.2; one up and one down, by 0.2, is optimal.
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[7.0, 0.45, 0.35]]))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.stack([torch.rand(64, generator=generator), torch.ones(64), torch.ones(64)], 1),)]
    rounded, encodings = apply_adaround_to_model(nn.Sequential(layer), W4, batches, AdaroundSettings(iterations=500))
    assert float(encodings["0.weight"].scale) == 1.0
    assert sorted(rounded[0].weight[0].tolist()) == [0.0, 1.0, 7.0]


def test_same_seed_same_rounding_and_the_input_model_is_untouched():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [apply_adaround_to_model(model, W4, image_batches(), AdaroundSettings(iterations=30, seed=3))[0]
            for _ in range(2)]
    for key, value in runs[0].state_dict().items():
        assert torch.equal(value, runs[1].state_dict()[key])
        assert torch.equal(model.state_dict()[key], before[key])


def test_encodings_file_round_trips_through_quantsim(tmp_path):
    model = small_model()
    params = AdaroundParameters(image_batches(3), 3, default_num_iterations=30)
    rounded = Adaround.apply_adaround(model, torch.zeros(1, 3, 6, 6), params, str(tmp_path), "ada",
                                      default_param_bw=4, default_quant_scheme=QuantScheme.post_training_tf)
    path = tmp_path / "ada.encodings"
    content = json.loads(path.read_text())
    assert sorted(content) == ["param_encodings"]
    assert len(content["param_encodings"]["0.weight"]) == 8  # AIMET's default config: per output channel
    sim = QuantSim(rounded, torch.zeros(1, 3, 6, 6), QuantConfig(weight_bits=4, per_channel=True, act_bits=None))
    sim.set_and_freeze_param_encodings(path)
    for name in ("0", "2", "4"):
        expected = rounded.get_submodule(name).weight
        assert torch.equal(sim.model.get_submodule(name).weight, expected)
        entries = content["param_encodings"][f"{name}.weight"]
        assert sim.encodings()[f"{name}.weight"]["scale"] == pytest.approx([e["scale"] for e in entries], rel=1e-7)


def test_encodings_file_loads_into_aimet(tmp_path):
    quantsim = require_extra("aimet_torch.quantsim")
    from aimet_torch.common.defs import QuantScheme as AimetScheme
    from pathlib import Path

    model = small_model()
    config = Path(quantsim.__file__).parents[1] / "common" / "quantsim_config" / "default_config.json"
    params = AdaroundParameters(image_batches(2), 2, default_num_iterations=30)
    rounded = Adaround.apply_adaround(model, torch.zeros(1, 3, 6, 6), params, str(tmp_path), "ada",
                                      default_param_bw=4, default_quant_scheme=AimetScheme.post_training_tf,
                                      default_config_file=str(config))
    sim = quantsim.QuantizationSimModel(rounded, torch.zeros(1, 3, 6, 6), quant_scheme="tf", default_param_bw=4,
                                        config_file=str(config))
    sim.set_and_freeze_param_encodings(str(tmp_path / "ada.encodings"))
    for name in ("0", "2", "4"):
        quantizer = sim.model.get_submodule(name).param_quantizers["weight"]
        weight = rounded.get_submodule(name).weight
        assert torch.allclose(quantizer(weight), weight, rtol=0, atol=1e-6)
        ours = json.loads((tmp_path / "ada.encodings").read_text())["param_encodings"][f"{name}.weight"][0]
        assert float(quantizer.get_scale()) == pytest.approx(ours["scale"], rel=1e-6)


def test_quantsim_rejects_encodings_of_unknown_or_misshapen_weights(tmp_path):
    sim = QuantSim(small_model(), torch.zeros(1, 3, 6, 6), W4)
    encoding = weight_encoding(small_model()[0], QuantConfig(weight_bits=4, per_channel=True))
    with pytest.raises(ValueError, match="no such weight quantizer"):
        sim.freeze_param_encodings({"9.weight": encoding})
    with pytest.raises(ValueError, match="needs 4 scales"):
        sim.freeze_param_encodings({"2.weight": encoding})
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps({"param_encodings": {"1.weight": []}}))
    with pytest.raises(ValueError, match="not the weight of a conv / linear layer"):
        sim.set_and_freeze_param_encodings(path)


def test_bad_input_is_a_clear_error(tmp_path):
    params = AdaroundParameters(image_batches(2), 2, default_num_iterations=5)
    dummy = torch.zeros(1, 3, 6, 6)
    with pytest.raises(AdaroundError, match="no conv / linear layer"):
        Adaround.apply_adaround(nn.Sequential(nn.ReLU()), dummy, params, str(tmp_path), "x")
    for bits in (1, 17, 4.0):
        with pytest.raises(AdaroundError, match=r"default_param_bw must be an int in \[2, 16\]"):
            Adaround.apply_adaround(small_model(), dummy, params, str(tmp_path), "x", default_param_bw=bits)
    with pytest.raises(AdaroundError, match="cannot fetch 3 batches from a data loader of length 2"):
        AdaroundParameters(image_batches(2), 3)

    class ShortLoader(list):
        def __len__(self):
            return 5  # claims more batches than it yields

    short = AdaroundParameters(ShortLoader(image_batches(2)), 4, default_num_iterations=5)
    with pytest.raises(AdaroundError, match="yielded 2 batches, AdaRound needs num_batches=4"):
        Adaround.apply_adaround(small_model(), dummy, short, str(tmp_path), "x")
    with pytest.raises(AdaroundError, match="warm_start"):
        AdaroundParameters(image_batches(2), 2, default_warm_start=1.0)
    with pytest.raises(AdaroundError, match="no calibration batches"):
        apply_adaround_to_model(small_model(), W4, [])
    assert not (tmp_path / "x.encodings").exists()


@pytest.mark.parametrize("layer, shape", [(nn.Conv2d(8, 6, 3, padding=1, stride=2, groups=2), (70, 8, 9, 9)),
                                          (nn.Linear(5, 3), (40, 5))])
def test_the_exact_loss_from_input_moments_equals_the_loss_over_all_samples(layer, shape):
    from torch.func import functional_call

    from clebench.adaround.layer import _moments, reconstruction_loss

    torch.manual_seed(0)
    x = torch.randn(shape)
    x_q = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        second, cross, constant = _moments(layer, x_q, layer(x))
        weight = layer.weight + 0.05 * torch.randn_like(layer.weight)
        grouped = weight.reshape(second.shape[0], -1, second.shape[1])
        from_moments = ((grouped @ second) * grouped).sum() - 2 * (grouped * cross).sum() + constant
        direct = reconstruction_loss(functional_call(layer, {"weight": weight}, (x_q,)), layer(x))
    assert from_moments.item() == pytest.approx(direct.item(), rel=1e-5)
