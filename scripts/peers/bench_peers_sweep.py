"""The sweep's cost: wall time, memory and evaluations made against the minimum, on the CIFAR-10 checkpoints.

    python scripts/peers/bench_peers_sweep.py [--limit 2000 | --full]

`clebench sweep configs/cifar10.toml` (the `paper` preset, W8/W6/W4 per-tensor and W8 per-channel) on each
CIFAR-10 checkpoint in a fresh process, on `--limit` test images (`--full`: all 10,000; about an hour per model on
a 2-core CPU): its wall time and peak resident memory (as the sweep records them in meta.json), and the FP32 and
quantized evaluations it made against the rows and against the minimum, found here independently by applying each
row's FP32 steps to a fresh copy of the model and counting distinct models (and distinct model / bias correction /
setting triples).

Output: prints its table and merges its rows into results/bench/peers.csv (rows of this section replace older ones), then
rewrites results/bench/peers.md (scripts/peers/_peers.py). The machine is shared, so ratios are what matter. AIMET is not
involved.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import _peers  # the scripts' shared helpers live beside them
import pandas as pd
from _peers import Row, SectionResult
from torch import nn

from clebench import graph

from clebench.sweep import steps
from clebench.sweep.config import load_config
from clebench.sweep.execute import fingerprint
from clebench.models import load_model

SWEEP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cifar10.toml"


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


def sweep_for(model_name: str, args: argparse.Namespace, result: SectionResult) -> None:
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


def measure(args: argparse.Namespace, aimet: SimpleNamespace | None) -> SectionResult:
    result = SectionResult()
    for model_name in _peers.CIFAR_MODELS:
        sweep_for(model_name, args, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _peers.parser(__doc__)
    parser.add_argument("--limit", type=_peers.positive_int, default=2000,
                        help="class-balanced CIFAR-10 test images (default 2000)")
    parser.add_argument("--full", action="store_true", help="evaluate on all 10,000 CIFAR-10 test images")
    return parser


def main() -> None:
    _peers.run_section("sweep", measure, build_parser().parse_args())


if __name__ == "__main__":
    main()
