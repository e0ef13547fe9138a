"""The sweep on Ray (a local 2-CPU Ray): the local run's rows, a killed worker retried, a killed driver resumed,
a worker error named with the recorded rows kept, [sensitivity] rows measured as Ray tasks."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from clebench.sweep.results import KEY_COLUMNS, read_json, row_differences, write_csv
from sweeps import SENSITIVITY_CONFIG, kill_after_rows, run_sweep, sweep_command

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def task_processes() -> list[int]:
    """Ray worker processes that are running a work unit (Ray names them after the task)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::_execute_task" in line]


def assert_same_rows(out: Path, reference: Path) -> None:
    assert row_differences(out, reference) == []


def test_a_ray_sweep_with_a_killed_worker_writes_the_local_rows(config_file, uninterrupted, tmp_path):
    out = tmp_path / "ray"
    process = subprocess.Popen(sweep_command(config_file, out, "--ray"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        running = task_processes()
        if running:
            time.sleep(1.0)  # let it get into its unit
            killed = running[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=600)
    assert killed is not None, "no Ray task was seen running"
    assert process.returncode == 0, stderr
    assert_same_rows(out, uninterrupted)
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 8 and not rows.duplicated(KEY_COLUMNS).any()
    work = read_json(out / "meta.json")["last_run_work"]
    assert work["rows"] == 8 and work["engine"] == "ray" and not (out / ".memo").exists()


def test_a_killed_ray_driver_resumes_without_recomputing_recorded_rows(config_file, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    results = out / "results.csv"
    partial = kill_after_rows(config_file, out, "--ray")
    assert 2 <= len(partial) < 8
    resumed = run_sweep(config_file, out, "--ray")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_rows(out, uninterrupted)
    kept = pd.read_csv(results).merge(partial, on=KEY_COLUMNS, suffixes=("", "_before"))
    assert len(kept) == len(partial) and (kept["seconds"] == kept["seconds_before"]).all()
    assert read_json(out / "meta.json")["last_run_work"]["rows"] == 8 - len(partial)


def broken_data_root(data_root: Path, root: Path) -> tuple[Path, Path]:
    """The tiny config's CIFAR-10 images, with the first airplane test image replaced by garbage."""
    for folder in sorted((data_root / "cifar10" / "test").iterdir()):
        (root / "cifar10" / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            (root / "cifar10" / "test" / folder.name / image.name).symlink_to(image.resolve())
    (root / "cifar10" / "train").symlink_to((data_root / "cifar10" / "train").resolve())
    broken = root / "cifar10" / "test" / "airplane" / "0000.jpg"
    broken.unlink()
    broken.write_bytes(b"not a jpeg")
    return root, broken


def test_a_worker_error_is_named_and_recorded_rows_stay(config_file, uninterrupted, tmp_path, data_root):
    out = tmp_path / "partial"
    shutil.copytree(uninterrupted, out)
    recorded = pd.read_csv(out / "results.csv").iloc[:6]
    write_csv(recorded, out / "results.csv")  # as the sweep writes it
    root, broken = broken_data_root(data_root, tmp_path / "data")
    result = run_sweep(config_file, out, "--ray", "--data-root", str(root))
    assert result.returncode == 2, result.stderr
    assert "work unit mobilenet_v2_cifar10" in result.stderr and "airplane/0000.jpg" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert pd.read_csv(out / "results.csv").equals(pd.read_csv(uninterrupted / "results.csv").iloc[:6])


def test_a_ray_sweep_measures_its_sensitivity_rows_as_the_command_does_on_one_thread(tmp_path, data_root, models_dir):
    """A Ray task runs on one thread (Ray sets OMP_NUM_THREADS to its one CPU); float sums, and so the activation
    ranges, depend on the thread count, so the reference is the command on one thread."""
    import torch

    from clebench.sweep.config import load_config
    from clebench.sweep.sensitivity import run_row_sensitivity

    config = tmp_path / "sensitivity.toml"
    config.write_text(SENSITIVITY_CONFIG.format(images=3))
    result = run_sweep(config, tmp_path / "ray", "--ray")
    assert result.returncode == 0, result.stderr
    work = read_json(tmp_path / "ray" / "meta.json")["last_run_work"]
    assert (work["rows"], work["sensitivity_rows"], work["units"]) == (2, 1, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_row_sensitivity(load_config(config), "bn_fold+cls_relu6_clip", "w4a8_per_tensor_minmax", tmp_path / "alone",
                            images=3, data_root=data_root, models_dir=models_dir, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "ray" / "sensitivity.csv").read_bytes() == (tmp_path / "alone" / "sensitivity.csv").read_bytes()
