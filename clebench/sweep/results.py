"""A sweep's results folder: its files, their columns, and how they are written and read.

    results.csv          one row per (model, dataset, steps, quant): RESULT_COLUMNS
    ranges.csv           per layer and FP32 step prefix: weight-range statistics (clebench.ranges.LAYER_COLUMNS)
    channel_ranges.csv   per channel of the Fig. 2 layers (clebench.ranges.CHANNEL_COLUMNS)
    cle_sets.csv         per CLS set of each FP32 step prefix that scales (clebench.cle_diagnostics.CLE_SET_COLUMNS)
    cle_skipped.csv      per layer CLE left alone in such a prefix, with the reason (cle_diagnostics.SKIPPED_COLUMNS)
    cle_regions.csv      per region of each prefix ending in a region-CLE step (cle_diagnostics.REGION_COLUMNS)
    step_costs.csv       per FP32 step prefix: its last step's wall time and the layers it changed (STEP_COST_COLUMNS)
    sensitivity.csv      per-layer quantization sensitivity of some rows (`clebench sensitivity`, or a sweep's
                         [sensitivity] table; SENSITIVITY_COLUMNS)
    sensitivity.json     per such row: its images (requested and used), wall / CPU time, and the run's metadata
    predictions.npz      every row's per-image top-1 class (int16), FP32 and quantized, and the labels
    meta.json            the config, its hash, the machine and device, the last run's work counters
    results.md, *.png, report.html                   written from the files above by clebench.reporting.report
    .lock                held by the one process that writes the folder

Every file is replaced atomically (written beside, then renamed), so a reader never sees half a file.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from clebench.cle_diagnostics import CLE_SET_COLUMNS, REGION_COLUMNS, SKIPPED_COLUMNS
from clebench.errors import UserError
from clebench.ranges import CHANNEL_COLUMNS, LAYER_COLUMNS
from clebench.runtimes import RUNTIMES
from clebench.sensitivity import UNIT_COLUMNS

KEY_COLUMNS = ["model", "dataset", "steps", "quant"]
# One column family per deploy target (clebench.runtimes.engines.RUNTIMES), filled by a sweep that deploys to it:
# top-1 / top-5 (%), agreement (% of images with the simulation's top-1 class), and how many conv / matmul layers
# the runtime ran on integers and in float (a float one is a silent fallback, reported, never hidden).
DEPLOY_METRICS = ("top1", "top5", "agreement", "integer_layers", "float_layers")
# Folders written before OpenVINO had int8_top1 / int8_top5 / int8_agreement (ONNX Runtime) and "|int8" predictions.
LEGACY_DEPLOY_TARGET = "onnxruntime"
LEGACY_DEPLOY_COLUMNS = {f"int8_{metric}": f"{LEGACY_DEPLOY_TARGET}_{metric}" for metric in ("top1", "top5", "agreement")}
LEGACY_PREDICTION_KIND = "int8"
RESULT_COLUMNS = [
    *KEY_COLUMNS, "fp32_top1", "fp32_top5", "quant_top1", "quant_top5", "delta_top1",
    "n_images", "n_calibration", "seconds", "config_hash",
]  # fmt: skip
TIMING_COLUMNS = ["seconds"]
# The FP32 check of the row's steps (clebench.sweep.fp32_check) on the probe batch: the largest relative change of the
# logits that one of its exact steps (BN fold, CLS) made, and HBF's or aimet_cle's (blank without either). Older folders lack them.
CHECK_COLUMNS = ["fp32_step_change", "hbf_fp32_change"]


def deploy_column(target: str, metric: str) -> str:
    """results.csv column of deploy `target`'s `metric` (one of DEPLOY_METRICS), e.g. "openvino_top1"."""
    if metric not in DEPLOY_METRICS:
        raise ValueError(f"deploy metric must be one of {DEPLOY_METRICS}, got {metric!r}")
    return f"{target}_{metric}"


def deploy_columns(targets: Sequence[str]) -> list[str]:
    """The columns the deploy `targets` add to results.csv, target by target."""
    return [deploy_column(target, metric) for target in targets for metric in DEPLOY_METRICS]


