"""Deploy targets in a sweep's config, results folder and report: one column family per runtime, older folders
(int8_* columns, "|int8" predictions: ONNX Runtime) still read, and a layer a runtime ran in float shows per row."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clebench.reporting.report import write_report
from clebench.sweep.config import ConfigError, load_config, parse_config
from clebench.sweep.results import (RESULT_COLUMNS, deploy_columns, deploy_targets, prediction_name, read_predictions,
                                    RowKey, upgrade_legacy, write_predictions)
from clebench.sweep.run import layers_per_row
from sweeps import CONFIG

ROOT = Path(__file__).resolve().parents[1]


def config_with(eval_table: str):
    return parse_config(tomllib.loads(CONFIG + "[eval]\n" + eval_table))


def test_both_runtimes_are_deploy_targets_and_engines():
    config = config_with('engine = "openvino"\ndeploy = ["onnxruntime", "openvino"]\n')
    assert (config.eval.engine, config.eval.deploy) == ("openvino", ("onnxruntime", "openvino"))
    assert config_with('deploy = ["onnxruntime"]\n').hash != config.hash
    with pytest.raises(ConfigError, match="eval.deploy must be a list of onnxruntime, openvino, got \\['tensorrt'\\]"):
        config_with('deploy = ["tensorrt"]\n')
    with pytest.raises(ConfigError, match="lists a target twice"):
        config_with('deploy = ["openvino", "openvino"]\n')
    with pytest.raises(ConfigError, match="eval.engine must be one of torch, onnxruntime, openvino"):
        config_with('engine = "tensorrt"\n')


def test_one_column_family_per_target_in_config_order():
    assert deploy_columns(["openvino"]) == ["openvino_top1", "openvino_top5", "openvino_agreement",
                                            "openvino_integer_layers", "openvino_float_layers"]
    columns = RESULT_COLUMNS + deploy_columns(["openvino", "onnxruntime"])
    assert deploy_targets(columns) == ["onnxruntime", "openvino"] and deploy_targets(RESULT_COLUMNS) == []


def test_an_older_folders_int8_columns_and_predictions_read_as_onnx_runtime(tmp_path):
    old = pd.DataFrame([{"model": "m", "int8_top1": 90.0, "int8_top5": 99.0, "int8_agreement": 99.5}])
    assert list(upgrade_legacy(old).columns) == ["model", "onnxruntime_top1", "onnxruntime_top5", "onnxruntime_agreement"]
    key = RowKey("m", "cifar10", "bn_fold", "w8a8_per_tensor_minmax")
    write_predictions({"m|cifar10|bn_fold|w8a8_per_tensor_minmax|int8": np.arange(3)}, tmp_path / "p.npz")
    assert list(read_predictions(tmp_path / "p.npz")) == [prediction_name(key, "onnxruntime")]


def _row(steps: str, quant: str, **deployed) -> dict:
    return {"model": "m", "dataset": "cifar10", "steps": steps, "quant": quant, "fp32_top1": 92.0, "fp32_top5": 99.0,
            "quant_top1": 91.0, "quant_top5": 99.0, "delta_top1": -1.0, "n_images": 100, "n_calibration": 10,
            "seconds": 1.0, "config_hash": "001234abcdef", **deployed}


def test_report_has_a_table_per_target_and_marks_a_float_fallback(tmp_path):
    rows = [_row("bn_fold", "w8a8_per_tensor_minmax", onnxruntime_top1=90.5, onnxruntime_top5=99.0,
                 onnxruntime_agreement=99.0, onnxruntime_integer_layers=21, onnxruntime_float_layers=0,
                 openvino_top1=90.0, openvino_top5=99.0, openvino_agreement=98.0, openvino_integer_layers=19,
                 openvino_float_layers=2),
            _row("bn_fold+cls", "w8a8_per_tensor_minmax", onnxruntime_top1=91.0, onnxruntime_top5=99.0,
                 onnxruntime_agreement=100.0, onnxruntime_integer_layers=21, onnxruntime_float_layers=0,
                 openvino_top1=91.0, openvino_top5=99.0, openvino_agreement=100.0, openvino_integer_layers=21,
                 openvino_float_layers=0)]
    table = pd.DataFrame(rows)
    table.to_csv(tmp_path / "results.csv", index=False)
    markdown = write_report(tmp_path)[0].read_text()
    onnx_part = markdown.split("(ONNX Runtime) top-1", 1)[1].split("###", 1)[0]
    openvino_part = markdown.split("(OpenVINO) top-1", 1)[1]
    assert "every conv / matmul layer ran on integers in all 2 rows (21 such layers per row)" in onnx_part
    assert "91.00 / 90.50 (99.0)" in onnx_part and "⚠" not in onnx_part
    assert "1 of 2 rows ran some conv / matmul layers in float (marked ⚠)" in openvino_part
    assert "91.00 / 90.00 (98.0) ⚠ 2 float layer(s)" in openvino_part
    assert layers_per_row(table, "openvino") == {"m|cifar10|bn_fold|w8a8_per_tensor_minmax": "19 integer, 2 float",
                                                 "m|cifar10|bn_fold+cls|w8a8_per_tensor_minmax": "21 integer, 0 float"}


def test_an_older_folders_int8_table_still_reports(tmp_path):
    pd.DataFrame([_row("bn_fold", "w8a8_per_tensor_minmax", int8_top1=90.5, int8_top5=99.0, int8_agreement=99.0)]
                 ).to_csv(tmp_path / "results.csv", index=False)
    markdown = write_report(tmp_path)[0].read_text()
    assert "### Simulated vs real int8 (ONNX Runtime) top-1 (%)" in markdown and "91.00 / 90.50 (99.0)" in markdown


def test_deploy_flag_overrides_the_config_and_hashes_like_the_same_config_written_out(tmp_path):
    config = load_config(ROOT / "configs" / "imagenet_sample_lite0.toml")
    deployed = config.with_deploy(["onnxruntime", "openvino"])
    assert deployed.eval.deploy == ("onnxruntime", "openvino") and config.eval.deploy == ()
    written = tmp_path / "lite0.toml"
    written.write_text((ROOT / "configs" / "imagenet_sample_lite0.toml").read_text()
                       + '\n[eval]\ndeploy = ["onnxruntime", "openvino"]\n')
    assert load_config(written).hash == deployed.hash != config.hash
    assert config.with_deploy(None) is config


@pytest.mark.parametrize("quant, deployed", [("w4a8_per_tensor_minmax", True), ("w8a16_per_channel_minmax", True),
                                             ("w8a4_per_tensor_minmax", False), ("w4a4_per_tensor_minmax", False)])
def test_rows_whose_activations_have_no_exact_export_are_not_deployed(quant, deployed):
    from clebench.quant import QuantConfig
    from clebench.sweep.execute import targets_for_quant

    targets = ("onnxruntime", "openvino")
    assert targets_for_quant(targets, QuantConfig.from_name(quant)) == (targets if deployed else ())
