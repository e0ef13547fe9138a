"""CLE diagnostics: the sets and skipped layers agree with what scaling did, and the activation-range growth is
the hand-computed one."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_batch_norms
from torch import nn

from clebench import cle_diagnostics, graph
from clebench.batch_norm_fold import backward_fold_map, fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, HighBiasFold
from clebench.models.cifar import CIFAR10_BUILDERS


class BranchyNet(nn.Module):
    """conv1 -relu- conv2 -ReLU6- conv3 -relu-> {conv4, conv5} -add- conv6 -relu- dw7 -pool- fc.

    Known sets: (conv1, conv2) under relu6 'keep'; (conv1, conv2), (conv2, conv3) under 'clip'. conv3 feeds a branch,
    conv4 / conv5 a merge, conv6 -> dw7 is a chain that ends at a depthwise conv, fc is the model output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.conv4, self.conv5, self.conv6 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.dw7 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.relu1, self.relu6, self.relu3, self.relu6b = nn.ReLU(), nn.ReLU6(), nn.ReLU(), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.relu3(self.conv3(self.relu6(self.conv2(self.relu1(self.conv1(x))))))
        y = self.conv6(self.conv4(y) + self.conv5(y))
        return self.fc(torch.flatten(self.pool(self.dw7(self.relu6b(y))), 1))


def _scaled_names(model: nn.Module, infos) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)] for info in infos for pair in info.cls_pair_info_list for m in (pair.layer1, pair.layer2)}


@pytest.mark.parametrize("relu6, sets, skipped", [
    ("keep", [["conv1", "conv2"]], {"conv3": "branch", "conv4": "merge", "conv5": "merge",
                                    "conv6": "depthwise_chain_end", "dw7": "depthwise_chain_end", "fc": "model_output"}),
    ("clip", [["conv1", "conv2"], ["conv2", "conv3"]], {"conv4": "merge", "conv5": "merge", "conv6": "depthwise_chain_end",
                                                        "dw7": "depthwise_chain_end", "fc": "model_output"}),
])
def test_sets_and_skipped_layers_agree_with_scaling(relu6, sets, skipped):
    torch.manual_seed(0)
    before = graph.prepare_model(BranchyNet().eval())
    after = copy.deepcopy(before)
    infos = CrossLayerScaling.scale_model(after, relu6=relu6)
    x = torch.randn(16, 3, 8, 8)
    table = cle_diagnostics.cls_set_rows(infos, before, after, [(x, None)], {}, hbf_ran=False)
    assert [text.split(" → ") for text in table["layers"]] == sets
    found = cle_diagnostics.skipped_layers(before, relu6, _scaled_names(after, infos))
    assert dict(zip(found["layer"], found["reason"])) == skipped
    conv3 = found.set_index("layer")["input_side"].get("conv3", "")
    assert ("ReLU6" in conv3) == (relu6 == "keep")  # the kept ReLU6 is named as what ends conv3's input side
    assert set(found["layer"]) | _scaled_names(after, infos) == {n for n, _ in graph_layers(before)}


def graph_layers(model):
    from clebench.ranges import named_layers

    return named_layers(model)


