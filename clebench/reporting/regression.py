"""CI regression gate: compare a sweep's results.csv with a committed baseline JSON.

Rows are keyed by (model, dataset, steps, quant). The gate fails when a quantized top-1 falls more than
`tolerance` points **and** more than `min_images` images below the baseline, when a baseline row is missing, when a
row was evaluated on a different number of images, or when the sweep configuration differs. New rows and
improvements are reported but pass. Timing (`seconds`) and `config_hash` are never compared.

Both conditions matter: on a small evaluation set one image is a large step (0.5 points of 200 images), and a run on
another device flips a few images near a rounding boundary (float reduction order differs), which is no regression.
When the results folder and the baseline both hold per-image predictions (predictions.npz, and the baseline's
sidecar `<baseline>.predictions.npz`), the report names per row how many images changed their prediction and how
many of those changed from right to wrong or back. Baseline and run record their device and precision; a
cross-device comparison says so.

Write a baseline once, commit it, then gate every run:

    clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --write-baseline
    clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --tolerance 0.5

or, in your own pytest suite:

    from clebench.reporting.regression import assert_no_regression

    def test_cle_accuracy():
        assert_no_regression("runs/cifar10_ci", "results/cifar10_ci/baseline.json", tolerance=0.5)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from clebench.sweep import results
from clebench.sweep.config import load_config
from clebench.sweep.results import KEY_COLUMNS, RESULT_COLUMNS, RowKey

DEVICE_KEYS = ("device", "device_name", "precision")  # what meta.json and a baseline record about the hardware
DEFAULT_MIN_IMAGES = 3
STATUSES = ("ok", "regressed", "improved", "missing", "new")
_DECIMALS = 6  # accuracy deltas are rounded before comparing, so 71.3 -> 70.8 is exactly a 0.5-point drop


@dataclass
class CheckResult:
    """Outcome of `check`.

    table: one row per key, baseline rows first: KEY_COLUMNS, baseline_top1, current_top1 (quantized top-1, %;
        NaN where the row is absent), delta (current - baseline, points), changed (images whose top-1 prediction
        changed), changed_correctness (of those, images that went from right to wrong or back; both NaN without
        predictions), status (one of STATUSES).
    problems: why the check failed (empty when ok). notes: what was reported but does not fail.
    """

    ok: bool
    table: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 0.5
    min_images: int = DEFAULT_MIN_IMAGES


def read_results(results_csv: Path) -> pd.DataFrame:
    """results.csv as a DataFrame, checked for the schema's columns, unique keys and numeric accuracies."""
    results_csv = Path(results_csv)
    if not results_csv.is_file():
        raise FileNotFoundError(f"{results_csv} does not exist; run `clebench sweep` to write it (or pass the right results dir)")
    try:
        table = pd.read_csv(
            results_csv, dtype={c: str for c in KEY_COLUMNS + ["config_hash"]}, keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in RESULT_COLUMNS if c not in KEY_COLUMNS + ["config_hash"]},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{results_csv} is not a readable CSV file ({error})") from None
    return _validated(table, str(results_csv))


def _validated(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source} lacks the results.csv columns {missing}; it must have {RESULT_COLUMNS}")
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


def baseline_predictions_path(baseline_json: Path) -> Path:
    """The sidecar holding a baseline's per-image predictions: baseline.json -> baseline.predictions.npz."""
    baseline_json = Path(baseline_json)
    return baseline_json.with_name(baseline_json.stem + ".predictions.npz")


def write_baseline(results_csv: Path, baseline_json: Path, config: dict | None, device: dict | None = None) -> None:
    """Store results.csv's rows, the sweep config and the device as {"config", "device", "rows"}.

    The folder's per-image predictions of those rows (if it has predictions.npz) go to the sidecar
    `baseline_predictions_path(baseline_json)`.
    """
    table = read_results(results_csv)
    if table["quant_top1"].isna().any():
        key = tuple(table.loc[table["quant_top1"].isna(), KEY_COLUMNS].iloc[0])
        raise ValueError(f"{results_csv} has rows without quant_top1, e.g. {key}; a baseline needs a complete run")
    rows = [{k: _json_value(v) for k, v in row.items()} for row in table[RESULT_COLUMNS].to_dict("records")]
    baseline_json = Path(baseline_json)
    baseline_json.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": config, "device": device, "rows": rows}
    baseline_json.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    predictions = results.read_predictions(Path(results_csv).parent / results.PREDICTIONS_FILE)
    kept = _row_predictions(predictions, table)
    sidecar = baseline_predictions_path(baseline_json)
    if kept:
        results.write_predictions(kept, sidecar)
    else:
        sidecar.unlink(missing_ok=True)


