"""Run a sweep: check the models, plan the work units, execute them (here or on Ray), record what they return.

    config ──check_models──> usable step combinations per model
           ──plan──────────> work units (rows not yet in the results folder)
           ──execute───────> rows, range statistics, predictions per unit (in this process, or as Ray tasks)
           ──record────────> results.csv, ranges.csv, channel_ranges.csv, predictions.npz, meta.json
                              (and sensitivity.csv / sensitivity.json for the config's [sensitivity] rows)

Work that rows share is done once: each FP32 step prefix is built once per unit; FP32 accuracy, activation ranges and
quantized evaluations are memoized by the model's fingerprint (a step that changes nothing, such as relu6_to_relu on
ResNet18, costs nothing). Rows are recorded as their unit finishes, so an interrupted sweep loses only the units in
flight, and re-running the same config resumes. A [sensitivity] row is measured once per images count: a re-run
skips the rows sensitivity.csv holds for the configured images.
"""
from __future__ import annotations

import copy
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import clebench
from clebench import graph
from clebench import models
from clebench.data import datasets, image_cache
from clebench.sweep import plan
from clebench.sweep import results
from clebench.sweep import steps
from clebench.sweep.config import ModelSpec, SweepConfig
from clebench.errors import UserError
from clebench.peers import PEERS, peer_version
from clebench.sweep.execute import (Memo, Resources, Settings, UnitResult, Work, execute_unit, fingerprint,
                                    input_shape, peak_memory_mib, sweep_classes, sweep_preprocessing)
from clebench.precision import device_info
from clebench.sweep.record import Recorder

SCRATCH_FOLDER = ".memo"  # work shared by Ray tasks and exported ONNX models; removed once every row is recorded
LABEL_SPACES = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet", "imagenette": "imagenet"}
LABEL_COUNTS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}  # classes of each label space


class SweepError(UserError):
    """A sweep that cannot start (a model for other labels, a step it cannot take ...)."""


@dataclass
class SweepOutcome:
    """The full results table (config order) and the work this run did."""

    table: pd.DataFrame
    work: Work
    wall_seconds: float


def check_models(config: SweepConfig, models_dir: str | Path | None) -> tuple[dict[str, nn.Module], dict[str, list[steps.Combination]]]:
    """Load every model and check it against the data and the steps, before any evaluation.

    Returns the loaded models and, per model, the step combinations it runs: the `all` and `ptq` presets skip the impossible
    ones, an explicit list raises.
    """
    loaded, usable = {}, {}
    for spec in config.models:
        loaded[spec.name] = load_checked_model(config, spec, models_dir)
        usable[spec.name] = []
        for combination in config.combinations:
            try:
                steps.check_for_model(combination, loaded[spec.name], spec.name)
            except steps.StepError:
                if config.steps not in steps.SKIPPING_PRESETS:
                    raise
                continue
            usable[spec.name].append(combination)
    return loaded, usable


def load_checked_model(config: SweepConfig, spec: ModelSpec, models_dir: str | Path | None) -> nn.Module:
    """`spec`'s model, checked against the data set's labels: a model of known labels must predict the data set's
    label space; every model needs an output for each label index the data uses (the label space's classes, or
    an imagefolder's data.classes). A model of unknown labels (a factory, an entry point, a timm model with its own
    classes) or with an `input_size` is counted on a probe image, and one that rejects it is an error; registry
    models are not probed, so they cost nothing new."""
    wanted = LABEL_SPACES.get(config.data.dataset)  # None for an imagefolder: its classes index the model's outputs
    space = models.spec_label_space(spec)
    if wanted is not None and space is not None and space != wanted:
        raise SweepError(f"{spec.name} predicts {space} labels but the config evaluates on {config.data.dataset}; "
                         f"pick a model trained for {wanted}")
    model = models.load_spec_model(spec, models_dir)
    outputs = LABEL_COUNTS.get(space)
    if outputs is None or spec.input_size is not None:
        size = spec.input_size or input_shape(sweep_preprocessing(config, spec))[1:]
        outputs = models.probe_output_count(model, size, spec.name)
    needed, labels = _needed_outputs(config, wanted)
    if outputs < needed:
        raise SweepError(f"{spec.name} gives {outputs} outputs per image but {labels}")
    return model