def deploy_targets(columns: Sequence[str]) -> list[str]:
    """The deploy targets whose top-1 column is among `columns` (a results table's)."""
    return [target for target in RUNTIMES if deploy_column(target, "top1") in columns]


def upgrade_legacy(frame: pd.DataFrame) -> pd.DataFrame:
    """A results table with the int8_* columns of folders written before OpenVINO renamed to onnxruntime_*."""
    return frame.rename(columns=LEGACY_DEPLOY_COLUMNS)
RANGES_COLUMNS = ["model", "steps", *LAYER_COLUMNS]
CHANNEL_RANGES_COLUMNS = ["model", "steps", *CHANNEL_COLUMNS]
CLE_SETS_COLUMNS = ["model", "steps", *CLE_SET_COLUMNS]
CLE_SKIPPED_COLUMNS = ["model", "steps", *SKIPPED_COLUMNS]
CLE_REGIONS_COLUMNS = ["model", "steps", *REGION_COLUMNS]
# steps: an FP32 step prefix; step: its last step; step_seconds: that step's wall time (s, this machine);
# layers_changed: conv / linear layers whose weight or bias that step changed (cle_diagnostics.changed_layers).
STEP_COST_COLUMNS = ["model", "steps", "step", "step_seconds", "layers_changed"]
SENSITIVITY_COLUMNS = ["model", "steps", "quant", *UNIT_COLUMNS, "fp32_top1", "n_images"]

RESULTS_FILE = "results.csv"
RANGES_FILE = "ranges.csv"
CHANNEL_RANGES_FILE = "channel_ranges.csv"
CLE_SETS_FILE = "cle_sets.csv"
CLE_SKIPPED_FILE = "cle_skipped.csv"
CLE_REGIONS_FILE = "cle_regions.csv"
STEP_COSTS_FILE = "step_costs.csv"
SENSITIVITY_FILE = "sensitivity.csv"
SENSITIVITY_META_FILE = "sensitivity.json"
SENSITIVITY_KEY_COLUMNS = ["model", "steps", "quant"]
PREDICTIONS_FILE = "predictions.npz"
META_FILE = "meta.json"
REPORT_FILE = "report.html"
LOCK_FILE = ".lock"


class RowKey(NamedTuple):
    """What identifies a results row."""

    model: str
    dataset: str
    steps: str
    quant: str


class ResultsFolderError(UserError):
    """A results folder that cannot be used: locked by another sweep, or holding an unreadable file."""


def _replace_atomically(path: Path, write) -> None:
    """Call write(temporary_path), then rename it onto `path`; the temporary name is unique to this process."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Four decimals; the check columns' relative changes in two significant digits (4 decimals would write 0.0000
    for every change below 5e-5, the very range they must show)."""
    scientific = {c: frame[c].map(lambda v: "" if pd.isna(v) else f"{v:.1e}") for c in CHECK_COLUMNS if c in frame}
    _replace_atomically(path, lambda tmp: frame.assign(**scientific).to_csv(tmp, index=False, float_format="%.4f"))


