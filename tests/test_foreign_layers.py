"""Layer subclasses from other libraries: folded as what they compute, or refused naming the module -- never treated
as their torch base class (clebench.foreign_layers)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, randomize_batch_norms, relative_error, require_extra
from torch import nn

from clebench import foreign_layers, graph
from clebench.batch_norm_fold import fold_all_batch_norms, fold_given_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling
from clebench.quant import QuantConfig, QuantSim

zoo_coverage = load_script("zoo_coverage")  # scripts/zoo/zoo_coverage.py: the timm report's checks


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: the activation runs inside the BN's forward."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class CopiedForwardBatchNorm(nn.BatchNorm2d):
    """A forward of its own that computes exactly what nn.BatchNorm2d's does."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class WeightStandardizedConv(nn.Conv2d):
    """timm's StdConv2d in miniature: scaling its weight is undone by the standardization."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePaddedConv(nn.Conv2d):
    """TensorFlow's SAME padding, computed from the input size in forward (timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for size, stride, kernel in zip(reversed(x.shape[2:]), reversed(self.stride), reversed(self.kernel_size)):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def block(norm: nn.Module, conv_type: type = nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(conv_type(3, 4, 3, stride=2), norm, nn.Conv2d(4, 2, 1))
    return randomize_batch_norms(model)


def test_bn_with_activation_folds_into_the_conv_and_leaves_its_activation():
    model = block(BatchNormAct(4, nn.ReLU6()))
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    pairs = fold_all_batch_norms(model)
    assert len(pairs) == 1 and isinstance(model[1], nn.ReLU6)  # as plain BN folding leaves Identity, this leaves the act
    assert relative_error(model(x), expected) < 1e-6
    # CLE now sees the ReLU6 for what it is: scaled across exactly under the clip policy, a chain end under keep
    assert CrossLayerScaling.scale_model(copy.deepcopy(model), relu6="keep") == []
    clipped = graph.prepare_model(model)
    assert len(CrossLayerScaling.scale_model(clipped, relu6="clip")) == 1
    assert relative_error(clipped(x), expected) < 1e-5


def test_bn_with_activation_never_folds_forward():
    """BN -> act -> conv: folding the BN into the conv would move it past the activation."""
    torch.manual_seed(0)
    bn = BatchNormAct(3, nn.ReLU())
    model = randomize_batch_norms(nn.Sequential(bn, nn.Conv2d(3, 2, 1)))
    assert fold_all_batch_norms(copy.deepcopy(model)) == []
    with pytest.raises(ValueError, match="its activation \\(ReLU\\) sits between the BN and the layer"):
        fold_given_batch_norms(model, [(model[0], model[1])])


def test_split_keeps_the_function_and_shares_the_statistics():
    model = block(BatchNormAct(4, nn.SiLU()))
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    original = model[1]
    foreign_layers.split_norm_acts(model)
    assert [type(m) for m in model[1]] == [nn.BatchNorm2d, nn.SiLU]
    assert model[1].bn.running_var is original.running_var and model[1].bn.weight is original.weight
    assert torch.equal(model(x), expected)


def test_quantsim_and_export_of_an_unfolded_bn_with_activation_keep_the_activation(tmp_path):
    """The sim quantizes the BN and its activation as two ops, and the exported ONNX runs the ReLU: ONNX Runtime gives
    the sim's output (as a BatchNormalization alone it would miss every negative value's clip)."""
    require_extra("onnxruntime")
    from clebench.runtimes.export import export_onnx
    from clebench.runtimes.onnxruntime import make_session

    model = block(BatchNormAct(4, nn.ReLU()))
    x = torch.randn(8, 3, 9, 9)
    sim = QuantSim(model, x[:1], QuantConfig.from_name("w8a8_per_tensor_minmax"))
    sim.calibrate([x], progress=False)
    called = [type(sim.model.get_submodule(n.target)) for n in sim.model.graph.nodes if n.op == "call_module"]
    assert nn.BatchNorm2d in called and nn.ReLU in called
    path = export_onnx(sim, x[:1], tmp_path / "model.onnx")
    session = make_session(path, "sim", threads=1)
    runtime = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert relative_error(runtime, sim.model(x)) < 0.02  # float kernels in another order: a step at most here


def test_a_copied_batch_norm_forward_is_the_base_class():
    model = block(CopiedForwardBatchNorm(4))
    assert foreign_layers.kind(model[1]) == "plain"
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    fold_all_batch_norms(model)
    assert isinstance(model[1], nn.Identity) and relative_error(model(x), expected) < 1e-6


