"""Region cross-layer equalization: hand-computed scales on tiny blocks, FP32 preservation on real networks, the sweep
steps' rules."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import assert_layer, randomize_batch_norms, relative_error, require_extra, set_weight
import torch.nn.functional as F
from torch import nn

from clebench import cle_diagnostics, graph, layers
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling
from clebench.models.cifar import mobilenet_v2_cifar10, resnet18_cifar10
from clebench.region_equalization import equalize_regions, find_regions
from clebench.sweep import fp32_check, steps


class ResidualBlock(nn.Module):
    """stem -> ReLU -> [conv_a -> ReLU -> conv_b -> ReLU] + skip -> conv_c, all 1x1: the skip is the stem's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = set_weight(nn.Conv2d(1, 2, 1), [4.0, 1.0], [2.0, 1.0])
        self.conv_a = set_weight(nn.Conv2d(2, 2, 1), [[1.0, 0.5], [0.25, 0.5]], [1.0, 1.0])
        self.conv_b = set_weight(nn.Conv2d(2, 2, 1), [[2.0, 1.0], [1.0, 1.0]], [2.0, 4.0])
        self.conv_c = set_weight(nn.Conv2d(2, 1, 1), [[1.0, 4.0]], [0.5])
        self.relu = nn.ReLU()

    def forward(self, x):
        skip = self.relu(self.stem(x))
        return self.conv_c(self.relu(self.conv_b(self.relu(self.conv_a(skip)))) + skip)


