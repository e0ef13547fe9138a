"""Helpers for the end-to-end sweep tests: a tiny config on the shared CIFAR-10 data and how to run it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from clebench.results import TIMING_COLUMNS

CONFIG = """
models = ["mobilenet_v2_cifar10"]
steps = ["bn_fold", "bn_fold+relu6_to_relu", "bn_fold+cls_relu6_clip", "bn_fold+cls_relu6_clip+hbf+bias_correction"]
quant = ["w8a8_per_tensor_minmax", "w4a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
limit = 20
calibration = 20
batch_size = 10
"""


def sweep_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clebench", "sweep", str(config), "--out", str(out), "--no-progress", *extra]


def run_sweep(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(config, out, *extra), capture_output=True, text=True, timeout=600)


def without_timing(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=TIMING_COLUMNS)