def _needed_outputs(config: SweepConfig, label_space: str | None) -> tuple[int, str]:
    """How many outputs a model needs for the data's label indices, and the end of the error that says why."""
    if label_space is not None:
        return LABEL_COUNTS[label_space], (f"{config.data.dataset} labels index {LABEL_COUNTS[label_space]} "
                                           f"{label_space} classes; give the model an output per class")
    if config.data.in_memory is not None:
        needed = config.data.in_memory.outputs_needed
        return needed, (f"the data sets' labels reach output index {needed - 1}; label the images with the model's "
                        "output indices")
    needed = max(sweep_classes(config.data).values()) + 1
    return needed, (f"data.classes maps a folder to output index {needed - 1}; map the folders to the model's "
                    "outputs (data.classes)")


def check_sensitivity_rows(config: SweepConfig, usable: dict[str, list[steps.Combination]]) -> None:
    """Every [sensitivity] row must be a row the sweep runs (a preset skips the combinations a model cannot take)."""
    runs = set(plan.row_order(config, usable))
    for key in plan.sensitivity_rows(config):
        if key not in runs:
            raise SweepError(f"[sensitivity] row {key.model} {key.steps} {key.quant}: the sweep skips it, as "
                             f"{key.model} cannot take those steps; remove it from sensitivity.rows")


def note_settings_skipped(config: SweepConfig, usable: dict[str, list[steps.Combination]]) -> None:
    """Say on stderr which (steps, quant setting) pairs have no row: NNCF steps quantize to int8 only
    (steps.runs_under)."""
    skipped = sorted({(steps.combination_name(c), q.name) for combinations in usable.values() for c in combinations
                      for q in config.quant_configs if not steps.runs_under(c, q)})
    if skipped:
        print(f"note: no rows for {len(skipped)} step x quant pairs: NNCF quantizes to 8-bit weights and activations "
              f"only ({', '.join(f'{s} {q}' for s, q in skipped)})", file=sys.stderr)


def prefix_states(config: SweepConfig, spec: ModelSpec, model: nn.Module,
                  combinations: list[steps.Combination]) -> dict[steps.Combination, steps.PipelineState]:
    """Every FP32 prefix state that `combinations` of `spec`'s model pass through, built on the CPU (no data is
    touched: milliseconds to a second per model for the built-in steps; custom steps run too), but the prefixes from
    an activation-equalization step on, which need the calibration images, and from a peer step on (seconds each)."""
    shape = input_shape(sweep_preprocessing(config, spec))
    states = {(): steps.PipelineState(graph.prepare_model(model), input_shape=shape)}
    for combination in combinations:
        fp32_steps, _ = steps.split_combination(combination)
        for prefix in plan.prefixes_of(fp32_steps)[1:]:
            if prefix not in states and not set(prefix) & (set(steps.ACT_EQUALIZE_STEPS) | set(steps.PEER_STEPS)):
                states[prefix] = copy.deepcopy(states[prefix[:-1]])
                steps.apply_fp32_step(prefix[-1], states[prefix], config.custom_steps)
    return states


def prefix_identities(config: SweepConfig, loaded: dict[str, nn.Module],
                      usable: dict[str, list[steps.Combination]]) -> dict[tuple[str, steps.Combination], str]:
    """(model, FP32 prefix) -> fingerprint of the model the prefix builds, for every prefix of the sweep's rows, so
    that the plan can put prefixes that build the same model into one unit. Custom steps run here first, so one
    that raises or returns no model stops the sweep before any row is written."""
    identities = {}
    for spec in config.models:
        states = prefix_states(config, spec, loaded[spec.name], usable[spec.name])
        identities.update({(spec.name, prefix): fingerprint(state.model) for prefix, state in states.items()})
        for combination in usable[spec.name]:  # a prefix not built here is its own identity: its unit is its own
            for prefix in plan.prefixes_of(steps.split_combination(combination)[0]):
                identities.setdefault((spec.name, prefix), f"unbuilt {steps.combination_name(prefix)}")
    return identities