def test_residual_block_hand_computed():
    model = ResidualBlock()
    x = torch.randn(4, 1, 3, 3)
    expected_output = model(x)
    first, inner = equalize_regions(model, iterations=1)
    # Region 1 (the residual stream): sources stem and conv_b (its output joins through the add), sinks conv_a, conv_c.
    #   r_src = [max(4, 2), max(1, 1)] = [4, 1], r_sink = [max(1, 0.25, 1), max(0.5, 0.5, 4)] = [1, 4] -> s = [2, 0.5]
    #   stem [4, 1] / s = [2, 2], b [2, 1] / s = [1, 2]; conv_b rows / s, bias [2, 4] / s = [1, 8];
    #   conv_a columns * s: [[2, 0.25], [0.5, 0.25]]; conv_c columns * s: [[2, 2]]
    # Region 2 (conv_a -> conv_b), on region 1's result: r_src = rows of conv_a = [2, 0.5],
    #   r_sink = columns of conv_b [[1, 0.5], [2, 2]] = [2, 2] -> s = [1, 0.5]
    #   conv_a rows / s: [[2, 0.25], [1, 0.5]], b [1, 1] / s = [1, 2]; conv_b columns * s: [[1, 0.25], [2, 1]]
    assert (first.sources, first.sinks, first.channels) == ({"stem": 0, "conv_b": 0}, {"conv_a": 0, "conv_c": 0}, 2)
    assert (inner.sources, inner.sinks, inner.channels) == ({"conv_a": 0}, {"conv_b": 0}, 2)
    torch.testing.assert_close(first.scale, torch.tensor([2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(inner.scale, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert_layer(model.stem, [[2.0], [2.0]], [1.0, 2.0])
    assert_layer(model.conv_a, [[2.0, 0.25], [1.0, 0.5]], [1.0, 2.0])
    assert_layer(model.conv_b, [[1.0, 0.25], [2.0, 1.0]], [1.0, 8.0])
    assert_layer(model.conv_c, [[2.0, 2.0]], [0.5])
    torch.testing.assert_close(model(x), expected_output)


def test_passes_repeat_until_every_region_is_balanced():
    model = ResidualBlock()
    regions = equalize_regions(model, iterations=100, tolerance=1e-6)
    modules = dict(model.named_modules())
    for region in regions:
        for name, offset in region.sources.items():
            assert offset == 0
        r_src = torch.stack([layers.channel_abs_max(modules[n].weight, 0) for n in region.sources]).amax(0)
        r_sink = torch.stack([layers.channel_abs_max(modules[n].weight, 1) for n in region.sinks]).amax(0)
        torch.testing.assert_close(r_src, r_sink, rtol=1e-5, atol=0)


class Concat(nn.Module):
    """cat([ReLU(conv_p(x)), conv_q(x)]) -> max pool -> conv_r, and conv_t reads conv_q's output (channel 2) too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_p = set_weight(nn.Conv2d(1, 2, 1), [4.0, 9.0], [2.0, 3.0])
        self.conv_q = set_weight(nn.Conv2d(1, 1, 1), [16.0], [4.0])
        self.conv_r = set_weight(nn.Conv2d(3, 1, 1), [[1.0, 1.0, 0.5]], [0.0])
        self.conv_t = set_weight(nn.Conv2d(1, 1, 1), [[1.0]], [1.0])
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        q = self.conv_q(x)
        return self.conv_r(self.pool(torch.cat([torch.relu(self.conv_p(x)), q], dim=1))), self.conv_t(q)


def test_concat_gives_each_source_its_channel_offset():
    model = Concat()
    x = torch.randn(2, 1, 4, 4)
    expected = model(x)
    (region,) = equalize_regions(model)
    # channels: conv_p -> 0, 1; conv_q -> 2.  r_src = [4, 9, 16], r_sink = [1, 1, max(0.5, 1)] -> s = [2, 3, 4]
    assert (region.sources, region.sinks, region.channels) == ({"conv_p": 0, "conv_q": 2}, {"conv_r": 0, "conv_t": 2}, 3)
    torch.testing.assert_close(region.scale, torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    assert_layer(model.conv_p, [[2.0], [3.0]], [1.0, 1.0])
    assert_layer(model.conv_q, [[4.0]], [1.0])
    assert_layer(model.conv_r, [[2.0, 3.0, 2.0]], [0.0])
    assert_layer(model.conv_t, [[4.0]], [1.0])
    for after, before in zip(model(x), expected):
        torch.testing.assert_close(after, before)


class Broken(nn.Module):
    """conv_a -> ReLU -> conv_b, with one thing that makes the region invalid (`kind`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(4, 4, 1, groups=2 if kind == "grouped_sink" else 1)
        self.other = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.conv_a(x))
        if self.kind == "output":
            return self.conv_b(h), h  # the source's output is also the graph output
        if self.kind == "sigmoid":
            return self.conv_b(h + torch.sigmoid(self.other(x)))  # the add's other input does not commute
        if self.kind == "constant":
            return self.conv_b(h + 1.0)  # a constant summand does not scale
        if self.kind == "cat_spatial":  # [N, 4, 2, 1] flattens to 8 features, but not channel-major: feature 2c + k
            pooled = [F.adaptive_avg_pool2d(t, 1) for t in (h, torch.relu(self.other(x)))]
            return self.fc(torch.flatten(torch.cat(pooled, dim=2), 1))
        if self.kind == "shared":
            return self.conv_b(self.conv_b(h))  # conv_b is called at two places
        return self.conv_b(h)


@pytest.mark.parametrize("kind", ["output", "sigmoid", "constant", "cat_spatial", "shared", "grouped_sink"])
def test_an_invalid_region_is_skipped_whole(kind):
    torch.manual_seed(0)
    model = Broken(kind)
    with torch.no_grad():
        layers.scale_output_channels(model.conv_a, torch.tensor([0.01, 1.0, 10.0, 100.0]))
    state = copy.deepcopy(model.state_dict())
    regions = equalize_regions(model)
    assert all("conv_a" not in region.sources for region in regions)
    assert torch.equal(model.conv_a.weight, state["conv_a.weight"]) and torch.equal(model.conv_b.weight, state["conv_b.weight"])


def prepared(model: nn.Module) -> nn.Module:
    gm = graph.prepare_model(randomize_batch_norms(model))
    fold_all_batch_norms(gm)
    return gm


def timm_model(name: str) -> nn.Module:
    timm = require_extra("timm")
    return timm.create_model(name, pretrained=False)


NETWORKS = {
    "resnet18_cifar10": (resnet18_cifar10, 16),
    "mobilenet_v2_cifar10": (mobilenet_v2_cifar10, 16),
    "torchvision_resnet18": (torchvision.models.resnet18, 32),
    "torchvision_mobilenet_v2": (torchvision.models.mobilenet_v2, 32),
    "timm_resnet18": (lambda: timm_model("resnet18"), 32),
    "timm_mobilenetv2_100": (lambda: timm_model("mobilenetv2_100"), 32),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_networks_keep_their_fp32_outputs(name):
    build, size = NETWORKS[name]
    torch.manual_seed(0)
    folded = prepared(build().eval())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = folded(x)
    for relu6 in ("keep",) if "resnet" in name else ("keep", "clip"):  # a ResNet has no ReLU6 to clip
        model = copy.deepcopy(folded)
        regions = equalize_regions(model, relu6=relu6, iterations=4)  # each pass keeps the function; the sweep test runs 20
        with torch.no_grad():
            actual = model(x)
        assert regions and any(region.scale.sub(1).abs().max() > 0.01 for region in regions), relu6
        assert relative_error(actual, expected) <= 1e-4, relu6


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    """resnet18_cifar10 with random BN statistics, BN-folded (tests take copies)."""
    torch.manual_seed(0)
    return prepared(resnet18_cifar10().eval())


def test_resnet18_regions_span_the_residual_adds(resnet18):
    model = copy.deepcopy(resnet18)
    regions = find_regions(model)
    # 8 conv1 -> conv2 pairs inside the blocks (what pairwise CLS finds too) and 4 residual streams, one per stage:
    # every block's conv2 (and downsample) writes the stream; the next blocks' conv1 (and downsample), or fc, read it.
    streams = [region for region in regions if len(region.sources) > 1]
    assert (len(regions), len(streams)) == (12, 4)
    assert streams[0].sources == {"conv1": 0, "layer1.0.conv2": 0, "layer1.1.conv2": 0}
    assert list(streams[0].sinks) == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    assert streams[-1].sources == {"layer4.0.conv2": 0, "layer4.0.downsample.0": 0, "layer4.1.conv2": 0}
    assert list(streams[-1].sinks) == ["layer4.1.conv1", "fc"]  # through ReLU, avgpool and flatten
    assert len(graph.find_cls_chains(graph.trace(model))) == 8
    table = cle_diagnostics.region_rows(regions)
    assert list(table.columns) == cle_diagnostics.REGION_COLUMNS and len(table) == 12
    assert table["sources"][0] == "conv1, layer1.0.conv2, layer1.1.conv2" and table["scale_max"].eq(1.0).all()


def test_the_pairwise_cls_step_is_unchanged(resnet18):
    model = resnet18
    direct = copy.deepcopy(model)
    infos = CrossLayerScaling.scale_model(direct)
    state = steps.PipelineState(copy.deepcopy(model))
    assert steps.apply_fp32_step("cls", state)
    assert len(state.cls_infos) == len(infos) == 8 and not state.regions
    modules = dict(model.named_modules())
    for info in state.cls_infos:  # s = sqrt(r1 / r2) of the weights before, as the AIMET formula has it
        (pair,) = info.cls_pair_info_list
        names = {id(module): name for name, module in state.model.named_modules()}
        r1 = layers.channel_abs_max(modules[names[id(pair.layer1)]].weight, 0)
        r2 = layers.channel_abs_max(modules[names[id(pair.layer2)]].weight, 1)
        torch.testing.assert_close(torch.from_numpy(pair.scale_factor), torch.sqrt(r1 / r2), rtol=1e-5, atol=0)
    for (name, after), reference in zip(state.model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(after, reference), name


def test_sweep_runs_bn_fold_then_cls_regions():
    model = graph.prepare_model(randomize_batch_norms(mobilenet_v2_cifar10().eval()))
    probe = torch.randn(2, 3, 16, 16)
    state = steps.PipelineState(model)
    for step in steps.parse_combination("bn_fold+cls_regions"):
        with torch.no_grad():
            before_model, before = copy.deepcopy(state.model), state.model(probe)
        assert steps.apply_fp32_step(step, state)
        with torch.no_grad():
            after = state.model(probe)
        assert fp32_check.check_step(step, "mobilenet_v2_cifar10", before_model, state.model, probe, before, after) <= 1e-4
    assert len(state.regions) == 7 and not state.cls_infos  # the residual streams and the ReLU6-free project -> expand
    assert fp32_check.TOLERANCES["cls_regions"] == fp32_check.TOLERANCES["cls_regions_relu6_clip"] == 1e-4


@pytest.mark.parametrize("combination, message", [
    ("bn_fold+cls+cls_regions", "choose one cross-layer-scaling step"),
    ("bn_fold+cls_relu6_clip+cls_regions_relu6_clip", "choose one cross-layer-scaling step"),
    ("cls_regions", "needs bn_fold first"),
    ("bn_fold+cls_regions+hbf", "hbf after cls_regions"),
    ("bn_fold+cls_regions_relu6_clip+bias_correction", "bias_correction after cls_regions_relu6_clip"),
])
def test_sweep_refuses_impossible_region_combinations(combination, message):
    with pytest.raises(steps.StepError, match=message) as error:
        steps.parse_combination(combination)
    assert "\n" not in str(error.value)


def test_region_steps_stay_out_of_the_presets():
    region_steps = set(steps.REGION_STEPS)
    assert steps.parse_combination("bn_fold+cls_regions_relu6_clip+bias_correction_empirical")
    assert not any(region_steps & set(combination) for combination in steps.all_combinations())
    assert not any(region_steps & set(text.split("+")) for texts in steps.PRESETS.values() for text in texts)


@pytest.mark.slow
def test_a_sweep_lists_the_regions_it_equalized(tmp_path, data_root, models_dir):
    """cle_regions.csv holds one row per region of the region-CLE prefix, the regions and scales equalize_regions
    finds on the same model, and report.html shows them. The sweep runs in this process (what it writes is what the
    CLI writes; the CLI's own run is tests/test_sweep.py's, so no second interpreter and torch import here)."""
    import pandas as pd

    from clebench.models import load_model
    from clebench.reporting.report import write_report
    from clebench.sweep import results
    from clebench.sweep.config import load_config
    from clebench.sweep.run import run_sweep

    config = tmp_path / "regions.toml"
    config.write_text('models = ["resnet18_cifar10"]\nsteps = ["bn_fold", "bn_fold+cls_regions"]\n'
                      'quant = ["w8a8_per_tensor_minmax"]\n\n[data]\ndataset = "cifar10"\nlimit = 10\n'
                      'calibration = 10\nbatch_size = 10\n')
    run_sweep(load_config(config), tmp_path / "out", data_root=data_root, models_dir=models_dir, progress=False)
    table = pd.read_csv(tmp_path / "out" / results.CLE_REGIONS_FILE)
    assert list(table.columns) == results.CLE_REGIONS_COLUMNS and set(table["steps"]) == {"bn_fold+cls_regions"}
    model = graph.prepare_model(load_model("resnet18_cifar10").eval())
    fold_all_batch_norms(model)
    expected = cle_diagnostics.region_rows(equalize_regions(model))
    assert list(table["sources"]) == list(expected["sources"]) and len(table) == 12
    assert table["scale_max"].to_numpy() == pytest.approx(expected["scale_max"].to_numpy(), rel=1e-5)
    assert (table["scale_max"] > 1).any()  # the regions were scaled, not just listed
    costs = pd.read_csv(tmp_path / "out" / results.STEP_COSTS_FILE)
    assert list(costs.columns) == results.STEP_COST_COLUMNS
    assert list(costs["steps"]) == ["bn_fold", "bn_fold+cls_regions"] and (costs["step_seconds"] > 0).all()
    in_regions = {name for column in ("sources", "sinks") for text in table[column] for name in text.split(", ")}
    assert list(costs["layers_changed"]) == [20, len(in_regions)]  # 20 convs with a BN; every layer of a region
    write_report(tmp_path / "out")
    assert "CLE: regions" in (tmp_path / "out" / results.REPORT_FILE).read_text(encoding="utf-8")
