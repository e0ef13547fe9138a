"""The CI regression gate: statuses at the tolerance boundary, config differences, clear errors on bad files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from clebench import cli
from clebench.sweep.config import load_config
from clebench.reporting.regression import (
    RESULT_COLUMNS,
    assert_no_regression,
    check,
    config_differences,
    format_check,
    read_results,
    results_config,
    write_baseline,
)

CONFIG_TOML = """\
models = ["resnet18_cifar10", "mobilenet_v2_cifar10"]
steps = ["bn_fold+cls"]
quant = ["w8a8_per_tensor_minmax"]

[data]
dataset = "cifar10"
limit = 100
calibration = 32
"""
CONFIG = {"models": ["resnet18_cifar10"], "data": {"dataset": "cifar10", "limit": 100}, "quant": ["w8a8_per_tensor_minmax"]}


def row(model: str, steps: str, quant_top1: float, **overrides) -> dict:
    values = {
        "model": model, "dataset": "cifar10", "steps": steps, "quant": "w8a8_per_tensor_minmax",
        "fp32_top1": 91.0, "fp32_top5": 99.5, "quant_top1": quant_top1, "quant_top5": 99.0,
        "delta_top1": quant_top1 - 91.0, "n_images": 100, "n_calibration": 32, "seconds": 1.5,
        "config_hash": "0123456789ab",
    }  # fmt: skip
    return values | overrides


BASELINE_ROWS = [
    row("resnet18_cifar10", "none", 71.3), row("resnet18_cifar10", "bn_fold+cls", 90.0), row("mobilenet_v2_cifar10", "none", 10.0)
]


def write_results(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def baseline(tmp_path) -> Path:
    path = tmp_path / "baseline.json"
    write_baseline(write_results(tmp_path / "base" / "results.csv", BASELINE_ROWS), path, CONFIG)
    return path


def statuses(result) -> list[str]:
    return result.table["status"].tolist()


def test_baseline_round_trip_passes_and_ignores_timing_and_hash(tmp_path, baseline):
    stored = json.loads(baseline.read_text())
    assert stored["config"] == CONFIG and [list(r) for r in stored["rows"]] == [RESULT_COLUMNS] * 3
    assert stored["rows"][0]["quant_top1"] == 71.3 and stored["rows"][0]["steps"] == "none"
    rerun = [r | {"seconds": 99.0, "config_hash": "ffffffffffff"} for r in BASELINE_ROWS]
    result = check(write_results(tmp_path / "results.csv", rerun), baseline, config=CONFIG)
    assert result.ok and result.problems == [] and statuses(result) == ["ok"] * 3
    assert result.table["delta"].tolist() == [0.0, 0.0, 0.0]


def test_drop_of_exactly_the_tolerance_passes_and_more_fails(tmp_path, baseline):
    rows = [BASELINE_ROWS[0] | {"quant_top1": 70.8}, BASELINE_ROWS[1] | {"quant_top1": 89.49}, BASELINE_ROWS[2]]
    result = check(write_results(tmp_path / "results.csv", rows), baseline, tolerance=0.5, config=CONFIG, min_images=0)
    assert statuses(result) == ["ok", "regressed", "ok"] and not result.ok
    assert result.table["delta"].tolist() == [-0.5, -0.51, 0.0]
    assert len(result.problems) == 1 and "resnet18_cifar10/cifar10/bn_fold+cls" in result.problems[0]
    assert "89.49 is 0.51 points (1 images) below the baseline 90.00" in result.problems[0]
    assert check(tmp_path / "results.csv", baseline, tolerance=0.51, config=CONFIG).ok


def test_missing_row_fails_new_row_and_improvement_pass(tmp_path, baseline):
    rows = [BASELINE_ROWS[0], BASELINE_ROWS[1] | {"quant_top1": 95.0}, row("vgg", "none", 50.0)]
    result = check(write_results(tmp_path / "results.csv", rows), baseline, config=CONFIG)
    assert statuses(result) == ["ok", "improved", "missing", "new"]
    assert result.problems == ["mobilenet_v2_cifar10/cifar10/none/w8a8_per_tensor_minmax: in the baseline but not in results.csv"]
    assert any("improved by 5.00" in n for n in result.notes) and any("vgg" in n and "new row" in n for n in result.notes)
    without_missing = check(write_results(tmp_path / "ok.csv", rows + [BASELINE_ROWS[2]]), baseline, config=CONFIG)
    assert without_missing.ok and statuses(without_missing) == ["ok", "improved", "ok", "new"]


def test_nan_accuracy_and_different_image_count_fail(tmp_path, baseline):
    rows = [BASELINE_ROWS[0] | {"quant_top1": math.nan}, BASELINE_ROWS[1] | {"n_images": 50}, BASELINE_ROWS[2]]
    result = check(write_results(tmp_path / "results.csv", rows), baseline, config=CONFIG)
    assert statuses(result)[:2] == ["regressed", "ok"] and not result.ok
    assert "quant_top1 is empty or NaN (baseline 71.30)" in result.problems[0]
    assert "evaluated on 50 images, the baseline on 100" in result.problems[1]


def test_config_differences_name_every_key(tmp_path, baseline):
    current = {"models": ["resnet18_cifar10", "x"], "data": {"dataset": "cifar10", "limit": 200, "seed": 3}}
    result = check(write_results(tmp_path / "results.csv", BASELINE_ROWS), baseline, config=current)
    assert not result.ok and statuses(result) == ["ok"] * 3
    assert result.problems == [
        "config differs: data.limit: baseline 100, current 200",
        "config differs: data.seed: in the current config (3) but not in the baseline",
        "config differs: models: baseline ['resnet18_cifar10'], current ['resnet18_cifar10', 'x']",
        "config differs: quant: in the baseline (['w8a8_per_tensor_minmax']) but not in the current config",
    ]
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1}}) == []


def test_no_config_is_noted_not_compared(tmp_path, baseline):
    result = check(write_results(tmp_path / "results.csv", BASELINE_ROWS), baseline)
    assert result.ok and "configuration not compared" in result.notes[0]


def test_format_check_shows_side_by_side_table_and_reasons(tmp_path, baseline):
    rows = [BASELINE_ROWS[0] | {"quant_top1": 60.0}] + BASELINE_ROWS[1:]
    text = format_check(check(write_results(tmp_path / "results.csv", rows), baseline, config=CONFIG))
    lines = text.splitlines()
    assert lines[0] == "clebench check: FAIL (2 ok, 1 regressed; a row fails below 0.5 top-1 points and 3 images)"
    assert lines[1].split() == ["model", "dataset", "steps", "quant", "baseline", "current", "delta", "changed",
                                "right<>wrong", "status"]
    assert lines[2].split() == ["resnet18_cifar10", "cifar10", "none", "w8a8_per_tensor_minmax", "71.30", "60.00", "-11.30",
                                "-", "-", "regressed"]
    assert lines[3 + len(rows) - 1].startswith(
        "FAIL  resnet18_cifar10/cifar10/none/w8a8_per_tensor_minmax: quant_top1 60.00 is 11.30 points (11 images) below")


def test_missing_and_malformed_files_raise_errors_naming_them(tmp_path, baseline):
    results = write_results(tmp_path / "results.csv", BASELINE_ROWS)
    with pytest.raises(FileNotFoundError, match=r"nothere\.csv does not exist; run `clebench sweep`"):
        check(tmp_path / "nothere.csv", baseline)
    with pytest.raises(FileNotFoundError, match=r"absent\.json does not exist.*--write-baseline"):
        check(results, tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"config": {}, "rows": [')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        check(results, tmp_path / "broken.json")
    (tmp_path / "shape.json").write_text('{"rows": {}}')
    with pytest.raises(ValueError, match=r"shape\.json must be an object with \"config\" and a \"rows\" list"):
        check(results, tmp_path / "shape.json")
    (tmp_path / "columns.json").write_text(json.dumps({"config": None, "rows": [{"model": "m", "quant_top1": 1.0}]}))
    with pytest.raises(ValueError, match=r"columns\.json lacks the results.csv columns \['dataset', 'steps'"):
        check(results, tmp_path / "columns.json")
    pd.DataFrame([BASELINE_ROWS[0]]).drop(columns=["quant_top1"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"short\.csv lacks the results.csv columns \['quant_top1'\]"):
        read_results(tmp_path / "short.csv")
    write_results(tmp_path / "dup.csv", BASELINE_ROWS + BASELINE_ROWS[:1])
    with pytest.raises(ValueError, match=r"dup\.csv has 2 rows sharing a key.*'resnet18_cifar10', 'cifar10', 'none'"):
        check(tmp_path / "dup.csv", baseline)
    write_results(tmp_path / "text.csv", [BASELINE_ROWS[0] | {"quant_top1": "high"}])
    with pytest.raises(ValueError, match=r"text\.csv: column quant_top1 holds non-numbers, e.g. 'high'"):
        read_results(tmp_path / "text.csv")
    write_results(tmp_path / "partial.csv", [BASELINE_ROWS[0] | {"quant_top1": math.nan}])
    with pytest.raises(ValueError, match=r"partial\.csv has rows without quant_top1, e.g. \('resnet18_cifar10'"):
        write_baseline(tmp_path / "partial.csv", tmp_path / "partial.json", CONFIG)
    for bad in (-0.1, math.inf, "0.5", True):
        with pytest.raises(ValueError, match="tolerance must be a finite number"):
            check(results, baseline, tolerance=bad)


def test_assert_no_regression_reads_config_toml_from_the_results_dir(tmp_path):
    run = tmp_path / "run"
    write_results(run / "results.csv", BASELINE_ROWS)
    (run / "config.toml").write_text(CONFIG_TOML)
    write_baseline(run / "results.csv", tmp_path / "baseline.json", load_config(run / "config.toml").to_dict())
    assert_no_regression(run, tmp_path / "baseline.json")
    write_results(run / "results.csv", [BASELINE_ROWS[0] | {"quant_top1": 70.0}] + BASELINE_ROWS[1:])
    with pytest.raises(AssertionError, match=r"(?s)FAIL \(2 ok, 1 regressed.*71\.30 +70\.00 +-1\.30 .*regressed"):
        assert_no_regression(run, tmp_path / "baseline.json", min_images=0)
    assert_no_regression(run, tmp_path / "baseline.json", tolerance=1.5, min_images=0)
    assert_no_regression(run, tmp_path / "baseline.json")  # 1 image of 100 is within the default 3 images
    (run / "config.toml").write_text(CONFIG_TOML.replace("limit = 100", "limit = 200"))
    with pytest.raises(AssertionError, match="config differs: data.limit: baseline 100, current 200"):
        assert_no_regression(run, tmp_path / "baseline.json", tolerance=1.5)


def test_the_effective_config_in_meta_json_wins_over_the_verbatim_config_toml(tmp_path):
    """A sweep run with --limit records the limit it ran in meta.json; config.toml is the unmodified file."""
    run = tmp_path / "run"
    write_results(run / "results.csv", BASELINE_ROWS)
    (run / "config.toml").write_text(CONFIG_TOML)
    effective = load_config(run / "config.toml").with_limit(50).to_dict()
    (run / "meta.json").write_text(json.dumps({"config": effective}))
    assert results_config(run)["data"]["limit"] == 50
    write_baseline(run / "results.csv", tmp_path / "baseline.json", load_config(run / "config.toml").to_dict())
    with pytest.raises(AssertionError, match="config differs: data.limit: baseline 100, current 50"):
        assert_no_regression(run, tmp_path / "baseline.json")


def test_cli_check_exit_codes(tmp_path, capsys):
    run = tmp_path / "run"
    write_results(run / "results.csv", BASELINE_ROWS)
    (run / "config.toml").write_text(CONFIG_TOML)
    baseline = tmp_path / "baseline.json"
    assert cli.main(["check", str(run), "--baseline", str(baseline), "--write-baseline"]) == 0
    assert cli.main(["check", str(run), "--baseline", str(baseline)]) == 0
    assert "clebench check: PASS (3 ok" in capsys.readouterr().out
    write_results(run / "results.csv", BASELINE_ROWS[:2])
    assert cli.main(["check", str(run), "--baseline", str(baseline)]) == 1
    assert "in the baseline but not in results.csv" in capsys.readouterr().out
    assert cli.main(["check", str(tmp_path / "nowhere"), "--baseline", str(baseline)]) == 2
    assert "results.csv does not exist" in capsys.readouterr().err
