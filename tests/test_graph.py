"""Graph discovery on the model shapes users actually write: functional ops, shared modules, wrappers, devices."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DataDependent, randomize_batch_norms, relative_error
from torch import nn

from clebench import graph
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, equalize_model


class FunctionalNet(nn.Module):
    """conv-bn-F.relu-conv-bn-torch.relu(inplace)-conv, one ReLU6 module reused twice, two inputs and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.side = nn.Sequential(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)), nn.ReLU6(), nn.Conv2d(6, 4, 1))
        self.act = nn.ReLU6()
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x, y):
        a = F.relu(self.bn1(self.conv1(x)))
        a = torch.relu_(self.bn2(self.conv2(a)))
        a = self.act(self.conv3(a))
        b = self.act(self.side(y))
        return self.head(a), a + b


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norms(FunctionalNet())


def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)


def test_functional_relus_count_and_multi_io_outputs_are_preserved():
    model = make_net()
    x = inputs()
    expected = model(*x)
    assert len(fold_all_batch_norms(model, [(1, 3, 8, 8), (1, 3, 8, 8)])) == 3
    infos = CrossLayerScaling.scale_model(model, [(1, 3, 8, 8), (1, 3, 8, 8)])
    pairs = [(p.layer1, p.layer2, p.relu_activation_between_layers) for i in infos for p in i.cls_pair_info_list]
    assert pairs == [(model.conv1, model.conv2, True), (model.conv2, model.conv3, True)]
    for out, ref in zip(model(*x), expected):
        assert relative_error(out, ref) < 1e-5


def test_shared_relu6_is_handled_per_call_site_and_clip_needs_prepare_model():
    model = make_net()
    x = inputs()
    expected = model(*x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"act \(called at 2 places\).*prepare_model"):
        equalize_model(model, relu6="clip")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # error before any change
    prepared = graph.prepare_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # prepare_model copies
    fold_all_batch_norms(prepared)
    infos = CrossLayerScaling.scale_model(prepared, relu6="clip")
    pairs = [(p.layer1, p.layer2) for i in infos for p in i.cls_pair_info_list]
    assert (prepared.get_submodule("side.0.0"), prepared.get_submodule("side.2")) in pairs
    clips = [m for m in prepared.modules() if isinstance(m, ChannelClippedReLU)]
    assert len(clips) == 1  # the side branch's ReLU6; the shared `act` sites feed a head / an add, not a layer chain
    for out, ref in zip(prepared(*x), expected):
        assert relative_error(out, ref) < 1e-5


def test_prepare_model_turns_functional_activations_into_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv2(F.hardtanh(self.conv1(x), 0.0, 6.0))

    model = Functional().eval()
    x = torch.randn(2, 3, 4, 4) * 10
    expected = model(x)
    with pytest.raises(ValueError, match="functional hardtanh"):
        CrossLayerScaling.scale_model(model, relu6="clip")
    prepared = graph.prepare_model(model)
    assert sum(isinstance(m, nn.Hardtanh) for m in prepared.modules()) == 1
    assert len(CrossLayerScaling.scale_model(prepared, relu6="clip")) == 1
    assert relative_error(prepared(x), expected) < 1e-5


def test_data_parallel_wrapper_is_unwrapped():
    model = make_net()
    wrapped = nn.DataParallel(model)
    assert len(fold_all_batch_norms(wrapped)) == 3
    assert isinstance(model.bn1, nn.Identity)


def test_untraceable_model_names_manual_mode():
    with pytest.raises(graph.UntraceableModelError, match="manual mode.*fold_given_batch_norms.*scale_cls_sets"):
        equalize_model(DataDependent(), (1, 3, 4, 4))


def test_linear_reading_a_conv_without_flatten_is_not_scaled():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Linear(4, 4)).eval()
    assert CrossLayerScaling.scale_model(model) == []


def test_weight_shared_layers_are_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(F.relu(self.conv1(x)))))

    assert CrossLayerScaling.scale_model(Shared()) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_equalize_model_on_cuda_keeps_everything_on_the_device():
    import torchvision

    torch.backends.cudnn.allow_tf32 = False  # compare GPU and CPU arithmetic, not TF32 rounding
    model = randomize_batch_norms(torchvision.models.mobilenet_v2()).cuda()
    reference = copy.deepcopy(model).cpu()
    x = torch.randn(2, 3, 64, 64)
    equalize_model(model, dummy_input=x.cuda(), relu6="keep")
    equalize_model(reference, dummy_input=x, relu6="keep")
    assert all(p.is_cuda for p in model.parameters())
    for (name, on_gpu), on_cpu in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-6, msg=name)
    assert relative_error(model(x.cuda()).cpu(), reference(x)) < 1e-4
