"""CI regression gate: compare a sweep's results.csv with a committed baseline JSON.

Rows are keyed by (model, dataset, steps, quant). The gate fails when a quantized top-1 falls more than
`tolerance` points below the baseline, when a baseline row is missing, when a row was evaluated on a different
number of images, or when the sweep configuration differs. New rows and improvements are reported but pass.
Timing (`seconds`) and `config_hash` are never compared.

Write a baseline once, commit it, then gate every run:

    clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --write-baseline
    clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --tolerance 0.5

or, in your own pytest suite:

    from clebench.regression import assert_no_regression

    def test_cle_accuracy():
        assert_no_regression("runs/cifar10_ci", "results/cifar10_ci/baseline.json", tolerance=0.5)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clebench.config import load_config

KEY_COLUMNS = ["model", "dataset", "steps", "quant"]
RESULTS_COLUMNS = [
    *KEY_COLUMNS, "fp32_top1", "fp32_top5", "quant_top1", "quant_top5", "delta_top1",
    "n_images", "n_calibration", "seconds", "config_hash",
]  # fmt: skip
STATUSES = ("ok", "regressed", "improved", "missing", "new")
_DECIMALS = 6  # accuracy deltas are rounded before comparing, so 71.3 -> 70.8 is exactly a 0.5-point drop


@dataclass
class CheckResult:
    """Outcome of `check`.

    table: one row per key, baseline rows first: KEY_COLUMNS, baseline_top1, current_top1 (quantized top-1, %;
        NaN where the row is absent), delta (current - baseline, points), status (one of STATUSES).
    problems: why the check failed (empty when ok). notes: what was reported but does not fail.
    """

    ok: bool
    table: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 0.5


def read_results(results_csv: Path) -> pd.DataFrame:
    """results.csv as a DataFrame, checked for the schema's columns, unique keys and numeric accuracies."""
    results_csv = Path(results_csv)
    if not results_csv.is_file():
        raise FileNotFoundError(f"{results_csv} does not exist; run `clebench sweep` to write it (or pass the right results dir)")
    try:
        table = pd.read_csv(
            results_csv, dtype={c: str for c in KEY_COLUMNS + ["config_hash"]}, keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in RESULTS_COLUMNS if c not in KEY_COLUMNS + ["config_hash"]},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{results_csv} is not a readable CSV file ({error})") from None
    return _validated(table, str(results_csv))


