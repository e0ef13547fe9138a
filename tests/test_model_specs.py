"""Models from anywhere: checkpoints as people have them, factories, timm names, entry points, [[models]] tables."""
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import require_extra
from clebench.errors import UserError
from clebench.models import (ENTRY_POINT_GROUP, ModelSourceError, Preprocessing, load_spec_model, spec_label_space,
                             spec_preprocessing)
from clebench.models.checkpoint import CheckpointError, load_pickled_model, load_state_dict, load_weights
from clebench.sweep.config import ConfigError, ModelSpec, SweepConfig, parse_config
from clebench.sweep.run import SweepError, load_checked_model

ROOT = Path(__file__).resolve().parents[1]


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))


def _net_with_weights() -> nn.Module:
    model = _small_net()
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy head
    return model.eval()


def _loaded(path) -> dict[str, torch.Tensor]:
    fresh = _net_with_weights()
    for tensor in fresh.state_dict().values():
        tensor.zero_()
    return load_weights(fresh, load_state_dict(path), path, "test net").state_dict()


def _assert_identical(left: dict, right: dict) -> None:
    assert list(left) == list(right)
    assert all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
    lambda sd: {"model_state_dict": sd},
    lambda sd: {"net": sd},
    lambda sd: {"state_dict_ema": sd, "arch": "test"},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
], ids=["bare", "state_dict", "model_state_dict", "net", "ema", "model+ddp", "ddp+compile"])
def test_wrapped_and_prefixed_checkpoints_load_identical_tensors(tmp_path, wrap):
    reference = _net_with_weights().state_dict()
    path = tmp_path / "weights.pt"
    torch.save(wrap(reference), path)
    _assert_identical(_loaded(path), reference)


def test_plain_weights_win_over_ema(tmp_path):
    reference = _net_with_weights().state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    torch.save({"state_dict_ema": ema, "state_dict": reference}, tmp_path / "both.pt")
    _assert_identical(_loaded(tmp_path / "both.pt"), reference)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    reference = _net_with_weights().state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "weights.safetensors")
    _assert_identical(_loaded(tmp_path / "weights.safetensors"), reference)
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00junk")
    with pytest.raises(CheckpointError, match="broken.safetensors cannot be read"):
        load_state_dict(tmp_path / "broken.safetensors")


def test_pickled_model_needs_the_explicit_opt_in(tmp_path):
    model = _net_with_weights()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"whole.pt holds pickled Python objects.*set full_model = true"):
        load_state_dict(tmp_path / "whole.pt")
    loaded = load_pickled_model(tmp_path / "whole.pt")
    _assert_identical(loaded.state_dict(), model.state_dict())
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="holds a OrderedDict, not a pickled nn.Module"):
        load_pickled_model(tmp_path / "state.pt")


def test_wrapper_without_a_state_dict_names_its_keys(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match=r"keys epoch, optimizer but no state_dict under any of state_dict, "):
        load_state_dict(tmp_path / "no_weights.pt")


def test_mismatch_is_one_message_with_counts_and_first_keys(tmp_path):
    state = _net_with_weights().state_dict()
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    del state["1.running_mean"], state["4.bias"]
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError) as caught:
        _loaded(tmp_path / "wrong.pt")
    message = str(caught.value)
    assert "\n" not in message
    assert "2 missing keys: 1.running_mean, 4.bias" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "1 shape mismatches: 0.weight (file [5, 3, 3, 3], model [4, 3, 3, 3])" in message


# --- [[models]] entries: factories, timm, entry points ---------------------------------------------------------

FACTORY_FILE = '''
from torch import nn


def build(width=4, classes=10):
    torch_seed()
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def torch_seed():
    import torch
    torch.manual_seed(0)


def broken(**kwargs):
    raise RuntimeError("no GPU named gpu7")


def not_a_model():
    return 3


build.label_space = "cifar10"
'''


def _config(tmp_path: Path, models: list, dataset: str = "cifar10") -> SweepConfig:
    raw = {"models": models, "steps": ["bn_fold"], "quant": ["w8a8_per_tensor_minmax"], "data": {"dataset": dataset}}
    return parse_config(raw, "test.toml", base_dir=tmp_path)


@pytest.fixture
def factory_dir(tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "small.py").write_text(FACTORY_FILE)
    return tmp_path


def _spec(folder: Path, **entry) -> ModelSpec:
    return _config(folder, [{"name": "mine", **entry}]).models[0]


