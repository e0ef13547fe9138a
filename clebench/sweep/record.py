"""Record a sweep: the only writer of a results folder's results.csv, ranges.csv, channel_ranges.csv,
cle_sets.csv, cle_skipped.csv, cle_regions.csv, step_costs.csv, predictions.npz and meta.json; sensitivity.csv and sensitivity.json through
results.write_sensitivity, as `clebench sensitivity` writes them.

The recorder runs in the driver. It locks the folder, refuses a folder of another config, and records each finished
unit at once, every file in a canonical order (config order) whatever order the units finish in, so a local run and
a distributed one write the same bytes and an interrupted sweep resumes where it stopped. A unit's ranges and
predictions are written before its rows: a row in results.csv implies the rest of it is on disk.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clebench.sweep import results
from clebench.errors import UserError
from clebench.sweep.execute import UnitResult, Work
from clebench.sweep.results import RowKey


class RecordError(UserError):
    """A results folder that belongs to another sweep configuration."""


class Recorder:
    """Writes `out` for a sweep of config hash `config_hash`; use as a context manager (it holds the folder lock).

    row_order: every row of the sweep, in config order. range_order: every (model, steps) whose ranges are recorded,
    in config order. meta: what meta.json records about this run (config, command, machine, device ...).
    columns: of results.csv (RESULT_COLUMNS, then results.deploy_columns(targets) for a sweep that deploys).
    sensitivity_order: the rows of the config's [sensitivity] table, the order of sensitivity.csv.
    """

    def __init__(self, out: str | Path, meta: dict, row_order: Sequence[RowKey],
                 range_order: Sequence[tuple[str, str]], columns: Sequence[str] = results.RESULT_COLUMNS,
                 sensitivity_order: Sequence[RowKey] = ()) -> None:
        self.out = Path(out)
        self.sensitivity_order = list(sensitivity_order)
        self.columns = list(columns)
        self.meta = meta
        self.row_order = list(row_order)
        self.range_order = list(range_order)
        self.lock = results.FolderLock(self.out)
        self.rows: dict[RowKey, dict] = {}
        self.layer_ranges: dict[tuple[str, str], pd.DataFrame] = {}
        self.channel_ranges: dict[tuple[str, str], pd.DataFrame] = {}
        self.cle_sets: dict[tuple[str, str], pd.DataFrame] = {}
        self.cle_skipped: dict[tuple[str, str], pd.DataFrame] = {}
        self.cle_regions: dict[tuple[str, str], pd.DataFrame] = {}
        self.step_costs: dict[tuple[str, str], pd.DataFrame] = {}
        self.predictions: dict[str, np.ndarray] = {}

    def __enter__(self) -> Recorder:
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    @property
    def done(self) -> set[RowKey]:
        return set(self.rows)

    def _open(self) -> None:
        meta_path = self.out / results.META_FILE
        if meta_path.exists():
            previous = results.read_json(meta_path).get("config_hash")
            if previous != self.meta["config_hash"]:
                raise RecordError(
                    f"{self.out} holds results of another configuration (config hash {previous}, this one is "
                    f"{self.meta['config_hash']}); choose another --out or delete the folder"
                )
        results.write_json(self.meta, meta_path)
        results_path = self.out / results.RESULTS_FILE
        if results_path.exists():
            frame = results.upgrade_legacy(pd.read_csv(results_path, dtype={"config_hash": str}))
            self.rows = {RowKey(*(str(row[c]) for c in results.KEY_COLUMNS)): row for row in frame.to_dict("records")}
        self.layer_ranges = _read_by_prefix(self.out / results.RANGES_FILE)
        self.channel_ranges = _read_by_prefix(self.out / results.CHANNEL_RANGES_FILE)
        self.cle_sets = _read_by_prefix(self.out / results.CLE_SETS_FILE)
        self.cle_skipped = _read_by_prefix(self.out / results.CLE_SKIPPED_FILE)
        self.cle_regions = _read_by_prefix(self.out / results.CLE_REGIONS_FILE)
        self.step_costs = _read_by_prefix(self.out / results.STEP_COSTS_FILE)
        self.predictions = results.read_predictions(self.out / results.PREDICTIONS_FILE)

    def record(self, result: UnitResult) -> None:
        """Add a finished unit's output and rewrite the files (rows last); a sensitivity row's meta is this run's."""
        self.layer_ranges.update(result.layer_ranges)
        self.channel_ranges.update(result.channel_ranges)
        self.cle_sets.update(result.cle_sets)
        self.cle_skipped.update(result.cle_skipped)
        self.cle_regions.update(result.cle_regions)
        self.step_costs.update(result.step_costs)
        self.predictions.update(result.predictions)
        self.rows.update(result.rows)
        results.write_predictions(self.predictions, self.out / results.PREDICTIONS_FILE)
        for tables, filename, columns in (
            (self.layer_ranges, results.RANGES_FILE, results.RANGES_COLUMNS),
            (self.channel_ranges, results.CHANNEL_RANGES_FILE, results.CHANNEL_RANGES_COLUMNS),
            (self.cle_sets, results.CLE_SETS_FILE, results.CLE_SETS_COLUMNS),
            (self.cle_skipped, results.CLE_SKIPPED_FILE, results.CLE_SKIPPED_COLUMNS),
            (self.cle_regions, results.CLE_REGIONS_FILE, results.CLE_REGIONS_COLUMNS),
            (self.step_costs, results.STEP_COSTS_FILE, results.STEP_COST_COLUMNS),
        ):
            if tables:
                ordered = [tables[key] for key in _ordered(tables, self.range_order)]
                results.write_csv(pd.concat(ordered, ignore_index=True)[columns], self.out / filename)
        for key, measured in result.sensitivity.items():
            results.write_sensitivity(self.out, key, measured.table, {**measured.measurement, **self.meta},
                                      self.sensitivity_order)
        results.write_csv(self.table(), self.out / results.RESULTS_FILE)

    def table(self) -> pd.DataFrame:
        """Every recorded row, in config order (rows of keys no longer in the config at the end)."""
        return pd.DataFrame([self.rows[key] for key in _ordered(self.rows, self.row_order)], columns=self.columns)

    def finish(self, work: Work, extra: dict) -> None:
        """Store this run's work counters (and wall time, memory ...) in meta.json."""
        self.meta["last_run_work"] = {**work.__dict__, **extra}
        results.write_json(self.meta, self.out / results.META_FILE)


def _ordered(recorded, order: Sequence) -> list:
    known = set(order)
    return [key for key in order if key in recorded] + [key for key in recorded if key not in known]


def _read_by_prefix(path: Path) -> dict[tuple[str, str], pd.DataFrame]:
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    return {(str(model), str(name)): group for (model, name), group in frame.groupby(["model", "steps"], sort=False)}
