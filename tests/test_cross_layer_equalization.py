"""Cross-layer scaling and high-bias folding: the paper's formulas term by term, on tiny layers and real networks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomize_batch_norms, relative_error, set_weight
from torch import nn

from clebench import layers, utils
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import ClsSetInfo, CrossLayerScaling, HighBiasFold, equalize_model


@pytest.mark.parametrize(
    "shape, axis",
    [((64, 32, 3, 3), 0), ((64, 32, 3, 3), 1), ((32, 64, 1, 1), 1), ((16, 8, 3, 3), 1), ((8, 16, 5), 1), ((10, 7), 0)],
)
def test_channel_abs_max_is_the_largest_magnitude_over_every_other_axis(shape, axis):
    weight = torch.randn(shape)
    others = tuple(d for d in range(weight.dim()) if d != axis)
    assert torch.equal(layers.channel_abs_max(weight, axis), weight.abs().amax(dim=others))


def test_pair_hand_computed():
    # r1 = [4, 1], r2 = [1, 4]  ->  s = sqrt(r1 / r2) = [2, 0.5]; both ranges become sqrt(r1 r2) = [2, 2]
    conv1 = set_weight(nn.Conv2d(1, 2, 1), [4.0, 1.0], bias=[2.0, 3.0])
    conv2 = set_weight(nn.Conv2d(2, 1, 1), [1.0, 4.0])
    (scale,) = CrossLayerScaling.scale_cls_sets([(conv1, conv2)])
    np.testing.assert_array_equal(scale, [2.0, 0.5])
    assert conv1.weight.flatten().tolist() == [2.0, 2.0]
    assert conv1.bias.tolist() == [1.0, 6.0]
    assert conv2.weight.flatten().tolist() == [2.0, 2.0]


def test_triple_hand_computed():
    # r1 = [8, 1], r2 = [1, 8], r3 = [1, 1]: cbrt(r1 r2 r3) = [2, 2], S12 = r1 / 2 = [4, 0.5], S23 = 2 / r3 = [2, 2]
    conv1 = set_weight(nn.Conv2d(1, 2, 1), [8.0, 1.0], bias=[8.0, 4.0])
    depthwise = set_weight(nn.Conv2d(2, 2, 1, groups=2), [1.0, 8.0], bias=[1.0, 2.0])
    conv3 = set_weight(nn.Conv2d(2, 1, 1), [1.0, 1.0])
    ((s12, s23),) = CrossLayerScaling.scale_cls_sets([(conv1, depthwise, conv3)])
    np.testing.assert_allclose(s12, [4.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(s23, [2.0, 2.0], rtol=1e-6)
    torch.testing.assert_close(conv1.weight.flatten(), torch.tensor([2.0, 2.0]))  # W1 / S12
    torch.testing.assert_close(conv1.bias, torch.tensor([2.0, 8.0]))  # b1 / S12
    torch.testing.assert_close(depthwise.weight.flatten(), torch.tensor([2.0, 2.0]))  # W2 * S12 / S23
    torch.testing.assert_close(depthwise.bias, torch.tensor([0.5, 1.0]))  # b2 / S23
    torch.testing.assert_close(conv3.weight.flatten(), torch.tensor([2.0, 2.0]))  # W3 * S23


@pytest.mark.parametrize(
    "make_pair, x_shape",
    [
        (lambda: (nn.Linear(5, 6), nn.Linear(6, 3)), (4, 5)),
        (lambda: (nn.Conv1d(5, 6, 3), nn.Conv1d(6, 3, 3)), (4, 5, 9)),
        (lambda: (nn.ConvTranspose2d(5, 6, 3), nn.ConvTranspose2d(6, 3, 3)), (4, 5, 7, 7)),
        (lambda: (nn.Conv2d(5, 6, 3, bias=False), nn.Conv2d(6, 3, 3, bias=False)), (4, 5, 7, 7)),
    ],
    ids=["linear", "conv1d", "conv_transpose2d", "no_bias"],
)
@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.PReLU(6, init=0.1)], ids=["relu", "prelu"])
def test_pair_equalizes_ranges_and_preserves_function(make_pair, x_shape, activation):
    torch.manual_seed(0)
    layer1, layer2 = make_pair()
    with torch.no_grad():  # very unequal channel ranges, as after BN folding
        layers.scale_output_channels(layer1, torch.logspace(-2, 2, 6))
    model = nn.Sequential(layer1, activation(), layer2)
    x = torch.randn(x_shape)
    expected = model(x)
    r1 = layers.channel_abs_max(layer1.weight, layers.output_axis(layer1))
    r2 = layers.channel_abs_max(layer2.weight, layers.input_axis(layer2))
    (scale,) = CrossLayerScaling.scale_cls_sets([(layer1, layer2)])
    torch.testing.assert_close(torch.from_numpy(scale), torch.sqrt(r1 / r2))
    equalized = torch.sqrt(r1 * r2)
    torch.testing.assert_close(layers.channel_abs_max(layer1.weight, layers.output_axis(layer1)), equalized, rtol=1e-5, atol=0)
    torch.testing.assert_close(layers.channel_abs_max(layer2.weight, layers.input_axis(layer2)), equalized, rtol=1e-5, atol=0)
    assert relative_error(model(x), expected) < 1e-5


def test_dead_channels_get_scale_one_and_no_nan():
    conv1 = set_weight(nn.Conv2d(1, 3, 1), [0.0, 2.0, 1.0], bias=[0.0, 0.0, 0.0])
    depthwise = set_weight(nn.Conv2d(3, 3, 1, groups=3), [1.0, 0.0, 1.0])
    conv3 = set_weight(nn.Conv2d(3, 1, 1), [1.0, 1.0, 0.0])
    ((s12, s23),) = CrossLayerScaling.scale_cls_sets([(conv1, depthwise, conv3)])
    assert np.isfinite(s12).all() and np.isfinite(s23).all() and (s12 > 0).all() and (s23 > 0).all()
    np.testing.assert_array_equal(s12[:2], [1.0, 1.0])  # r1 = 0 and r2 = 0 channels
    for module in (conv1, depthwise, conv3):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    (scale,) = CrossLayerScaling.scale_cls_sets([(set_weight(nn.Linear(1, 2), [0.0, 1.0]), set_weight(nn.Linear(2, 1), [1.0, 0.0]))])
    np.testing.assert_array_equal(scale, [1.0, 1.0])


def hand_bn(gamma, beta) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(gamma))
    bn.weight.data.copy_(torch.tensor(gamma))
    bn.bias.data.copy_(torch.tensor(beta))
    return bn


@pytest.mark.parametrize("relu, absorbed", [(True, [3.5, 0.0]), (False, [5.0, 2.0])])
def test_high_bias_fold_hand_computed(relu, absorbed):
    # gamma / s = [0.5, 1], beta / s = [5, 2]: with ReLU c = max(0, beta - 3|gamma|) = [3.5, 0], else c = beta
    conv1 = set_weight(nn.Conv2d(1, 2, 1), [1.0, 1.0], bias=[7.0, 7.0])
    conv2 = set_weight(nn.Conv2d(2, 1, 3), [1.0] * 9 + [2.0] * 9, bias=[1.0])
    bn = hand_bn([1.0, 0.5], [10.0, 1.0])
    info = ClsSetInfo(ClsSetInfo.ClsSetLayerPairInfo(conv1, conv2, np.array([2.0, 0.5]), relu))
    HighBiasFold.bias_fold([info], {conv1: bn})
    assert conv1.bias.tolist() == [7.0 - absorbed[0], 7.0 - absorbed[1]]
    assert conv2.bias.item() == 1.0 + 9 * 1.0 * absorbed[0] + 9 * 2.0 * absorbed[1]  # kernel sums 9 and 18
    torch.testing.assert_close(info.cls_pair_info_list[0].absorbed_bias, torch.tensor(absorbed))


def test_high_bias_fold_depthwise_layer2_is_elementwise_and_skips_without_bn():
    conv1 = set_weight(nn.Conv2d(1, 2, 1), [1.0, 1.0], bias=[7.0, 7.0])
    depthwise = set_weight(nn.Conv2d(2, 2, 3, groups=2), [1.0] * 9 + [-1.0] * 9, bias=[0.0, 0.0])
    bn = hand_bn([0.0, 0.0], [1.0, 2.0])
    info = ClsSetInfo(ClsSetInfo.ClsSetLayerPairInfo(conv1, depthwise, np.array([1.0, 1.0]), True))
    HighBiasFold.bias_fold([info], {})  # no BN folded into conv1: nothing happens
    assert conv1.bias.tolist() == [7.0, 7.0]
    HighBiasFold.bias_fold([info], {conv1: bn})
    assert conv1.bias.tolist() == [6.0, 5.0]
    assert depthwise.bias.tolist() == [9.0, -18.0]


@pytest.mark.parametrize("activation", ["relu", "clip"])
def test_high_bias_fold_is_exact_where_preactivations_exceed_the_absorbed_amount(activation):
    """The absorbed c never exceeds beta - 3|gamma|; inputs that keep every pre-activation above it are reproduced exactly."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 3)
    bn = hand_bn([0.1, 0.2, 0.1, 0.3], [2.0, 1.5, 3.0, 0.2])
    with torch.no_grad():
        conv1.weight.mul_(0.01)  # pre-activations stay within beta +- 3 |gamma| for |x| < 1
        conv1.bias.copy_(bn.bias)
    act = nn.ReLU() if activation == "relu" else ChannelClippedReLU(torch.tensor([2.5, 1.0, 6.0, 6.0]))
    model = nn.Sequential(conv1, act, conv2)
    x = torch.rand(2, 3, 6, 6) * 2 - 1
    expected = model(x)
    info = ClsSetInfo(ClsSetInfo.ClsSetLayerPairInfo(conv1, conv2, np.ones(4), True, act if activation == "clip" else None))
    HighBiasFold.bias_fold([info], {conv1: bn})
    absorbed = info.cls_pair_info_list[0].absorbed_bias
    if activation == "clip":  # c = min(beta - 3|gamma|, u) = [1.7, 0.9 -> 1.0 bound ... ]
        torch.testing.assert_close(absorbed, torch.tensor([1.7, 0.9, 2.7, 0.0]))
        torch.testing.assert_close(act.upper, torch.tensor([0.8, 0.1, 3.3, 6.0]))
    assert (absorbed > 0).any()
    assert relative_error(model(x), expected) < 1e-5


