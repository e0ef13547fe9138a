"""The user's own ImageFolder data set ([data] dataset = "imagefolder") and config preprocessing (resize, crop,
crop_pct): labels from `classes`, odd files, non-square geometry against torchvision and timm, one-line errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import require_extra
from clebench.data import image_cache
from clebench.data.classes import ClassesError
from clebench.data.datasets import DatasetError, imagefolder_classes, load_images
from clebench.models.preprocessing import (IMAGENET_PREPROCESSING, Preprocessing, PreprocessingError,
                                           parse_preprocess, resolve_preprocessing)
from clebench.sweep.config import ConfigError, load_config

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOLDERS = ("cat", "dog", "ship")  # CIFAR-10 output indices 3, 5, 8
PER_CLASS = 3
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture
def folder(tmp_path, data_root) -> Path:
    """root/{val,train}/{cat,dog,ship}/ with CIFAR-10 JPEGs, plus a greyscale PNG and a text file in val/dog."""
    root = tmp_path / "my_data"
    for split, source in (("val", "test"), ("train", "train")):
        for name in FOLDERS:
            (root / split / name).mkdir(parents=True)
            for image in sorted((data_root / "cifar10" / source / name).iterdir())[:PER_CLASS]:
                shutil.copy(image, root / split / name / image.name)
    grey = Image.open(data_root / "cifar10" / "test" / "dog" / "0100.jpg").convert("L")
    grey.save(root / "val" / "dog" / "grey.png")
    (root / "val" / "dog" / "notes.txt").write_text("not an image")
    return root


def _load(root: Path, split: str = "val", preprocessing: Preprocessing | None = None, **kwargs):
    preprocessing = preprocessing or Preprocessing(None, 32, MEAN, STD)
    return load_images("imagefolder", split, root, preprocessing, progress=False, cache=False, **kwargs)


@pytest.mark.parametrize("classes", [
    CIFAR10_CLASSES,  # the model's class names in output order
    {"cat": 3, "dog": 5, "ship": 8},
    "list.txt", "list.json", "table.json",
])
def test_classes_give_the_model_output_indices(folder, tmp_path, classes):
    (tmp_path / "list.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    (tmp_path / "list.json").write_text(json.dumps(CIFAR10_CLASSES))
    (tmp_path / "table.json").write_text(json.dumps({"cat": 3, "dog": 5, "ship": 8}))
    toml = f"classes = {json.dumps(classes)}" if not isinstance(classes, dict) else \
        "classes = { " + ", ".join(f"{k} = {v}" for k, v in classes.items()) + " }"
    config = _config(tmp_path, toml)
    with pytest.warns(UserWarning):
        images = _load(folder, classes=imagefolder_classes(folder, ["val", "train"], config.data.classes))
    counts = {label: images.labels.tolist().count(label) for label in set(images.labels.tolist())}
    assert counts == {3: PER_CLASS, 5: PER_CLASS + 1, 8: PER_CLASS}  # dog has the greyscale PNG too
    assert images.label_space == "imagefolder"


def test_default_classes_are_sorted_folder_order_and_odd_files_are_counted(folder):
    with pytest.warns(UserWarning, match=r"ignored 1 files of my_data/val that are not images .*dog/notes\.txt"):
        images = _load(folder)
    assert sorted(set(images.labels.tolist())) == [0, 1, 2]
    assert images.ignored == ["dog/notes.txt"]
    assert images.converted == ["dog/grey.png"]  # greyscale loads, as RGB
    grey = images.images[images.files.index("dog/grey.png")]
    assert grey.shape == (3, 32, 32) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_a_corrupt_image_is_an_error_naming_it_or_skipped_and_counted(folder):
    (folder / "val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"1 of 11 images .*cat/broken\.jpg.*data\.skip_unreadable = true"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(folder)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        images = _load(folder, skip_unreadable=True)
    assert images.skipped == ["cat/broken.jpg"] and len(images) == 10


def _torchvision(path: Path, resize, crop, interpolation: str) -> np.ndarray:
    """The reference: torchvision.transforms on the PIL image (antialiased), uint8 [3, H, W]."""
    mode = transforms.InterpolationMode(interpolation)
    pipeline = transforms.Compose([transforms.Resize(resize, interpolation=mode, antialias=True),
                                   transforms.CenterCrop(crop), transforms.PILToTensor()])
    return pipeline(Image.open(path).convert("RGB")).numpy()


@pytest.mark.parametrize("resize, crop, interpolation", [
    ([40, 56], [36, 48], "bicubic"),  # resize to [h, w], non-square crop
    (45, [40, 44], "bilinear"),  # shorter side, non-square crop
    ([30, 50], 28, "nearest"),
])
def test_non_square_geometry_equals_torchvision_pixel_for_pixel(folder, resize, crop, interpolation):
    preprocessing = resolve_preprocessing(
        IMAGENET_PREPROCESSING, parse_preprocess({"resize": resize, "crop": crop, "interpolation": interpolation},
                                                 "data.preprocess"))
    with pytest.warns(UserWarning):
        images = _load(folder, preprocessing=preprocessing)
    height, width = (crop, crop) if isinstance(crop, int) else crop
    assert images.images.shape == (10, 3, height, width)
    for row, file in enumerate(images.files):
        expected = _torchvision(folder / "val" / file, resize, crop, interpolation)
        assert np.array_equal(images.images[row].numpy(), expected), file


def test_a_wide_photo_resized_by_its_shorter_side_equals_torchvision(tmp_path, data_root):
    source = sorted((data_root / "imagenet-sample").glob("n*/*"))[0]  # 341 x 256
    (tmp_path / "val" / "fish").mkdir(parents=True)
    shutil.copy(source, tmp_path / "val" / "fish" / source.name)
    preprocessing = Preprocessing(resize=120, crop=(96, 120), mean=MEAN, std=STD, interpolation="bicubic")
    images = _load(tmp_path, preprocessing=preprocessing)
    assert images.images.shape == (1, 3, 96, 120)
    assert np.array_equal(images.images[0].numpy(), _torchvision(source, 120, [96, 120], "bicubic"))


@pytest.mark.parametrize("size, crop_pct", [(224, 0.875), (224, 0.95), (288, 0.9), (256, 1.0), (240, 0.888)])
def test_crop_pct_resolves_as_timm_does(tmp_path, data_root, size, crop_pct):
    require_extra("timm")
    import timm.data as timm_data
    config = timm_data.resolve_data_config(pretrained_cfg={"input_size": (3, size, size), "crop_pct": crop_pct,
                                                           "interpolation": "bicubic", "mean": MEAN, "std": STD})
    reference = timm_data.create_transform(**config, use_prefetcher=True)  # uint8 tensors, not normalised
    ours = resolve_preprocessing(IMAGENET_PREPROCESSING, parse_preprocess(
        {"crop": size, "crop_pct": crop_pct, "interpolation": "bicubic"}, "data.preprocess"))
    resize = next(t for t in reference.transforms if isinstance(t, transforms.Resize)).size
    assert ours.resize_size == resize
    source = sorted((data_root / "imagenet-sample").glob("n*/*"))[1]
    (tmp_path / "val" / "fish").mkdir(parents=True)
    shutil.copy(source, tmp_path / "val" / "fish" / source.name)
    images = _load(tmp_path, preprocessing=ours)
    assert np.array_equal(images.images[0].numpy(), reference(Image.open(source).convert("RGB")).numpy())


def test_resolve_order_model_then_data_then_entry():
    data = parse_preprocess({"crop_pct": 0.95, "mean": [0.1, 0.2, 0.3]}, "data.preprocess")
    entry = parse_preprocess({"crop": 240}, "models.m.preprocess")
    resolved = resolve_preprocessing(IMAGENET_PREPROCESSING, data, None, entry)
    assert resolved == Preprocessing(None, 240, (0.1, 0.2, 0.3), IMAGENET_PREPROCESSING.std, crop_pct=0.95)
    assert resolved.resize_size == 252  # floor(240 / 0.95): the entry's crop with the data set's crop_pct
    again = resolve_preprocessing(resolved, parse_preprocess({"resize": 256}, "models.m.preprocess"))
    assert (again.resize_size, again.crop_pct) == (256, None)  # a later resize drops the inherited crop_pct
    assert resolve_preprocessing(IMAGENET_PREPROCESSING) == IMAGENET_PREPROCESSING
    assert Preprocessing(**resolved.to_dict()) == resolved


@pytest.mark.parametrize("table, message", [
    ({"crop": 288}, r"crop 288 is larger than the resized image \(shorter side 256\)"),
    ({"resize": [200, 300], "crop": [224, 224]}, r"crop 224 is larger than the resized image \(200x300\)"),
    ({"crop_pct": 1.5}, r"data\.preprocess\.crop_pct must be a number in \(0, 1\]"),
    ({"resize": 256, "crop_pct": 0.9}, r"data\.preprocess: give resize or crop_pct, not both"),
    ({"crop": [224, 200, 3]}, r"data\.preprocess\.crop must be a positive pixel count or \[height, width\]"),
    ({"std": [0.2, 0, 0.2]}, r"data\.preprocess\.std must be positive"),
    ({"mean": "imagenet"}, r"data\.preprocess\.mean must be 3 values"),
    ({"interpolation": "lanczos"}, r"data\.preprocess\.interpolation must be one of nearest, bilinear, bicubic"),
    ({"size": 3}, r"unknown key 'size' in data\.preprocess"),
])
def test_bad_preprocessing_is_one_line_naming_the_key(table, message):
    with pytest.raises(PreprocessingError, match=message) as error:
        resolve_preprocessing(IMAGENET_PREPROCESSING, parse_preprocess(table, "data.preprocess"))
    assert "\n" not in str(error.value)


def _config(tmp_path: Path, extra: str = "", root: str = "my_data"):
    text = f"""models = ["resnet18_cifar10"]
