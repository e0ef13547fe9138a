"""The sweep end to end on the shared CIFAR-10 data: resumable after SIGKILL, deterministic, clean failures."""
from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clebench import layers
from clebench.sweep.config import parse_config
from clebench.reporting.report import write_report
from clebench.reporting.regression import check, format_check, results_config, results_device, write_baseline
from clebench.sweep.results import (
    CHECK_COLUMNS,
    KEY_COLUMNS,
    RESULT_COLUMNS,
    FolderLock,
    RowKey,
    labels_name,
    prediction_name,
    read_json,
    read_predictions,
    write_json,
    deploy_columns,
    write_predictions,
)
from clebench.sweep import fp32_check
from clebench.sweep.fp32_check import FP32StepError
from clebench.sweep.run import SweepError, run_sweep as run_sweep_in_process
from conftest import require_extra
from sweeps import CONFIG, kill_after_rows, run_sweep, without_timing


def sweep_here(capsys, config: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`clebench sweep` in this process (cli.main, what `python -m clebench` exits with): (exit status, stderr). For
    sweeps refused before any work, where a fresh interpreter per case (~5 s of imports) would check nothing more;
    an exception that is not the one-line error escapes main() and fails the test, as a traceback would."""
    from clebench import cli

    try:
        returncode = cli.main(["sweep", str(config), "--out", str(out), "--no-progress", *extra])
    except SystemExit as exit_:  # argparse's way out
        returncode = exit_.code
    return returncode, capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_every_row_once_and_twice_is_byte_identical(uninterrupted, benchmark_rerun):
    rows = pd.read_csv(uninterrupted / "results.csv")
    assert len(rows) == 8 and not rows.duplicated(KEY_COLUMNS).any()
    assert (rows["n_images"] == 20).all() and (rows["n_calibration"] == 20).all()
    work = json.loads((uninterrupted / "meta.json").read_text())["last_run_work"]
    # 4 distinct FP32 models (the BC row shares its prefix's), 8 distinct quantized ones; activation ranges once per
    # FP32 model, but per setting after bias correction (which gives each weight setting its own FP32 model)
    assert (work["rows"], work["fp32_evaluations"], work["calibrations"], work["quantized_evaluations"]) == (8, 4, 5, 8)
    assert work["wall_seconds"] > 0 and work["peak_memory_mib"] > 100
    _, again = benchmark_rerun  # the same config run a second time (clebench.benchmark; test_api reads it too)
    assert without_timing(again / "results.csv").to_csv() == without_timing(uninterrupted / "results.csv").to_csv()
    # the CLI writes the report beside the rows (the second run is benchmark(), which writes no report)
    assert (uninterrupted / "results.md").is_file()
    assert (uninterrupted / "fig2_channel_ranges_mobilenet_v2_cifar10.png").is_file()


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_gives_the_uninterrupted_rows(config_file, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    results = out / "results.csv"
    partial = kill_after_rows(config_file, out)
    assert 2 <= len(partial) < 8
    resumed = run_sweep(config_file, out)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timing(results).to_csv() == without_timing(uninterrupted / "results.csv").to_csv()
    kept = pd.read_csv(results).merge(partial, on=KEY_COLUMNS, suffixes=("", "_before"))
    assert (kept["seconds"] == kept["seconds_before"]).all()  # finished rows were not recomputed


def test_a_results_folder_of_another_config_is_refused(config_file, uninterrupted, capsys):
    returncode, stderr = sweep_here(capsys, config_file, uninterrupted, "--limit", "10")
    assert returncode == 2 and "another configuration" in stderr


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
def test_invalid_configs_fail_before_any_work(tmp_path, capsys, change, message):
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.replace(*change))
    out = tmp_path / "out"
    returncode, stderr = sweep_here(capsys, config, out)
    assert returncode == 2
    assert re.search(message, stderr), stderr
    assert "Traceback" not in stderr and not out.exists()


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


def test_a_second_sweep_on_a_locked_folder_fails_and_writes_nothing(config_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with FolderLock(out):  # a sweep writing this folder
        result = run_sweep(config_file, out)
    assert result.returncode == 2 and "is being written by another sweep (pid" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_truncated_meta_json_is_an_error_naming_it(config_file, tmp_path, capsys):
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "meta.json").write_text('{"config_hash": "47fe')
    returncode, stderr = sweep_here(capsys, config_file, out)
    assert returncode == 2 and f"{out / 'meta.json'} is not valid JSON" in stderr, stderr
    assert "Traceback" not in stderr and (out / "meta.json").read_text() == '{"config_hash": "47fe'


def test_meta_json_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_json({"config_hash": "old"}, path)

    def half_then_disk_full(self, text):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json({"config_hash": "new", "config": {"models": ["x"] * 100}}, path)
    monkeypatch.undo()
    assert read_json(path) == {"config_hash": "old"} and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def flip(results_dir: Path, row: int, count: int) -> None:
    """Make `count` right quantized predictions of results row `row` wrong, as another device might."""
    table = pd.read_csv(results_dir / "results.csv")
    key = RowKey(*table.loc[row, KEY_COLUMNS])
    arrays = read_predictions(results_dir / "predictions.npz")
    name, labels = prediction_name(key, "quant"), arrays[labels_name(key.model, key.dataset)]
    images = np.flatnonzero(arrays[name] == labels)[:count]
    arrays[name][images] = (labels[images] + 1) % 10
    table.loc[row, "quant_top1"] = 100.0 * (arrays[name] == labels).sum() / len(labels)
    write_predictions(arrays, results_dir / "predictions.npz")
    table.to_csv(results_dir / "results.csv", index=False)


@pytest.mark.slow
def test_check_passes_a_few_flipped_images_and_names_them(uninterrupted, tmp_path):
    baseline = tmp_path / "baseline.json"
    write_baseline(uninterrupted / "results.csv", baseline, results_config(uninterrupted), results_device(uninterrupted))
    assert (tmp_path / "baseline.predictions.npz").is_file()
    identical = check(uninterrupted / "results.csv", baseline, config=results_config(uninterrupted),
                      device=results_device(uninterrupted))
    assert identical.ok and identical.table["changed"].tolist() == [0] * 8 and identical.notes == []
    jittered = tmp_path / "jittered"
    shutil.copytree(uninterrupted, jittered)
    flip(jittered, 1, 1)  # 1 of 20 images: 5 points, but one image
    flip(jittered, 6, 2)
    gpu = results_device(jittered) | {"device": "cuda:0", "device_name": "NVIDIA H200", "precision": "fp32, TF32 off"}
    result = check(jittered / "results.csv", baseline, config=results_config(jittered), device=gpu)
    assert result.ok, format_check(result)
    assert result.table["changed"].tolist() == [0, 1, 0, 0, 0, 0, 2, 0]
    assert result.table["changed_correctness"].tolist() == [0, 1, 0, 0, 0, 0, 2, 0]
    assert result.table["status"].tolist()[1] == "ok" and result.table["delta"].tolist()[1] == -5.0
    assert any(n.startswith("cross-device comparison: baseline on cpu") for n in result.notes)
    assert "changed" in format_check(result)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_sweep_on_cuda_records_the_gpu_and_passes_the_cpu_baseline(uninterrupted, config_file, tmp_path):
    out = tmp_path / "gpu"
    result = run_sweep(config_file, out, "--device", "cuda")
    assert result.returncode == 0, result.stderr
    meta = read_json(out / "meta.json")
    assert meta["device"] == "cuda" and "TF32 off" in meta["precision"]
    assert without_timing(out / "results.csv")[KEY_COLUMNS].equals(without_timing(uninterrupted / "results.csv")[KEY_COLUMNS])
    labels = labels_name("mobilenet_v2_cifar10", "cifar10")
    assert np.array_equal(read_predictions(out / "predictions.npz")[labels],
                          read_predictions(uninterrupted / "predictions.npz")[labels])
    baseline = tmp_path / "baseline.json"
    write_baseline(uninterrupted / "results.csv", baseline, results_config(uninterrupted), results_device(uninterrupted))
    gate = check(out / "results.csv", baseline, config=results_config(out), device=results_device(out))
    assert gate.ok, format_check(gate)
    assert any(n.startswith("cross-device comparison: baseline on cpu") for n in gate.notes)


@pytest.mark.slow
def test_a_step_that_breaks_the_fp32_model_stops_the_unit_naming_where(tmp_path, monkeypatch, data_root, models_dir):
    """CLS that no longer compensates in the next layer: the FP32 check stops the unit at cls_relu6_clip, naming the
    first value the two models part at, and records none of the unit's rows."""
    monkeypatch.setattr(layers, "scale_input_channels", lambda layer, scale: None)
    broken = tmp_path / "broken"
    config = parse_config(tomllib.loads(CONFIG)).with_models(["mobilenet_v2_cifar10"])
    with pytest.raises(FP32StepError, match=r"mobilenet_v2_cifar10: step cls_relu6_clip changed the FP32 output by rel "
                                            rf".* \(> 0.0001\) on {fp32_check.PROBE_IMAGES} calibration images; the first value that differs "
                                            r"is add\(features.2.conv.3, features.3.conv.3\) \(rel"):
        run_sweep_in_process(config, broken, data_root=data_root, models_dir=models_dir, progress=False)
    recorded = pd.read_csv(broken / "results.csv")["steps"]  # the units before it finished
    assert not recorded.str.contains("cls_relu6_clip").any()


@pytest.mark.parametrize("change, message", [
    (lambda config: config.with_engine("onnxruntime"), "the onnxruntime engine runs on the CPU, not cuda"),
    (lambda config: config.with_execution(ray="local"), "a Ray sweep on cuda must give its tasks a GPU: pass --gpus-per-task"),
])
def test_gpu_sweeps_that_cannot_work_are_refused_before_any_work(tmp_path, change, message):
    config = change(parse_config(tomllib.loads(CONFIG)))
    with pytest.raises(SweepError, match=re.escape(message)):
        run_sweep_in_process(config, tmp_path / "out", device="cuda", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_sweep_on_openvino_deployed_to_both_runtimes(tmp_path, data_root, models_dir, uninterrupted):
    require_extra("onnxruntime")
    require_extra("openvino")
    two_rows = (CONFIG.replace('steps = ["bn_fold", "bn_fold+relu6_to_relu", ', 'steps = [')
                .replace(', "w4a8_per_tensor_minmax"]', "]"))
    config = parse_config(tomllib.loads(two_rows + '[eval]\nengine = "openvino"\ndeploy = ["onnxruntime", "openvino"]\n'))
    outcome = run_sweep_in_process(config, tmp_path / "ov", data_root=data_root, models_dir=models_dir, progress=False)
    rows = outcome.table
    assert list(rows.columns[len(RESULT_COLUMNS):]) == deploy_columns(["onnxruntime", "openvino"]) + CHECK_COLUMNS
    assert len(rows) == 2
    for target in ("onnxruntime", "openvino"):
        assert (rows[f"{target}_agreement"] >= 90).all() and rows[f"{target}_top1"].notna().all()
        # MobileNetV2-CIFAR: 52 convolutions and the classifier, every one on integers
        assert (rows[f"{target}_integer_layers"] == 53).all() and (rows[f"{target}_float_layers"] == 0).all()
    # the torch rows of the same two keys: the session's CLI sweep of the same data (its rows do not depend on the
    # config's other rows: a row is its prefix and setting, each prefix calibrated on the same 20 images)
    torch_rows = pd.read_csv(uninterrupted / "results.csv")
    same = rows.merge(torch_rows, on=KEY_COLUMNS, suffixes=("", "_torch"))
    assert len(same) == 2
    assert (abs(same["quant_top1"] - same["quant_top1_torch"]) <= 5.0).all()  # at most one image of 20 flips
    predictions = read_predictions(tmp_path / "ov" / "predictions.npz")
    assert sum(name.endswith(("|onnxruntime", "|openvino")) for name in predictions) == 4
    meta = read_json(tmp_path / "ov" / "meta.json")
    assert meta["onnxruntime"]["version"] and "vnni" in meta["onnxruntime"] and meta["openvino"]["version"]
    assert set(meta["openvino"]["layers_per_row"].values()) == {"53 integer, 0 float"}
    assert not (tmp_path / "ov" / ".memo").exists()
    write_report(tmp_path / "ov")
    markdown = (tmp_path / "ov" / "results.md").read_text()
    assert "Simulated vs real int8 (ONNX Runtime)" in markdown and "Simulated vs real int8 (OpenVINO)" in markdown