def count_set_kinds(infos: list[ClsSetInfo]) -> tuple[int, int]:
    triples = sum(len(info.cls_pair_info_list) == 2 for info in infos)
    return len(infos) - triples, triples


def layer_name(model: nn.Module):
    names = {module: name for name, module in model.named_modules()}
    return lambda module: names[module]


def test_resnet18_auto_mode_finds_the_eight_block_pairs_and_preserves_outputs():
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    fold_all_batch_norms(model, (1, 3, 64, 64))
    infos = CrossLayerScaling.scale_model(model, (1, 3, 64, 64))
    name = layer_name(model)
    found = [(name(p.layer1), name(p.layer2), p.relu_activation_between_layers) for i in infos for p in i.cls_pair_info_list]
    assert found == [(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2", True) for s in range(1, 5) for b in range(2)]
    assert relative_error(model(x), expected) < 1e-4
    for pair in (p for i in infos for p in i.cls_pair_info_list):
        r1 = layers.channel_abs_max(pair.layer1.weight, 0)
        r2 = layers.channel_abs_max(pair.layer2.weight, 1)
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)


def test_mobilenet_v2_auto_mode_finds_17_triples_and_2_pairs():
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.mobilenet_v2())
    fold_all_batch_norms(model, (1, 3, 64, 64))
    utils.replace_modules_of_type1_with_type2(model, nn.ReLU6, nn.ReLU)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    infos = CrossLayerScaling.scale_model(model, (1, 3, 64, 64))
    assert count_set_kinds(infos) == (2, 17)
    name = layer_name(model)
    first = [name(p.layer1) for p in infos[0].cls_pair_info_list] + [name(infos[0].cls_pair_info_list[-1].layer2)]
    assert first == ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]
    pairs = [(name(i.cls_pair_info_list[0].layer1), name(i.cls_pair_info_list[0].layer2)) for i in infos if len(i.cls_pair_info_list) == 1]
    assert pairs == [("features.1.conv.1", "features.2.conv.0.0"), ("features.17.conv.2", "features.18.0")]
    assert not any(p.relu_activation_between_layers for i in infos if len(i.cls_pair_info_list) == 1 for p in i.cls_pair_info_list)
    assert relative_error(model(x), expected) < 1e-4
    rescaled_later = {i.cls_pair_info_list[0].layer1 for i in infos}  # a later set rescales these layers' rows
    for info in infos:
        if len(info.cls_pair_info_list) == 2 and info.cls_pair_info_list[1].layer2 not in rescaled_later:
            (a, _), (dw, c) = [(p.layer1, p.layer2) for p in info.cls_pair_info_list]
            r = [layers.channel_abs_max(a.weight, 0), layers.channel_abs_max(dw.weight, 0), layers.channel_abs_max(c.weight, 1)]
            torch.testing.assert_close(r[0], r[1], rtol=1e-5, atol=0)
            torch.testing.assert_close(r[1], r[2], rtol=1e-5, atol=0)


