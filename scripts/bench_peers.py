"""clebench against its peers: AIMET (`aimet-torch`, optional) and PyTorch's `torch.ao.quantization._equalize`.

    /opt/aimetenv/bin/python scripts/bench_peers.py [--section cle-time|agreement|simulation|sweep] [--limit 2000 | --full]

Sections (each one function, registered in SECTIONS):
* cle-time: wall time of cross-layer equalization on torchvision ResNet18 / MobileNetV2 (random weights, randomized BN
  statistics, input (1, 3, 224, 224)) and on the two CIFAR-10 checkpoints (input (1, 3, 32, 32)). "first call" is the
  call in a fresh process (graph tracing and any lazy set-up included; imports and model building excluded), median
  over `--fresh-runs` processes; "repeated call" is the median of `--repeats` further calls, each on a fresh deep copy;
  the tools take turns run by run, so that load changes on the shared machine hit all of them alike.
  Garbage is collected before, and collection held off during, every timed call (as timeit does).
  clebench: `equalize_model(model, shape)` (BN fold, ReLU6 -> ReLU, CLS, high-bias fold). AIMET: its `equalize_model`
  on a copy whose ReLU6s are already ReLUs (AIMET >= 2.4 warns and leaves conv -> ReLU6 -> conv unscaled).
  torch.ao: `equalize(model, pairs, threshold=1e-4)` (iterates pairwise scaling to convergence; no BN fold, no
  high-bias fold) on a model BN-folded beforehand (untimed), with the pairs clebench finds, minus those whose second
  layer is a depthwise conv: torch.ao reads the second layer's input ranges on weight axis 1, which has size 1 for a
  depthwise conv, so of each conv -> depthwise -> conv triple only the depthwise -> conv pair remains.
* agreement: clebench vs AIMET `equalize_model`, both with ReLU6 -> ReLU: the largest relative difference between
  corresponding weights / biases (max |a - b| / max |a| per tensor, max over tensors, a = AIMET), the CLS set lists,
  and the largest relative difference of FP32 logits on 64 real images (CIFAR-10 test for the checkpoints, the
  ImageNet sample for the ImageNet-shape models).
* simulation: W8A8 per-tensor min/max evaluation throughput and top-1 of clebench QuantSim, AIMET
  QuantizationSimModel (set up as in scripts/_peers.py) and the plain FP32 checkpoint (BN unfolded), on the same
  CIFAR-10 test images (`--limit`, default 2000; `--full`: all 10,000), calibrated on the same 512 train images.
  Median of `--eval-repeats` passes; sim set-up (fold, build, calibrate) is reported separately.
* sweep: `clebench sweep configs/cifar10.toml` (the `paper` preset, W8/W6/W4 per-tensor and W8 per-channel) on each
  CIFAR-10 checkpoint in a fresh process, on `--limit` test images (`--full`: all 10,000; about an hour per model on
  a 2-core CPU): its wall time and peak resident memory (as the sweep records them in meta.json), and the FP32 and
  quantized evaluations it made against the rows and against the minimum, found here independently by applying each
  row's FP32 steps to a fresh copy of the model and counting distinct models (and distinct model / bias correction /
  setting triples).

Every run prints its tables and merges its rows into results/bench/peers.csv (rows of the sections run now replace
older ones) and rewrites results/bench/peers.md from it. The machine is shared, so ratios are what matter. Without
AIMET the clebench and torch.ao columns still run.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import datetime
import gc
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from torch import nn
from torch.ao.quantization import _equalize as torch_ao

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402  (the scripts' shared helpers live beside them)

from clebench import graph, layers, steps  # noqa: E402
from clebench.batch_norm_fold import fold_all_batch_norms  # noqa: E402
from clebench.cross_layer_equalization import CrossLayerScaling, equalize_model  # noqa: E402
from clebench.data import batches  # noqa: E402
from clebench.evaluation import evaluate  # noqa: E402
from clebench.config import load_config  # noqa: E402
from clebench.models import load_model, model_preprocessing  # noqa: E402
from clebench.sweep import fingerprint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLE_MODELS = _peers.IMAGENET_SHAPE_MODELS + _peers.CIFAR_MODELS
CLE_TOOLS = ("clebench", "aimet", "torch.ao")
TORCH_AO_THRESHOLD = 1e-4  # torch.ao's default convergence threshold
LOGIT_IMAGES = 64
SPEEDUP_TARGET = 10.0
WEIGHT_AGREEMENT_TARGET = 1e-5
SIM_TIME_TARGET = 1.3  # clebench sim time / FP32 time
TOP1_AGREEMENT_TARGET = 0.3  # points
CSV_COLUMNS = ("section", "model", "measure", "tool", "value", "unit", "note", "machine", "date")
TARGET_TOOL = "target"  # rows of this tool are pass / fail checks, listed under each section's table


@dataclass
class Row:
    """One measured number; a row with tool == TARGET_TOOL states a target and whether it was met (note)."""

    model: str
    measure: str
    tool: str
    value: float
    unit: str
    note: str = ""


@dataclass
class SectionResult:
    rows: list[Row] = field(default_factory=list)
    skipped: str = ""  # why the section did not run, if it did not

    def target(self, model: str, measure: str, value: float, unit: str, met: bool) -> None:
        self.rows.append(Row(model, measure, TARGET_TOOL, value, unit, "met" if met else "MISSED"))


@dataclass
class Bench:
    args: argparse.Namespace
    aimet: SimpleNamespace | None


# ---------------------------------------------------------------------------------------------------- CLE time


def torch_ao_pairs(model: nn.Module) -> list[list[str]]:
    """Module-name pairs torch.ao can equalize: clebench's CLS pairs whose second layer is not depthwise."""
    probe = _peers.with_relu(model)
    fold_all_batch_norms(probe)
    names = {module: name for name, module in probe.named_modules()}
    return [
        [names[pair.layer1], names[pair.layer2]]
        for info in CrossLayerScaling.scale_model(probe)
        for pair in info.cls_pair_info_list
        if not layers.is_depthwise(pair.layer2)
    ]


