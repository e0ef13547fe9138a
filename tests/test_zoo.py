"""CLE on a fast subset of the torchvision zoo (scripts/zoo/zoo_coverage.py runs all of it), and the checker's own
checks.

Expected counts were read off results/zoo_coverage.md; a change means clebench now finds different BN folds or
CLS sets on a stock architecture, which must be explained. VGG is left out: initialising its 100M-parameter
classifier alone takes longer than all of these checks.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DataDependent, load_script
from torch import nn

from clebench import cross_layer_equalization, graph, layers
from clebench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
zoo_coverage = load_script("zoo_coverage")

ZOO = {  # name: (BN folds, keep (pairs, triples), clip (pairs, triples))
    "resnet18": (20, (8, 0), (8, 0)),
    "mobilenet_v2": (52, (2, 0), (2, 17)),  # ReLU6 ends chains unless it becomes a per-channel clip
    "mobilenet_v3_small": (34, (10, 2), (10, 2)),
    "mnasnet0_5": (52, (2, 17), (2, 17)),
    "efficientnet_b0": (49, (2, 0), (2, 0)),  # SiLU: only the linear bottleneck -> expansion links
    "regnet_y_400mf": (53, (16, 0), (16, 0)),
    "resnext50_32x4d": (53, (0, 0), (0, 0)),  # grouped 3x3 convs cannot be scaled
    "densenet121": (59, (58, 0), (58, 0)),  # pre-activation BN -> ReLU -> conv cannot fold
    "squeezenet1_0": (0, (0, 0), (0, 0)),  # every ReLU output feeds two expand convs or a pool
    "googlenet": (57, (19, 0), (19, 0)),  # the two auxiliary heads never run in eval mode
    "shufflenet_v2_x0_5": (56, (3, 16), (3, 16)),
    "inception_v3": (94, (44, 0), (44, 0)),  # 75x75 input, its smallest
    "convnext_tiny": (0, (0, 0), (0, 0)),  # LayerNorm and GELU: nothing to fold or scale
    "swin_v2_t": (0, (12, 0), (12, 0)),  # Linear -> ReLU -> Linear in the position-bias MLPs
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two intra-op threads on a busy 2-core CI machine run these small forwards ~10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_is_equalized_exactly_and_completely(name):
    result = zoo_coverage.check_model(name)
    assert result.problems == []  # reference links == clebench links, fold + CLS within 1e-4, all finite
    assert result.traceable and result.status == "ok"
    bn_folds, keep_sets, clip_sets = ZOO[name]
    assert (result.keep.bn_folds, result.keep.sets, result.clip.sets) == (bn_folds, keep_sets, clip_sets)
    assert result.keep.rel <= 1e-4 and result.clip.rel <= 1e-4
    assert result.rel_hbf < 0.1  # HBF is approximate; the full zoo stays below 0.1 on these random models
    if result.export.exported is None:  # the onnx extra is missing (tests under CI have it: tests/test_export_ops.py)
        return
    assert result.export.exported, result.export.error
    # ONNX Runtime's float kernels sum in another order than torch's: a value on a rounding boundary lands one step
    # away, and through dozens of layers of random weights such flips grow (results/zoo_coverage.md). How far depends
    # on the CPU's kernels (inception_v3: 5 steps on an AVX512 CPU, 6 on an AVX2 one), so the bound is measured in the
    # same run: ONNX Runtime may be as far from torch's float32 as torch's float32 is from float64, and no farther.
    assert result.export.max_steps <= max(zoo_coverage.EXPORT_STEPS, result.export.sim_float64_steps)


def conv_relu_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Dropout(), nn.Conv2d(4, 2, 1)).eval()


def test_reference_links_follow_functional_ops_and_stop_at_shared_values():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.b1, self.b2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.act, self.drop = nn.ReLU6(), nn.Dropout()

        def forward(self, x):
            a = self.a2(self.drop(torch.relu(self.a1(x))))
            b = F.relu(self.b1(x))
            c = self.c2(self.act(self.c1(x)))
            return a + self.b2(b) + b + c

    model = Net().eval()
    x = (torch.randn(1, 3, 4, 4),)
    keep, outputs = zoo_coverage.reference_links(model, x, relu6=False)
    assert keep == {("a1", "a2")} and torch.equal(outputs[0], model(*x))
    clip, _ = zoo_coverage.reference_links(model, x, relu6=True)
    assert clip == {("a1", "a2"), ("c1", "c2")}
    assert zoo_coverage.clebench_links(model, relu6=False) == keep


def test_untraceable_model_is_reported_with_the_documented_error():
    result = zoo_coverage.check(DataDependent().eval(), "data_dependent", 8)
    assert result.status == "untraceable (clear error)" and not result.traceable and result.problems == []
    assert "manual mode" in result.error and "fold_given_batch_norms" in result.error


def test_missed_links_are_a_silent_no_op_failure(monkeypatch):
    monkeypatch.setattr(graph, "find_cls_chains", lambda gm, relu6="keep": [])
    result = zoo_coverage.check(conv_relu_conv(), "conv_relu_conv", 8)
    assert result.status == "FAIL"
    assert "keep: links only the reference found [('0', '3')], only clebench found []" in result.problems
    assert "keep: silent no-op, 1 scalable links but no CLS set" in result.problems


def test_changed_output_and_nan_are_failures(monkeypatch):
    monkeypatch.setattr(layers, "scale_input_channels", lambda layer, scale: None)
    result = zoo_coverage.check(conv_relu_conv(), "broken_scaling", 8)
    assert any(p.startswith("keep: BN fold + CLS changed the FP32 output by") for p in result.problems)
    monkeypatch.undo()
    model = conv_relu_conv()
    with torch.no_grad():
        model[0].weight[0] = 0.0  # a dead channel: r1 = 0, so s = sqrt(0 / r2) = 0 unless it is replaced by 1
    monkeypatch.setattr(cross_layer_equalization, "_finite_or_one", lambda scale: scale)
    result = zoo_coverage.check(model, "nan_scaling", 8)
    assert not result.finite and "keep: a parameter or buffer is NaN/inf" in result.problems


def test_unexpected_error_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def explode(model, *args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(zoo_coverage, "equalize_model", explode)
    result = zoo_coverage.check(conv_relu_conv(), "exploding", 8)
    assert result.status == "FAIL" and result.problems == ["unexpected RuntimeError: boom"]
    assert math.isnan(result.rel_hbf) and result.keep.sets == (1, 0)  # the steps before the error were recorded
    report = zoo_coverage.render([result], "python scripts/zoo/zoo_coverage.py", threads=1, finished=True)
    assert "| exploding | 8 | yes | 0/0 |" in report and "- exploding: unexpected RuntimeError: boom" in report


def test_script_writes_the_report_for_a_model_filter(tmp_path):
    output = tmp_path / "zoo.md"
    command = [sys.executable, "scripts/zoo/zoo_coverage.py", "--models", "squeezenet1_.", "--output", str(output)]
    assert subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300).returncode == 0
    text = output.read_text()
    assert f"torch {torch.__version__}" in text and "`python scripts/zoo/zoo_coverage.py --models squeezenet1_. --output" in text
    assert "**2 models: 2 ok, 0 rejected with UntraceableModelError, 0 FAIL. Export: 2 exported, 0 refused;" in text
    assert "| squeezenet1_0 | 64 | yes |" in text and "| squeezenet1_1 | 64 | yes |" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| squeeze")] == ["| squeezenet1_0", "| squeezenet1_1"]
    with pytest.raises(UserError, match="'resnet1' matches no torchvision classification or clebench model"):
        zoo_coverage.select(["resnet1"])