def test_a_same_padded_conv_is_folded_and_scaled_as_a_padded_conv():
    model = block(nn.BatchNorm2d(4), SamePaddedConv)
    assert foreign_layers.kind(model[0]) == "padded_conv"
    model = nn.Sequential(*model[:2], nn.ReLU(), model[2]).eval()
    x = torch.randn(2, 3, 9, 10)  # odd and even sides: SAME pads differ from any fixed padding
    expected = model(x)
    fold_all_batch_norms(model)
    assert len(CrossLayerScaling.scale_model(model)) == 1
    assert relative_error(model(x), expected) < 1e-5


def test_a_layer_that_computes_something_else_is_refused_by_name():
    model = block(nn.BatchNorm2d(4), WeightStandardizedConv)
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    message = "Sequential has layers that subclass a torch class but compute something else: WeightStandardizedConv \\(1: 0\\)"
    for run in (graph.trace, fold_all_batch_norms, CrossLayerScaling.scale_model,
                lambda m: QuantSim(m, x[:1], QuantConfig())):
        with pytest.raises(foreign_layers.ForeignModuleError, match=message):
            run(model)
    assert torch.equal(model(x), expected)  # refused before anything changed


def test_a_module_whose_forward_fails_on_the_probe_is_refused_with_its_error():
    class Fussy(nn.Conv2d):
        def forward(self, x):
            raise RuntimeError("needs 224 x 224")

    with pytest.raises(foreign_layers.ForeignModuleError, match="fails on a probe input .*needs 224 x 224"):
        foreign_layers.kind(Fussy(3, 4, 3))


TIMM = {  # timm name: (BN folds, keep (pairs, triples), clip (pairs, triples)), as results/zoo_coverage_timm.md has them
    "mobilenetv2_100": (52, (2, 0), (2, 17)),  # BatchNormAct2d with ReLU6, as torchvision's mobilenet_v2 has it
    "tf_efficientnet_lite0": (49, (2, 0), (2, 16)),  # Conv2dSame (TF SAME padding) and BatchNormAct2d with ReLU6
    "regnety_002": (44, (13, 0), (13, 0)),  # BatchNormAct2d with ReLU, squeeze-excite
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models_fold_and_scale_exactly_and_export(name):
    require_extra("timm")
    torch.set_num_threads(1)
    result = zoo_coverage.check_model(zoo_coverage.TIMM_PREFIX + name)
    assert result.problems == [] and result.status == "ok"
    assert (result.keep.bn_folds, result.keep.sets, result.clip.sets) == TIMM[name]
    assert result.keep.rel <= 1e-4 and result.clip.rel <= 1e-4
    if result.export.exported is not None:
        assert result.export.exported and result.export.max_steps <= zoo_coverage.EXPORT_STEPS


def test_timm_weight_standardized_resnet_is_refused():
    require_extra("timm")
    result = zoo_coverage.check_model(zoo_coverage.TIMM_PREFIX + "resnetv2_50x1_bit")
    assert result.status == "refused (clear error)" and result.problems == []
    assert "StdConv2d (53: stem.conv," in result.error


@pytest.mark.slow
def test_a_timm_model_runs_through_the_sweep_on_both_int8_runtimes(tmp_path, data_root):
    """timm's MobileNetV2 (BatchNormAct2d with ReLU6, random weights) on 20 CIFAR-10 images: every step keeps the FP32
    function, and all 53 conv / linear layers run on integers in both runtimes."""
    require_extra("timm"), require_extra("onnxruntime"), require_extra("openvino")
    import tomllib

    from clebench.sweep.config import parse_config
    from clebench.sweep.run import run_sweep

    config = parse_config(tomllib.loads("""
steps = ["bn_fold", "bn_fold+cls_relu6_clip+hbf"]
quant = ["w8a8_per_tensor_minmax"]
[[models]]
name = "timm:mobilenetv2_100"
kwargs = { num_classes = 10 }
preprocess = { crop = 32, mean = [0.4914, 0.4822, 0.4465], std = [0.2470, 0.2435, 0.2616] }
[data]
dataset = "cifar10"
limit = 20
calibration = 20
batch_size = 10
[eval]
deploy = ["onnxruntime", "openvino"]
"""))
    rows = run_sweep(config, tmp_path / "timm", data_root=data_root, progress=False).table
    assert len(rows) == 2 and (rows["fp32_step_change"] <= 1e-4).all()
    for target in ("onnxruntime", "openvino"):
        assert rows[f"{target}_top1"].notna().all()
        assert (rows[f"{target}_integer_layers"] == 53).all() and (rows[f"{target}_float_layers"] == 0).all()
