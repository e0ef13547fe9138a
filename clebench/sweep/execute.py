"""Execute one work unit of a sweep: build its FP32 prefixes, evaluate its rows, measure the per-layer sensitivity
of its sensitivity rows; return rows, sensitivity tables and range statistics.

`execute_unit` writes no results file, so it runs the same in the driver's process or as a Ray task. What it reads
(checkpoints, images) is cached per process in `Resources`; work that several units may need (the FP32 accuracy of a
model state, activation ranges, a quantized evaluation) goes through a `Memo` keyed by the model's fingerprint, kept
in memory for a local run and on disk beside the results for a distributed one.
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from clebench import cle_diagnostics, graph, ranges, sensitivity

from clebench.data import datasets

from clebench.sweep import fp32_check, steps
from clebench.sweep.config import FIRST_DEPTHWISE, DataSpec, ModelSpec, SweepConfig
from clebench.evaluation import agreement, evaluate
from clebench.models import Preprocessing, load_spec_model, spec_preprocessing
from clebench.models.preprocessing import PreprocessingError, resolve_preprocessing
from clebench.sweep.plan import WorkUnit, combination_of
from clebench.precision import fp32_precision
from clebench.quant import QuantConfig, QuantSim
from clebench.runtimes import EXPORTABLE_ACT_BITS
from clebench.sweep.results import SENSITIVITY_COLUMNS, STEP_COST_COLUMNS, RowKey, deploy_column, labels_name, prediction_name


@dataclass(frozen=True)
class Settings:
    """Everything besides a unit that executing it needs; plain data, so it travels to Ray workers.

    Every path is resolved by the driver (from its arguments, the config or its CLEBENCH_* environment) and absolute,
    so a worker on another node reads the same folders and never looks at its own environment.
    """

    config: SweepConfig
    data_root: Path | None  # None: torch data sets given in memory (clebench.sweep.api)
    models_dir: Path | None = None
    device: str = "cpu"
    progress: bool = True
    scratch: Path | None = None  # where exported ONNX models are kept (a folder every worker sees)
    cache: bool = True  # decoded images through the on-disk image cache (clebench.data.image_cache)
    cache_dir: Path | None = None  # that cache's folder (None: the default of the process that reads it)


@dataclass
class Work:
    """Forward passes over the data that were actually made, next to the rows they filled."""

    rows: int = 0
    fp32_evaluations: int = 0
    calibrations: int = 0
    quantized_evaluations: int = 0
    adaround_runs: int = 0  # AdaRound optimizations (of every layer of a model) on one weight grid
    sensitivity_rows: int = 0  # rows whose per-layer sensitivity was measured

    def add(self, other: Work) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


class Sensitivity(NamedTuple):
    """A row's per-layer sensitivity (SENSITIVITY_COLUMNS) and what sensitivity.json records of its measurement
    (besides the run's metadata)."""

    table: pd.DataFrame
    measurement: dict


@dataclass
class UnitResult:
    """What a unit produced: results rows, sensitivity tables, per-layer and per-channel range tables, per-image
    predictions."""

    unit: WorkUnit
    rows: dict[RowKey, dict] = field(default_factory=dict)
    sensitivity: dict[RowKey, Sensitivity] = field(default_factory=dict)
    layer_ranges: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # (model, steps) -> rows
    channel_ranges: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    cle_sets: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # prefixes that scale only
    cle_skipped: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    cle_regions: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # prefixes ending in region CLE
    step_costs: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # one row per FP32 prefix
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # results.prediction_name -> int [N]
    work: Work = field(default_factory=Work)


def targets_for_quant(targets: Sequence[str], quant: QuantConfig) -> tuple[str, ...]:
    """The [eval] deploy `targets` that a `quant` row runs on: none where its activation grid has no exact export."""
    exportable = quant.act_bits is None or quant.act_bits in EXPORTABLE_ACT_BITS
    return tuple(targets) if exportable else ()


def fingerprint(model: nn.Module) -> str:
    """Identity of a model's function: its module types and every parameter and buffer value."""
    digest = hashlib.sha1()
    digest.update(" ".join(type(m).__name__ for m in model.modules()).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Memo:
    """Results of fingerprint-keyed work, shared by the units of one process."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, key: str) -> Any | None:
        return self._values.get((kind, key))

    def put(self, kind: str, key: str, value: Any) -> None:
        self._values[(kind, key)] = value


class DiskMemo(Memo):
    """A memo that is also written to `folder` (one file per entry, atomically), so processes share it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def get(self, kind: str, key: str) -> Any | None:
        value = super().get(kind, key)
        path = self._path(kind, key)
        if value is None and path.is_file():
            try:
                value = torch.load(path, weights_only=True)
            except Exception:  # a torn or foreign file is recomputed, never trusted
                return None
            super().put(kind, key, value)
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        super().put(kind, key, value)
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(value, temporary)
        os.replace(temporary, path)


@dataclass
class ModelInputs:
    """One model, prepared for the pipeline, and the images its rows use."""

    base: steps.PipelineState
    preprocessing: Preprocessing
    eval_set: datasets.ImageSet
    calibration_set: datasets.ImageSet
    calibration_batches: list[tuple[torch.Tensor, torch.Tensor]]  # normalized once, reused by every quantized row
    adaround_batches: list[tuple[torch.Tensor]]  # AdaRound's input batches (empty where no row runs AdaRound)


def sweep_preprocessing(config: SweepConfig, spec: ModelSpec) -> Preprocessing:
    """The preprocessing of `spec`'s images in the sweep of `config`: the model's default (else the data set's) <
    [data.preprocess] < the models entry's `preprocess`; a one-line PreprocessingError naming the model."""
    default = spec_preprocessing(spec, datasets.dataset_preprocessing(config.data.dataset))
    try:
        return resolve_preprocessing(default, config.data.preprocess, spec.preprocess)
    except PreprocessingError as error:
        raise PreprocessingError(f"models.{spec.name}: {error}") from None


def sweep_classes(data: DataSpec) -> dict[str, int]:
    """{class folder: model output index} of an imagefolder sweep, over its evaluation and calibration splits."""
    return datasets.imagefolder_classes(data.root, [data.eval_split, data.calibration_split], data.classes)


def input_shape(preprocessing: Preprocessing) -> tuple[int, int, int, int]:
    """The model input shape (N, C, H, W) of a sweep's rows on `preprocessing`'s images, N = 1 as the dummy input."""
    return (1, 3, *preprocessing.crop_size)


class Resources:
    """Checkpoints and decoded images, loaded once per process and shared by the units it runs."""

    def __init__(self, settings: Settings, loaded: dict[str, nn.Module] | None = None) -> None:
        self.settings = settings
        self._loaded = dict(loaded or {})
        self._images: dict[tuple, datasets.ImageSet] = {}
        self._inputs: dict[str, ModelInputs] = {}
        self._folder_classes: dict[str, int] | None = None

    def inputs(self, spec: ModelSpec) -> ModelInputs:
        """The model's inputs; only the latest model's are kept (units arrive model by model)."""
        if spec.name not in self._inputs:
            self._inputs.clear()
            self._inputs[spec.name] = self._prepare(spec)
        return self._inputs[spec.name]

    def _prepare(self, spec: ModelSpec) -> ModelInputs:
        settings, config = self.settings, self.settings.config
        model = self._loaded.pop(spec.name, None)
        if model is None:
            model = load_spec_model(spec, settings.models_dir)  # a Ray worker resolves the spec as the driver did
        preprocessing = sweep_preprocessing(config, spec)
        eval_set = self._image_set(config.data.eval_split, config.data.limit, preprocessing)
        calibration_set = self._image_set(config.data.calibration_split, config.data.calibration, preprocessing)
        base = steps.PipelineState(graph.prepare_model(model).to(settings.device).eval(),
                                   input_shape=input_shape(preprocessing))
        calibration_batches = list(datasets.batches(calibration_set, config.data.batch_size, preprocessing, settings.device))
        return ModelInputs(base, preprocessing, eval_set, calibration_set, calibration_batches,
                           self._adaround_batches(calibration_batches, preprocessing))

    def _adaround_batches(self, calibration: list, preprocessing: Preprocessing) -> list[tuple[torch.Tensor]]:
        """AdaRound's images: [adaround] calibration_images from the calibration split, else the calibration set."""
        config = self.settings.config
        if not config.uses_adaround:
            return []
        images = config.adaround.calibration_images
        if images is not None:
            image_set = self._image_set(config.data.calibration_split, images, preprocessing)
            calibration = datasets.batches(image_set, config.data.batch_size, preprocessing, self.settings.device)
        return [(inputs,) for inputs, _ in calibration]

    def _classes(self) -> dict[str, int] | None:
        """imagefolder: {folder: output index} over both splits, the same for every split and model."""
        data = self.settings.config.data
        if data.dataset != "imagefolder":
            return None
        if self._folder_classes is None:
            self._folder_classes = sweep_classes(data)
        return self._folder_classes

    def evaluation_images(self, spec: ModelSpec, limit: int) -> datasets.ImageSet:
        """`limit` class-balanced images of the evaluation split, prepared for `spec`'s model."""
        return self._image_set(self.settings.config.data.eval_split, limit, self.inputs(spec).preprocessing)

    def _image_set(self, split: str, limit: int | None, preprocessing: Preprocessing) -> datasets.ImageSet:
        key = (split, limit, preprocessing.resize_size, preprocessing.crop, preprocessing.interpolation)
        if key not in self._images:
            data = self.settings.config.data  # an imagefolder's root is settings.data_root (resolve_settings)
            if data.in_memory is not None:  # torch data sets (clebench.sweep.api): no files, so no image cache
                self._images[key] = data.in_memory.image_set(split, limit, data.seed, preprocessing)
            else:
                self._images[key] = datasets.load_images(
                    data.dataset, split, self.settings.data_root, preprocessing, limit=limit, seed=data.seed,
                    download=data.download, skip_unreadable=data.skip_unreadable, classes=self._classes(),
                    progress=self.settings.progress, cache=self.settings.cache, cache_dir=self.settings.cache_dir,
                )
            self._images[key] = datasets.to_device(self._images[key], self.settings.device)
        return self._images[key]


def execute_unit(unit: WorkUnit, settings: Settings, resources: Resources, memo: Memo) -> UnitResult:
    """Compute every row of `unit`, the range statistics of the FP32 prefixes it builds and the sensitivity of its
    sensitivity rows (on config.sensitivity.images evaluation images)."""
    torch.manual_seed(0)
    with fp32_precision():
        run = _UnitRun(unit, settings, resources.inputs(unit.model), memo)
        for prefix in unit.prefixes:
            run.build(prefix)
        for key in unit.rows:
            run.row(key)
        for key in unit.sensitivity:
            run.sensitivity(key, resources.evaluation_images(unit.model, settings.config.sensitivity.images))
    return run.result


class _UnitRun:
    """The state of one unit while it executes: its prefix models and what it has produced."""

    def __init__(self, unit: WorkUnit, settings: Settings, inputs: ModelInputs, memo: Memo) -> None:
        self.settings, self.inputs, self.memo = settings, inputs, memo
        self.device = torch.device(settings.device)
        self.result = UnitResult(unit)
        self.states: dict[steps.Combination, tuple[steps.PipelineState, str]] = {}
        self.probe = inputs.calibration_batches[0][0][:fp32_check.PROBE_IMAGES]
        self.probe_outputs: dict[steps.Combination, torch.Tensor] = {}
        self.step_changes: dict[steps.Combination, dict[str, float]] = {}  # step -> its rel change of the logits
        labels = inputs.eval_set.labels.cpu().numpy()  # on the GPU when the images were moved there
        self.result.predictions[labels_name(unit.model.name, settings.config.data.dataset)] = labels

    def build(self, prefix: steps.Combination) -> None:
        """The FP32 state after `prefix` (its parent is built already); a step that changes nothing shares it."""
        if not prefix:
            state = self.inputs.base
            self.probe_outputs[prefix], self.step_changes[prefix] = self._probe_output(state.model), {}
        else:
            parent, parent_print = self.states[prefix[:-1]]
            state = copy.deepcopy(parent)
            started = time.perf_counter()
            changed = self._apply(prefix[-1], state)
            self._record_cost(prefix, time.perf_counter() - started,
                              cle_diagnostics.changed_layers(parent.model, state.model))
            if not changed:
                self.states[prefix] = (parent, parent_print)
                self.probe_outputs[prefix] = self.probe_outputs[prefix[:-1]]
                self.step_changes[prefix] = self.step_changes[prefix[:-1]]
                self._record_cle(prefix, state)  # an hbf that absorbed nothing still says so
                return
            self._check_step(prefix, parent.model, state.model)
        self.states[prefix] = (state, fingerprint(state.model))
        self._record_ranges(prefix, state.model)
        self._record_cle(prefix, state)

    def _apply(self, step: str, state: steps.PipelineState) -> bool:
        """apply_fp32_step with the data a step may read: the calibration images (the same every run: the config's
        seeded calibration set), the [act_equalize] and [brevitas] options."""
        config = self.settings.config
        return steps.apply_fp32_step(step, state, config.custom_steps, alpha=config.act_equalize.alpha,
                                     calibration=[(inputs,) for inputs, _ in self.inputs.calibration_batches],
                                     brevitas_iterations=config.brevitas.iterations)

    def _probe_output(self, model: nn.Module) -> torch.Tensor:
        """The logits on the probe batch, on one CPU thread: a Ray worker runs on one and a local sweep on all, and
        the kernels' reduction order (so the last bits of the check columns) follows the thread count."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return model(self.probe)
        finally:
            torch.set_num_threads(threads)

    def _check_step(self, prefix: steps.Combination, before: nn.Module, after: nn.Module) -> None:
        """Stop the unit if the prefix's last step broke the FP32 function (clebench.sweep.fp32_check)."""
        output = self.probe_outputs[prefix] = self._probe_output(after)
        change = fp32_check.check_step(prefix[-1], self.result.unit.model.name, before, after, self.probe,
                                       self.probe_outputs[prefix[:-1]], output)
        self.step_changes[prefix] = {**self.step_changes[prefix[:-1]], prefix[-1]: change}

    def _record_cost(self, combination: steps.Combination, seconds: float, layers_changed: int) -> None:
        """step_costs.csv's row of `combination`'s last step (an FP32 step, or an NNCF step after its FP32 steps)."""
        key = (self.result.unit.model.name, steps.combination_name(combination))
        self.result.step_costs[key] = pd.DataFrame([{
            "model": key[0], "steps": key[1], "step": combination[-1], "step_seconds": seconds,
            "layers_changed": layers_changed}], columns=STEP_COST_COLUMNS)

    def _record_ranges(self, prefix: steps.Combination, model: nn.Module) -> None:
        name, model_name = steps.combination_name(prefix), self.result.unit.model.name
        chosen = [ranges.first_depthwise_conv(model) if layer == FIRST_DEPTHWISE else layer
                  for layer in self.settings.config.range_layers]
        chosen = [layer for layer in chosen if layer is not None]
        key = (model_name, name)
        self.result.layer_ranges[key] = ranges.layer_ranges(model).assign(model=model_name, steps=name)
        self.result.channel_ranges[key] = ranges.channel_stats(model, chosen).assign(model=model_name, steps=name)

    def _record_cle(self, prefix: steps.Combination, state: steps.PipelineState) -> None:
        """cle_sets / cle_skipped rows of a prefix that ends in a CLS step or in hbf, against the model before CLS;
        cle_regions rows of a prefix that ends in a region-CLE step."""
        if prefix and prefix[-1] in steps.REGION_STEPS:
            key = (self.result.unit.model.name, steps.combination_name(prefix))
            self.result.cle_regions[key] = cle_diagnostics.region_rows(state.regions).assign(model=key[0], steps=key[1])
            return
        cls_index = next((i for i, step in enumerate(prefix) if step in steps.CLS_STEPS), None)
        if cls_index is None or prefix[-1] not in (prefix[cls_index], "hbf") or not state.cls_infos:
            return
        before = self.states[prefix[:cls_index]][0].model
        key = (self.result.unit.model.name, steps.combination_name(prefix))
        sets = cle_diagnostics.cls_set_rows(state.cls_infos, before, state.model, self.inputs.calibration_batches,
                                            state.bn_map, hbf_ran="hbf" in prefix)
        scaled = {name for text in sets["layers"] for name in text.split(" → ")}
        skipped = cle_diagnostics.skipped_layers(before, steps.CLS_STEPS[prefix[cls_index]], scaled)
        self.result.cle_sets[key] = sets.assign(model=key[0], steps=key[1])
        self.result.cle_skipped[key] = skipped.assign(model=key[0], steps=key[1])

    def row(self, key: RowKey) -> None:
        started = time.perf_counter()
        combination = combination_of(key)
        fp32_steps, correction = steps.split_combination(combination)
        state, print_ = self.states[fp32_steps]
        fp32 = self._fp32_accuracy(state, print_)
        quantizer = steps.quantizer_step(combination)
        if quantizer is not None:
            quant = self._peer_quantized_accuracy(fp32_steps, quantizer, QuantConfig.from_name(key.quant))
        else:
            quant = self._quantized_accuracy(state, print_, correction, steps.uses_adaround(combination),
                                             QuantConfig.from_name(key.quant))
        self.result.predictions[prediction_name(key, "fp32")] = fp32["predictions"].numpy()
        self.result.predictions[prediction_name(key, "quant")] = quant["predictions"].numpy()
        deployed = {}
        for target, run in quant.get("deploy", {}).items():
            self.result.predictions[prediction_name(key, target)] = run["predictions"].numpy()
            deployed |= {deploy_column(target, "top1"): run["top1"], deploy_column(target, "top5"): run["top5"],
                         deploy_column(target, "agreement"): agreement(run, quant),
                         deploy_column(target, "integer_layers"): run["integer_layers"],
                         deploy_column(target, "float_layers"): len(run["float_layers"])}
        self.result.rows[key] = {
            **key._asdict(),
            "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"], "quant_top1": quant["top1"], "quant_top5": quant["top5"],
            "delta_top1": quant["top1"] - fp32["top1"], "n_images": quant["n"],
            "n_calibration": len(self.inputs.calibration_set.labels),
            "seconds": time.perf_counter() - started, "config_hash": self.settings.config.hash, **deployed,
            **fp32_check.row_columns(self.step_changes[fp32_steps]),
        }
        self.result.work.rows += 1

    def sensitivity(self, key: RowKey, images: datasets.ImageSet) -> None:
        """clebench.sensitivity's table of row `key` on `images`, from the row's QuantSim (memoized activation
        ranges), with its timing: wall and CPU seconds (all threads; the steadier figure on a shared machine)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        combination = combination_of(key)
        fp32_steps, correction = steps.split_combination(combination)
        state, print_ = self.states[fp32_steps]
        sim = self.calibrated_sim(state, print_, correction, QuantConfig.from_name(key.quant),
                                  steps.uses_adaround(combination))
        config = self.settings.config
        batches = list(datasets.batches(images, config.data.batch_size, self.inputs.preprocessing, self.device))
        table = sensitivity.sensitivity(sim, batches, progress=self.settings.progress)
        table = table.assign(model=key.model, steps=key.steps, quant=key.quant)[SENSITIVITY_COLUMNS]
        measurement = {
            "seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "images": len(images.labels), "images_requested": config.sensitivity.images,
            "calibration_images": len(self.inputs.calibration_set.labels), "peak_memory_mib": peak_memory_mib(),
        }
        self.result.sensitivity[key] = Sensitivity(table, measurement)
        self.result.work.sensitivity_rows += 1

    def _evaluate(self, model: nn.Module, desc: str) -> dict:
        batches = datasets.batches(self.inputs.eval_set, self.settings.config.data.batch_size, self.inputs.preprocessing,
                               self.device)
        return evaluate(model, batches, self.device, progress=self.settings.progress, desc=desc)

    def _fp32_accuracy(self, state: steps.PipelineState, print_: str) -> dict:
        accuracy = self.memo.get("fp32", print_)
        if accuracy is None:
            accuracy = self._evaluate(state.model, f"{self.result.unit.model.name} FP32")
            self.memo.put("fp32", print_, accuracy)
            self.result.work.fp32_evaluations += 1
        return accuracy

    def _quantized_accuracy(self, state: steps.PipelineState, print_: str, correction: str | None, adaround: bool,
                            quant: QuantConfig) -> dict:
        adaround_key = f"{self.settings.config.adaround.key}|" if adaround else ""
        memo_key = f"{print_}|{adaround_key}{correction}|{quant.name}"
        accuracy = self.memo.get("quantized", memo_key)
        if accuracy is not None:
            return accuracy
        sim = self.calibrated_sim(state, print_, correction, quant, adaround)
        desc = f"{self.result.unit.model.name} {quant.name}"
        engine = self.settings.config.eval.engine
        accuracy = self._evaluate_sim(sim, "torch" if engine == "torch" else f"{engine}-sim", desc)
        deploy = targets_for_quant(self.settings.config.eval.deploy, quant)
        if deploy:
            accuracy = accuracy | {"deploy": {target: self._deploy(sim, target, f"{desc} {target} int8") for target in deploy}}
        self.memo.put("quantized", memo_key, accuracy)
        self.result.work.quantized_evaluations += 1
        return accuracy

    def _peer_quantized_accuracy(self, fp32_steps: steps.Combination, quantizer: str, quant: QuantConfig) -> dict:
        """An NNCF row (clebench.peers.nncf): NNCF's int8 model of the FP32 prefix's state, calibrated on the sweep's
        calibration images, on OpenVINO's int8 kernels: evaluate()'s dict with "integer_layers" / "float_layers",
        also as its "deploy" run where the sweep deploys to OpenVINO (the row has no simulation). Its quantization
        time and integer layers go to step_costs.csv under the row's steps."""
        from clebench.peers import nncf
        from clebench.runtimes.engines import runtime  # the openvino extra

        state, print_ = self.states[fp32_steps]
        memo_key = f"{print_}|{quantizer}|{quant.name}"
        accuracy = self.memo.get("quantized", memo_key)
        if accuracy is not None:
            return accuracy
        name, threads = self.result.unit.model.name, torch.get_num_threads()
        images = torch.cat([inputs for inputs, *_ in self.inputs.calibration_batches]).cpu()
        path = self._export_dir() / "nncf" / f"{hashlib.sha1(memo_key.encode()).hexdigest()[:16]}.xml"
        started = time.perf_counter()
        try:
            nncf.quantize(copy.deepcopy(state.model).cpu(), images, quantizer, per_channel=quant.per_channel,
                          path=path, progress=self.settings.progress)
        except nncf.NNCFFailure as error:  # the peer's fault: the row stays, blank, and the sweep goes on
            print(f"warning: {name} {quant.name}: {error}; the row is recorded without a quantized accuracy",
                  file=sys.stderr)
            return failed_accuracy(len(self.inputs.eval_set.labels))
        seconds = time.perf_counter() - started
        openvino = runtime("openvino")
        batches = datasets.batches(self.inputs.eval_set, self.settings.config.data.batch_size, self.inputs.preprocessing)
        run = openvino.evaluate_onnx(path, batches, mode="int8", threads=threads, progress=self.settings.progress,
                                     desc=f"{name} {quant.name} {quantizer} openvino int8")
        run |= self._layer_precision("openvino", path, f"{name} {quant.name} {quantizer}")
        self._record_cost((*fp32_steps, quantizer), seconds, run["integer_layers"])
        accuracy = run | {"deploy": {"openvino": run} if "openvino" in self.settings.config.eval.deploy else {}}
        self.memo.put("quantized", memo_key, accuracy)
        self.result.work.quantized_evaluations += 1
        return accuracy

    def calibrated_sim(self, state: steps.PipelineState, print_: str, correction: str | None,
                       quant: QuantConfig, adaround: bool = False) -> QuantSim:
        """The row's QuantSim: `state`'s model, AdaRounded and bias-corrected if asked, with memoized activation
        ranges."""
        calibration = self.inputs.calibration_batches
        rounding = self._adaround(state, print_, quant) if adaround else None
        model = steps.quantized_model(state, quant, correction, rounding, calibration, self.settings.progress)
        model_print = print_ if model is state.model else fingerprint(model)
        sim = steps.quant_sim(model, calibration[0][0][:1], quant, rounding)
        sim.set_activation_ranges(self._activation_ranges(sim, model_print, quant))
        return sim

    def _adaround(self, state: steps.PipelineState, print_: str, quant: QuantConfig) -> steps.Rounding:
        """AdaRound's rounding of the FP32 state on quant's weight grids: once per (model, weight grid, options)."""
        options = self.settings.config.adaround
        memo_key = f"{print_}|{steps.weight_grid(quant)}|{options.key}"
        rounding = self.memo.get("adaround", memo_key)
        if rounding is None:
            rounding = steps.adaround_rounding(state.model, quant, self.inputs.adaround_batches, options.settings(),
                                               progress=self.settings.progress)
            self.memo.put("adaround", memo_key, rounding)
            self.result.work.adaround_runs += 1
        return rounding

    def _evaluate_sim(self, sim: QuantSim, engine: str, desc: str) -> dict:
        """The simulation on torch, or exported and run by a runtime (engine of clebench.runtimes.engines.ENGINES)."""
        if engine == "torch":
            return self._evaluate(sim.model, desc)
        from clebench.runtimes.engines import evaluate_quantized  # the onnx extra

        batches = datasets.batches(self.inputs.eval_set, self.settings.config.data.batch_size, self.inputs.preprocessing)
        return evaluate_quantized(sim, self._dummy_input(), batches, engine=engine, workdir=self._export_dir(),
                                  threads=torch.get_num_threads(), progress=self.settings.progress, desc=desc)

    def _deploy(self, sim: QuantSim, target: str, desc: str) -> dict:
        """The row on `target`'s integer kernels: evaluate()'s dict, "integer_layers" (how many conv / matmul layers
        ran on integers) and "float_layers" (the names of those that ran in float; plain data, as the memo stores it).
        A layer the runtime ran in float is reported on stderr and counted in the row."""
        from clebench.runtimes.export import cached_export  # the onnx extra

        accuracy = self._evaluate_sim(sim, f"{target}-int8", desc)
        path = cached_export(sim, self._dummy_input(), self._export_dir(), int32_bias=True)
        return accuracy | self._layer_precision(target, path, desc)

    def _layer_precision(self, target: str, path: Path, desc: str) -> dict:
        """{"integer_layers", "float_layers"} of the model at `path` on `target`'s int8 kernels; a layer the runtime
        ran in float is reported on stderr."""
        from clebench.runtimes.engines import runtime  # the onnx extra

        precision = runtime(target).layer_precision(path, "int8", torch.get_num_threads())
        if precision.float_layers:
            print(f"warning: {desc}: {target} ran {len(precision.float_layers)} of {precision.total} conv/matmul "
                  f"layers in float: {', '.join(precision.float_layers)}", file=sys.stderr)
        return {"integer_layers": precision.integer, "float_layers": list(precision.float_layers)}

    def _dummy_input(self) -> torch.Tensor:
        return self.inputs.calibration_batches[0][0][:1].cpu()

    def _export_dir(self) -> Path:
        return self.settings.scratch / "onnx"

    def _activation_ranges(self, sim: QuantSim, model_print: str, quant: QuantConfig) -> dict:
        """Observed once per simulated FP32 model and activation setting (AIMET's rules observe quantized weights)."""
        if quant.aimet_rules:
            self.result.work.calibrations += 1
            return sim.observe(self.inputs.calibration_batches, progress=False)
        memo_key = f"{model_print}|{quant.act_bits}|{quant.calibration}|{quant.percentile}"
        observed = self.memo.get("activation_ranges", memo_key)
        if observed is None:
            observed = sim.observe(self.inputs.calibration_batches, progress=False)
            self.memo.put("activation_ranges", memo_key, observed)
            self.result.work.calibrations += 1
        return observed


def failed_accuracy(images: int) -> dict:
    """evaluate()'s dict of a row whose quantizer failed: no accuracy (blank in results.csv), predictions -1."""
    return {"top1": float("nan"), "top5": float("nan"), "n": images,
            "predictions": torch.full((images,), -1, dtype=torch.int64)}


def peak_memory_mib() -> float | None:
    """Peak resident memory of this process so far, in MiB; None where the OS does not report it (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
