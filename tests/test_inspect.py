"""`clebench inspect`: BN folds, CLS sets, skipped layers and export gaps, as graph discovery finds them."""
from __future__ import annotations

import copy
import json

import pytest
import torchvision
from torch import nn

from conftest import require_extra
from clebench import cli, graph, inspection
from clebench.batch_norm_fold import fold_all_batch_norms

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """conv1 -> conv2 is the one CLS pair; a grouped conv, two adds, a BN folded forward and one left in place."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.grouped, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.bn4, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn5, self.relu3 = nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        y = self.conv3(self.bn4(x + self.bn3(self.grouped(x))))
        y = self.relu3(self.bn5(y + x))
        return self.fc(torch.flatten(self.pool(y), 1))


class Flipped(Tiny):
    def forward(self, x):
        return torch.flip(super().forward(x), [1])
'''


@pytest.fixture
def tiny_file(tmp_path, monkeypatch):
    (tmp_path / "tiny_models.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "tiny_models.py"


def graph_counts(model: nn.Module, relu6: str) -> tuple[int, int, int]:
    """(BN folds, CLS pairs, CLS triples) straight from clebench.graph, as the sweep's steps find them."""
    prepared = graph.prepare_model(model.eval())
    folds = graph.find_bn_folds(graph.trace(prepared))
    folded = copy.deepcopy(prepared)
    fold_all_batch_norms(folded)
    traced = graph.trace(folded)
    modules = dict(traced.named_modules())
    sets = [s for chain in graph.find_cls_chains(traced, relu6) for s in graph.chain_to_cls_sets(chain, modules)]
    return len(folds.backward) + len(folds.forward), sum(len(s) == 1 for s in sets), sum(len(s) == 2 for s in sets)


def counts(result: inspection.Inspection) -> tuple[int, int, int]:
    kinds = [record["kind"] for record in result.cls_sets]
    return len(result.bn_folds), kinds.count("pair"), kinds.count("triple")


def test_resnet18_as_graph_discovery_sees_it():
    model = torchvision.models.resnet18()
    result = inspection.inspect_model(model, "resnet18", (1, 3, 64, 64), export=False)
    assert counts(result) == graph_counts(model, "keep") == (20, 8, 0)
    assert all(record["direction"] == "backward" for record in result.bn_folds) and not result.bn_unfolded
    assert {"bn": "layer2.0.downsample.1", "layer": "layer2.0.downsample.0", "direction": "backward"} in result.bn_folds
    assert result.cls_sets[0] == {"kind": "pair", "layers": ["layer1.0.conv1", "layer1.0.conv2"], "activations": [["ReLU"]]}
    skipped = {record["layer"]: record["reason"] for record in result.skipped}
    assert result.layers == 21 and skipped == {"conv1": "other_op", "layer2.0.downsample.0": "merge",
                                               "layer3.0.downsample.0": "merge", "layer4.0.downsample.0": "merge",
                                               "fc": "model_output"}
    assert result.export_gaps == []


@pytest.mark.parametrize("relu6, expected", [("keep", (52, 2, 0)), ("clip", (52, 2, 17)), ("replace", (52, 2, 17))])
def test_mobilenet_v2_per_relu6_policy(relu6, expected):
    model = torchvision.models.mobilenet_v2()
    result = inspection.inspect_model(model, "mobilenet_v2", (1, 3, 64, 64), relu6, export=False)
    reference = copy.deepcopy(model)
    if relu6 == "replace":
        reference = graph.prepare_model(reference)
        for name, module in list(reference.named_modules()):
            if isinstance(module, nn.ReLU6):
                graph.set_submodule(reference, name, nn.ReLU())
    assert counts(result) == graph_counts(reference, "clip" if relu6 == "clip" else "keep") == expected
    assert len(result.skipped) == (53 - 4 if relu6 == "keep" else 1)  # keep: two pairs across linear bottlenecks
    reasons = {r["reason"] for r in result.skipped}
    assert reasons == ({"relu6_chain_end", "merge", "branch", "model_output"} if relu6 == "keep" else {"model_output"})


