"""Run models x step combinations x quantization settings and write results.csv, ranges.csv and the report.

Work that rows share is done once: each model and data split is loaded once; each FP32 step prefix is computed once
(one deep copy per prefix); FP32 accuracy is measured once per distinct model (models are identified by a hash of
their weights and modules, so a step that changes nothing, such as relu6_to_relu on ResNet18, costs nothing); each
distinct (model, bias correction, quantization setting) is evaluated once; and activation ranges are observed once per
distinct FP32 model and activation setting (weight settings do not change them).

Rows are written as they finish (atomically, in config order), so an interrupted sweep loses nothing and a re-run
of the same config skips finished rows.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import clebench
from clebench import data, graph, ranges, steps
from clebench.bias_correction import correct_bias
from clebench.config import FIRST_DEPTHWISE, ModelSpec, SweepConfig
from clebench.evaluation import evaluate
from clebench.models import Preprocessing, load_model, model_label_space, model_preprocessing
from clebench.quant import QuantConfig, QuantSim

RESULT_COLUMNS = [
    "model", "dataset", "steps", "quant", "fp32_top1", "fp32_top5", "quant_top1", "quant_top5", "delta_top1",
    "n_images", "n_calibration", "seconds", "config_hash",
]
KEY_COLUMNS = ["model", "dataset", "steps", "quant"]
TIMING_COLUMNS = ["seconds"]
LABEL_SPACES = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet", "imagenette": "imagenet"}


class SweepError(ValueError):
    """A sweep that cannot start (wrong model for the data, a results folder of another config ...)."""


def fingerprint(model: nn.Module) -> str:
    """Identity of a model's function: its module types and every parameter and buffer value."""
    digest = hashlib.sha1()
    digest.update(" ".join(type(m).__name__ for m in model.modules()).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_csv_atomically(frame: pd.DataFrame, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    frame.to_csv(temporary, index=False, float_format="%.4f")
    os.replace(temporary, path)


@dataclass
class WorkCounter:
    """Forward passes over the data the sweep actually made, next to the rows it filled, and what they cost."""

    rows: int = 0
    fp32_evaluations: int = 0
    calibrations: int = 0
    quantized_evaluations: int = 0
    wall_seconds: float = 0.0
    peak_memory_mib: float | None = None  # resident set of the process (GPU memory is not counted)


def peak_memory_mib() -> float | None:
    """Peak resident memory of this process so far, in MiB; None where the OS does not report it (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@dataclass
class ModelRun:
    """One model's data and caches while its rows are computed."""

    spec: ModelSpec
    base: steps.PipelineState
    eval_set: data.ImageSet
    calibration_set: data.ImageSet
    calibration_batches: list[tuple[torch.Tensor, torch.Tensor]]  # normalized once, reused by every quantized row
    preprocessing: Preprocessing
    prefixes: dict[steps.Combination, tuple[steps.PipelineState, str]] = field(default_factory=dict)
    fp32: dict[str, dict] = field(default_factory=dict)  # fingerprint -> accuracy
    quantized: dict[tuple[str, str | None, str], dict] = field(default_factory=dict)
    activation_ranges: dict[tuple, dict[str, tuple[float, float]]] = field(default_factory=dict)


class Sweep:
    """A sweep of `config` into `out` on `device`; `run()` does the work."""

    def __init__(
        self,
        config: SweepConfig,
        out: str | Path,
        *,
        data_root: str | Path | None = None,
        models_dir: str | Path | None = None,
        device: str = "cpu",
        progress: bool = True,
        command: str | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.data_root = data.data_root(data_root)
        self.models_dir = models_dir
        self.device = torch.device(device)
        self.progress = progress
        self.command = command
        self.work = WorkCounter()
        self.combinations = config.combinations
        self.quant_configs = config.quant_configs
        self._images: dict[tuple, data.ImageSet] = {}

    # -- set-up ---------------------------------------------------------------------------------------------
    def _check_models(self) -> tuple[dict[str, nn.Module], dict[str, list[steps.Combination]]]:
        """Load every model and check it against the data and the steps, before any evaluation.

        Returns the models and, per model, the step combinations it runs.
        """
        wanted_labels = LABEL_SPACES[self.config.data.dataset]
        loaded, usable = {}, {}
        for spec in self.config.models:
            if model_label_space(spec.name) != wanted_labels:
                raise SweepError(
                    f"{spec.name} predicts {model_label_space(spec.name)} labels but the config evaluates on "
                    f"{self.config.data.dataset}; pick a model trained for {wanted_labels}"
                )
            loaded[spec.name] = load_model(spec.name, models_dir=self.models_dir, checkpoint=spec.checkpoint)
            usable[spec.name] = self._usable_combinations(loaded[spec.name], spec.name)
        return loaded, usable

    def _usable_combinations(self, model: nn.Module, name: str) -> list[steps.Combination]:
        """The combinations this model can run: the `all` preset skips impossible ones, an explicit list raises."""
        usable = []
        for combination in self.combinations:
            try:
                steps.check_for_model(combination, model, name)
            except steps.StepError:
                if self.config.steps != "all":
                    raise
                continue
            usable.append(combination)
        return usable

    def _prepare_out(self) -> dict[tuple, dict]:
        """Create the results folder, or reopen it for the same config; return the rows already done, by key."""
        self.out.mkdir(parents=True, exist_ok=True)
        meta_path = self.out / "meta.json"
        if meta_path.exists():
            previous = json.loads(meta_path.read_text()).get("config_hash")
            if previous != self.config.hash:
                raise SweepError(
                    f"{self.out} holds results of another configuration (config hash {previous}, this one is "
                    f"{self.config.hash}); choose another --out or delete the folder"
                )
        meta = {
            "config_hash": self.config.hash,
            "config": self.config.to_dict(),
            "command": self.command,
            "clebench_version": clebench.__version__,
            "torch_version": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)".strip(),
            "device": str(self.device),
            "data_root": str(self.data_root),
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        results_path = self.out / "results.csv"
        if not results_path.exists():
            return {}
        rows = pd.read_csv(results_path, dtype={"config_hash": str}).to_dict("records")
        return {tuple(str(row[c]) for c in KEY_COLUMNS): row for row in rows}

    def _images_for(self, split: str, limit: int | None, preprocessing) -> data.ImageSet:
        key = (split, limit, preprocessing)
        if key not in self._images:
            self._images[key] = data.load_images(
                self.config.data.dataset, split, self.data_root, preprocessing, limit=limit, seed=self.config.data.seed,
                progress=self.progress,
            )
        return self._images[key]

    def _batches(self, image_set: data.ImageSet, preprocessing) -> Iterator:
        return data.batches(image_set, self.config.data.batch_size, preprocessing, self.device)

    # -- the work -------------------------------------------------------------------------------------------
    def _state(self, run: ModelRun, fp32_steps: steps.Combination) -> tuple[steps.PipelineState, str]:
        """The FP32 model after `fp32_steps` and its fingerprint, built from the longest cached prefix."""
        if fp32_steps in run.prefixes:
            return run.prefixes[fp32_steps]
        if not fp32_steps:
            state = run.base
        else:
            parent, parent_print = self._state(run, fp32_steps[:-1])
            state = copy.deepcopy(parent)
            if not steps.apply_fp32_step(fp32_steps[-1], state):
                run.prefixes[fp32_steps] = (parent, parent_print)  # no-op: share the parent's model
                return run.prefixes[fp32_steps]
        run.prefixes[fp32_steps] = (state, fingerprint(state.model))
        self._record_ranges(run.spec.name, fp32_steps, state.model)
        return run.prefixes[fp32_steps]

    def _fp32_accuracy(self, run: ModelRun, state: steps.PipelineState, print_: str) -> dict:
        if print_ not in run.fp32:
            run.fp32[print_] = evaluate(
                state.model, self._batches(run.eval_set, run.preprocessing), self.device, progress=self.progress,
                desc=f"{run.spec.name} FP32",
            )
            self.work.fp32_evaluations += 1
        return run.fp32[print_]

    def _quantized_accuracy(
        self, run: ModelRun, state: steps.PipelineState, print_: str, correction: str | None, quant: QuantConfig
    ) -> dict:
        key = (print_, correction, quant.name)
        if key in run.quantized:
            return run.quantized[key]
        calibration = run.calibration_batches
        model, model_print = state.model, print_
        if correction is not None:
            corrected = copy.deepcopy(state)
            method = steps.BIAS_CORRECTION_STEPS[correction]
            correct_bias(
                corrected.model, quant, bn_map=corrected.bn_map, cls_set_infos=corrected.cls_infos, method=method,
                batches=calibration if method == "empirical" else None,
            )
            model, model_print = corrected.model, fingerprint(corrected.model)
        sim = QuantSim(model, calibration[0][0][:1], quant)
        sim.set_activation_ranges(self._activation_ranges(run, sim, model_print, quant))
        run.quantized[key] = evaluate(
            sim.model, self._batches(run.eval_set, run.preprocessing), self.device, progress=self.progress,
            desc=f"{run.spec.name} {quant.name}",
        )
        self.work.quantized_evaluations += 1
        return run.quantized[key]

    def _activation_ranges(self, run: ModelRun, sim: QuantSim, model_print: str, quant: QuantConfig) -> dict:
        """Observed once per simulated FP32 model and activation setting (AIMET's rules observe quantized weights)."""
        key = None if quant.aimet_rules else (model_print, quant.act_bits, quant.calibration, quant.percentile)
        if key not in run.activation_ranges:
            ranges = sim.observe(run.calibration_batches, progress=False)
            self.work.calibrations += 1
            if key is None:
                return ranges
            run.activation_ranges[key] = ranges
        return run.activation_ranges[key]

    def _record_ranges(self, model_name: str, fp32_steps: steps.Combination, model: nn.Module) -> None:
        """Append this prefix's per-layer ranges (and the Fig. 2 layers' channel statistics) to the CSVs."""
        name = steps.combination_name(fp32_steps)
        layer_rows = ranges.layer_ranges(model).assign(model=model_name, steps=name)
        chosen = [ranges.first_depthwise_conv(model) if layer == FIRST_DEPTHWISE else layer for layer in self.config.range_layers]
        chosen = [layer for layer in chosen if layer is not None]
        channel_rows = ranges.channel_stats(model, chosen).assign(model=model_name, steps=name)
        for frame, filename in ((layer_rows, "ranges.csv"), (channel_rows, "channel_ranges.csv")):
            path = self.out / filename
            previous = pd.read_csv(path) if path.exists() else None
            if previous is not None:
                previous = previous[~((previous["model"] == model_name) & (previous["steps"] == name))]
            columns = ["model", "steps"] + [c for c in frame.columns if c not in ("model", "steps")]
            write_csv_atomically(pd.concat([previous, frame[columns]], ignore_index=True) if previous is not None else frame[columns], path)

    def run(self) -> pd.DataFrame:
        """Fill every missing row; return the full results table (in config order)."""
        started = time.perf_counter()
        models, usable = self._check_models()
        rows = self._prepare_out()
        order = self._row_order(usable)
        todo = [key for key in order if key not in rows]
        torch.manual_seed(0)
        with tqdm(total=len(todo), desc="sweep rows", unit="row", disable=not self.progress) as bar:
            for spec in self.config.models:
                mine = [key for key in todo if key[0] == spec.name]
                if not mine:
                    continue
                run = self._start_model(spec, models[spec.name])
                for key in mine:
                    rows[key] = self._row(run, key)
                    write_csv_atomically(self._table(rows, order), self.out / "results.csv")
                    self.work.rows += 1
                    bar.update()
        self.work.wall_seconds = round(time.perf_counter() - started, 1)
        self.work.peak_memory_mib = peak_memory_mib()
        self._write_work_summary()
        return self._table(rows, order)

    def _row(self, run: ModelRun, key: tuple[str, str, str, str]) -> dict:
        started = time.perf_counter()
        model_name, dataset, steps_name, quant_name = key
        combination = () if steps_name == steps.NO_STEPS else tuple(steps_name.split("+"))
        fp32_steps, correction = steps.split_combination(combination)
        state, print_ = self._state(run, fp32_steps)
        fp32 = self._fp32_accuracy(run, state, print_)
        quant = self._quantized_accuracy(run, state, print_, correction, QuantConfig.from_name(quant_name))
        return {
            "model": model_name, "dataset": dataset, "steps": steps_name, "quant": quant_name,
            "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"], "quant_top1": quant["top1"], "quant_top5": quant["top5"],
            "delta_top1": quant["top1"] - fp32["top1"], "n_images": quant["n"],
            "n_calibration": len(run.calibration_set.labels),
            "seconds": time.perf_counter() - started, "config_hash": self.config.hash,
        }

    @staticmethod
    def _table(rows: dict[tuple, dict], order: list[tuple]) -> pd.DataFrame:
        """Rows in config order (rows of keys no longer in the config are kept at the end)."""
        keys = [key for key in order if key in rows] + [key for key in rows if key not in set(order)]
        return pd.DataFrame([rows[key] for key in keys], columns=RESULT_COLUMNS)

    def _row_order(self, usable: dict[str, list[steps.Combination]]) -> list[tuple[str, str, str, str]]:
        dataset = self.config.data.dataset
        return [
            (spec.name, dataset, steps.combination_name(combination), quant.name)
            for spec in self.config.models
            for combination in usable[spec.name]
            for quant in self.quant_configs
        ]

    def _start_model(self, spec: ModelSpec, model: nn.Module) -> ModelRun:
        preprocessing = model_preprocessing(spec.name)
        eval_set = self._images_for(self.config.data.eval_split, self.config.data.limit, preprocessing)
        calibration_set = self._images_for(self.config.data.calibration_split, self.config.data.calibration, preprocessing)
        base = steps.PipelineState(graph.prepare_model(model).to(self.device).eval())
        calibration_batches = list(self._batches(calibration_set, preprocessing))
        return ModelRun(spec, base, eval_set, calibration_set, calibration_batches, preprocessing)

    def _write_work_summary(self) -> None:
        meta_path = self.out / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["last_run_work"] = self.work.__dict__
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