def test_factory_from_a_file_gives_the_callables_model(factory_dir, monkeypatch):
    monkeypatch.chdir(factory_dir.parent)  # the file is relative to the config's folder, not the working directory
    spec = _spec(factory_dir, factory="nets/small.py:build", kwargs={"width": 6})
    model = load_spec_model(spec)
    namespace: dict = {}
    exec(FACTORY_FILE, namespace)
    reference = namespace["build"](width=6).eval()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(images), reference(images))
    assert spec_label_space(spec) == "cifar10"
    assert spec.base_dir == str(factory_dir.resolve())


def test_module_factory_is_found_in_the_config_folder(factory_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (factory_dir / "clebench_test_netmod.py").write_text(FACTORY_FILE)
    monkeypatch.delitem(sys.modules, "clebench_test_netmod", raising=False)
    model = load_spec_model(_spec(factory_dir, factory="clebench_test_netmod:build", kwargs={"classes": 7}))
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 7)


@pytest.mark.parametrize("factory, message", [
    ("nets/missing.py:build", r"models\.mine\.factory: file .*missing\.py does not exist"),
    ("clebench_no_such_module:build", r"models\.mine\.factory: no module named 'clebench_no_such_module'"),
    ("nets/small.py:nope", r"models\.mine\.factory: nets/small\.py has no attribute 'nope'"),
    ("nets/small.py:broken", r"models\.mine: factory nets/small\.py:broken raised RuntimeError: no GPU named gpu7$"),
    ("nets/small.py:not_a_model", r"models\.mine: factory nets/small\.py:not_a_model returned a int, not an nn"),
])
def test_factory_errors_are_one_line_user_errors(factory_dir, factory, message):
    with pytest.raises(UserError, match=message) as caught:
        load_spec_model(_spec(factory_dir, factory=factory))
    assert "\n" not in str(caught.value)


def test_factory_takes_a_prefixed_checkpoint_and_a_mismatch_is_an_error(factory_dir):
    namespace: dict = {}
    exec(FACTORY_FILE, namespace)
    reference = namespace["build"]()
    for tensor in reference.state_dict().values():
        tensor.add_(1)
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, factory_dir / "w.pt")
    loaded = load_spec_model(_spec(factory_dir, factory="nets/small.py:build", checkpoint="w.pt"))
    _assert_identical(loaded.state_dict(), reference.state_dict())
    with pytest.raises(CheckpointError, match=r"does not fit the mine architecture \(3 shape mismatches: 0\.weight"):
        load_spec_model(_spec(factory_dir, factory="nets/small.py:build", kwargs={"width": 5}, checkpoint="w.pt"))


def test_pickled_whole_model_loads_only_with_full_model(tmp_path):
    model = _net_with_weights()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="set full_model = true"):
        load_spec_model(_spec(tmp_path, factory="torch.nn:Identity", checkpoint="whole.pt"))
    loaded = load_spec_model(_spec(tmp_path, checkpoint="whole.pt", full_model=True))
    _assert_identical(loaded.state_dict(), model.state_dict())
    assert spec_label_space(_spec(tmp_path, checkpoint="whole.pt", full_model=True)) is None
    with pytest.raises(ConfigError, match="full_model: the checkpoint is the whole model"):
        _spec(tmp_path, full_model=True)
    with pytest.raises(ModelSourceError, match="full_model = true needs the pickled model as checkpoint"):
        load_spec_model(ModelSpec("mine", full_model=True))