def test_activation_range_growth_matches_hand_computation():
    """Linear(2,2) -ReLU- Linear(2,2): r1 = [1, 4], r2 = [4, 1] so s = sqrt(r1 / r2) = [0.5, 2]; channel 0 doubles,
    channel 1 halves. On x = [[1, 2], [-1, 3]] the ReLU outputs span [0, 1] and [8, 12] before, [0, 2] and [4, 6] after."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[4.0, 1.0], [4.0, 1.0]]))
    before = graph.prepare_model(model)
    after = copy.deepcopy(before)
    infos = CrossLayerScaling.scale_model(after)
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    row = cle_diagnostics.cls_set_rows(infos, before, after, [(x, None)], {}, hbf_ran=False).iloc[0]
    assert (row["scale_min"], row["scale_median"], row["scale_max"]) == pytest.approx((0.5, 1.25, 2.0))
    assert row["act_range_growth_median"] == pytest.approx(1.25)  # growths 2 and 0.5
    assert row["act_range_growth_max"] == pytest.approx(2.0)
    assert row["act_tensor_range_growth"] == pytest.approx(0.5)  # widest channel: 4 before, 2 after
    assert row["weight_range_ratios_before"] == "4 / 1" and row["weight_range_ratios_after"] == "1 / 1"
    assert row["hbf"] == "not run"


def test_hbf_columns_report_the_absorbed_bias():
    torch.manual_seed(0)
    net = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    with torch.no_grad():
        net[1].bias.copy_(torch.linspace(-1, 5, 8))  # large betas: some channels have beta - 3|gamma| > 0
        net[1].weight.fill_(0.5)
    before = graph.prepare_model(net.eval())
    bn_map = backward_fold_map(fold_all_batch_norms(before))
    after = copy.deepcopy(before)
    bn_after = {after.get_submodule("0"): bn for layer, bn in bn_map.items()}
    infos = CrossLayerScaling.scale_model(after)
    HighBiasFold.bias_fold(infos, bn_after)
    row = cle_diagnostics.cls_set_rows(infos, before, after, [(torch.randn(4, 3, 4, 4), None)], bn_after, True).iloc[0]
    absorbed = infos[0].cls_pair_info_list[0].absorbed_bias
    assert row["hbf"] == "folded"
    assert row["hbf_channels"] == int((absorbed > 0).sum()) > 0
    assert row["absorbed_bias_max"] == pytest.approx(absorbed.max().item())


def _architecture(name: str) -> nn.Module:
    if name in CIFAR10_BUILDERS:
        return CIFAR10_BUILDERS[name]()
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


@pytest.mark.parametrize("name, relu6", [("mobilenet_v2_cifar10", "keep"), ("mobilenet_v2_cifar10", "clip"),
                                         ("resnet18_cifar10", "keep"), ("efficientnet_lite0", "keep"),
                                         ("efficientnet_lite0", "clip")])
def test_output_side_reason_is_none_exactly_where_discovery_finds_a_hop(name, relu6):
    """The reasons come from a walk over the same predicates as graph.find_cls_chains; check it on the zoo graphs
    (architectures only: the graph does not depend on the weights)."""
    model = graph.prepare_model(_architecture(name).eval())
    fold_all_batch_norms(model)
    gm = graph.trace(model)
    heads = {hop.layer for chain in graph.find_cls_chains(gm, relu6) for hop in chain}
    modules, single_use = dict(gm.named_modules()), graph.single_use_modules(gm)
    walked = {node.target for node in gm.graph.nodes
              if node.op == "call_module" and node.target in single_use and graph.is_scalable(modules[node.target])
              and cle_diagnostics._walk_out(node, modules, single_use, relu6) is None}
    assert walked == heads and heads
    after = copy.deepcopy(model)
    scaled = _scaled_names(after, CrossLayerScaling.scale_model(after, relu6=relu6))
    skipped = cle_diagnostics.skipped_layers(model, relu6, scaled)
    assert not set(skipped["layer"]) & scaled
    assert len(skipped) + len(scaled) == len(graph_layers(model))
    assert set(skipped["reason"]) <= set(cle_diagnostics.SKIP_REASONS)


@pytest.mark.slow
def test_a_sweep_writes_the_sets_and_skipped_layers_of_each_prefix_that_scales(uninterrupted):
    """The tiny sweep (MobileNetV2-CIFAR, bn_fold+cls_relu6_clip[+hbf]) on calibration data: the sets are the ones
    scale_model finds, every other layer is listed as skipped, and, because ReLU / the per-channel clip are
    positive-homogeneous, the activations feeding a set's inner layers shrink by exactly the scale factors
    (growth = 1 / s per channel), so the largest growth is 1 / the smallest scale."""
    import pandas as pd

    from clebench.models import load_model
    from clebench.sweep import results

    sets = pd.read_csv(uninterrupted / results.CLE_SETS_FILE)
    skipped = pd.read_csv(uninterrupted / results.CLE_SKIPPED_FILE)
    assert list(sets.columns) == results.CLE_SETS_COLUMNS and list(skipped.columns) == results.CLE_SKIPPED_COLUMNS
    assert set(sets["steps"]) == {"bn_fold+cls_relu6_clip", "bn_fold+cls_relu6_clip+hbf"}
    model = graph.prepare_model(load_model("mobilenet_v2_cifar10").eval())
    fold_all_batch_norms(model)
    after = copy.deepcopy(model)
    infos = CrossLayerScaling.scale_model(after, relu6="clip")
    names = {id(m): n for n, m in after.named_modules()}
    expected = [" → ".join([names[id(i.cls_pair_info_list[0].layer1)]] + [names[id(p.layer2)] for p in i.cls_pair_info_list])
                for i in infos]
    clip = sets[sets["steps"] == "bn_fold+cls_relu6_clip"]
    assert list(clip["layers"]) == expected
    listed = set(skipped[skipped["steps"] == "bn_fold+cls_relu6_clip"]["layer"])
    assert listed == {n for n, _ in graph_layers(model)} - _scaled_names(after, infos)
    assert clip["act_range_growth_max"].to_numpy() == pytest.approx(1 / clip["scale_min"].to_numpy(), rel=1e-3)
    assert set(sets[sets["steps"].str.endswith("hbf")]["hbf"]) <= {"folded", "nothing to absorb"}
    assert set(clip["hbf"]) == {"not run"}


def test_changed_layers_counts_layers_whose_weight_or_bias_moved():
    before = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1, bias=False), nn.Linear(2, 2))
    after = copy.deepcopy(before)
    assert cle_diagnostics.changed_layers(before, after) == 0
    with torch.no_grad():
        after[0].bias[1] += 1e-6  # a bias alone counts
        after[3].weight.mul_(1.0)  # the same values: unchanged
    assert cle_diagnostics.changed_layers(before, after) == 1
    after[2].bias = nn.Parameter(torch.zeros(2))  # a bias added (HBF on a bias-free conv)
    assert cle_diagnostics.changed_layers(before, after) == 2