def range_order(config: SweepConfig, usable: dict[str, list[steps.Combination]]) -> list[tuple[str, str]]:
    """Every (model, FP32 prefix name) whose ranges a sweep may record, in config order."""
    ordered: dict[tuple[str, str], None] = {}
    for key in plan.row_order(config, usable):
        fp32_steps, _ = steps.split_combination(plan.combination_of(key))
        for prefix in plan.prefixes_of(fp32_steps):
            ordered[(key.model, steps.combination_name(prefix))] = None
    return list(ordered)


def resolve_settings(config: SweepConfig, out: Path, *, data_root: str | Path | None, models_dir: str | Path | None,
                     device: str, progress: bool, cache: bool) -> Settings:
    """The settings of every unit, with each path a sweep reads or writes resolved here, absolute.

    Data root, checkpoints folder and image cache folder come from the arguments, else this process's CLEBENCH_*
    environment; checkpoint files and an imagefolder's root from the config (already absolute when read from a file;
    made so here when given as a dict), that root also being the data root. Ray workers take them from here, never
    from their own environment or working directory.
    """
    found_models = models.models_dir(models_dir)
    specs = tuple(replace(spec, checkpoint=str(Path(spec.checkpoint).resolve())) if spec.checkpoint else spec
                  for spec in config.models)
    data = replace(config.data, root=str(Path(config.data.root).resolve())) if config.data.root else config.data
    found_data = (Path(data.root) if data.root else None if data.in_memory is not None
                  else datasets.data_root(data_root).resolve())
    return Settings(replace(config, models=specs, data=data), found_data,
                    None if found_models is None else found_models.resolve(), device, progress,
                    (out / SCRATCH_FOLDER).resolve(), cache, image_cache.cache_dir().resolve() if cache else None)


def run_sweep(config: SweepConfig, out: str | Path, *, data_root: str | Path | None = None,
              models_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
              command: str | None = None, cache: bool = True) -> SweepOutcome:
    """Fill every missing row of `config` in the results folder `out`; return the full table and this run's work.

    cache: read decoded images through the on-disk image cache (False: decode into a temporary file).

    `config.execution` says where the units run: in this process (ray None) or as Ray tasks.
    """
    started = time.perf_counter()
    out = Path(out)
    execution = config.execution
    if config.eval.engine != "torch" and torch.device(device).type != "cpu":
        raise SweepError(f"the {config.eval.engine} engine runs on the CPU, not {device}: use --engine torch on a GPU "
                         "(deploy targets still run the int8 rows on the CPU)")
    if execution.ray is not None and torch.device(device).type == "cuda" and execution.gpus_per_task == 0:
        raise SweepError(f"a Ray sweep on {device} must give its tasks a GPU: pass --gpus-per-task (1: a card per "
                         "task; 0.25: four share one, 15 % slower in total than one task for MobileNetV2 on an H100) "
                         "or set [execution] gpus_per_task")
    settings = resolve_settings(config, out, data_root=data_root, models_dir=models_dir, device=device,
                                progress=progress and execution.ray is None, cache=cache)
    config = settings.config
    meta = run_metadata(settings, command)  # first: a runtime that is not installed stops the sweep before any work
    loaded, usable = check_models(config, settings.models_dir)
    check_sensitivity_rows(config, usable)
    note_settings_skipped(config, usable)
    identities = prefix_identities(config, loaded, usable) if execution.ray or config.custom_steps else None
    columns = results.RESULT_COLUMNS + results.deploy_columns(config.eval.deploy) + results.CHECK_COLUMNS
    with Recorder(out, meta, plan.row_order(config, usable), range_order(config, usable), columns,
                  plan.sensitivity_rows(config)) as recorder:
        measured = results.measured_sensitivity(out, config.sensitivity.images)
        units = plan.plan(config, usable, recorder.done, execution.unit, identities, measured)
        if execution.ray is None:
            finished = execute_locally(units, settings, Resources(settings, loaded))
        else:
            from clebench.sweep.distributed import execute_on_ray  # Ray is an optional extra

            finished = execute_on_ray(units, settings, out / SCRATCH_FOLDER, address=execution.ray,
                                     gpus_per_task=execution.gpus_per_task)
        work = Work()
        total = sum(len(u.rows) + len(u.sensitivity) for u in units)  # a sensitivity row counts as one row
        with tqdm(total=total, desc="sweep rows", unit="row", disable=not progress) as bar:
            for result in finished:
                recorder.record(result)
                work.add(result.work)
                bar.update(len(result.rows) + len(result.sensitivity))
        shutil.rmtree(out / SCRATCH_FOLDER, ignore_errors=True)  # every row is recorded: the memo has served
        wall = round(time.perf_counter() - started, 1)
        for target in config.eval.deploy:
            recorder.meta[target]["layers_per_row"] = layers_per_row(recorder.table(), target)
        recorder.finish(work, {"wall_seconds": wall, "peak_memory_mib": peak_memory_mib(), "units": len(units),
                               "engine": "ray" if execution.ray else "local"})
        return SweepOutcome(recorder.table(), work, wall)