def write_json(data: Any, path: Path) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    """A JSON object file; a truncated or non-object file is an error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsFolderError(f"{path} is not valid JSON ({error}); it may be truncated: delete it to start over") from None
    if not isinstance(data, dict):
        raise ResultsFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_sensitivity(out: Path, key: RowKey, table: pd.DataFrame, meta: dict, order: Sequence[RowKey] = ()) -> None:
    """Put row `key`'s sensitivity table (SENSITIVITY_COLUMNS) into out/sensitivity.csv and `meta` into
    sensitivity.json, replacing what they held of that row and keeping the other rows: those of `order` in its order,
    then the others in the order they were written (a rewritten row last)."""
    path, meta_path = out / SENSITIVITY_FILE, out / SENSITIVITY_META_FILE
    tables = {}
    if path.is_file():
        old = pd.read_csv(path).reindex(columns=SENSITIVITY_COLUMNS)
        tables = {tuple(map(str, name)): group for name, group in old.groupby(SENSITIVITY_KEY_COLUMNS, sort=False)}
    recorded = read_json(meta_path) if meta_path.is_file() else {}
    tables.pop((key.model, key.steps, key.quant), None)
    recorded.pop("|".join(key), None)
    tables[(key.model, key.steps, key.quant)], recorded["|".join(key)] = table, meta
    ranks = {(k.model, k.steps, k.quant): i for i, k in enumerate(order)}

    def rank(name: tuple[str, ...]) -> int:  # sorted() is stable: rows not in `order` keep their order
        return ranks.get(name, len(ranks))

    write_csv(pd.concat([tables[name] for name in sorted(tables, key=rank)], ignore_index=True), path)
    write_json({name: recorded[name] for name in sorted(recorded, key=lambda n: rank(_sensitivity_name(n)))}, meta_path)


def _sensitivity_name(meta_key: str) -> tuple[str, ...]:
    """(model, steps, quant) of a sensitivity.json key, "model|dataset|steps|quant"."""
    model, _, steps, quant = meta_key.split("|")
    return model, steps, quant


def measured_sensitivity(out: Path, images: int) -> set[RowKey]:
    """The rows whose sensitivity `out` holds, measured on `images` requested images (entries written before
    sensitivity.json recorded the request: on that many images)."""
    path, meta_path = out / SENSITIVITY_FILE, out / SENSITIVITY_META_FILE
    if not (path.is_file() and meta_path.is_file()):
        return set()
    in_table = set(pd.read_csv(path, usecols=SENSITIVITY_KEY_COLUMNS).astype(str).itertuples(index=False, name=None))
    return {RowKey(*name.split("|")) for name, entry in read_json(meta_path).items()
            if entry.get("images_requested", entry.get("images")) == images and _sensitivity_name(name) in in_table}


def prediction_name(key: RowKey, kind: str) -> str:
    """Array name in predictions.npz: kind "fp32" or "quant" (the simulated row) or a deploy target's name."""
    return "|".join((*key, kind))


def labels_name(model: str, dataset: str) -> str:
    """Array name in predictions.npz of the labels of the images `model`'s rows were evaluated on."""
    return f"{model}|{dataset}|labels"


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a predictions.npz ({} when the file is absent); a corrupt file is an error naming it.

    Arrays of an older folder's "int8" kind are returned under the "onnxruntime" kind, which they were.
    """
    if not path.is_file():
        return {}
    legacy = f"|{LEGACY_PREDICTION_KIND}"
    try:
        with np.load(path) as archive:
            return {(name.removesuffix(legacy) + f"|{LEGACY_DEPLOY_TARGET}" if name.endswith(legacy) else name):
                    archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ResultsFolderError(f"{path} cannot be read ({error}); delete it and re-run the sweep") from None


def write_predictions(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """int16 class indices, compressed (CIFAR-10 and ImageNet class indices fit in int16)."""

    def write(temporary: Path) -> None:
        with temporary.open("wb") as file:
            np.savez_compressed(file, **{name: np.asarray(values, dtype=np.int16) for name, values in arrays.items()})

    _replace_atomically(path, write)


def row_differences(first: Path, second: Path) -> list[str]:
    """How two results folders differ in their rows ([] when they hold the same): results.csv apart from
    TIMING_COLUMNS, ranges.csv and channel_ranges.csv byte for byte, and the per-image predictions."""
    found = []
    tables = [pd.read_csv(folder / RESULTS_FILE).drop(columns=TIMING_COLUMNS).to_csv() for folder in (first, second)]
    if tables[0] != tables[1]:
        found.append(f"{RESULTS_FILE} differs (apart from {', '.join(TIMING_COLUMNS)})")
    for name in (RANGES_FILE, CHANNEL_RANGES_FILE):
        if (first / name).read_bytes() != (second / name).read_bytes():
            found.append(f"{name} differs")
    ours, theirs = (read_predictions(folder / PREDICTIONS_FILE) for folder in (first, second))
    if ours.keys() != theirs.keys() or any((ours[k] != theirs[k]).any() for k in ours):
        found.append(f"{PREDICTIONS_FILE} differs")
    return found


class FolderLock:
    """An exclusive, non-blocking lock on a results folder for as long as one sweep writes it.

    The OS releases it when the process ends, killed or not, so a crashed sweep never leaves a stale lock.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ResultsFolderError(
                f"{self.path.parent} is being written by another sweep ({holder}); wait for it to finish or choose "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
