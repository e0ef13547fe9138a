"""QuantSim on the reference CIFAR-10 checkpoints: W8A8 is near FP32, W4 is clearly worse, runs are deterministic.

Calibration: the first 256 training images (class-balanced); evaluation: the first 500 test images (50 per class).
"""
from __future__ import annotations

import copy

import pytest
import torch

from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.data.datasets import batches, load_images
from clebench.evaluation import evaluate
from clebench.models import load_model, model_preprocessing
from clebench.quant import QuantConfig, QuantSim

pytestmark = pytest.mark.slow
MODELS = ("resnet18_cifar10", "mobilenet_v2_cifar10")
TEST_IMAGES, CALIBRATION_IMAGES, BATCH = 500, 256, 100
# Per-channel weights are finer than per-tensor ones, but on 500 images one image is 0.2 points and a few borderline
# images flip either way between two W8A8 runs; the full 10,000-image test set is where per-channel >= per-tensor - 0.3
# is measured (see the QuantSim report). Here: at most 3 images worse.
PER_CHANNEL_SLACK = 0.6


@pytest.fixture(scope="module", params=MODELS)
def setup(request, data_root, models_dir):
    torch.manual_seed(0)
    name = request.param
    preprocessing = model_preprocessing(name)
    test = load_images("cifar10", "test", data_root, preprocessing, limit=TEST_IMAGES, progress=False)
    calibration = load_images("cifar10", "train", data_root, preprocessing, limit=CALIBRATION_IMAGES, progress=False)
    model = load_model(name, models_dir=models_dir)
    folded = copy.deepcopy(model)
    fold_all_batch_norms(folded)

    def run(config: QuantConfig) -> tuple[dict, dict]:
        sim = QuantSim(folded, torch.zeros(1, 3, 32, 32), config)
        sim.calibrate(batches(calibration, BATCH, preprocessing), progress=False)
        return evaluate(sim.model, batches(test, BATCH, preprocessing), progress=False), sim.encodings()

    runs = {}

    def cached(config: QuantConfig) -> tuple[dict, dict]:
        if config not in runs:
            runs[config] = run(config)
        return runs[config]

    fp32 = evaluate(model, batches(test, BATCH, preprocessing), progress=False)
    return fp32, cached, run


def test_w8a8_is_within_1_5_points_of_fp32_and_w4_is_clearly_worse(setup):
    fp32, cached, _ = setup
    per_tensor, _ = cached(QuantConfig())
    per_channel, _ = cached(QuantConfig(per_channel=True))
    w4, _ = cached(QuantConfig(weight_bits=4))
    assert per_tensor["n"] == TEST_IMAGES
    assert abs(per_tensor["top1"] - fp32["top1"]) <= 1.5, (fp32, per_tensor)
    assert per_channel["top1"] >= per_tensor["top1"] - PER_CHANNEL_SLACK, (per_tensor, per_channel)
    assert w4["top1"] <= per_tensor["top1"] - 3.0, (per_tensor, w4)


def test_two_runs_give_identical_accuracy_and_encodings(setup):
    _, cached, run = setup
    first, second = cached(QuantConfig()), run(QuantConfig())
    assert torch.equal(first[0]["predictions"], second[0]["predictions"])  # every image's, not only the counts
    assert {**first[0], "predictions": None} == {**second[0], "predictions": None}
    assert first[1] == second[1]
