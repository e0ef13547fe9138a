"""ReLU6-aware equalization: scaling across ReLU6 with per-channel clips preserves FP32 logits on real networks."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import randomize_batch_norms, relative_error

from clebench import graph

from clebench.data import datasets
from clebench.activations import ChannelClippedReLU
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, HighBiasFold
from clebench.models import MobileNetV2, load_model, model_preprocessing


def real_images(name: str, dataset: str, split: str, n: int) -> torch.Tensor:
    preprocessing = model_preprocessing(name)
    images = datasets.load_images(dataset, split, None, preprocessing, limit=n, progress=False)
    return next(datasets.batches(images, n, preprocessing))[0]


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_channel_clipped_relu_hand_computed(channel_axis):
    clip = ChannelClippedReLU(torch.tensor([6.0, 0.5]), channel_axis=channel_axis)
    x = torch.tensor([[-1.0, 7.0], [8.0, 0.25]])  # [N, C]: channel 0 clips at 6, channel 1 at 0.5
    x = x.view(2, 2, 1, 1) if channel_axis == 1 else x.view(1, 2, 2)
    assert torch.equal(clip(x).reshape(2, 2), torch.tensor([[0.0, 0.5], [6.0, 0.25]]))


def fold_then_clip(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(BN-folded logits, logits after CLS with relu6='clip', folded pairs, CLS infos)."""
    with torch.no_grad():
        pairs = fold_all_batch_norms(model)
        folded = model(x)
        infos = CrossLayerScaling.scale_model(model, relu6="clip")
        return folded, model(x), pairs, infos


def test_clip_on_mobilenet_v2_cifar_checkpoint_preserves_logits_and_hbf_stays_close(models_dir, data_root):
    x = real_images("mobilenet_v2_cifar10", "cifar10", "test", 50)
    model = graph.prepare_model(load_model("mobilenet_v2_cifar10", models_dir=models_dir))
    folded, scaled, pairs, infos = fold_then_clip(model, x)
    assert sum(len(i.cls_pair_info_list) == 2 for i in infos) == 17
    assert relative_error(scaled, folded) < 1e-4
    HighBiasFold.bias_fold(infos, {layer: bn for layer, bn in pairs})
    with torch.no_grad():
        absorbed = model(x)
    assert relative_error(absorbed, folded) < 1e-3  # HBF is exact wherever pre-activations stay above the absorbed amount
    assert torch.equal(absorbed.argmax(1), folded.argmax(1))


def test_clip_on_tonylins_mobilenet_v2_preserves_logits():
    torch.manual_seed(0)
    model = graph.prepare_model(randomize_batch_norms(MobileNetV2()))
    x = torch.randn(2, 3, 96, 96)
    folded, scaled, _, infos = fold_then_clip(model, x)
    assert sum(len(i.cls_pair_info_list) == 2 for i in infos) == 17
    assert sum(isinstance(m, ChannelClippedReLU) for m in model.modules()) == 34
    assert relative_error(scaled, folded) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="needs the zoo extra")
def test_clip_on_efficientnet_lite0_with_its_shared_activation_preserves_logits(data_root):
    x = real_images("efficientnet_lite0", "imagenet", "imagenet-sample", 4)
    model = load_model("efficientnet_lite0")
    with pytest.raises(ValueError, match="prepare_model"):
        CrossLayerScaling.scale_model(model, relu6="clip")  # one activation instance serves many call sites
    prepared = graph.prepare_model(model)
    folded, scaled, pairs, infos = fold_then_clip(prepared, x)
    assert len(pairs) == 49
    assert sum(len(i.cls_pair_info_list) == 2 for i in infos) == 16
    assert relative_error(scaled, folded) < 1e-4