steps = ["bn_fold"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "imagefolder"
root = "{root}"
eval_split = "val"
{extra}
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def test_imagefolder_config_is_parsed_relative_to_its_folder(folder, tmp_path):
    config = _config(tmp_path, 'classes = ["cat", "dog", "ship"]\nskip_unreadable = true\n'
                               "[data.preprocess]\nresize = [40, 48]\ncrop = [32, 40]")
    assert config.data.root == str(folder)
    assert config.data.preprocess == {"resize": (40, 48), "crop": (32, 40)}
    recorded = config.to_dict()["data"]
    assert (recorded["root"], recorded["classes"], recorded["skip_unreadable"]) == ("my_data", ["cat", "dog", "ship"], True)
    assert hash(config)  # Ray keys its per-process resources on the settings, config included


@pytest.mark.parametrize("extra, folders, message", [
    ('classes = ["cat", "dog"]', None, r"folder 'ship' of .*my_data/val not in data\.classes"),
    ("classes = { cat = 3, dog = 5 }", None, r"folder 'ship' of .*my_data/val not in data\.classes"),
    ("", ["val/ship"], r"class folder .*val/ship holds no images"),
    ("", ["val"], r"split 'val' is not a folder of .*my_data \(its folders: train\)"),
    ("", [""], r"data set root .*my_data \(data\.root\) is not a folder"),
])
def test_data_errors_are_one_line_before_decoding(folder, tmp_path, extra, folders, message):
    for emptied in folders or []:
        target = folder / emptied
        shutil.rmtree(target)
        if emptied == "val/ship":
            target.mkdir()
    config = _config(tmp_path, extra)
    with pytest.raises((DatasetError, ClassesError), match=message) as error:
        imagefolder_classes(config.data.root, [config.data.eval_split, config.data.calibration_split],
                            config.data.classes)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("data, message", [
    ('dataset = "cifar10"\nroot = "x"', r"unknown key 'root' in \[data\]"),
    ('dataset = "imagefolder"', r'data\.root must name the folder holding the splits of dataset = "imagefolder"'),
    ('dataset = "imagefolder"\nroot = "x"\ndownload = true', r"data\.download: an imagefolder data set is not downloaded"),
    ('dataset = "imagefolder"\nroot = "x"\nclasses = [1, 2]', r"data\.classes must be a table"),
    ('dataset = "imagefolder"\nroot = "x"\nclasses = ["a", "a"]', r"data\.classes lists 'a' more than once"),
    ('dataset = "imagefolder"\nroot = "x"\nclasses = "none.txt"', r"data\.classes: cannot read .*none\.txt"),
    ('dataset = "imagefolder"\nroot = "x"\npreprocess = { crop = 0 }', r"data\.preprocess\.crop must be"),
])
def test_bad_data_tables_are_config_errors(tmp_path, data, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'models = ["resnet18_cifar10"]\nsteps = ["bn_fold"]\nquant = ["w8a8_per_tensor_minmax"]\n'
                    f"[data]\n{data}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_existing_configs_and_cache_keys_are_unchanged():
    results = Path(__file__).resolve().parents[1] / "results"
    for name in ("cifar10_ci", "imagenet_sample", "ptq_cifar10"):
        meta = json.loads((results / name / "meta.json").read_text())
        config = load_config(results / name / "config.toml")
        assert config.hash == meta["config_hash"] and config.data.to_dict() == meta["config"]["data"], name
    # the image cache's key of a preset, as it was before resize pairs and crop_pct existed
    files = ["a/1.jpg"]
    key = json.dumps({"format": image_cache.FORMAT, "origin": "/d", "files": files, "resize": 256, "crop": 224,
                      "interpolation": "bilinear"}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    assert image_cache.entry_name("imagenet/val", "/d", files, IMAGENET_PREPROCESSING) == \
        f"imagenet_val-256-224-bilinear-{digest}"


def test_cache_keys_follow_the_pixels():
    files, name = ["a/1.jpg"], lambda p: image_cache.entry_name("s", "/d", files, p)
    derived = Preprocessing(None, 224, MEAN, STD, crop_pct=0.875)  # resize floor(224 / 0.875) = 256
    assert name(derived) == name(Preprocessing(256, 224, MEAN, STD))  # the same pixels, the same entry
    wide = Preprocessing((256, 320), (224, 288), MEAN, STD)
    assert name(wide).startswith("s-256x320-224x288-bilinear-")
    others = [Preprocessing((320, 256), (224, 200), MEAN, STD), Preprocessing((256, 320), (200, 224), MEAN, STD),
              Preprocessing(288, (224, 288), MEAN, STD), Preprocessing(None, 224, MEAN, STD, crop_pct=0.9)]
    assert len({name(p) for p in [wide, derived, *others]}) == 6


def _torchvision_top1(folder: Path, models_dir: Path) -> float:
    """FP32 top-1 (%) of resnet18_cifar10 on a plain torchvision ImageFolder of ``folder`` with the same transforms."""
    from torchvision.datasets import ImageFolder

    from clebench.models import load_model
    from clebench.models.preprocessing import CIFAR10_PREPROCESSING as prep

    dataset = ImageFolder(str(folder), transform=transforms.Compose(
        [transforms.CenterCrop(prep.crop), transforms.ToTensor(), transforms.Normalize(prep.mean, prep.std)]))
    model = load_model("resnet18_cifar10", models_dir=models_dir)
    with torch.no_grad():
        correct = sum(int(model(image[None]).argmax()) == CIFAR10_CLASSES.index(dataset.classes[label])
                      for image, label in dataset)
    return 100 * correct / len(dataset)


def test_an_imagefolder_sweep_matches_torchvision_and_records_its_preprocessing(folder, tmp_path, models_dir,
                                                                                 monkeypatch):
    from clebench.reporting.gate_page import _EvalImages
    from clebench.reporting.report import write_report
    from clebench.sweep.run import run_sweep

    monkeypatch.setenv("CLEBENCH_MODELS", str(models_dir))
    monkeypatch.delenv("CLEBENCH_DATA")  # an imagefolder needs no data root
    config = _config(tmp_path, f"classes = {json.dumps(CIFAR10_CLASSES)}\ncalibration = 6\nbatch_size = 6")
    with pytest.warns(UserWarning, match="ignored 1 files"):
        table = run_sweep(config, tmp_path / "out", progress=False, cache=False).table
    assert table["n_images"].tolist() == [10]
    assert table["fp32_top1"].iloc[0] == pytest.approx(_torchvision_top1(folder / "val", models_dir), abs=0.2)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["imagefolder"] == {"root": str(folder), "classes": {"cat": 3, "dog": 5, "ship": 8}}
    recorded = Preprocessing(**meta["preprocessing"]["resnet18_cifar10"])
    assert recorded.crop == 32 and recorded.resize is None
    write_report(tmp_path / "out")
    assert recorded.describe() in (tmp_path / "out" / "report.html").read_text()
    # the regression gate's gallery finds the same images from meta.json alone
    images, names, why = _EvalImages(meta["config"], None, meta).for_model("resnet18_cifar10")
    assert (why, names, images.shape) == ("", {3: "cat", 5: "dog", 8: "ship"}, (10, 3, 32, 32))


@pytest.mark.parametrize("extra, message", [
    ('classes = ["cat", "dog"]', r"folder 'ship' of .*my_data/val not in data\.classes"),
    ("[data.preprocess]\nresize = 36\ncrop = 40",
     r"models\.resnet18_cifar10: crop 40 is larger than the resized image \(shorter side 36\)"),
    ("classes = { cat = 3, dog = 5, ship = 12 }",
     r"resnet18_cifar10 gives 10 outputs per image but data\.classes maps a folder to output index 12"),
])
def test_a_sweep_with_bad_data_writes_no_row(folder, tmp_path, extra, message):
    from clebench.sweep.run import SweepError, run_sweep

    with pytest.raises((DatasetError, ClassesError, PreprocessingError, SweepError), match=message):
        run_sweep(_config(tmp_path, extra), tmp_path / "out", progress=False, cache=False)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_relative_root_of_a_dict_config_is_made_absolute_for_the_workers(folder, tmp_path, monkeypatch):
    from clebench.sweep.config import parse_config
    from clebench.sweep.run import resolve_settings

    monkeypatch.chdir(tmp_path)
    config = parse_config({"models": ["resnet18_cifar10"], "steps": ["bn_fold"], "quant": ["w8a8_per_tensor_minmax"],
                           "data": {"dataset": "imagefolder", "root": "my_data"}})
    settings = resolve_settings(config, tmp_path / "out", data_root=None, models_dir=None, device="cpu",
                                progress=False, cache=False)
    assert settings.config.data.root == str(folder) == str(settings.data_root)
    assert settings.config.hash == config.hash  # the root as written is what is hashed


def test_an_image_smaller_than_an_unresized_crop_is_an_error_not_padding(folder):
    with pytest.raises(DatasetError, match=r"cat/\S+\.jpg \(its 32x32 pixels are smaller than the 32x40 crop\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(folder, preprocessing=Preprocessing(None, (32, 40), MEAN, STD))


@pytest.mark.parametrize("suffix, mode", [(".bmp", "RGB"), (".tiff", "RGB"), (".webp", "RGB"), (".png", "P"),
                                          (".JPEG", "CMYK"), (".pgm", "L")])
def test_common_image_types_load_as_torchvision_loads_them(tmp_path, data_root, suffix, mode):
    source = Image.open(data_root / "cifar10" / "test" / "frog" / "0000.jpg")
    (tmp_path / "val" / "frog").mkdir(parents=True)
    path = tmp_path / "val" / "frog" / f"image{suffix}"
    source.convert(mode).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    images = _load(tmp_path)
    assert images.files == [f"frog/image{suffix}"] and images.converted == ([] if mode == "RGB" else images.files)
    assert np.array_equal(images.images[0].numpy(), _torchvision(path, 32, 32, "bilinear"))


def test_a_sweep_resolves_model_default_then_data_then_entry(tmp_path):
    from clebench.sweep.execute import sweep_preprocessing

    path = tmp_path / "c.toml"
    path.write_text('steps = ["bn_fold"]\nquant = ["w8a8_per_tensor_minmax"]\n'
                    '[[models]]\nname = "resnet18_cifar10"\n'
                    '[[models]]\nname = "mobilenet_v2_cifar10"\npreprocess = { crop = [30, 28], mean = [0.5, 0.5, 0.5] }\n'
                    '[data]\ndataset = "imagefolder"\nroot = "x"\n'
                    '[data.preprocess]\nresize = 36\ncrop = 32\ninterpolation = "bicubic"\n')
    config = load_config(path)
    plain, overridden = (sweep_preprocessing(config, spec) for spec in config.models)
    cifar = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the models' own mean and std
    assert plain == Preprocessing(36, 32, *cifar, interpolation="bicubic")
    assert overridden == Preprocessing(36, (30, 28), (0.5,) * 3, cifar[1], interpolation="bicubic")
