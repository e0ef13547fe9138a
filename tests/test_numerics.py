"""Numerical faults CLE must survive without NaN/inf or silently wrong numbers, and model shapes test_graph.py lacks.

"Exact" models here are built so that high-bias folding is exact too: 1x1 / unpadded convs, BN running means 0 and
weights so small that every pre-activation stays within beta +- 3 |gamma|, the range HBF leaves untouched.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_batch_norms, relative_error
from torch import nn

from clebench import graph, layers
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms, fold_given_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, HighBiasFold, equalize_model


def hbf_exact_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics under which HBF absorbs a positive amount from some channels yet stays exact (see module doc)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.zero_()
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 2 + 2)  # beta - 3 gamma in [-1, 2.5]
    return model.eval()


def block(c_in: int = 3, c_mid: int = 6, c_out: int = 4, bias: bool = True) -> nn.Sequential:
    """conv1x1-BN-ReLU -> depthwise 3x3 (unpadded)-BN-ReLU -> conv1x1-BN, the MobileNet block without the residual."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1, bias=bias), nn.BatchNorm2d(c_mid), nn.ReLU(),
        nn.Conv2d(c_mid, c_mid, 3, groups=c_mid, bias=bias), nn.BatchNorm2d(c_mid), nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1, bias=bias), nn.BatchNorm2d(c_out),
    )  # fmt: skip
    with torch.no_grad():
        for layer in (model[0], model[3], model[6]):
            layer.weight.mul_(0.01)
    return hbf_exact_batch_norms(model)


def small_input(*shape: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(*shape) * 2 - 1


def assert_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), f"{name} holds NaN/inf"


def ranges(model: nn.Sequential) -> list[torch.Tensor]:
    """Per-channel ranges of the block's three layers along the channel CLS equalizes."""
    return [layers.channel_abs_max(model[i].weight, axis) for i, axis in ((0, 0), (3, 0), (6, 1))]


def test_block_is_exact_and_hbf_absorbs_something():
    """The premise of the exact tests below: equalize_model keeps this block's function and HBF moves bias."""
    model, x = block(), small_input(2, 3, 6, 6)
    expected = model(x)
    scaled = copy.deepcopy(model)
    fold_all_batch_norms(scaled)
    CrossLayerScaling.scale_model(scaled)
    equalize_model(model)
    assert not torch.allclose(model[0].bias, scaled[0].bias)  # HBF changed layer1's bias
    assert relative_error(model(x), expected) < 1e-5


@pytest.mark.parametrize("dead", ["layer1", "depthwise", "layer3", "all_three", "whole_layer1"])
def test_dead_channels_stay_finite_exact_and_get_scale_one(dead):
    model, x = block(), small_input(2, 3, 6, 6)
    with torch.no_grad():
        if dead in ("layer1", "all_three"):
            model[0].weight[0] = 0.0
        if dead in ("depthwise", "all_three"):
            model[3].weight[0] = 0.0
        if dead in ("layer3", "all_three"):
            model[6].weight[:, 0] = 0.0
        if dead == "whole_layer1":
            model[0].weight.zero_()
    expected = model(x)
    equalized = copy.deepcopy(model)
    fold_all_batch_norms(model)
    infos = CrossLayerScaling.scale_model(model)
    s12, s23 = (pair.scale_factor for pair in infos[0].cls_pair_info_list)
    assert np.isfinite(s12).all() and np.isfinite(s23).all() and (s12 > 0).all() and (s23 > 0).all()
    assert s12[0] == 1.0 and s23[0] == 1.0  # a zero range anywhere leaves the channel unscaled
    live = slice(None) if dead == "whole_layer1" else slice(1, None)
    if dead != "whole_layer1":
        r = ranges(model)
        torch.testing.assert_close(r[0][live], r[1][live], rtol=1e-5, atol=0)
        torch.testing.assert_close(r[1][live], r[2][live], rtol=1e-5, atol=0)
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5
    equalize_model(equalized)
    assert_finite(equalized)
    assert relative_error(equalized(x), expected) < 1e-5


def test_dead_channels_in_manual_pairs_and_triples():
    model = block()
    fold_all_batch_norms(model)
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[3].weight[2] = 0.0
        model[6].weight[:, 3] = 0.0
    x = small_input(2, 3, 6, 6)
    expected = model(x)
    ((s12, s23),) = CrossLayerScaling.scale_cls_sets([(model[0], model[3], model[6])])
    np.testing.assert_array_equal([s12[1], s12[2], s12[3], s23[1], s23[2], s23[3]], [1.0] * 6)
    linear1, linear2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        linear1.weight[0] = 0.0
        linear2.weight[:, 1] = 0.0
    (scale,) = CrossLayerScaling.scale_cls_sets([(linear1, linear2)])
    assert scale[0] == 1.0 and scale[1] == 1.0 and np.isfinite(scale).all()
    for module in (model, linear1, linear2):
        assert_finite(module)
    assert relative_error(model(x), expected) < 1e-5


