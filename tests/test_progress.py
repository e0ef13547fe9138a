"""--no-progress reaches every progress bar of a sweep, the empirical bias correction's included."""
from __future__ import annotations

import pytest

import clebench.bias_correction
from clebench import cli

CONFIG = """
models = ["mobilenet_v2_cifar10"]
steps = ["bn_fold+bias_correction_empirical"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
limit = 10
calibration = 10
batch_size = 10
"""


@pytest.mark.slow
def test_no_progress_reaches_bias_correction(tmp_path, monkeypatch, data_root, models_dir):
    for split in ("train", "test"):  # one image per class: listing the full CIFAR-10 folders costs more than the sweep
        for folder in sorted((data_root / "cifar10" / split).iterdir()):
            (tmp_path / "data" / "cifar10" / split / folder.name).mkdir(parents=True)
            (tmp_path / "data" / "cifar10" / split / folder.name / "0000.jpg").symlink_to(folder / "0000.jpg")
    config = tmp_path / "bc.toml"
    config.write_text(CONFIG)
    seen = []

    def spy(model, candidates, modules, config, batches, progress):  # records the flag; corrects nothing (fast)
        seen.append(progress)
        return 0

    monkeypatch.setattr(clebench.bias_correction, "_correct_empirical", spy)
    assert cli.main(["sweep", str(config), "--out", str(tmp_path / "out"), "--no-progress",
                     "--data-root", str(tmp_path / "data"), "--models-dir", str(models_dir)]) == 0
    assert seen == [False]
