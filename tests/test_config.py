"""Config paths and keys that do not change the numbers: checkpoints relative to the config file, `download`."""
from __future__ import annotations

from pathlib import Path

import pytest

from clebench.sweep.config import ConfigError, load_config

CONFIG = """
models = [{{ name = "resnet18_cifar10", checkpoint = "{checkpoint}" }}]
steps = ["bn_fold"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
{data}
"""


def write(folder: Path, checkpoint: str = "../models/r18.pt", data: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.toml"
    path.write_text(CONFIG.format(checkpoint=checkpoint, data=data))
    return path


def test_relative_checkpoint_is_relative_to_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "clone" / "configs")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("clone") / "configs" / "sweep.toml")
    assert config.models[0].checkpoint == str(tmp_path / "clone" / "models" / "r18.pt")


def test_absolute_checkpoint_stays_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = str(tmp_path / "elsewhere" / "r18.pt")
    assert load_config(write(tmp_path / "a", absolute)).models[0].checkpoint == absolute
    assert load_config(write(tmp_path / "b", "~/r18.pt")).models[0].checkpoint == str(tmp_path / "home" / "r18.pt")


def test_hash_and_recorded_config_do_not_depend_on_where_the_repo_is(tmp_path):
    first, second = load_config(write(tmp_path / "one")), load_config(write(tmp_path / "two" / "deeper"))
    assert first.models[0].checkpoint != second.models[0].checkpoint
    assert first.hash == second.hash
    assert first.to_dict()["models"] == [{"name": "resnet18_cifar10", "checkpoint": "../models/r18.pt"}]


def test_download_key_is_parsed_validated_and_not_hashed(tmp_path):
    plain = load_config(write(tmp_path / "plain"))
    fetching = load_config(write(tmp_path / "fetching", data="download = true"))
    assert (plain.data.download, fetching.data.download) == (False, True)
    assert plain.hash == fetching.hash and "download" not in fetching.to_dict()["data"]
    with pytest.raises(ConfigError, match=r"data\.download must be true or false, got 'yes'"):
        load_config(write(tmp_path / "bad", data='download = "yes"'))


def test_committed_configs_keep_their_hashes():
    # results/*/meta.json and results/cifar10_ci/baseline.json were made with these hashes.
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / "cifar10_ci.toml").hash == "47fefcd6a488"
    assert load_config(configs / "imagenet_sample_lite0.toml").hash == "2777652ededf"
