"""DFQ bias correction: clipped-normal means, kernel responses, and removal of the quantized layer's mean error."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clebench import graph
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.bias_correction import clipped_normal_mean, correct_bias, relu_normal_mean
from clebench.layers import constant_input_response
from clebench.cross_layer_equalization import CrossLayerScaling, HighBiasFold
from clebench.quant import QuantConfig, quantize_weight

W4 = QuantConfig(weight_bits=4)


def _monte_carlo(mean, std, upper, samples=400_000):
    x = mean[:, None] + std[:, None] * torch.randn(len(mean), samples, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    clipped = x.clamp_min(0) if upper is None else torch.minimum(x.clamp_min(0), torch.as_tensor(upper).view(-1, 1))
    return clipped.mean(1), clipped.std(1) / samples**0.5


@pytest.mark.parametrize("upper", [None, 6.0, torch.tensor([0.5, 1.0, 2.0, 3.0, 6.0, 0.1])])
def test_clipped_normal_mean_matches_monte_carlo(upper):
    mean = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0, 6.5], dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0, 1.0], dtype=torch.float64)
    expected, standard_error = _monte_carlo(mean, std, upper)
    actual = clipped_normal_mean(mean, std, upper)
    assert ((actual - expected).abs() <= 5 * standard_error + 1e-9).all()


def test_degenerate_std_is_the_clipped_mean():
    mean = torch.tensor([-1.0, 0.5, 8.0])
    assert torch.equal(relu_normal_mean(mean, torch.zeros(3)), torch.tensor([0.0, 0.5, 8.0]))
    assert torch.equal(clipped_normal_mean(mean, torch.zeros(3), 6.0), torch.tensor([0.0, 0.5, 6.0]))


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 3, stride=2),
    nn.ConvTranspose2d(4, 6, 3), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3, stride=2),
    nn.Linear(4, 6),
], ids=["conv", "grouped", "depthwise", "strided", "transposed", "grouped-transposed", "strided-transposed", "linear"])
def test_constant_input_response_is_the_mean_interior_output_for_a_constant_input(layer):
    values = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            output = layer(values) - layer.bias
        else:  # a 12x12 constant image; the central 4x4 outputs see every tap, and span whole stride periods
            full = layer(values.view(1, 4, 1, 1).expand(1, 4, 12, 12)) - layer.bias.view(1, -1, 1, 1)
            centre = full.shape[-1] // 2
            output = full[0, :, centre - 2:centre + 2, centre - 2:centre + 2].mean(dim=(1, 2))
    assert torch.allclose(constant_input_response(layer, values), output, atol=1e-5)


def _conv_bn_act_conv(activation: nn.Module, samples: int = 2048, seed: int = 0):
    """conv1 (1x1) -> BN -> activation -> conv2 (3x3), with N(0, 1) inputs: BN's output is exactly N(beta, gamma^2)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), activation, nn.Conv2d(16, 8, 3)).eval()
    with torch.no_grad():
        conv1, bn = model[0], model[1]
        bn.running_mean.copy_(conv1.bias)  # conv1's output per channel: N(b, |w|^2)
        bn.running_var.copy_(conv1.weight.flatten(1).pow(2).sum(1) - bn.eps)
        bn.weight.copy_(torch.rand(16) * 2 + 0.2)
        bn.bias.copy_(torch.randn(16) * 2)
    data = torch.randn(samples, 8, 3, 3, generator=torch.Generator().manual_seed(seed + 1))
    return model, data