def _validated(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in RESULTS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source} lacks the results.csv columns {missing}; it must have {RESULTS_COLUMNS}")
    for column in ("quant_top1", "n_images"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.loc[values.isna() & table[column].notna(), column]
        if len(bad):
            raise ValueError(f"{source}: column {column} holds non-numbers, e.g. {bad.iloc[0]!r}")
        table[column] = values
    duplicated = table[table.duplicated(KEY_COLUMNS, keep=False)]
    if len(duplicated):
        key = tuple(duplicated.iloc[0][KEY_COLUMNS])
        raise ValueError(f"{source} has {len(duplicated)} rows sharing a key, e.g. (model, dataset, steps, quant) = {key}; "
                         "each key must appear once")
    return table.reset_index(drop=True)


def write_baseline(results_csv: Path, baseline_json: Path, config: dict | None) -> None:
    """Store results.csv's rows and the sweep config as {"config": {...}, "rows": [{column: value}, ...]}."""
    table = read_results(results_csv)
    if table["quant_top1"].isna().any():
        key = tuple(table.loc[table["quant_top1"].isna(), KEY_COLUMNS].iloc[0])
        raise ValueError(f"{results_csv} has rows without quant_top1, e.g. {key}; a baseline needs a complete run")
    rows = [{k: _json_value(v) for k, v in row.items()} for row in table[RESULTS_COLUMNS].to_dict("records")]
    baseline_json = Path(baseline_json)
    baseline_json.parent.mkdir(parents=True, exist_ok=True)
    baseline_json.write_text(json.dumps({"config": config, "rows": rows}, indent=1, allow_nan=False) + "\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


def read_baseline(baseline_json: Path) -> tuple[dict | None, pd.DataFrame]:
    """(config, rows) of a baseline written by `write_baseline`."""
    baseline_json = Path(baseline_json)
    if not baseline_json.is_file():
        raise FileNotFoundError(
            f"baseline {baseline_json} does not exist; create it from a trusted run with "
            f"`clebench check <results_dir> --baseline {baseline_json} --write-baseline`"
        )
    try:
        data = json.loads(baseline_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"baseline {baseline_json} is not valid JSON ({error}); rewrite it with --write-baseline") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "config" not in data:
        raise ValueError(
            f"baseline {baseline_json} must be an object with \"config\" and a \"rows\" list; rewrite it with --write-baseline"
        )
    config = data["config"]
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"baseline {baseline_json}: \"config\" must be an object or null, got {type(config).__name__}")
    if not all(isinstance(row, dict) for row in data["rows"]):
        raise ValueError(f"baseline {baseline_json}: every entry of \"rows\" must be an object of results.csv columns")
    rows = pd.DataFrame(data["rows"], columns=RESULTS_COLUMNS if not data["rows"] else None)
    for column in KEY_COLUMNS:
        if column in rows.columns:
            rows[column] = rows[column].astype(str)
    rows = _validated(rows, f"baseline {baseline_json}")
    if rows["quant_top1"].isna().any():
        raise ValueError(f"baseline {baseline_json} has rows without quant_top1; rewrite it from a complete run")
    return config, rows


def config_differences(baseline: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts, one per differing (dotted) key."""
    if isinstance(baseline, dict) and isinstance(current, dict):
        differences = []
        for key in sorted(set(baseline) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in current:
                differences.append(f"{name}: in the baseline ({baseline[key]!r}) but not in the current config")
            elif key not in baseline:
                differences.append(f"{name}: in the current config ({current[key]!r}) but not in the baseline")
            else:
                differences += config_differences(baseline[key], current[key], name)
        return differences
    return [] if baseline == current else [f"{prefix or 'config'}: baseline {baseline!r}, current {current!r}"]


def _status(delta: float, tolerance: float) -> str:
    if math.isnan(delta):
        return "regressed"  # the current run produced no number
    if delta < -tolerance:
        return "regressed"
    return "improved" if delta > tolerance else "ok"


def check(results_csv: Path, baseline_json: Path, tolerance: float = 0.5, config: dict | None = None) -> CheckResult:
    """Compare results.csv with the baseline; `tolerance` is the allowed top-1 drop in points.

    `config` is the current sweep config (as `SweepConfig.to_dict()`); None skips the config comparison (noted).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number of top-1 points >= 0, got {tolerance!r}")
    baseline_config, baseline = read_baseline(baseline_json)
    current = read_results(results_csv)
    merged = baseline[KEY_COLUMNS + ["quant_top1", "n_images"]].merge(
        current[KEY_COLUMNS + ["quant_top1", "n_images"]], on=KEY_COLUMNS, how="outer", suffixes=("_base", "_cur"), indicator=True,
        sort=False,
    )
    order = {key: i for i, key in enumerate(map(tuple, baseline[KEY_COLUMNS].to_numpy()))}
    merged["_order"] = [order.get(tuple(k), len(order)) for k in merged[KEY_COLUMNS].to_numpy()]
    merged = merged.sort_values("_order", kind="stable").reset_index(drop=True)
    delta = (merged["quant_top1_cur"] - merged["quant_top1_base"]).round(_DECIMALS)
    status = [
        "missing" if side == "left_only" else "new" if side == "right_only" else _status(d, tolerance)
        for side, d in zip(merged["_merge"], delta)
    ]
    table = merged[KEY_COLUMNS].assign(
        baseline_top1=merged["quant_top1_base"], current_top1=merged["quant_top1_cur"], delta=delta, status=status
    )
    problems, notes = _row_messages(table, merged, tolerance)
    if config is None:
        notes.append("configuration not compared: no current config given (is config.toml missing from the results dir?)")
    elif baseline_config is None:
        notes.append(f"configuration not compared: baseline {baseline_json} stores none")
    else:
        problems += [f"config differs: {d}" for d in config_differences(baseline_config, config)]
    return CheckResult(ok=not problems, table=table, problems=problems, notes=notes, tolerance=float(tolerance))


def _row_messages(table: pd.DataFrame, merged: pd.DataFrame, tolerance: float) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    for i, row in table.iterrows():
        key = "/".join(row[KEY_COLUMNS])
        if row.status == "regressed" and math.isnan(row.current_top1):
            problems.append(f"{key}: quant_top1 is empty or NaN (baseline {row.baseline_top1:.2f})")
        elif row.status == "regressed":
            problems.append(f"{key}: quant_top1 {row.current_top1:.2f} is {-row.delta:.2f} points below the baseline "
                            f"{row.baseline_top1:.2f} (tolerance {tolerance:g})")
        elif row.status == "missing":
            problems.append(f"{key}: in the baseline but not in results.csv")
        elif row.status == "new":
            notes.append(f"{key}: new row (not in the baseline)")
        elif row.status == "improved":
            notes.append(f"{key}: improved by {row.delta:.2f} points; consider updating the baseline")
        images = merged.loc[i, ["n_images_base", "n_images_cur"]]
        if row.status not in ("missing", "new") and images.iloc[0] != images.iloc[1]:
            problems.append(f"{key}: evaluated on {images.iloc[1]:g} images, the baseline on {images.iloc[0]:g}")
    return problems, notes


def format_check(result: CheckResult) -> str:
    """The side-by-side table and the reasons, as a person reads them in a CI log."""
    verdict = "PASS" if result.ok else "FAIL"
    counts = result.table["status"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts) or "no rows"
    lines = [f"clebench check: {verdict} ({summary}; tolerance {result.tolerance:g} top-1 points)"]
    if len(result.table):
        shown = result.table.rename(columns={"baseline_top1": "baseline", "current_top1": "current"})
        lines.append(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.2f}"))
    lines += [f"FAIL  {p}" for p in result.problems] + [f"note  {n}" for n in result.notes]
    return "\n".join(lines)


def results_config(results_dir: str | Path) -> dict | None:
    """The configuration a results folder was made with, as plain data (None if the folder records none).

    meta.json holds the effective config a sweep ran (after --limit / --models); config.toml, the verbatim copy of
    the file given on the command line, is the fallback.
    """
    results_dir = Path(results_dir)
    meta_path = results_dir / "meta.json"
    if meta_path.is_file():
        config = json.loads(meta_path.read_text()).get("config")
        if config is not None:
            return config
    config_path = results_dir / "config.toml"
    return load_config(config_path).to_dict() if config_path.is_file() else None


def assert_no_regression(results_dir: str | Path, baseline: str | Path, tolerance: float = 0.5) -> None:
    """pytest helper: AssertionError carrying `format_check`'s text unless `results_dir` passes against `baseline`.

    The current config is `results_config(results_dir)`, as in `clebench check`.
    """
    results_dir = Path(results_dir)
    result = check(results_dir / "results.csv", Path(baseline), tolerance=tolerance, config=results_config(results_dir))
    if not result.ok:
        raise AssertionError(format_check(result))