def cle_call_factory(tool: str, model: nn.Module, shape: tuple[int, ...],
                     aimet: SimpleNamespace | None) -> Callable[[], Callable[[], object]]:
    """A factory whose every call makes a fresh copy (untimed) and returns the CLE call to time on it."""
    if tool == "clebench":
        def make() -> Callable[[], object]:
            fresh = copy.deepcopy(model)
            return lambda: equalize_model(fresh, shape)
    elif tool == "aimet":
        def make() -> Callable[[], object]:
            fresh = _peers.with_relu(model)
            return lambda: aimet.cross_layer_equalization.equalize_model(fresh, shape)
    elif tool == "torch.ao":
        pairs = torch_ao_pairs(model)
        folded = copy.deepcopy(model)
        fold_all_batch_norms(folded)

        def make() -> Callable[[], object]:
            fresh, fresh_pairs = copy.deepcopy(folded), copy.deepcopy(pairs)  # equalize rewrites the list it gets
            return lambda: torch_ao.equalize(fresh, fresh_pairs, threshold=TORCH_AO_THRESHOLD)
    else:
        raise ValueError(f"unknown CLE tool {tool!r}; choose from {CLE_TOOLS}")
    return make


def first_call_child(tool: str, model_name: str, args: argparse.Namespace) -> None:
    """In a fresh process: time one CLE call and print {"seconds": s} as the last stdout line."""
    aimet = _peers.load_aimet() if tool == "aimet" else None
    if tool == "aimet" and aimet is None:
        raise SystemExit(_peers.aimet_missing_message())
    model, shape = _peers.bench_model(model_name, args.models_dir)
    print(json.dumps({"seconds": _timed(cle_call_factory(tool, model, shape, aimet)())}))