def test_a_factory_with_a_grouped_conv_and_adds_by_hand(tiny_file, capsys):
    assert cli.main(["inspect", "tiny_models.py:Tiny", "--input-size", "3", "16", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny_models.py:Tiny: input 1x3x16x16, ReLU6 policy 'keep', 5 conv / linear layers\n")
    for line in ["BN fold: 4 of 5 BatchNorms folded (3 into the layer before, 1 into the layer after)",
                 "  bn3 into grouped", "  bn4 into conv3 (after it)",
                 "  bn5 left in the model: between add (add_1) and ReLU relu3: it folds only into a layer",
                 "CLS sets: 1 (1 pair, 0 triples)", "  pair   conv1 -> ReLU -> conv2",
                 "Layers in no CLS set: 3 of 5",
                 "  grouped  conv       a grouped (not depthwise) conv: CLS cannot scale it",
                 "  conv3    conv       out: an op with several data inputs (add, concat, ...) at add (add_1)",
                 "                      in:  an op with several data inputs (add, concat, ...) at add (add)",
                 "  fc       linear     out: the model output",
                 "Export: 0 ops without an ONNX lowering", "  trial export exports (W8A8"]:
        assert f"\n{line}" in out, line


def test_json_and_an_op_the_exporter_cannot_take(tiny_file, capsys):
    assert cli.main(["inspect", "tiny_models.py:Flipped", "--input-size", "3", "16", "16", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["input_shape"] == [1, 3, 16, 16] and len(found["bn_folds"]) == 4
    assert [r["bn"] for r in found["bn_unfolded"]] == ["bn5"]
    assert [(r["layer"], r["reason"]) for r in found["skipped"]] == [
        ("grouped", "not_scalable"), ("conv3", "merge"), ("fc", "other_op")]  # fc feeds the flip
    assert found["export_gaps"] == [{"node": "flip", "what": "call_function flip"}]
    assert found["export"].startswith("fails: cannot export node 'flip' (call_function flip) to ONNX: no ONNX mapping")


class SharedBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(self.bn(self.bn(self.conv(x))).mean((2, 3)))


def test_a_bn_called_twice_is_left_and_said_so():
    result = inspection.inspect_model(SharedBn(), "shared", (1, 3, 8, 8), export=False)
    assert result.bn_folds == [] and result.bn_unfolded == [
        {"bn": "bn", "reason": "called at 2 places: folding would change the others"}]


@pytest.mark.parametrize("argv, message", [
    (["tiny_models.py:nothing"], "models.tiny_models.py:nothing.factory: tiny_models.py has no attribute 'nothing'"),
    (["tiny_models.py:Tiny", "--input-size", "1", "16", "16"], "models.tiny_models.py:Tiny: the model rejects input_size [1, 16, 16]"),
    (["tiny_models.py:Tiny", "--relu6", "clip", "--checkpoint", "missing.pt"], "missing.pt"),
])
def test_bad_input_is_one_line(tiny_file, capsys, argv, message):
    assert cli.main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clebench inspect: error: ") and message in err and err.count("\n") == 1, err


def test_a_timm_model_by_name(capsys):
    require_extra("timm")
    import timm

    assert cli.main(["inspect", "timm:mobilenetv2_100", "--input-size", "3", "64", "64", "--relu6", "clip",
                     "--no-export", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    kinds = [record["kind"] for record in found["cls_sets"]]
    expected = graph_counts(timm.create_model("mobilenetv2_100"), "clip")
    assert (len(found["bn_folds"]), kinds.count("pair"), kinds.count("triple")) == expected == (52, 2, 17)
    assert found["cls_sets"][0]["activations"] == [["ReLU6"], ["ReLU6"]] and found["export"] == "not tried"
