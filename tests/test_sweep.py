"""The sweep end to end on the shared CIFAR-10 data: resumable after SIGKILL, deterministic, clean failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clebench.results import KEY_COLUMNS, TIMING_COLUMNS

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


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, data_root, models_dir) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweeps") / "uninterrupted"
    result = run_sweep(config_file, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_sweep_writes_every_row_once_and_twice_is_byte_identical(config_file, uninterrupted, tmp_path):
    rows = pd.read_csv(uninterrupted / "results.csv")
    assert len(rows) == 8 and not rows.duplicated(KEY_COLUMNS).any()
    assert (rows["n_images"] == 20).all() and (rows["n_calibration"] == 20).all()
    work = json.loads((uninterrupted / "meta.json").read_text())["last_run_work"]
    # 4 distinct FP32 models (the BC row shares its prefix's), 8 distinct quantized ones; activation ranges once per
    # FP32 model, but per setting after bias correction (which gives each weight setting its own FP32 model)
    assert (work["rows"], work["fp32_evaluations"], work["calibrations"], work["quantized_evaluations"]) == (8, 4, 5, 8)
    assert work["wall_seconds"] > 0 and work["peak_memory_mib"] > 100
    again = tmp_path / "again"
    assert run_sweep(config_file, again).returncode == 0
    assert without_timing(again / "results.csv").to_csv() == without_timing(uninterrupted / "results.csv").to_csv()
    assert (again / "results.md").is_file() and (again / "fig2_channel_ranges_mobilenet_v2_cifar10.png").is_file()


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_gives_the_uninterrupted_rows(config_file, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(sweep_command(config_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results, deadline = out / "results.csv", time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if results.is_file() and len(pd.read_csv(results)) >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    partial = pd.read_csv(results)
    assert 2 <= len(partial) < 8
    resumed = run_sweep(config_file, out)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(results).to_csv() == without_timing(uninterrupted / "results.csv").to_csv()
    kept = pd.read_csv(results).merge(partial, on=KEY_COLUMNS, suffixes=("", "_before"))
    assert (kept["seconds"] == kept["seconds_before"]).all()  # finished rows were not recomputed


def test_a_results_folder_of_another_config_is_refused(config_file, uninterrupted):
    result = run_sweep(config_file, uninterrupted, "--limit", "10")
    assert result.returncode == 2 and "another configuration" in result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (("w8a8_per_tensor_minmax", "w33a8_per_tensor_minmax"), "weight_bits must be an int in \\[2, 16\\]"),
        (("w8a8_per_tensor_minmax", "w0a8_per_tensor_minmax"), "weight_bits"),
        (("limit = 20", "limit = -5"), "data.limit must be a positive integer"),
        (('"bn_fold+relu6_to_relu"', '"bn_fold+fold_everything"'), "unknown step 'fold_everything'"),
        (('"bn_fold+relu6_to_relu"', '"bn_fold+hbf+cls_relu6_clip"'), "out of order"),
        (("batch_size = 10", "batch_size = 10\nbatchsize = 3"), "unknown key 'batchsize' in \\[data\\]"),
    ],
)
def test_invalid_configs_fail_before_any_work(tmp_path, change, message):
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.replace(*change))
    out = tmp_path / "out"
    result = run_sweep(config, out)
    assert result.returncode == 2
    assert pytest.importorskip("re").search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_corrupted_checkpoint_is_named_and_nothing_is_written(tmp_path, data_root, models_dir):
    bad_models = tmp_path / "models"
    bad_models.mkdir()
    original = (models_dir / "mobilenet_v2_cifar10.pt").read_bytes()
    (bad_models / "mobilenet_v2_cifar10.pt").write_bytes(original[: len(original) // 3])
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    result = run_sweep(config, out, "--models-dir", str(bad_models))
    assert result.returncode == 2 and "mobilenet_v2_cifar10.pt" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "results.csv").exists()