def first_call_seconds(tool: str, model_name: str, args: argparse.Namespace) -> float:
    command = [sys.executable, str(Path(__file__).resolve()), "--first-call", tool, model_name,
               "--threads", str(args.threads)]
    if args.models_dir is not None:
        command += ["--models-dir", str(args.models_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{shlex.join(command)} failed (exit {done.returncode}): {reason}")
    return json.loads(lines[-1])["seconds"]


def time_cle(tools: list[str], model_name: str, bench: Bench) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """({tool: (median first-call seconds over fresh processes, median repeated-call seconds)}, {tool: failure}).

    The tools take turns, run by run, so that load changes on a shared machine hit every tool alike.
    """
    args = bench.args
    model, shape = _peers.bench_model(model_name, args.models_dir)
    makers, failures = {}, {}
    for tool in tools:
        try:
            makers[tool] = cle_call_factory(tool, model, shape, bench.aimet)
            makers[tool]()()  # warm-up; the first call is measured in fresh processes below
        except Exception as error:  # a peer failing on a model is a result; clebench failing is a bug
            if tool == "clebench":
                raise
            makers.pop(tool, None)
            failures[tool] = _peers.aimet_error(error) if tool == "aimet" else f"torch.ao failed: {type(error).__name__}: {error}"
    first = {tool: [] for tool in makers}
    repeated = {tool: [] for tool in makers}
    for _ in range(args.fresh_runs):
        for tool in makers:
            first[tool].append(first_call_seconds(tool, model_name, args))
    for _ in range(args.repeats):
        for tool, make in makers.items():
            repeated[tool].append(_timed(make()))
    return {tool: (statistics.median(first[tool]), statistics.median(repeated[tool])) for tool in makers}, failures


def _timed(call: Callable[[], object]) -> float:
    """Seconds one call takes, with garbage collection done before and held off during it (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    finally:
        gc.enable()


def section_cle_time(bench: Bench) -> SectionResult:
    result = SectionResult()
    tools = [t for t in CLE_TOOLS if t != "aimet" or bench.aimet is not None]
    for model_name in bench.args.cle_models:
        seconds, failures = time_cle(tools, model_name, bench)
        for tool, note in failures.items():
            result.rows.append(Row(model_name, "first call", tool, math.nan, "ms", note))
        for tool, values in seconds.items():
            for measure, value in zip(("first call", "repeated call"), values):
                result.rows.append(Row(model_name, measure, tool, 1000 * value, "ms"))
            print(f"  cle-time {model_name} {tool}: first {1000 * values[0]:.1f} ms, repeated {1000 * values[1]:.1f} ms",
                  flush=True)
        if "aimet" in seconds:
            for index, measure in enumerate(("first call", "repeated call")):
                speedup = seconds["aimet"][index] / seconds["clebench"][index]
                result.target(model_name, f"clebench >= {SPEEDUP_TARGET:g}x faster than AIMET, {measure}", speedup, "x",
                              speedup >= SPEEDUP_TARGET)
    return result


# ---------------------------------------------------------------------------------------------------- agreement


def cls_set_names(tool: str, model: nn.Module, shape: tuple[int, ...], aimet: SimpleNamespace) -> list[tuple[str, ...]]:
    """The CLS sets `tool` finds in BN-folded, ReLU6 -> ReLU `model`, as tuples of module names."""
    probe = _peers.with_relu(model)
    if tool == "clebench":
        fold_all_batch_norms(probe)
        infos = CrossLayerScaling.scale_model(probe)
    else:
        aimet.batch_norm_fold.fold_all_batch_norms(probe, shape)
        infos = aimet.cross_layer_equalization.CrossLayerScaling.scale_model(probe, shape)
    names = {module: name for name, module in probe.named_modules()}
    return [
        tuple(names[p.layer1] for p in info.cls_pair_info_list) + (names[info.cls_pair_info_list[-1].layer2],)
        for info in infos
    ]


def largest_relative_difference(reference: dict[str, torch.Tensor],
                                other: dict[str, torch.Tensor]) -> tuple[float, str, list[str]]:
    """(max over shared float tensors of max|ref - other| / max|ref|, the worst tensor, keys not in both)."""
    unmatched = sorted(set(reference) ^ set(other))
    worst, worst_name = 0.0, ""
    for name, ref in reference.items():
        if name not in other or not ref.is_floating_point() or not ref.numel():
            continue
        scale = ref.abs().max().item()
        gap = (ref - other[name]).abs().max().item()
        relative = gap / scale if scale else (0.0 if gap == 0 else math.inf)
        if relative > worst:
            worst, worst_name = relative, name
    return worst, worst_name, unmatched


def describe_set_difference(ours: list[tuple[str, ...]], theirs: list[tuple[str, ...]]) -> str:
    only_ours = [s for s in ours if s not in theirs]
    only_theirs = [s for s in theirs if s not in ours]
    if not only_ours and not only_theirs:
        return "identical, same order" if ours == theirs else "same sets, different order"
    return f"only clebench: [{_listed_sets(only_ours)}]; only AIMET: [{_listed_sets(only_theirs)}]"


def _listed_sets(sets: list[tuple[str, ...]], shown: int = 4) -> str:
    return "; ".join("->".join(s) for s in sets[:shown]) + (" ..." if len(sets) > shown else "")


def agreement_for(model_name: str, bench: Bench, result: SectionResult) -> None:
    aimet, args = bench.aimet, bench.args
    model, shape = _peers.bench_model(model_name, args.models_dir)
    ours = copy.deepcopy(model)
    equalize_model(ours, shape)
    theirs = _peers.with_relu(model)
    aimet.cross_layer_equalization.equalize_model(theirs, shape)
    worst, worst_name, unmatched = largest_relative_difference(theirs.state_dict(), ours.state_dict())
    our_sets = cls_set_names("clebench", model, shape, aimet)
    their_sets = cls_set_names("aimet", model, shape, aimet)
    sets_note = describe_set_difference(our_sets, their_sets)
    images, preprocessing = _peers.sample_images(model_name, args.data, LOGIT_IMAGES)
    inputs = torch.cat(_peers.input_batches(images, preprocessing, LOGIT_IMAGES))
    with torch.no_grad():
        their_logits, our_logits = theirs(inputs), ours(inputs)
    logit_gap = ((our_logits - their_logits).abs().max() / their_logits.abs().max()).item()
    both = "clebench vs aimet"
    result.rows += [
        Row(model_name, "weights/biases max rel. diff", both, worst, "relative",
            f"worst: {worst_name}" + (f"; tensors in one model only: {unmatched}" if unmatched else "")),
        Row(model_name, "CLS sets", "clebench", len(our_sets), "sets"),
        Row(model_name, "CLS sets", "aimet", len(their_sets), "sets"),
        Row(model_name, "CLS sets in both", both, len(set(our_sets) & set(their_sets)), "sets", sets_note),
        Row(model_name, f"FP32 logits max rel. diff ({len(inputs)} real images)", both, logit_gap, "relative"),
    ]
    identical = our_sets == their_sets
    result.target(model_name, f"weights agree within {WEIGHT_AGREEMENT_TARGET:g} relative", worst, "relative",
                  worst <= WEIGHT_AGREEMENT_TARGET and not unmatched)
    result.target(model_name, "CLS set lists identical", float(identical), "bool", identical)
    print(f"  agreement {model_name}: weights {worst:.2e} ({worst_name}), sets: {sets_note}, logits {logit_gap:.2e}",
          flush=True)


def section_agreement(bench: Bench) -> SectionResult:
    if bench.aimet is None:
        return SectionResult(skipped=_peers.aimet_missing_message())
    result = SectionResult()
    for model_name in bench.args.cle_models:
        try:
            agreement_for(model_name, bench, result)
        except Exception as error:  # an AIMET failure is recorded; the section goes on with the next model
            result.rows.append(Row(model_name, "agreement", "aimet", math.nan, "", _peers.aimet_error(error)))
    return result


# ---------------------------------------------------------------------------------------------------- simulation


def timed_top1(network: nn.Module, loader_factory: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(top-1 %, median seconds of a full evaluation pass) over `repeats` passes."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        top1 = evaluate(network, loader_factory(), progress=False)["top1"]
        runs.append((time.perf_counter() - start, top1))
    if len({top1 for _, top1 in runs}) != 1:
        raise RuntimeError(f"top-1 changed between identical passes: {[top1 for _, top1 in runs]}")
    return runs[0][1], statistics.median(seconds for seconds, _ in runs)


def simulation_for(model_name: str, bench: Bench, result: SectionResult) -> None:
    args = bench.args
    preprocessing = model_preprocessing(model_name)
    calibration_set, test_set = _peers.cifar_images(model_name, args.data, None if args.full else args.limit)
    calibration = _peers.input_batches(calibration_set, preprocessing, args.batch_size)
    model, shape = _peers.bench_model(model_name, args.models_dir)
    builders: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: model,
        "clebench": lambda: _peers.clebench_quantsim(model, calibration, 8, 8, shape),
    }
    if bench.aimet is not None:
        builders["aimet"] = lambda: _peers.aimet_quantsim(bench.aimet, model, calibration, 8, 8, shape)
    measured: dict[str, tuple[float, float]] = {}
    for tool, build in builders.items():
        start = time.perf_counter()
        try:
            network = build()
        except Exception as error:  # only the AIMET builder is allowed to fail
            if tool != "aimet":
                raise
            result.rows.append(Row(model_name, "W8A8 top-1", tool, math.nan, "%", _peers.aimet_error(error)))
            continue
        setup = time.perf_counter() - start
        measured[tool] = timed_top1(network, lambda: batches(test_set, args.batch_size, preprocessing), args.eval_repeats)
        top1, seconds = measured[tool]
        label = f"{'FP32' if tool == 'fp32' else 'W8A8'} top-1 ({len(test_set)} test images)"
        result.rows += [
            Row(model_name, label, tool, top1, "%"),
            Row(model_name, "throughput", tool, len(test_set) / seconds, "images/s"),
            Row(model_name, "eval time / FP32 eval time", tool, seconds / measured["fp32"][1], "x"),
        ]
        if tool != "fp32":
            result.rows.append(Row(model_name, "set-up (fold, build, calibrate)", tool, setup, "s"))
        print(f"  simulation {model_name} {tool}: top-1 {top1:.2f}, {len(test_set) / seconds:.0f} images/s", flush=True)
    ratio = measured["clebench"][1] / measured["fp32"][1]
    result.target(model_name, f"clebench sim time <= {SIM_TIME_TARGET:g}x FP32", ratio, "x", ratio <= SIM_TIME_TARGET)
    if "aimet" in measured:
        speedup = measured["aimet"][1] / measured["clebench"][1]
        result.target(model_name, "clebench sim faster than AIMET", speedup, "x", speedup > 1.0)
        gap = abs(measured["clebench"][0] - measured["aimet"][0])
        result.target(model_name, f"|top-1 clebench - AIMET| <= {TOP1_AGREEMENT_TARGET:g}", gap, "points",
                      gap <= TOP1_AGREEMENT_TARGET)


def section_simulation(bench: Bench) -> SectionResult:
    result = SectionResult()
    for model_name in _peers.CIFAR_MODELS:
        simulation_for(model_name, bench, result)
    return result


# ---------------------------------------------------------------------------------------------------- sweep

SWEEP_CONFIG = REPO / "configs" / "cifar10.toml"


def minimum_evaluations(model: nn.Module, model_name: str, combinations: list[steps.Combination],
                        quant_names: list[str]) -> tuple[int, int, int]:
    """(rows, distinct FP32 models, distinct quantized models) of the sweep, each row's steps applied from scratch.

    The config lists its steps explicitly (a preset), so every combination must run on the model, as in the sweep.
    """
    fp32_models, quantized_models, rows = set(), set(), 0
    for combination in combinations:
        steps.check_for_model(combination, model, model_name)
        fp32_steps, correction = steps.split_combination(combination)
        state = steps.PipelineState(graph.prepare_model(copy.deepcopy(model)))
        for step in fp32_steps:
            steps.apply_fp32_step(step, state)
        model_print = fingerprint(state.model)
        fp32_models.add(model_print)
        quantized_models |= {(model_print, correction, quant) for quant in quant_names}
        rows += len(quant_names)
    return rows, len(fp32_models), len(quantized_models)


def sweep_for(model_name: str, bench: Bench, result: SectionResult) -> None:
    args = bench.args
    config = load_config(SWEEP_CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "clebench", "sweep", str(SWEEP_CONFIG), "--models", model_name,
                   "--out", folder, "--no-progress"]
        command += [] if args.full else ["--limit", str(args.limit)]
        command += [option for option, value in (("--data-root", args.data), ("--models-dir", args.models_dir))
                    for option in (option, value) if value is not None]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        work = json.loads((Path(folder) / "meta.json").read_text())["last_run_work"]
        images = int(pd.read_csv(Path(folder) / "results.csv")["n_images"].iloc[0])
    rows, fp32_minimum, quantized_minimum = minimum_evaluations(
        load_model(model_name, models_dir=args.models_dir), model_name, config.combinations,
        [quant.name for quant in config.quant_configs])
    note = f"{images} test images, {work['rows']} rows"
    result.rows += [
        Row(model_name, "wall time", "clebench", work["wall_seconds"], "s", note),
        Row(model_name, "peak resident memory", "clebench", work["peak_memory_mib"], "MiB"),
        Row(model_name, "FP32 evaluations (rows / minimum)", "clebench", work["fp32_evaluations"], "passes",
            f"{rows} / {fp32_minimum}"),
        Row(model_name, "quantized evaluations (rows / minimum)", "clebench", work["quantized_evaluations"], "passes",
            f"{rows} / {quantized_minimum}"),
    ]
    print(f"  sweep {model_name}: {work['wall_seconds']:.0f} s, {work['peak_memory_mib']:.0f} MiB", flush=True)
    result.target(model_name, "sweep rows = config rows", work["rows"], "rows", work["rows"] == rows)
    minimal = (work["fp32_evaluations"], work["quantized_evaluations"]) == (fp32_minimum, quantized_minimum)
    result.target(model_name, "evaluations = minimum (FP32, quantized)", float(minimal), "bool", minimal)


def section_sweep(bench: Bench) -> SectionResult:
    result = SectionResult()
    for model_name in _peers.CIFAR_MODELS:
        sweep_for(model_name, bench, result)
    return result


SECTIONS: dict[str, Callable[[Bench], SectionResult]] = {
    "cle-time": section_cle_time,
    "agreement": section_agreement,
    "simulation": section_simulation,
    "sweep": section_sweep,
}


# ---------------------------------------------------------------------------------------------------- output


def format_value(value: float) -> str:
    if math.isnan(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:,.2f}"


def section_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measurements: one row per model / measure / unit, one column per tool, in first-seen order; targets)."""
    targets = frame[frame["tool"] == TARGET_TOOL][["model", "measure", "value", "unit", "note"]]
    measured = frame[frame["tool"] != TARGET_TOOL]
    tools = list(dict.fromkeys(measured["tool"]))
    table: dict[tuple[str, str, str], dict] = {}
    for row in measured.itertuples():
        record = table.setdefault((row.model, row.measure, row.unit), {
            "model": row.model, "measure": row.measure, "unit": row.unit, **dict.fromkeys(tools, math.nan), "note": "",
        })
        record[row.tool] = row.value
        record["note"] = "; ".join(filter(None, [record["note"], row.note]))
    wide = pd.DataFrame(list(table.values()))
    return (wide if wide["note"].any() else wide.drop(columns="note")), targets


def target_line(target) -> str:
    """'<model>: <target>: <value> <unit> -- met|MISSED' for a target row (a namedtuple from itertuples)."""
    value = ("yes" if target.value else "no") if target.unit == "bool" else f"{format_value(target.value)} {target.unit}"
    return f"{target.model}: {target.measure}: {value} -- {target.note}"


def tools_of(wide: pd.DataFrame) -> list[str]:
    """The value columns of a section table (one per tool)."""
    return [c for c in wide.columns if c not in ("model", "measure", "unit", "note")]


def markdown_table(frame: pd.DataFrame) -> str:
    cells = [[format_value(v) if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def render(frame: pd.DataFrame) -> str:
    """Markdown for every section in `frame` (the merged CSV)."""
    parts = ["# clebench vs peers", "",
             "Generated by scripts/bench_peers.py; the machine is shared, so compare ratios, not absolute times.", ""]
    for section, rows in frame.groupby("section", sort=False):
        wide, targets = section_tables(rows)
        parts += [f"## {section}", "", f"Machine: {rows['machine'].iloc[0]}; run {rows['date'].iloc[0]}.", "",
                  markdown_table(wide), ""]
        if len(targets):
            parts += ["Targets:", ""] + [
                f"- {target_line(t)}" for t in targets.itertuples()
            ] + [""]
    return "\n".join(parts)


def write_results(rows: pd.DataFrame, out: Path) -> None:
    """Merge `rows` into out/peers.csv (replacing rows of the same sections) and rewrite out/peers.md."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "peers.csv"
    if csv_path.is_file():
        old = pd.read_csv(csv_path, keep_default_na=False, na_values=[""], dtype={"note": str})
        old["note"] = old["note"].fillna("")
        rows = pd.concat([old[~old["section"].isin(set(rows["section"]))], rows], ignore_index=True)
    order = {name: index for index, name in enumerate(SECTIONS)}  # sections in registry order, unknown ones last
    rows = rows.sort_values("section", key=lambda column: column.map(lambda name: order.get(name, len(order))),
                            kind="stable")[list(CSV_COLUMNS)]
    rows.to_csv(csv_path, index=False)
    (out / "peers.md").write_text(render(rows))
    print(f"wrote {csv_path} and {out / 'peers.md'}")


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", *SECTIONS], default="all", help="run one section (default all)")
    parser.add_argument("--data", default=None, help="data root (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="CIFAR-10 checkpoints folder (default: env CLEBENCH_MODELS)")
    parser.add_argument("--cle-models", nargs="+", choices=CLE_MODELS, default=list(CLE_MODELS),
                        help="models of the cle-time and agreement sections (default all four)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads value (default 1: CLE is many small ops, which extra threads on a "
                             "busy machine only slow down)")
    parser.add_argument("--fresh-runs", type=int, default=3, help="fresh processes per first-call time (median)")
    parser.add_argument("--repeats", type=int, default=5, help="repeated CLE calls per model and tool (median)")
    parser.add_argument("--eval-repeats", type=int, default=3, help="evaluation passes per simulator (median)")
    parser.add_argument("--limit", type=int, default=2000, help="class-balanced CIFAR-10 test images (default 2000)")
    parser.add_argument("--full", action="store_true", help="evaluate on all 10,000 CIFAR-10 test images")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench",
                        help="folder of peers.csv / peers.md (default: results/bench in the repository)")
    parser.add_argument("--first-call", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "fresh_runs", "repeats", "eval_repeats", "limit", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.first_call:
        first_call_child(*args.first_call, args)
        return
    bench = Bench(args, _peers.load_aimet())
    machine = _peers.machine_summary(bench.aimet)
    print(f"# {machine}")
    if bench.aimet is None:
        print(f"# {_peers.aimet_missing_message()}; AIMET columns are left out")
    date = datetime.datetime.now().isoformat(timespec="seconds")
    frames = []
    for name in SECTIONS if args.section == "all" else [args.section]:
        print(f"## {name}", flush=True)
        try:
            result = SECTIONS[name](bench)
        except FileNotFoundError as error:  # data or checkpoints not where the arguments / environment say
            raise SystemExit(f"error: {error}") from None
        if result.skipped:
            print(f"  skipped: {result.skipped}")
            continue
        frame = pd.DataFrame([asdict(row) for row in result.rows], columns=list(Row.__dataclass_fields__))
        frame.insert(0, "section", name)
        frame["machine"], frame["date"] = machine, date
        wide, targets = section_tables(frame)
        print(wide.to_string(index=False, na_rep="-", formatters=dict.fromkeys(tools_of(wide), format_value)))
        for target in targets.itertuples():
            print(f"  target {target_line(target)}")
        frames.append(frame)
    if frames:
        write_results(pd.concat(frames, ignore_index=True), args.out)


if __name__ == "__main__":
    main()