@pytest.mark.parametrize("entry, message", [
    ({"factory": "no_colon"}, r'models\.mine\.factory must be "module:callable"'),
    ({"kwargs": 3}, r"models\.mine\.kwargs must be a table"),
    ({"input_size": [3, 32]}, r"models\.mine\.input_size must be \[channels, height, width\]"),
    ({"input_size": [3, 0, 32]}, r"models\.mine\.input_size must be a positive integer"),
    ({"preprocess": {"crop": 0}}, r"models\.mine\.preprocess\.crop must be a positive pixel count"),
    ({"pretrained": "yes"}, r"models\.mine\.pretrained must be true or false"),
    ({"pretrained": True, "checkpoint": "w.pt"}, r"pretrained = true .* or a checkpoint, not both"),
    ({"weights": "w.pt"}, r"unknown key 'weights' in models entry 'mine'"),
])
def test_bad_entries_are_config_errors_naming_the_key(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        _spec(tmp_path, **entry)


def test_old_style_entries_hash_as_committed_and_new_keys_only_when_set(factory_dir):
    committed = json.loads((ROOT / "results" / "cifar10_ci" / "meta.json").read_text())
    raw = tomllib.loads((ROOT / "configs" / "cifar10_ci.toml").read_text())
    raw["models"] = [{"name": name} for name in raw["models"]]  # [[models]] tables instead of names
    assert parse_config(raw, base_dir=ROOT / "configs").hash == committed["config_hash"]
    plain = _spec(factory_dir, checkpoint="w.pt")
    assert plain.to_dict() == {"name": "mine", "checkpoint": "w.pt"}
    entry = {"factory": "nets/small.py:build", "kwargs": {"width": 6}, "input_size": [3, 16, 16],
             "preprocess": {"crop": 16}}
    rich = _spec(factory_dir, **entry)
    sha256 = hashlib.sha256((factory_dir / "nets" / "small.py").read_bytes()).hexdigest()
    assert rich.to_dict() == {"name": "mine", "checkpoint": None, **entry, "factory_sha256": sha256}
    wider = _spec(factory_dir, **{**entry, "kwargs": {"width": 7}})
    assert hash(rich) == hash(wider) and rich != wider  # hashable (Ray's Settings key) with kwargs compared
    (factory_dir / "nets" / "small.py").write_text(FACTORY_FILE + "\n# edited\n")
    edited = _spec(factory_dir, **entry)
    config = _config(factory_dir, ["resnet18_cifar10"])
    assert len({replace(config, models=(spec,)).hash for spec in (plain, rich, wider, edited)}) == 4
    with pytest.raises(ModelSourceError, match=r"models\.mine\.factory: .*small\.py changed since the config was read"):
        load_spec_model(rich)  # a process that sees another version of the file than the driver did


def test_timm_model_resolves_preprocessing_from_its_pretrained_cfg(tmp_path):
    timm = require_extra("timm")
    spec = _spec(tmp_path, name="timm:resnet18", kwargs={"num_classes": 10})
    model = load_spec_model(spec)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    expected = timm.data.resolve_model_data_config(timm.create_model("resnet18", num_classes=10))
    assert spec_preprocessing(spec) == Preprocessing(resize=None, crop=expected["input_size"][1],
                                                     crop_pct=expected["crop_pct"], mean=expected["mean"],
                                                     std=expected["std"], interpolation=expected["interpolation"])
    assert spec_preprocessing(spec).resize_size == 235  # floor(224 / 0.95), as timm resizes
    assert spec_label_space(spec) is None  # its own 10 classes
    assert spec_label_space(_spec(tmp_path, name="timm:resnet18")) == "imagenet"
    assert spec_preprocessing(_spec(tmp_path, name="timm:resnet18.tv_in1k")).crop_pct == 0.875
    assert spec_preprocessing(_spec(tmp_path, name="timm:resnet18", input_size=[3, 160, 160])).crop == 160


def _timm_eval_sizes(name: str) -> tuple:
    """(Resize size, CenterCrop size) of timm's own eval transform for model `name`."""
    import timm.data

    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    resize, crop = timm.data.create_transform(**config).transforms[:2]
    return resize.size, tuple(crop.size)


@pytest.mark.parametrize("name", ["resnet18", "resnet18.tv_in1k", "convnext_base.fb_in22k_ft_in1k_384",
                                  "vit_base_patch16_sapiens2.fb"])  # center, center, squash, squash non-square
def test_timm_sizes_are_those_of_timms_eval_transform(tmp_path, name):
    require_extra("timm")
    resize, crop = _timm_eval_sizes(name)
    preprocessing = spec_preprocessing(_spec(tmp_path, name=f"timm:{name}"))
    assert (preprocessing.resize_size, preprocessing.crop_size) == (resize, crop)


def test_timm_resize_clebench_cannot_reproduce_needs_the_entrys_resize(tmp_path, monkeypatch):
    timm = require_extra("timm")
    config = {"input_size": (3, 256, 192), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.9, "crop_mode": "center"}  # timm: ResizeKeepRatio, which clebench has not
    monkeypatch.setattr(timm.data, "resolve_data_config", lambda **kwargs: config)
    with pytest.raises(ModelSourceError, match=r"crop_mode 'center' on a 256x192 input .* give the entry preprocess "
                                               r"= \{ resize = \.\.\. \}"):
        spec_preprocessing(_spec(tmp_path, name="timm:resnet18"))
    own = spec_preprocessing(_spec(tmp_path, name="timm:resnet18", preprocess={"resize": [284, 213]}))
    assert (own.resize, own.crop, own.crop_pct, own.interpolation) == ((284, 213), (256, 192), None, "bicubic")
    monkeypatch.setitem(config, "crop_mode", "border")
    with pytest.raises(ModelSourceError, match="crop_mode 'border' on a 256x192 input"):
        spec_preprocessing(_spec(tmp_path, name="timm:resnet18"))


def test_timm_checkpoint_pretrained_and_unknown_names(tmp_path, monkeypatch):
    timm = require_extra("timm")
    reference = timm.create_model("resnet18", num_classes=10)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "r18.pth")
    loaded = load_spec_model(_spec(tmp_path, name="timm:resnet18", kwargs={"num_classes": 10}, checkpoint="r18.pth"))
    _assert_identical(loaded.state_dict(), reference.state_dict())
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: calls.append((name, kwargs)) or nn.Identity())
    load_spec_model(_spec(tmp_path, name="timm:resnet18", pretrained=True, kwargs={"drop_rate": 0.1}))
    assert calls == [("resnet18", {"pretrained": True, "drop_rate": 0.1})]
    with pytest.raises(ModelSourceError, match=r"timm has no model 'resnet181'; close matches: resnet18"):
        load_spec_model(_spec(tmp_path, name="timm:resnet181"))
    with pytest.raises(ModelSourceError, match="pretrained = true is for timm:<name> models only"):
        load_spec_model(_spec(tmp_path, name="resnet18_cifar10", pretrained=True))