def _row_predictions(predictions: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The arrays of predictions.npz that belong to `table`'s rows: quantized predictions and labels."""
    kept = {}
    for values in table[KEY_COLUMNS].itertuples(index=False):
        key = RowKey(*values)
        for name in (results.prediction_name(key, "quant"), results.labels_name(key.model, key.dataset)):
            if name in predictions:
                kept[name] = predictions[name]
    return kept


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


class Baseline(NamedTuple):
    """A baseline written by `write_baseline`; device is None in baselines written before it was recorded."""

    config: dict | None
    rows: pd.DataFrame
    device: dict | None
    predictions: dict[str, np.ndarray]


def read_baseline(baseline_json: Path) -> Baseline:
    """The baseline file and its predictions sidecar (empty when absent)."""
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
    rows = pd.DataFrame(data["rows"], columns=RESULT_COLUMNS if not data["rows"] else None)
    for column in KEY_COLUMNS:
        if column in rows.columns:
            rows[column] = rows[column].astype(str)
    rows = _validated(rows, f"baseline {baseline_json}")
    if rows["quant_top1"].isna().any():
        raise ValueError(f"baseline {baseline_json} has rows without quant_top1; rewrite it from a complete run")
    device = data.get("device")
    if device is not None and not isinstance(device, dict):
        raise ValueError(f"baseline {baseline_json}: \"device\" must be an object or null, got {type(device).__name__}")
    return Baseline(config, rows, device, results.read_predictions(baseline_predictions_path(baseline_json)))


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


def _status(delta: float, lost_images: float, tolerance: float, min_images: int) -> str:
    if math.isnan(delta):
        return "regressed"  # the current run produced no number
    if delta < -tolerance and lost_images > min_images:
        return "regressed"
    return "improved" if delta > tolerance else "ok"


def check(results_csv: Path, baseline_json: Path, tolerance: float = 0.5, config: dict | None = None,
          min_images: int = DEFAULT_MIN_IMAGES, device: dict | None = None) -> CheckResult:
    """Compare results.csv with the baseline.

    tolerance: allowed top-1 drop in points; min_images: allowed drop in images (a row fails only past both).
    config: the current sweep config (as `SweepConfig.to_dict()`); None skips the config comparison (noted).
    device: the current run's DEVICE_KEYS (from its meta.json); compared with the baseline's and noted when they differ.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number of top-1 points >= 0, got {tolerance!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 0:
        raise ValueError(f"min_images must be an integer >= 0, got {min_images!r}")
    baseline = read_baseline(baseline_json)
    current = read_results(results_csv)
    merged = baseline.rows[KEY_COLUMNS + ["quant_top1", "n_images"]].merge(
        current[KEY_COLUMNS + ["quant_top1", "n_images"]], on=KEY_COLUMNS, how="outer", suffixes=("_base", "_cur"), indicator=True,
        sort=False,
    )
    order = {key: i for i, key in enumerate(map(tuple, baseline.rows[KEY_COLUMNS].to_numpy()))}
    merged["_order"] = [order.get(tuple(k), len(order)) for k in merged[KEY_COLUMNS].to_numpy()]
    merged = merged.sort_values("_order", kind="stable").reset_index(drop=True)
    delta = (merged["quant_top1_cur"] - merged["quant_top1_base"]).round(_DECIMALS)
    lost_images = (-delta * merged["n_images_cur"] / 100).round()
    status = [
        "missing" if side == "left_only" else "new" if side == "right_only" else _status(d, lost, tolerance, min_images)
        for side, d, lost in zip(merged["_merge"], delta, lost_images)
    ]
    table = merged[KEY_COLUMNS].assign(
        baseline_top1=merged["quant_top1_base"], current_top1=merged["quant_top1_cur"], delta=delta,
        **_flips(merged, baseline.predictions, results.read_predictions(Path(results_csv).parent / results.PREDICTIONS_FILE)),
        status=status,
    )
    problems, notes = _row_messages(table, merged, tolerance, min_images)
    if config is None:
        notes.append("configuration not compared: no current config given (is config.toml missing from the results dir?)")
    elif baseline.config is None:
        notes.append(f"configuration not compared: baseline {baseline_json} stores none")
    else:
        problems += [f"config differs: {d}" for d in config_differences(baseline.config, config)]
    if table["changed"].isna().all() and len(table):
        notes.append("per-image changes not counted: the results folder or the baseline holds no predictions")
    notes += _device_notes(baseline.device, device)
    return CheckResult(ok=not problems, table=table, problems=problems, notes=notes, tolerance=float(tolerance),
                       min_images=min_images)


def _flips(merged: pd.DataFrame, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, list]:
    """Per row: images whose top-1 prediction changed, and of those, whose correctness changed (NaN: not known)."""
    changed, changed_correctness = [], []
    for values in merged[KEY_COLUMNS].itertuples(index=False):
        key = RowKey(*values)
        name, labels_name = results.prediction_name(key, "quant"), results.labels_name(key.model, key.dataset)
        arrays = [before.get(name), after.get(name), after.get(labels_name, before.get(labels_name))]
        if any(a is None for a in arrays) or not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
            changed.append(math.nan)
            changed_correctness.append(math.nan)
            continue
        old, new, labels = arrays
        changed.append(int((old != new).sum()))
        changed_correctness.append(int(((old == labels) != (new == labels)).sum()))
    return {"changed": changed, "changed_correctness": changed_correctness}


def _device_notes(baseline: dict | None, current: dict | None) -> list[str]:
    if baseline is None or current is None:
        return ["device not compared: the baseline or the run does not record it"]
    describe = lambda d: f"{d.get('device')} ({d.get('device_name')}, {d.get('precision')})"  # noqa: E731
    if all(baseline.get(k) == current.get(k) for k in DEVICE_KEYS):
        return []
    return [f"cross-device comparison: baseline on {describe(baseline)}, this run on {describe(current)}; float "
            "reduction order differs, so a few images near a rounding boundary may flip"]


def _row_messages(table: pd.DataFrame, merged: pd.DataFrame, tolerance: float,
                  min_images: int) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    for i, row in table.iterrows():
        key = "/".join(row[KEY_COLUMNS])
        images = merged.loc[i, ["n_images_base", "n_images_cur"]]
        if row.status == "regressed" and math.isnan(row.current_top1):
            problems.append(f"{key}: quant_top1 is empty or NaN (baseline {row.baseline_top1:.2f})")
        elif row.status == "regressed":
            lost = round(-row.delta * images.iloc[1] / 100)
            problems.append(f"{key}: quant_top1 {row.current_top1:.2f} is {-row.delta:.2f} points ({lost:g} images) "
                            f"below the baseline {row.baseline_top1:.2f} (tolerance {tolerance:g} points and "
                            f"{min_images} images)")
        elif row.status == "missing":
            problems.append(f"{key}: in the baseline but not in results.csv")
        elif row.status == "new":
            notes.append(f"{key}: new row (not in the baseline)")
        elif row.status == "improved":
            notes.append(f"{key}: improved by {row.delta:.2f} points; consider updating the baseline")
        if row.status not in ("missing", "new") and images.iloc[0] != images.iloc[1]:
            problems.append(f"{key}: evaluated on {images.iloc[1]:g} images, the baseline on {images.iloc[0]:g}")
    return problems, notes


def format_check(result: CheckResult) -> str:
    """The side-by-side table and the reasons, as a person reads them in a CI log."""
    verdict = "PASS" if result.ok else "FAIL"
    counts = result.table["status"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts) or "no rows"
    lines = [f"clebench check: {verdict} ({summary}; a row fails below {result.tolerance:g} top-1 points and "
             f"{result.min_images} images)"]
    if len(result.table):
        shown = result.table.rename(columns={"baseline_top1": "baseline", "current_top1": "current",
                                             "changed_correctness": "right<>wrong"})
        lines.append(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.2f}"))
    lines += [f"FAIL  {p}" for p in result.problems] + [f"note  {n}" for n in result.notes]
    return "\n".join(lines)


def results_device(results_dir: str | Path) -> dict | None:
    """The DEVICE_KEYS a results folder's meta.json records (None if it has no meta.json or they are absent)."""
    meta_path = Path(results_dir) / results.META_FILE
    if not meta_path.is_file():
        return None
    meta = results.read_json(meta_path)
    return {k: meta[k] for k in DEVICE_KEYS} if all(k in meta for k in DEVICE_KEYS) else None


def results_config(results_dir: str | Path) -> dict | None:
    """The configuration a results folder was made with, as plain data (None if the folder records none).

    meta.json holds the effective config a sweep ran (after --limit / --models); config.toml, the verbatim copy of
    the file given on the command line, is the fallback.
    """
    results_dir = Path(results_dir)
    meta_path = results_dir / results.META_FILE
    if meta_path.is_file():
        config = results.read_json(meta_path).get("config")
        if config is not None:
            return config
    config_path = results_dir / "config.toml"
    return load_config(config_path).to_dict() if config_path.is_file() else None


def assert_no_regression(results_dir: str | Path, baseline: str | Path, tolerance: float = 0.5,
                         min_images: int = DEFAULT_MIN_IMAGES) -> None:
    """pytest helper: AssertionError carrying `format_check`'s text unless `results_dir` passes against `baseline`.

    The current config and device come from the results folder, as in `clebench check`.
    """
    results_dir = Path(results_dir)
    result = check(results_dir / results.RESULTS_FILE, Path(baseline), tolerance=tolerance,
                   config=results_config(results_dir), min_images=min_images, device=results_device(results_dir))
    if not result.ok:
        raise AssertionError(format_check(result))