def execute_locally(units: list[plan.WorkUnit], settings: Settings, resources: Resources) -> Iterator[UnitResult]:
    memo = Memo()
    for unit in units:
        yield execute_unit(unit, settings, resources, memo)



def run_metadata(settings: Settings, command: str | None) -> dict:
    """What meta.json records about a run: the config and what could change its numbers."""
    device = torch.device(settings.device)
    hardware = device_info(device)
    return {
        "config_hash": settings.config.hash,
        "config": settings.config.to_dict(),
        "command": command,
        "clebench_version": clebench.__version__,
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)".strip(),
        "device": str(device),
        "device_name": hardware.pop("device_name"),
        "precision": hardware.pop("precision_policy") if device.type == "cuda" else "fp32",
        **hardware,
        "data_root": None if settings.data_root is None else str(settings.data_root),
        **{name: _runtime_info(name) for name in runtimes_used(settings.config)},
        **({"peers": peer_versions(settings.config)} if settings.config.peers else {}),
        **data_record(settings.config),
        **({"custom_steps": {step.name: step.source() for step in settings.config.custom_steps}}
           if settings.config.custom_steps else {}),
    }


def data_record(config: SweepConfig) -> dict:
    """meta.json's record of what each model's images are: {"preprocessing": {model: Preprocessing.to_dict()}} and, for
    an imagefolder, "imagefolder": {"root": absolute folder, "classes": {folder: output index}}. Resolving them raises
    the data's one-line errors (crop larger than the resized image, a missing or empty split, a folder not in
    data.classes) before any model loads."""
    record = {"preprocessing": {spec.name: sweep_preprocessing(config, spec).to_dict() for spec in config.models}}
    if config.data.dataset == "imagefolder":
        record["imagefolder"] = {"root": config.data.root, "classes": sweep_classes(config.data)}
    return record


def peer_versions(config: SweepConfig) -> dict[str, str]:
    """{distribution: version} of the peers the sweep's steps run; one that is not installed stops the sweep here,
    naming its extra."""
    return {PEERS[peer][0]: peer_version(peer) for peer in config.peers}


def runtimes_used(config: SweepConfig) -> list[str]:
    """The runtimes a sweep runs: its simulation engine (unless torch), its deploy targets, and OpenVINO for NNCF
    steps (their rows run there)."""
    nncf = any(steps.quantizer_step(combination) for combination in config.combinations)
    return list(dict.fromkeys([*([config.eval.engine] if config.eval.engine != "torch" else []), *config.eval.deploy,
                               *(["openvino"] if nncf else [])]))


def _runtime_info(name: str) -> dict:
    """meta.json's entry of runtime `name`; a runtime that is not installed stops the sweep here, naming its extra."""
    from clebench.runtimes.engines import runtime  # the onnx extra

    return runtime(name).runtime_info()


def layers_per_row(table: pd.DataFrame, target: str) -> dict[str, str]:
    """{"model|steps|quant": "<integer> integer, <float> float"}: how deploy `target` ran each row's conv / matmul
    layers (from the results table's <target>_integer_layers / _float_layers columns)."""
    integer, floats = (results.deploy_column(target, metric) for metric in ("integer_layers", "float_layers"))
    done = table[table[integer].notna()]
    return {"|".join(str(row[c]) for c in results.KEY_COLUMNS): f"{int(row[integer])} integer, {int(row[floats])} float"
            for _, row in done.iterrows()}