def test_torchvision_names_take_the_weights_preprocessing(tmp_path):
    assert spec_preprocessing(_spec(tmp_path, name="resnet50")).resize == 232  # IMAGENET1K_V2's transforms
    assert spec_label_space(_spec(tmp_path, name="resnet50")) == "imagenet"
    with pytest.raises(ModelSourceError, match=r"unknown model 'resnet18_cifar'; close matches: resnet18_cifar10"):
        load_spec_model(_spec(tmp_path, name="resnet18_cifar"))


ENTRY_MODULE = '''
from torch import nn


def tiny(classes=10):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))


tiny.preprocessing = {"resize": 36, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
tiny.label_space = "cifar10"
'''


def test_entry_point_models_register_by_name(tmp_path, monkeypatch):
    (tmp_path / "clebench_fake_plugin.py").write_text(ENTRY_MODULE)
    info = tmp_path / "clebench_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clebench-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntiny_plugin_net = clebench_fake_plugin:tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec(tmp_path, name="tiny_plugin_net", kwargs={"classes": 12})
    assert load_spec_model(spec)(torch.zeros(1, 3, 4, 4)).shape == (1, 12)
    assert spec_preprocessing(spec) == Preprocessing(36, 32, (0.5,) * 3, (0.25,) * 3)
    assert spec_label_space(spec) == "cifar10"
    with pytest.raises(ModelSourceError, match="close matches: tiny_plugin_net"):
        load_spec_model(_spec(tmp_path, name="tiny_plugin_nett"))


def test_sweep_checks_outputs_and_input_size_on_a_probe(factory_dir):
    config = _config(factory_dir, [{"name": "five", "factory": "nets/small.py:torch_seed"}])
    with pytest.raises(UserError, match="returned a NoneType, not an nn.Module"):
        load_checked_model(config, config.models[0], None)
    narrow = {"name": "five", "factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 5}}
    config = _config(factory_dir, [{**narrow, "input_size": [3, 32, 32]}])
    with pytest.raises(ModelSourceError, match=r"models\.five: the model rejects input_size \[3, 32, 32\] \(Runtime"):
        load_checked_model(config, config.models[0], None)
    config = _config(factory_dir, [{**narrow, "input_size": [1, 1, 4]}])
    with pytest.raises(ModelSourceError, match=r"returns \[1, 1, 1, 5\] for one image, not \[1, classes\] logits"):
        load_checked_model(config, config.models[0], None)
    config = _config(factory_dir, [{"name": "net", "factory": "nets/small.py:build", "kwargs": {"classes": 5},
                                    "input_size": [3, 32, 32]}], dataset="imagenet")
    with pytest.raises(SweepError, match="net predicts cifar10 labels but the config evaluates on imagenet"):
        load_checked_model(config, config.models[0], None)
    config = _config(factory_dir, [{"name": "t", "factory": "torch.nn:Flatten", "input_size": [2, 2, 2]}])
    with pytest.raises(SweepError, match=r"t gives 8 outputs per image but cifar10 labels index 10 cifar10 classes"):
        load_checked_model(config, config.models[0], None)


def test_timm_imagenet_model_on_cifar10_is_refused(tmp_path):
    require_extra("timm")
    config = _config(tmp_path, [{"name": "timm:resnet18"}])
    with pytest.raises(SweepError, match="timm:resnet18 predicts imagenet labels but the config evaluates on cifar10"):
        load_checked_model(config, config.models[0], None)


def test_a_worker_elsewhere_resolves_the_factory_as_the_driver(factory_dir, tmp_path_factory):
    spec = _spec(factory_dir, factory="nets/small.py:build", kwargs={"width": 3})
    elsewhere = tmp_path_factory.mktemp("worker")
    (elsewhere / "spec.pkl").write_bytes(pickle.dumps(spec))
    script = ("import pickle, torch; from clebench.models import load_spec_model; "
              "m = load_spec_model(pickle.load(open('spec.pkl', 'rb'))); torch.manual_seed(1); "
              "print(m(torch.randn(1, 3, 8, 8)).sum().item())")
    printed = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, check=True)
    model = load_spec_model(spec)
    torch.manual_seed(1)
    expected = model(torch.randn(1, 3, 8, 8)).sum().item()
    assert float(printed.stdout) == pytest.approx(expected, rel=1e-6)