def _mean_error_of_quantized_last_layer(model: nn.Module, reference: nn.Module, data: torch.Tensor, config=W4):
    """Per output channel, mean over data of (model with its last layer's weights quantized) - reference."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        quantized[-1].weight.copy_(quantize_weight(quantized[-1], config))
        return (quantized(data) - reference(data)).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6(), nn.Identity()], ids=["relu", "relu6", "none"])
def test_analytical_correction_removes_the_mean_output_error(activation):
    model, data = _conv_bn_act_conv(activation)
    reference = copy.deepcopy(model)
    bn_map = dict(fold_all_batch_norms(model))
    before = _mean_error_of_quantized_last_layer(model, reference, data)
    corrected = correct_bias(model, W4, bn_map=bn_map)
    after = _mean_error_of_quantized_last_layer(model, reference, data)
    assert corrected == 1  # conv1 reads the model input, which no folded BN describes
    assert before.abs().max() > 0.02
    assert after.abs().max() < before.abs().max() / 10


def test_analytical_correction_follows_scaling_and_high_bias_folding():
    model, data = _conv_bn_act_conv(nn.ReLU6())
    model = graph.prepare_model(model)
    reference = copy.deepcopy(model)
    bn_map = dict(fold_all_batch_norms(model))
    infos = CrossLayerScaling.scale_model(model, relu6="clip")
    HighBiasFold.bias_fold(infos, bn_map)
    assert isinstance(model.get_submodule("2"), ChannelClippedReLU)
    assert infos[0].cls_pair_info_list[0].absorbed_bias.abs().max() > 0  # the test exercises the shift
    naive = copy.deepcopy(model)
    correct_bias(naive, W4, bn_map={naive.get_submodule("0"): bn_map[model.get_submodule("0")]})
    correct_bias(model, W4, bn_map=bn_map, cls_set_infos=infos)

    def error(m):
        quantized = copy.deepcopy(m)
        with torch.no_grad():
            quantized.get_submodule("3").weight.copy_(quantize_weight(quantized.get_submodule("3"), W4))
            return (quantized(data) - reference(data)).mean(dim=(0, 2, 3)).abs().max()

    assert error(model) < error(naive) / 5


def test_empirical_correction_zeroes_the_mean_error_on_the_calibration_data():
    model, data = _conv_bn_act_conv(nn.ReLU())
    fold_all_batch_norms(model)
    model[0].requires_grad_(False)
    single = nn.Sequential(model[3])  # one layer: its corrected mean error on the same data is zero up to rounding
    reference = copy.deepcopy(single)
    inputs = model[2](model[0](data))
    before = _mean_error_of_quantized_last_layer(single, reference, inputs)
    batches = [inputs[:1000], (inputs[1000:], None)]  # bare tensors and (inputs, labels) tuples
    corrected = correct_bias(single, W4, bn_map=None, method="empirical", batches=batches, progress=False)
    after = _mean_error_of_quantized_last_layer(single, reference, inputs)
    assert corrected == 1
    assert before.abs().max() > 0.02 and after.abs().max() < 1e-5


def test_empirical_correction_goes_layer_by_layer_on_the_whole_model():
    model, data = _conv_bn_act_conv(nn.ReLU())
    fold_all_batch_norms(model)
    reference = copy.deepcopy(model)
    before = _mean_error_of_quantized_last_layer(model, reference, data)
    assert correct_bias(model, W4, bn_map=None, method="empirical", batches=[data], progress=False) == 2
    after = _mean_error_of_quantized_last_layer(model, reference, data)
    assert after.abs().max() < before.abs().max() / 10


def test_layers_without_a_bn_folded_producer_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)).eval()
    bn_map = dict(fold_all_batch_norms(model))
    bias = model[4].bias.detach().clone()
    assert correct_bias(model, W4, bn_map=bn_map) == 0  # the max-pool between breaks the clipped-normal model
    assert torch.equal(model[4].bias, bias)


def test_a_layer_without_bias_gets_one():
    model, _ = _conv_bn_act_conv(nn.ReLU())
    model[3] = nn.Conv2d(16, 8, 3, bias=False)
    bn_map = dict(fold_all_batch_norms(model))
    assert correct_bias(model, W4, bn_map=bn_map) == 1
    assert model[3].bias is not None and model[3].bias.abs().max() > 0


def test_bad_arguments():
    model, data = _conv_bn_act_conv(nn.ReLU())
    with pytest.raises(ValueError, match="method"):
        correct_bias(model, W4, bn_map={}, method="exact")
    with pytest.raises(TypeError, match="bn_map"):
        correct_bias(model, W4, bn_map=None)
    with pytest.raises(TypeError, match="BatchNorm"):
        correct_bias(model, W4, bn_map={model[0]: model[2]})
    with pytest.raises(ValueError, match="batches"):
        correct_bias(model, W4, bn_map=None, method="empirical")
    with pytest.raises(ValueError, match="empirical"):
        correct_bias(model, W4, bn_map={}, batches=[data])
    with pytest.raises(TypeError, match="QuantConfig"):
        correct_bias(model, "w4a8_per_tensor_minmax", bn_map={})
