"""`clebench sensitivity`: the per-layer sensitivity table of one sweep row, written into a results folder.

The row is measured by the same work unit a sweep with a [sensitivity] table runs (clebench.sweep.plan
.sensitivity_unit through clebench.sweep.execute: same FP32 prefixes, bias correction and calibration images), on
the config's first `images` class-balanced evaluation images, with a memo of its own (the memo's activation ranges
are keyed by the model, not by the calibration images, so a memo is only shared within one sweep). sensitivity.csv
keeps the rows of other sweep rows already there; sensitivity.json records per row the images, the wall and CPU time
of the measurement (all threads; the steadier figure on a shared machine), the command and the machine.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from clebench.data import datasets
from clebench.quant import QuantConfig
from clebench.sweep import plan, results, steps
from clebench.sweep.config import SensitivitySpec, SweepConfig
from clebench.sweep.execute import Memo, Resources, Settings, execute_unit
from clebench.sweep.results import RowKey
from clebench.sweep.run import check_models, run_metadata


def run_row_sensitivity(config: SweepConfig, combination: str, quant: str, out: str | Path, *, images: int,
                        data_root: str | Path | None = None, models_dir: str | Path | None = None,
                        device: str = "cpu", progress: bool = True, command: str | None = None) -> pd.DataFrame:
    """Sensitivity of the row (config's first model, `combination`, `quant`) on `images` class-balanced evaluation
    images; returns the row's table (results.SENSITIVITY_COLUMNS) after writing it into `out`."""
    parsed = steps.parse_combination(combination, config.custom_steps)
    quant_name = QuantConfig.from_name(quant).name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Only the ranked images are evaluated: with data.limit = images the model's evaluation set is that subset.
    config = replace(config.with_limit(images), sensitivity=SensitivitySpec(images))
    settings = Settings(config, datasets.data_root(data_root).resolve(),
                        None if models_dir is None else Path(models_dir).resolve(), device, progress)
    loaded, _ = check_models(config, settings.models_dir)
    spec = config.models[0]
    steps.check_for_model(parsed, loaded[spec.name], spec.name)
    key = RowKey(spec.name, config.data.dataset, steps.combination_name(parsed), quant_name)
    with results.FolderLock(out):
        measured = execute_unit(plan.sensitivity_unit(spec, key), settings, Resources(settings, loaded), Memo()).sensitivity[key]
        results.write_sensitivity(out, key, measured.table, {**measured.measurement, **run_metadata(settings, command)})
    return measured.table