def test_mobilenet_v2_keeps_relu6_as_chain_end_by_default_and_clip_scales_across_exactly():
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.mobilenet_v2())
    fold_all_batch_norms(model, (1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    kept = copy.deepcopy(model)
    assert count_set_kinds(CrossLayerScaling.scale_model(kept, (1, 3, 64, 64))) == (2, 0)
    infos = CrossLayerScaling.scale_model(model, (1, 3, 64, 64), relu6="clip")
    assert count_set_kinds(infos) == (2, 17)
    clips = [m for m in model.modules() if isinstance(m, ChannelClippedReLU)]
    assert len(clips) == 34 and not any(isinstance(m, nn.ReLU6) for m in model.features[1:18].modules())
    assert relative_error(model(x), expected) < 1e-4


@pytest.mark.parametrize("name, relu6", [("resnet18", "replace"), ("mobilenet_v2", "keep"), ("mobilenet_v2", "clip")])
def test_equalize_model_hbf_stays_close_on_random_inputs(name, relu6):
    """HBF is exact except where padding feeds the absorbed constant as 0 or a pre-activation dips below c."""
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.get_model(name))
    x = torch.randn(4, 3, 64, 64)
    expected = model(x)
    equalize_model(model, (1, 3, 64, 64), relu6=relu6)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert relative_error(model(x), expected) < 0.05


def test_manual_mode_errors_name_the_layers_and_leave_the_model_unchanged():
    conv1, conv2, conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(5, 4, 1)
    grouped, depthwise = nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8)
    before = [copy.deepcopy(m.state_dict()) for m in (conv1, conv2, conv3)]
    with pytest.raises(ValueError, match=r"Conv2d\(in=8, out=4, groups=1\) has 4 output channels.*in=5"):
        CrossLayerScaling.scale_cls_sets([(conv1, conv2), (conv2, conv3)])
    with pytest.raises(TypeError, match="groups=2"):
        CrossLayerScaling.scale_cls_sets([(conv1, grouped)])
    with pytest.raises(ValueError, match="middle layer"):
        CrossLayerScaling.scale_cls_sets([(conv1, conv2, conv3)])
    with pytest.raises(TypeError, match="ReLU"):
        CrossLayerScaling.scale_cls_sets([(conv1, nn.ReLU())])
    with pytest.raises(ValueError, match="Linear only pairs"):
        CrossLayerScaling.scale_cls_sets([(conv1, depthwise), (depthwise, nn.Linear(8, 2))])
    assert all(
        torch.equal(b[k], v) for b, m in zip(before, (conv1, conv2, conv3)) for k, v in m.state_dict().items()
    )


def test_equalize_model_puts_every_replaced_module_into_the_model_itself():
    """One trace serves every step; the BNs it folds and the ReLU6s it replaces must change in `model` too."""
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.mobilenet_v2())
    model.unused = nn.ReLU6()  # never called: 'replace' swaps it anyway, as AIMET's replace does
    x = torch.randn(2, 3, 64, 64)
    for relu6, clips in (("replace", 0), ("clip", 34)):
        equalized = copy.deepcopy(model)
        equalize_model(equalized, (1, 3, 64, 64), relu6=relu6)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in equalized.modules())
        assert sum(isinstance(m, ChannelClippedReLU) for m in equalized.modules()) == clips
        assert isinstance(equalized.unused, nn.ReLU if relu6 == "replace" else nn.ReLU6)
    assert relative_error(equalized(x), model(x)) < 0.05  # 'clip': HBF's padding effect only


def test_bad_relu6_policy_is_rejected():
    with pytest.raises(ValueError, match="replace.*keep.*clip"):
        equalize_model(nn.Sequential(nn.Conv2d(3, 4, 1)), (1, 3, 4, 4), relu6="drop")