def test_imagefolder_classes_need_model_outputs(tmp_path):
    for folder in ("cat", "dog"):
        (tmp_path / "pets" / "val" / folder).mkdir(parents=True)
        (tmp_path / "pets" / "val" / folder / "a.jpg").write_bytes(b"")  # listed, never decoded here
    data = {"dataset": "imagefolder", "root": "pets", "eval_split": "val", "calibration_split": "val",
            "classes": {"cat": 0, "dog": 4}}
    raw = {"models": [{"name": "flat", "factory": "torch.nn:Flatten", "input_size": [3, 1, 1]}], "steps": ["bn_fold"],
           "quant": ["w8a8_per_tensor_minmax"], "data": data}
    config = parse_config(raw, "test.toml", base_dir=tmp_path)
    with pytest.raises(SweepError, match=r"flat gives 3 outputs per image but data.classes maps a folder to output "
                                         r"index 4; map the folders"):
        load_checked_model(config, config.models[0], None)
    config = parse_config({**raw, "data": {**data, "classes": {"cat": 0, "dog": 2}}}, "test.toml", base_dir=tmp_path)
    assert isinstance(load_checked_model(config, config.models[0], None), nn.Flatten)


@pytest.mark.slow
def test_factory_with_a_ddp_checkpoint_sweeps_like_the_registry_model(tmp_path, data_root, models_dir):
    from clebench.sweep.run import run_sweep

    reference = torch.load(models_dir / "resnet18_cifar10.pt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}, "epoch": 200}, tmp_path / "ddp.pth")
    raw = {"models": ["resnet18_cifar10", {"name": "mine", "factory": "clebench.models.cifar:resnet18_cifar10",
                                           "checkpoint": "ddp.pth"}],
           "steps": ["bn_fold"], "quant": ["w8a8_per_tensor_minmax"],
           "data": {"dataset": "cifar10", "limit": 20, "calibration": 10, "batch_size": 10}}
    config = parse_config(raw, "test.toml", base_dir=tmp_path)
    table = run_sweep(config, tmp_path / "out", data_root=data_root, models_dir=models_dir, progress=False).table
    rows = table.set_index("model")
    assert rows.loc["mine", "fp32_top1"] == rows.loc["resnet18_cifar10", "fp32_top1"]
    assert rows.loc["mine", "quant_top1"] == rows.loc["resnet18_cifar10", "quant_top1"]


RAY_CONFIG = """
steps = ["bn_fold"]
quant = ["w8a8_per_tensor_minmax"]

[[models]]
name = "resnet18_cifar10"

[[models]]
name = "mine"
factory = "nets/cifar.py:build"
checkpoint = "ddp.pth"

[data]
dataset = "cifar10"
limit = 10
calibration = 10
batch_size = 10
"""


@pytest.mark.slow
def test_a_ray_worker_builds_a_config_relative_factory(tmp_path, data_root, models_dir):
    require_extra("ray")
    folder = tmp_path / "project"
    (folder / "nets").mkdir(parents=True)
    (folder / "nets" / "cifar.py").write_text("from clebench.models.cifar import resnet18_cifar10 as build\n")
    reference = torch.load(models_dir / "resnet18_cifar10.pt", map_location="cpu", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in reference.items()}}, folder / "ddp.pth")
    (folder / "sweep.toml").write_text(RAY_CONFIG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "clebench", "sweep", str(folder / "sweep.toml"), "--out", str(tmp_path / "out"),
               "--no-progress", "--ray"]
    env = {**os.environ, "CLEBENCH_DATA": str(data_root.resolve()), "CLEBENCH_MODELS": str(models_dir.resolve())}
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(tmp_path / "out" / "results.csv").set_index("model")
    assert rows.loc["mine", ["fp32_top1", "quant_top1"]].tolist() == \
        rows.loc["resnet18_cifar10", ["fp32_top1", "quant_top1"]].tolist()