def test_zero_running_variance_folds_with_eps():
    model, x = block(), small_input(2, 3, 6, 6)
    with torch.no_grad():
        model[1].running_var[:2] = 0.0  # sigma = sqrt(eps) ~ 3e-3: a 300x gain on two channels
    expected = model(x)
    equalize_model(model)
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5



def test_zero_running_variance_without_eps_is_a_clear_error():
    model = block()
    model[1].eps = 0.0
    with torch.no_grad():
        model[1].running_var[0] = 0.0
    with pytest.raises(ValueError, match=r"1.*running_var"):
        fold_all_batch_norms(model)


def test_huge_gamma_is_equalized_and_stays_finite():
    model, x = block(), small_input(2, 3, 6, 6)
    with torch.no_grad():
        model[1].weight[0] = 1e30
        model[3].weight[0] = 1e-32  # keeps the depthwise output of that channel in range
    expected = model(x)
    fold_all_batch_norms(model)
    CrossLayerScaling.scale_model(model)
    r = ranges(model)
    torch.testing.assert_close(r[0], r[1], rtol=1e-5, atol=0)
    assert r[0][0] < 1e12  # was ~1e28 after folding
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_extreme_weight_ranges_in_a_triple_are_equalized_exactly(magnitude):
    """Channel 0 of layer1 is 1e30 (or 1e-30) times the rest; layer3 compensates, so the FP32 output is ordinary."""
    model, x = block(bias=False), small_input(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[0] *= magnitude
        model[6].weight[:, 0] /= magnitude
    expected = model(x)
    fold_all_batch_norms(model)
    ((s12, s23),) = CrossLayerScaling.scale_cls_sets([(model[0], model[3], model[6])])
    assert np.isfinite(s12).all() and np.isfinite(s23).all()
    r = ranges(model)
    torch.testing.assert_close(r[0], r[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(r[1], r[2], rtol=1e-4, atol=0)
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5



@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_extreme_weight_ranges_in_a_pair_are_equalized_exactly(magnitude):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[0] *= magnitude
        model[0].bias[0] *= magnitude
        model[2].weight[:, 0] /= magnitude
    x = small_input(2, 3, 5, 5)
    expected = model(x)
    (scale,) = CrossLayerScaling.scale_cls_sets([(model[0], model[2])])
    assert np.isfinite(scale).all()
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5
    torch.testing.assert_close(layers.channel_abs_max(model[0].weight, 0), layers.channel_abs_max(model[2].weight, 1), rtol=1e-5, atol=0)


def test_float64_model_stays_float64_and_is_exact_to_double_precision():
    model, x = block(bias=False).double(), small_input(2, 3, 6, 6).double()
    model[2], model[5] = nn.ReLU6(), nn.ReLU6()
    expected = model(x)
    prepared = graph.prepare_model(model)
    fold_all_batch_norms(prepared)
    infos = CrossLayerScaling.scale_model(prepared, relu6="clip")
    assert len(infos) == 1 and all(p.scale_factor.dtype == np.float64 for p in infos[0].cls_pair_info_list)
    assert relative_error(prepared(x), expected) < 1e-12
    equalized = graph.prepare_model(model)
    equalize_model(equalized, relu6="clip")
    for module in (prepared, equalized):
        tensors = list(module.parameters()) + list(module.buffers())
        assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
        assert sum(isinstance(m, ChannelClippedReLU) for m in module.modules()) == 2
        assert_finite(module)
    assert relative_error(equalized(x), expected) < 1e-12


def test_conv_without_bias_folded_then_scaled_then_high_bias_folded():
    model, x = block(bias=False), small_input(2, 3, 6, 6)
    expected = model(x)
    folded = fold_all_batch_norms(model)
    assert all(layer.bias is not None for layer in (model[0], model[3], model[6]))
    infos = CrossLayerScaling.scale_model(model)
    HighBiasFold.bias_fold(infos, {layer: bn for layer, bn in folded})
    assert (infos[0].cls_pair_info_list[0].absorbed_bias > 0).any()
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5


def test_scaling_without_bias_and_without_bn_keeps_bias_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    x = small_input(2, 3, 5, 5)
    expected = model(x)
    infos = CrossLayerScaling.scale_model(model)
    HighBiasFold.bias_fold(infos, {})
    assert len(infos) == 1 and model[0].bias is None and model[2].bias is None
    assert relative_error(model(x), expected) < 1e-6


class SharedActivations(nn.Module):
    """One nn.ReLU and one per-channel nn.PReLU, each reused by two chains; the in-place `relu_` method too."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.b1, self.b2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.relu, self.prelu = nn.ReLU(), nn.PReLU(4, init=0.2)

    def forward(self, x):
        a = self.a2(self.prelu(self.relu(self.a1(x))))
        b = self.b2(self.relu(self.prelu(self.b1(x))))
        return a + b + self.c2(self.c1(x).relu_())


def test_shared_relu_and_prelu_modules_and_inplace_method_are_scaled_exactly():
    torch.manual_seed(0)
    model = SharedActivations().eval()
    with torch.no_grad():
        for layer in (model.a1, model.b1, model.c1):
            layers.scale_output_channels(layer, torch.logspace(-2, 2, 4))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    infos = CrossLayerScaling.scale_model(model)
    found = [(p.layer1, p.layer2) for i in infos for p in i.cls_pair_info_list]
    assert found == [(model.a1, model.a2), (model.b1, model.b2), (model.c1, model.c2)]
    for first, second in found:
        torch.testing.assert_close(layers.channel_abs_max(first.weight, 0), layers.channel_abs_max(second.weight, 1), rtol=1e-5, atol=0)
    assert relative_error(model(x), expected) < 1e-5


class Outputs(nn.Module):
    """A layer output and an activation output that are also model outputs; an in-place add inside a chain."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.b1, self.b2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x, shift):
        a = self.a1(x)
        b = F.relu(self.b1(x))
        c = self.c1(x)
        c += shift
        return self.a2(F.relu(a)), a, self.b2(b), b, self.c2(F.relu(c))


def test_values_that_leave_the_chain_are_not_scaled():
    torch.manual_seed(0)
    model = Outputs().eval()
    x = (torch.randn(2, 3, 4, 4), torch.randn(1, 4, 1, 1))
    expected = model(*x)
    assert CrossLayerScaling.scale_model(model) == []
    assert all(torch.equal(out, ref) for out, ref in zip(model(*x), expected))



def test_prepare_model_keeps_inplace_functional_statements():
    class InplaceStatement(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv1(x)
            F.relu(y, inplace=True)  # result discarded: only the side effect on y matters
            return self.conv2(y)

    model = InplaceStatement().eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    assert CrossLayerScaling.scale_model(copy.deepcopy(model)) == []  # conv1's output has two readers: not a chain
    assert relative_error(graph.prepare_model(model)(x), expected) < 1e-6


def test_deeply_nested_sequential_layers_are_found_by_qualified_name():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.ReLU())
    model = randomize_batch_norms(nn.Sequential(nn.Sequential(inner, nn.Sequential(nn.Sequential(nn.Conv2d(4, 2, 1))))))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    assert len(fold_all_batch_norms(model)) == 1 and isinstance(model[0][0][0][1], nn.Identity)
    names = {m: n for n, m in model.named_modules()}
    infos = CrossLayerScaling.scale_model(model)
    assert [(names[p.layer1], names[p.layer2]) for i in infos for p in i.cls_pair_info_list] == [("0.0.0.0", "0.1.0.0")]
    assert relative_error(model(x), expected) < 1e-5


def test_data_parallel_wrapper_for_scale_model_equalize_model_and_prepare_model():
    model, x = block(), small_input(2, 3, 6, 6)
    model[2], model[5] = nn.ReLU6(), nn.ReLU6()
    expected = model(x)
    kept = copy.deepcopy(model)
    fold_all_batch_norms(nn.DataParallel(kept))
    assert len(CrossLayerScaling.scale_model(nn.DataParallel(kept))) == 0  # ReLU6 ends chains under "keep"
    clipped = graph.prepare_model(nn.DataParallel(model))
    equalize_model(nn.DataParallel(clipped), relu6="clip")
    assert sum(isinstance(m, ChannelClippedReLU) for m in clipped.modules()) == 2
    replaced = nn.DataParallel(copy.deepcopy(model))
    equalize_model(replaced)  # default relu6="replace" reaches the wrapped model's ReLU6 modules
    assert not any(isinstance(m, nn.ReLU6) for m in replaced.modules())
    for wrapped in (kept, clipped):
        assert relative_error(nn.DataParallel(wrapped)(x), expected) < 1e-5



def test_tied_weights_are_not_folded_or_scaled():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.b.weight = self.a.weight
            self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_a(self.a(x)) + self.bn_b(self.b(x))

    torch.manual_seed(0)
    model = randomize_batch_norms(Tied())
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    fold_all_batch_norms(model)
    assert relative_error(model(x), expected) < 1e-5



def test_linear_on_sequence_input_then_batch_norm1d_is_not_folded_wrongly():
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)))
    x = torch.randn(2, 4, 8)  # BatchNorm1d normalizes axis 1 (4 positions), the Linear's features sit on axis 2
    expected = model(x)
    fold_all_batch_norms(model, dummy_input=x)
    assert relative_error(model(x), expected) < 1e-5


def test_manual_fold_of_linear_bn1d_on_flat_input_is_exact():
    """The supported Linear -> BatchNorm1d case, next to the unsupported one above."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)))
    x = torch.randn(5, 8)
    expected = model(x)
    fold_given_batch_norms(model, [(model[0], model[1])])
    CrossLayerScaling.scale_cls_sets([(model[0], model[3])])
    assert_finite(model)
    assert relative_error(model(x), expected) < 1e-5
