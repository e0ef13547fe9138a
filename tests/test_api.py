"""clebench.benchmark: the CLI's sweep from Python, with in-memory models and torch data sets."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

import clebench
from clebench.models import load_model
from clebench.models.preprocessing import CIFAR10_PREPROCESSING
from clebench.sweep import results
from clebench.sweep.api import ApiError, InMemoryData, build_config

SMALL = {"steps": ["bn_fold", "bn_fold+cls_relu6_clip"], "quant": ["w4a8_per_tensor_minmax"],
         "data": {"dataset": "cifar10", "limit": 20, "calibration": 10, "batch_size": 10}}
MODEL = "mobilenet_v2_cifar10"
VARIABLE = ["seconds", "config_hash"]  # the columns two runs of the same numbers may differ in


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["model", "dataset", *VARIABLE])


def test_the_frame_is_the_cli_results_csv(config_file, uninterrupted, benchmark_rerun):
    frame, out = benchmark_rerun  # clebench.benchmark(config_file, out=...), shared with test_sweep's run-twice check
    assert frame.equals(pd.read_csv(out / results.RESULTS_FILE))
    cli = pd.read_csv(uninterrupted / results.RESULTS_FILE)
    assert list(frame.columns) == list(cli.columns) and (frame.dtypes == cli.dtypes).all()
    pd.testing.assert_frame_equal(frame.drop(columns=results.TIMING_COLUMNS),
                                  cli.drop(columns=results.TIMING_COLUMNS), check_exact=True)
    assert (out / "config.toml").read_text() == config_file.read_text()


# Two rows of the tiny config (tests/sweeps.py CONFIG: the same data, calibration and batch size): the registry
# model's rows for them are the session's CLI sweep's (`uninterrupted`), so no second registry sweep runs here.
TINY_ROWS = {"steps": ["bn_fold", "bn_fold+cls_relu6_clip"], "quant": ["w4a8_per_tensor_minmax"],
             "data": {"dataset": "cifar10", "limit": 20, "calibration": 20, "batch_size": 10}}


def test_an_in_memory_model_gives_the_rows_of_the_registry_model_it_equals(uninterrupted, data_root, models_dir):
    cli = pd.read_csv(uninterrupted / results.RESULTS_FILE)
    registry = cli[cli["steps"].isin(TINY_ROWS["steps"]) & cli["quant"].isin(TINY_ROWS["quant"])]
    given = clebench.benchmark(TINY_ROWS, models={"mine": lambda: load_model(MODEL)})
    assert list(given["model"].unique()) == ["mine"] and len(registry) == len(given) == 2
    in_order = lambda table: numbers(table).sort_values(["steps", "quant"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(in_order(given), in_order(registry), check_exact=True)
    # the registry model's hash for the same two rows (a results' config_hash is its config's .hash)
    assert given["config_hash"].iloc[0] != build_config({"models": [MODEL], **TINY_ROWS}).hash
    assert cli["config_hash"].iloc[0] == build_config(uninterrupted / "config.toml").hash


def _folder(tmp_path, data_root, split: str, files: slice) -> None:
    """tmp_path/<split>/<class>/ with `files` of each class of the shared CIFAR-10 test folder."""
    for source in sorted((data_root / "cifar10" / "test").iterdir()):
        target = tmp_path / split / source.name
        target.mkdir(parents=True)
        for image in sorted(source.iterdir())[files]:
            shutil.copy(image, target / image.name)


def test_a_torchvision_image_folder_gives_the_imagefolder_rows(tmp_path, data_root, models_dir):
    _folder(tmp_path, data_root, "test", slice(0, 3))
    _folder(tmp_path, data_root, "train", slice(3, 4))
    data = {"limit": 20, "calibration": 10, "batch_size": 10}
    config = {"models": [MODEL], "steps": SMALL["steps"], "quant": SMALL["quant"]}
    files = clebench.benchmark({**config, "data": {**data, "dataset": "imagefolder", "root": str(tmp_path),
                                                   "eval_split": "test", "calibration_split": "train"}})
    folders = {"eval": torchvision.datasets.ImageFolder(tmp_path / "test"),
               "calibration": torchvision.datasets.ImageFolder(tmp_path / "train")}
    given = clebench.benchmark({**config, "data": data}, datasets=folders)
    assert set(given["dataset"]) == {"torch"} and given["n_images"].eq(20).all()
    pd.testing.assert_frame_equal(numbers(given), numbers(files), check_exact=True)


def test_uint8_and_to_tensor_images_are_the_pil_images(tmp_path, data_root):
    _folder(tmp_path, data_root, "test", slice(0, 2))
    pil = torchvision.datasets.ImageFolder(tmp_path / "test")
    floats = torchvision.datasets.ImageFolder(tmp_path / "test", transform=torchvision.transforms.ToTensor())
    uint8 = [((image * 255).round().to(torch.uint8), label) for image, label in floats]
    sets = [InMemoryData({"eval": d, "calibration": d}).image_set("eval", 10, None, CIFAR10_PREPROCESSING)
            for d in (pil, floats, uint8)]
    assert all(torch.equal(s.images, sets[0].images) and torch.equal(s.labels, sets[0].labels) for s in sets)
    assert sets[0].labels.tolist() == list(range(10)) and sets[0].images.is_contiguous()  # NCHW, as load_images


def _images(count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator), k % 2)
            for k in range(count)]


def test_the_hash_follows_the_in_memory_weights_and_images():
    model = load_model(MODEL)
    base = {"models": [MODEL], **SMALL}
    hashed = build_config(base, models={MODEL: model}).hash
    assert build_config(base, models={MODEL: load_model(MODEL)}).hash == hashed
    assert build_config(base).hash != hashed  # the registry's model, not an object
    with torch.no_grad():
        model.classifier[-1].bias[0] += 1e-3
    assert build_config(base, models={MODEL: model}).hash != hashed
    data = {**SMALL, "data": {"limit": 2}}
    first = build_config(data, models={MODEL: model}, datasets={"eval": _images(), "calibration": _images()}).hash
    again = build_config(data, models={MODEL: model}, datasets={"eval": _images(), "calibration": _images()}).hash
    other = build_config(data, models={MODEL: model}, datasets={"eval": _images(seed=1), "calibration": _images()})
    assert first == again != other.hash


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


@pytest.mark.parametrize(("models", "datasets", "message"), [
    ({"other": Net()}, None, r"models=\{'other': ...\}: the config has no model 'other' \(its models: net\)"),
    ({"net": 3}, None, r"models\['net'\] is a int, not an nn.Module or a callable returning one"),
    ({"net": lambda: "a string"}, None, r"models\['net'\]\(\) returned a str, not an nn.Module"),
    ({"net": lambda: 1 / 0}, None, r"models\['net'\]\(\) raised ZeroDivisionError: division by zero"),
    ({}, {"eval": [(1, 2, 3)], "calibration": [(1, 2, 3)]}, r"datasets\['eval'\]\[0\] is a 3-item tuple, not an"),
    ({}, {"eval": [("x.png", 0)], "calibration": _images()}, r"datasets\['eval'\]\[0\]: the image is a str; give"),
    ({}, {"eval": [(_images()[0][0], 0.5)], "calibration": _images()}, r"\[0\]: the label is 0.5; give the model"),
    ({}, {"eval": [(torch.randn(3, 8, 8), 0)], "calibration": _images()}, r"a float image that is not ToTensor's"),
    ({}, {"eval": _images()}, r"datasets= takes \{'eval': Dataset, 'calibration': Dataset\}, got \['eval'\]"),
])
def test_bad_arguments_are_one_line_errors(models, datasets, message):
    config = {"models": ["net"], **SMALL, "data": {"limit": 2} if datasets else SMALL["data"]}
    with pytest.raises(ApiError, match=message) as error:
        build_config(config, models=models, datasets=datasets)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("config", "message"), [
    ({"models": ["net"], **SMALL, "execution": {"ray": "local"}}, "execution.ray: in-memory models and data sets"),
    ({"models": [{"name": "net", "factory": "nets.py:build"}], **SMALL}, "models.net: given in models=, so it"),
])
def test_ray_and_a_second_way_to_build_the_model_are_refused(config, message):
    with pytest.raises(ApiError, match=message):
        build_config(config, models={"net": Net()})


def test_datasets_replace_the_files_of_data():
    with pytest.raises(ApiError, match=r"data.dataset: the images come from datasets=; remove data.dataset from"):
        build_config(SMALL, models={"net": Net()}, datasets={"eval": _images(), "calibration": _images()})
