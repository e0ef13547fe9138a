"""Helpers for the end-to-end sweep tests: a tiny config on the shared CIFAR-10 data and how to run it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from clebench.sweep.results import TIMING_COLUMNS

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

# Two rows, and the sensitivity of the second on {images} images (format it).
SENSITIVITY_CONFIG = """
models = ["mobilenet_v2_cifar10"]
steps = ["bn_fold", "bn_fold+cls_relu6_clip"]
quant = ["w4a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
limit = 10
calibration = 10
batch_size = 10

[sensitivity]
images = {images}
rows = [ {{ model = "mobilenet_v2_cifar10", steps = "bn_fold+cls_relu6_clip", quant = "w4a8_per_tensor_minmax" }} ]
"""


def sweep_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clebench", "sweep", str(config), "--out", str(out), "--no-progress", *extra]


def run_sweep(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(config, out, *extra), capture_output=True, text=True, timeout=600)


def kill_after_rows(config: Path, out: Path, *extra: str, rows: int = 2) -> pd.DataFrame:
    """Start a sweep, SIGKILL it and every process it started once `rows` rows are recorded; the rows it left.

    Asserts that it was killed before it finished.
    """
    process = subprocess.Popen(sweep_command(config, out, *extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    results, deadline = out / "results.csv", time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if results.is_file() and len(pd.read_csv(results)) >= rows:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and anything it started (a local Ray)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    return pd.read_csv(results)


def without_timing(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=TIMING_COLUMNS)
