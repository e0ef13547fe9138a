"""The driver resolves every path a sweep's units read, so Ray workers never consult their own environment."""
from __future__ import annotations

from pathlib import Path

from clebench.sweep.config import parse_config
from clebench.sweep.distributed import cluster_address
from clebench.sweep.run import resolve_settings

RAW = {"models": [{"name": "resnet18_cifar10", "checkpoint": "mine/r18.pt"}], "steps": ["bn_fold"],
       "quant": ["w8a8_per_tensor_minmax"], "data": {"dataset": "cifar10"}}


def test_paths_come_from_the_driver_environment_and_are_absolute(tmp_path, monkeypatch):
    for name in ("data", "models", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEBENCH_DATA", "data")  # relative, as the README's test command sets them
    monkeypatch.setenv("CLEBENCH_MODELS", "models")
    monkeypatch.setenv("CLEBENCH_CACHE", "cache")
    config = parse_config(RAW, "dict", None)
    settings = resolve_settings(config, Path("out"), data_root=None, models_dir=None, device="cpu", progress=False,
                                cache=True)
    assert (settings.data_root, settings.models_dir, settings.cache_dir, settings.scratch) == (
        tmp_path / "data", tmp_path / "models", tmp_path / "cache", tmp_path / "out" / ".memo")
    assert settings.config.models[0].checkpoint == str(tmp_path / "mine" / "r18.pt")
    assert settings.config.hash == config.hash  # the checkpoint as written is what the hash covers


def test_arguments_win_over_the_environment_and_no_cache_has_no_folder(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setenv("CLEBENCH_DATA", "/nonexistent")
    monkeypatch.setenv("CLEBENCH_MODELS", "/nonexistent")
    settings = resolve_settings(parse_config(RAW, "dict", None), tmp_path / "out", data_root=tmp_path / "d",
                                models_dir=tmp_path / "m", device="cpu", progress=False, cache=False)
    assert (settings.data_root, settings.models_dir, settings.cache_dir) == (tmp_path / "d", tmp_path / "m", None)


def test_ray_auto_connects_where_ray_address_points(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert [cluster_address(a) for a in ("auto", "local", "10.0.0.9:6380")] == ["10.0.0.5:6379", "local", "10.0.0.9:6380"]
