"""BN folding: exact hand-computed values on tiny layers, graph discovery, function preservation, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import randomize_batch_norms, relative_error
from torch import nn

from clebench.batch_norm_fold import fold_all_batch_norms, fold_given_batch_norms


def hand_bn(cls=nn.BatchNorm2d) -> nn.Module:
    """sigma = sqrt(var + eps) = [2, 1], gamma / sigma = [2, 3], so bn(x) = [2, 3] * x + [-5.5, 1]."""
    bn = cls(2, eps=1.0).eval()
    bn.running_mean.copy_(torch.tensor([3.0, -1.0]))
    bn.running_var.copy_(torch.tensor([3.0, 0.0]))
    bn.weight.data.copy_(torch.tensor([4.0, 3.0]))
    bn.bias.data.copy_(torch.tensor([0.5, -2.0]))
    return bn


def hand_layer(kind: str, bias: bool = True) -> nn.Module:
    """A 1 -> 2 channel layer with weights [2, -1] per output channel and bias [1, 0]."""
    layer = {
        "conv2d": lambda: nn.Conv2d(1, 2, 1, bias=bias),
        "conv1d": lambda: nn.Conv1d(1, 2, 1, bias=bias),
        "conv_transpose2d": lambda: nn.ConvTranspose2d(1, 2, 1, bias=bias),
        "linear": lambda: nn.Linear(1, 2, bias=bias),
    }[kind]()
    with torch.no_grad():
        # ConvTranspose keeps output channels on axis 1: weight [in=1, out=2, 1, 1]
        shape = (1, 2) + layer.weight.shape[2:] if kind == "conv_transpose2d" else (2, 1) + layer.weight.shape[2:]
        layer.weight.copy_(torch.tensor([2.0, -1.0]).reshape(shape))
        if bias:
            layer.bias.copy_(torch.tensor([1.0, 0.0]))
    return layer


@pytest.mark.parametrize(
    "kind, bn_cls",
    [("conv2d", nn.BatchNorm2d), ("conv1d", nn.BatchNorm1d), ("conv_transpose2d", nn.BatchNorm2d), ("linear", nn.BatchNorm1d)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_fold_hand_computed(kind, bn_cls, bias):
    layer, bn = hand_layer(kind, bias), hand_bn(bn_cls)
    model = nn.Sequential(layer, bn)
    fold_given_batch_norms(model, [(layer, bn)])
    # W' = W * gamma / sigma = [2, -1] * [2, 3];  b' = beta - (mu - b) * gamma / sigma
    expected_bias = [0.5 - (3 - 1) * 2, -2 - (-1 - 0) * 3] if bias else [0.5 - 3 * 2, -2 + 1 * 3]
    assert layer.weight.flatten().tolist() == [4.0, -3.0]
    assert layer.bias.tolist() == expected_bias
    assert isinstance(model[1], nn.Identity)


def test_forward_fold_hand_computed():
    bn, conv = hand_bn(), nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1))
        conv.bias.fill_(0.25)
    model = nn.Sequential(bn, conv)
    fold_given_batch_norms(model, [(bn, conv)])
    # bn(x) = a x + c with a = [2, 3], c = [-5.5, 1]:  W' = W * a,  b' = b + W @ c
    assert conv.weight.flatten().tolist() == [2.0, 6.0]
    assert conv.bias.item() == 0.25 + 1 * -5.5 + 2 * 1
    assert isinstance(model[0], nn.Identity)


def test_forward_fold_sums_over_the_kernel():
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    pairs = fold_all_batch_norms(model, (1, 3, 8, 8))
    assert len(pairs) == 1 and isinstance(pairs[0][0], nn.BatchNorm2d)  # forward folds come back as (bn, layer)
    assert relative_error(model(x), expected) < 1e-6


def test_padded_conv_after_bn_is_not_folded_forward():
    model = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    assert fold_all_batch_norms(model, (1, 3, 8, 8)) == []
    assert isinstance(model[0], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unpadded"):
        fold_given_batch_norms(model, [(model[0], model[1])])


def test_backward_fold_has_priority_and_grouped_transposed_conv_folds():
    torch.manual_seed(0)
    model = randomize_batch_norms(
        nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1), nn.BatchNorm2d(2))
    )
    x = torch.randn(2, 4, 5, 5)
    expected = model(x)
    pairs = fold_all_batch_norms(model, (1, 4, 5, 5))
    assert [(type(a), type(b)) for a, b in pairs] == [(nn.ConvTranspose2d, nn.BatchNorm2d), (nn.Conv2d, nn.BatchNorm2d)]
    assert relative_error(model(x), expected) < 1e-6


@pytest.mark.parametrize("name, n_pairs", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_fold_all_preserves_outputs(name, n_pairs):
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.get_model(name))
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    pairs = fold_all_batch_norms(model, (1, 3, 64, 64))
    assert len(pairs) == n_pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert relative_error(model(x), expected) < 1e-5


def test_fold_accepts_multiple_input_shapes_and_rejects_bad_ones():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="input_shapes"):
        fold_all_batch_norms(model, (1, -3, 8))
    assert len(fold_all_batch_norms(model, [(1, 3, 8, 8), (1, 3, 8, 8)])) == 1


def test_bad_pairs_raise_and_leave_model_unchanged():
    model = randomize_batch_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1))
    )
    before = copy.deepcopy(model.state_dict())
    good = (model[0], model[1])
    with pytest.raises(ValueError, match="4 BN features vs 5 layer channels"):
        fold_given_batch_norms(model, [good, (model[4], model[3])])
    with pytest.raises(ValueError, match="1 does not directly follow 2"):
        fold_given_batch_norms(model, [good, (model[2], model[1])])
    with pytest.raises(TypeError, match="MaxPool2d"):
        fold_given_batch_norms(model, [good, (nn.MaxPool2d(2), model[1])])
    with pytest.raises(ValueError, match="not a submodule"):
        fold_given_batch_norms(model, [good, (model[2], nn.BatchNorm2d(4))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)


def test_bn_used_at_two_places_is_not_folded():
    class TwoSites(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))

    model = randomize_batch_norms(TwoSites())
    assert fold_all_batch_norms(model, (1, 3, 4, 4)) == []
