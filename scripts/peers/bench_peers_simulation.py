"""clebench against its peers, quantization simulation: clebench QuantSim, AIMET QuantizationSimModel (optional)
and FP32.

    /opt/aimetenv/bin/python scripts/peers/bench_peers_simulation.py [--limit 2000 | --full] [--eval-repeats 3]

W8A8 per-tensor min/max evaluation throughput and top-1 of clebench QuantSim, AIMET
QuantizationSimModel (set up as in scripts/peers/_peers.py) and the plain FP32 checkpoint (BN unfolded), on the same
CIFAR-10 test images (`--limit`, default 2000; `--full`: all 10,000), calibrated on the same 512 train images.
Median of `--eval-repeats` passes; sim set-up (fold, build, calibrate) is reported separately.

Output: prints its table and merges its rows into results/bench/peers.csv (rows of this section replace older ones), then
rewrites results/bench/peers.md (scripts/peers/_peers.py). The machine is shared, so ratios are what matter. Without
AIMET the clebench and FP32 columns still run.
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from types import SimpleNamespace

import _peers  # the scripts' shared helpers live beside them
from _peers import Row, SectionResult
from torch import nn

from clebench import timing
from clebench.data.datasets import batches
from clebench.evaluation import evaluate
from clebench.models import model_preprocessing

SIM_TIME_TARGET = 1.3  # clebench sim time / FP32 time
TOP1_AGREEMENT_TARGET = 0.3  # points


def timed_top1(network: nn.Module, loader_factory: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(top-1 %, median seconds of a full evaluation pass) over `repeats` passes."""
    runs = []
    for _ in range(repeats):
        runs.append(timing.timed(lambda: evaluate(network, loader_factory(), progress=False)["top1"]))
    if len({top1 for _, top1 in runs}) != 1:
        raise RuntimeError(f"top-1 changed between identical passes: {[top1 for _, top1 in runs]}")
    return runs[0][1], statistics.median(seconds for seconds, _ in runs)


def simulation_for(model_name: str, args: argparse.Namespace, aimet: SimpleNamespace | None,
                   result: SectionResult) -> None:
    preprocessing = model_preprocessing(model_name)
    calibration_set, test_set = _peers.cifar_images(model_name, args.data, None if args.full else args.limit)
    calibration = _peers.input_batches(calibration_set, preprocessing, args.batch_size)
    model, shape = _peers.bench_model(model_name, args.models_dir)
    builders: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: model,
        "clebench": lambda: _peers.clebench_quantsim(model, calibration, 8, 8, shape),
    }
    if aimet is not None:
        builders["aimet"] = lambda: _peers.aimet_quantsim(aimet, model, calibration, 8, 8, shape)
    measured: dict[str, tuple[float, float]] = {}
    for tool, build in builders.items():
        clock = timing.Stopwatch()
        try:
            network = build()
        except Exception as error:  # only the AIMET builder is allowed to fail
            if tool != "aimet":
                raise
            result.rows.append(Row(model_name, "W8A8 top-1", tool, math.nan, "%", _peers.aimet_error(error)))
            continue
        setup = clock.seconds
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


def measure(args: argparse.Namespace, aimet: SimpleNamespace | None) -> SectionResult:
    result = SectionResult()
    for model_name in _peers.CIFAR_MODELS:
        simulation_for(model_name, args, aimet, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _peers.parser(__doc__)
    parser.add_argument("--eval-repeats", type=_peers.positive_int, default=3,
                        help="evaluation passes per simulator (median)")
    parser.add_argument("--limit", type=_peers.positive_int, default=2000,
                        help="class-balanced CIFAR-10 test images (default 2000)")
    parser.add_argument("--full", action="store_true", help="evaluate on all 10,000 CIFAR-10 test images")
    parser.add_argument("--batch-size", type=_peers.positive_int, default=250)
    return parser


def main() -> None:
    _peers.run_section("simulation", measure, build_parser().parse_args())


if __name__ == "__main__":
    main()
