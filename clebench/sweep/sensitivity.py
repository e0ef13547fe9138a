"""`clebench sensitivity`: the per-layer sensitivity table of one sweep row, written into a results folder.

The row is built exactly as a sweep builds it (same FP32 prefixes, bias correction, calibration images and
activation-range memo, through clebench.sweep.execute), then clebench.sensitivity runs on the config's first
data.limit class-balanced evaluation images. sensitivity.csv keeps the rows of other sweep rows already there;
sensitivity.json records per row the command, the wall and CPU time (all threads; the steadier figure on a shared
machine) and the machine.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from clebench.data import datasets
from clebench.quant import QuantConfig
from clebench.sweep import results, steps
from clebench.sweep.config import SweepConfig
from clebench.sweep.execute import Memo, Resources, Settings, peak_memory_mib, row_sensitivity
from clebench.sweep.results import RowKey
from clebench.sweep.run import check_models, run_metadata

SENSITIVITY_META_FILE = "sensitivity.json"


def run_row_sensitivity(config: SweepConfig, combination: str, quant: str, out: str | Path, *,
                        data_root: str | Path | None = None, models_dir: str | Path | None = None,
                        device: str = "cpu", progress: bool = True, command: str | None = None) -> pd.DataFrame:
    """Sensitivity of the row (config's one model, `combination`, `quant`) on config.data.limit images; returns the
    row's table (results.SENSITIVITY_COLUMNS) after writing it into `out`."""
    parsed = steps.parse_combination(combination)
    quant_name = QuantConfig.from_name(quant).name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(config, datasets.data_root(data_root).resolve(),
                        None if models_dir is None else Path(models_dir).resolve(), device, progress)
    loaded, _ = check_models(config, settings.models_dir)
    spec = config.models[0]
    steps.check_for_model(parsed, loaded[spec.name], spec.name)
    key = RowKey(spec.name, config.data.dataset, steps.combination_name(parsed), quant_name)
    started, cpu_started = time.perf_counter(), time.process_time()
    with results.FolderLock(out):
        table = row_sensitivity(key, settings, Resources(settings, loaded), Memo())
        seconds, cpu_seconds = round(time.perf_counter() - started, 1), round(time.process_time() - cpu_started, 1)
        _write(out, key, table, {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": int(table["n_images"].iloc[0]),
                                 "calibration_images": config.data.calibration, "peak_memory_mib": peak_memory_mib(),
                                 **run_metadata(settings, command)})
    return table


def _write(out: Path, key: RowKey, table: pd.DataFrame, meta: dict) -> None:
    path = out / results.SENSITIVITY_FILE
    frames = [table]
    if path.is_file():
        old = pd.read_csv(path)
        same = (old[["model", "steps", "quant"]].astype(str) == [key.model, key.steps, key.quant]).all(axis=1)
        frames.insert(0, old[~same].reindex(columns=results.SENSITIVITY_COLUMNS))
    results.write_csv(pd.concat(frames, ignore_index=True), path)
    meta_path = out / SENSITIVITY_META_FILE
    recorded = results.read_json(meta_path) if meta_path.is_file() else {}
    recorded["|".join(key)] = meta
    results.write_json(recorded, meta_path)
