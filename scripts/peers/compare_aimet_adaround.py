"""AdaRound: clebench against AIMET (aimet-torch 2.42) on the CIFAR-10 checkpoints, same call, data and iterations.

    /opt/aimetenv/bin/python scripts/peers/compare_aimet_adaround.py [--iterations 200] [--limit N] [--out FILE]

Each checkpoint is BN-folded once (clebench's fold) and every tool rounds a copy of that model: W4 per-tensor
weights (AIMET's per-tensor default_config.json, quant scheme "tf", AIMET's symmetric scale rule in both), learned
from the same 512 class-balanced CIFAR-10 train images in 8 batches of 64, `--iterations` per layer. Columns:

* nearest: no AdaRound, round-to-nearest on the same grid;
* aimet: AIMET's `Adaround.apply_adaround` (its Adam learning rate is fixed at 1e-3, tuned for 10,000 iterations);
* clebench: clebench's `Adaround.apply_adaround` (Adam learning rate 10 / iterations, its default);
* clebench lr 1e-3: `apply_adaround_to_model` with AIMET's learning rate, the like-for-like run.

Every result is scored the same way: clebench's QuantSim W4A8 per tensor (AIMET's rules) of the rounded model with
that tool's weight encodings frozen, activations calibrated on the same 512 images, top-1 on `--limit`
class-balanced test images (default: all 10,000). Each AdaRound's wall and CPU seconds come from the same run
(CPU seconds are what an otherwise idle machine would need at this thread count).

With `--repeats N` the aimet and clebench calls run N times each, alternating (AIMET first in odd repeats, clebench
first in even ones, so drift in the machine's load falls on both): the seconds are medians, every repeat's ratio is
listed, AIMET's top-1 (it seeds nothing) is given with its range over the repeats, and every clebench repeat must
give the same weights bit for bit (the script stops if not).

Output: prints the markdown table to stdout; with --out, also writes it to that file
(results/bench/adaround_aimet.md is the committed one).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import _peers
from bench_adaround import load_aimet_adaround

from clebench import timing
from clebench.adaround import AdaroundSettings, apply_adaround_to_model
from clebench.adaround.adaround_weight import Adaround, AdaroundParameters, QuantScheme
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cli import positive_int
from clebench.data.datasets import batches
from clebench.evaluation import evaluate
from clebench.models import model_preprocessing
from clebench.quant import QuantConfig, QuantSim

WEIGHT_BITS = 4
AIMET_LEARNING_RATE = 1e-3  # aimet_torch/_base/adaround/adaround_optimizer.py: torch.optim.Adam([alpha]), default lr
COLUMNS = ("nearest", "aimet", "clebench", "clebench lr 1e-3")


def timed(call):
    """(result, wall seconds, CPU seconds of this process) of call()."""
    clock = timing.Stopwatch()
    result = call()
    return result, clock.seconds, clock.cpu_seconds


def api_adaround(tool, model, images: list[torch.Tensor], iterations: int, config_file: str):
    """(rounded model, encodings file) of `tool.Adaround.apply_adaround` on a copy of `model`."""
    folder = tempfile.mkdtemp()
    params = tool.AdaroundParameters(images, len(images), default_num_iterations=iterations)
    rounded = tool.Adaround.apply_adaround(copy.deepcopy(model), images[0][:1], params, folder, "ada",
                                           default_param_bw=WEIGHT_BITS,
                                           default_quant_scheme=tool.QuantScheme.post_training_tf,
                                           default_config_file=config_file)
    return rounded, Path(folder) / "ada.encodings"


def score(model, encodings, images: list[torch.Tensor], test_loader: list) -> float:
    """Top-1 (%) of the W4A8 per-tensor QuantSim of `model`, weights frozen on `encodings` (None: its own)."""
    config = QuantConfig(weight_bits=WEIGHT_BITS, act_bits=8, calibration="minmax", aimet_rules=True)
    sim = QuantSim(model, images[0][:1], config)
    if isinstance(encodings, Path):
        sim.set_and_freeze_param_encodings(encodings)
    elif encodings is not None:
        sim.freeze_param_encodings(encodings)
    sim.calibrate(images, progress=False)
    return evaluate(sim.model, test_loader, progress=False)["top1"]


def compare_model(name: str, args: argparse.Namespace, aimet_tool, config_file: str) -> list[str]:
    """The markdown rows (top-1, then seconds) of one checkpoint."""
    model, _ = _peers.bench_model(name, args.models_dir)
    fold_all_batch_norms(model)
    preprocessing = model_preprocessing(name)
    calibration, test = _peers.cifar_images(name, args.data, args.limit)
    images = _peers.input_batches(calibration, preprocessing, 64)
    test_loader = list(batches(test, 500, preprocessing))
    ours = argparse.Namespace(Adaround=Adaround, AdaroundParameters=AdaroundParameters, QuantScheme=QuantScheme)
    grid = QuantConfig(weight_bits=WEIGHT_BITS, act_bits=8, aimet_rules=True)
    runs = {
        "aimet": lambda: api_adaround(aimet_tool, model, images, args.iterations, config_file),
        "clebench": lambda: api_adaround(ours, model, images, args.iterations, config_file),
        "clebench lr 1e-3": lambda: apply_adaround_to_model(
            model, grid, [(x,) for x in images],
            AdaroundSettings(iterations=args.iterations, learning_rate=AIMET_LEARNING_RATE)),
    }
    repeated = ["aimet", "clebench"] if aimet_tool is not None else ["clebench"]
    schedule = [column for repeat in range(args.repeats) for column in (repeated if repeat % 2 == 0 else repeated[::-1])]
    top1, wall, cpu = {"nearest": [score(model, None, images, test_loader)]}, {}, {}
    first_weights = None
    for column in schedule + ["clebench lr 1e-3"]:
        (rounded, encodings), seconds, cpu_seconds = timed(runs[column])
        wall.setdefault(column, []).append(seconds)
        cpu.setdefault(column, []).append(cpu_seconds)
        if column == "clebench":
            weights = rounded.state_dict()
            if first_weights is not None:
                same = all(torch.equal(weights[key], value) for key, value in first_weights.items())
                print(f"  {name} clebench repeat {len(wall[column])}: {seconds:.0f} s wall, same weights: {same}",
                      flush=True)
                if not same:
                    raise SystemExit(f"{name}: clebench's AdaRound gave other weights in repeat {len(wall[column])}")
                continue
            first_weights = weights
        top1.setdefault(column, []).append(score(rounded, encodings, images, test_loader))
        print(f"  {name} {column}: top-1 {top1[column][-1]:.2f}, {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU",
              flush=True)
    return table_rows(name, top1, wall, cpu)


def table_rows(name: str, top1: dict[str, list[float]], wall: dict[str, list[float]],
               cpu: dict[str, list[float]]) -> list[str]:
    """The markdown rows of one checkpoint: top-1 (first run; with repeats AIMET's range after it), seconds
    (medians with repeats), and with repeats each repeat's AIMET / clebench wall ratio."""
    def top1_cell(column: str) -> str:
        if column not in top1:
            return "-"
        values = top1[column]
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        return f"{values[0]:.2f}{spread}"

    median = {column: (statistics.median(wall[column]), statistics.median(cpu[column])) for column in wall}
    seconds = [f"{median[c][0]:.0f} / {median[c][1]:.0f}" if c in median else "" for c in COLUMNS]
    ratio = (f"{median['aimet'][0] / median['clebench'][0]:.2f}x / {median['aimet'][1] / median['clebench'][1]:.2f}x"
             if "aimet" in median else "-")
    repeats = len(wall["clebench"])
    measure = "AdaRound s (wall / CPU)" + (f", median of {repeats}" if repeats > 1 else "")
    rows = [f"| {name} | top-1 (%) | {' | '.join(top1_cell(c) for c in COLUMNS)} | |",
            f"| {name} | {measure} | {' | '.join(seconds)} | {ratio} |"]
    if repeats > 1 and "aimet" in wall:
        ratios = ", ".join(f"{a / c:.2f}x" for a, c in zip(wall["aimet"], wall["clebench"]))
        rows.append(f"| {name} | wall ratio per repeat |{' |' * len(COLUMNS)} {ratios} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="folder of the checkpoints (default: env CLEBENCH_MODELS)")
    parser.add_argument("--models", nargs="+", default=list(_peers.CIFAR_MODELS), choices=_peers.CIFAR_MODELS)
    parser.add_argument("--iterations", type=positive_int, default=200, help="AdaRound steps per layer")
    parser.add_argument("--limit", type=positive_int, default=None, help="class-balanced test images (default: all)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="time AIMET and clebench this many times each, alternating (medians, spread)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    aimet_tool, aimet = load_aimet_adaround()
    if aimet_tool is None:
        print(f"# {_peers.aimet_missing_message()}: clebench's columns only", file=sys.stderr)
    config_file = aimet.per_tensor_config if aimet is not None else None
    lines = [f"Command: `python {' '.join(sys.argv)}` ({datetime.date.today()}); {_peers.machine_summary(aimet)}.",
             "",
             f"W{WEIGHT_BITS}A8 per tensor, BN folded, {args.iterations} AdaRound iterations per layer, 512 CIFAR-10 "
             f"train images (8 batches of 64); top-1 on {args.limit or 'all 10,000'} test images, every column "
             "scored by clebench's QuantSim with that tool's weight encodings frozen. Seconds: the AdaRound call "
             "only; ratio = AIMET / clebench (default learning rate)"
             + (f"; aimet and clebench ran {args.repeats} times each, alternating: seconds are medians, AIMET's "
                "top-1 is the first run's with its range over the repeats in brackets, clebench's repeats gave the "
                "same weights bit for bit." if args.repeats > 1 else "."),
             "",
             f"| model | measure | {' | '.join(COLUMNS)} | AIMET / clebench |",
             "|:--|:--|" + "--:|" * (len(COLUMNS) + 1)]
    print("\n".join(lines), flush=True)
    for name in args.models:
        rows = compare_model(name, args, aimet_tool, config_file)
        print("\n".join(rows), flush=True)
        lines += rows
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
