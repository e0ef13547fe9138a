"""Command line: `clebench sweep | report | ranges | check | cache` (also `python -m clebench ...`)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

EXAMPLES = """examples:
  clebench sweep configs/cifar10_ci.toml --data-root ../shared/data --models-dir ../shared/models
  clebench report runs/cifar10_ci
  clebench ranges mobilenet_v2_cifar10 --steps bn_fold+cls_relu6_clip --plot ranges.png
  clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --tolerance 0.5
  clebench cache ls
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def device_name(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA was requested but torch sees no CUDA device")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clebench",
        description="Cross-Layer Equalization benchmark: sweeps of equalization steps x quantization settings.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = commands.add_parser("sweep", help="run a sweep config and write tables and plots",
                                description="Evaluate models x step combinations x quantization settings (resumable).")
    sweep.add_argument("config", type=Path, help="TOML sweep config (see configs/)")
    sweep.add_argument("--data-root", help="folder holding the data sets (default: $CLEBENCH_DATA)")
    sweep.add_argument("--models-dir", help="folder holding <model>.pt checkpoints (default: $CLEBENCH_MODELS)")
    sweep.add_argument("--device", type=device_name, default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    sweep.add_argument("--limit", type=positive_int, help="evaluate on this many class-balanced images (overrides data.limit)")
    sweep.add_argument("--models", nargs="+", metavar="NAME", help="run only these of the config's models")
    sweep.add_argument("--out", type=Path, help="results folder (default: runs/<config name>); re-running resumes it")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = commands.add_parser("report", help="regenerate tables and plots of a results folder",
                                 description="Rewrite results.md and the PNG plots from the saved CSVs, without re-running.")
    report.add_argument("results_dir", type=Path, help="folder written by `clebench sweep`")

    ranges = commands.add_parser("ranges", help="print (and plot) a model's per-layer weight ranges",
                                 description="Per-layer per-output-channel weight ranges and int8 weight SQNR of a zoo model.")
    ranges.add_argument("model", help="model name (see `clebench ranges --list`)", nargs="?")
    ranges.add_argument("--list", action="store_true", help="list the model names and exit")
    ranges.add_argument("--steps", default="bn_fold", help="FP32 steps applied first, e.g. bn_fold+cls_relu6_clip (default: bn_fold)")
    ranges.add_argument("--models-dir", help="folder holding <model>.pt checkpoints (default: $CLEBENCH_MODELS)")
    ranges.add_argument("--checkpoint", help="a checkpoint file for the model")
    ranges.add_argument("--bits", type=positive_int, default=8, help="weight bit-width for the SQNR column (default: 8)")
    ranges.add_argument("--plot", type=Path, help="also write the per-layer range-ratio plot to this PNG")

    check = commands.add_parser("check", help="compare a sweep with a committed baseline (CI gate)",
                                description="Exit 1 when a quantized accuracy fell more than --tolerance points below the "
                                "baseline, a baseline row is missing, or the configuration differs.")
    check.add_argument("results_dir", type=Path, help="folder written by `clebench sweep`")
    check.add_argument("--baseline", type=Path, required=True, help="baseline JSON file")
    check.add_argument("--tolerance", type=non_negative_float, default=0.5, help="allowed top-1 drop in points (default: 0.5)")
    check.add_argument("--write-baseline", action="store_true", help="write the baseline from the results instead of checking")

    cache = commands.add_parser("cache", help="list or delete the decoded-image cache",
                                description="The decoded images load_images keeps on disk, one entry per data set "
                                "split, file list and resize/crop (default folder: $CLEBENCH_CACHE, else "
                                "~/.cache/clebench).")
    cache.add_argument("action", choices=["ls", "clear"], help="ls: list the entries; clear: delete them all")
    cache.add_argument("--cache-dir", type=Path, help="the cache folder (default: $CLEBENCH_CACHE or ~/.cache/clebench)")
    return parser


def run_sweep(args: argparse.Namespace) -> int:
    from clebench.config import load_config
    from clebench.report import write_report
    from clebench.sweep import Sweep

    config = load_config(args.config)
    if args.limit is not None:
        config = config.with_limit(args.limit)
    if args.models:
        config = config.with_models(args.models)
    out = args.out or Path("runs") / args.config.stem
    command = "clebench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sweep = Sweep(config, out, data_root=args.data_root, models_dir=args.models_dir, device=args.device,
                  progress=not args.no_progress, command=command)
    results = sweep.run()
    (out / "config.toml").write_text(args.config.read_text())
    written = write_report(out)
    print(f"{len(results)} rows in {out / 'results.csv'}; work this run: {sweep.work.__dict__}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from clebench.report import write_report

    for path in write_report(args.results_dir):
        print(path)
    return 0


def run_ranges(args: argparse.Namespace) -> int:
    from clebench import graph, ranges, steps
    from clebench.models import list_models, load_model
    from clebench.report import plot_layer_ranges

    if args.list or not args.model:
        print("\n".join(list_models()))
        return 0
    combination = steps.parse_combination(args.steps)
    fp32_steps, correction = steps.split_combination(combination)
    if correction:
        raise ValueError(f"{correction} depends on a quantization setting; `clebench ranges` takes FP32 steps only")
    state = steps.PipelineState(graph.prepare_model(load_model(args.model, models_dir=args.models_dir, checkpoint=args.checkpoint)))
    steps.check_for_model(combination, state.model, args.model)
    for step in fp32_steps:
        steps.apply_fp32_step(step, state)
    table = ranges.layer_ranges(state.model, bits=args.bits)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.plot:
        plot_layer_ranges(table, args.plot, f"{args.model} after {steps.combination_name(combination)}")
        print(f"wrote {args.plot}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from clebench import regression

    results_csv = args.results_dir / "results.csv"
    config = regression.results_config(args.results_dir)
    if args.write_baseline:
        regression.write_baseline(results_csv, args.baseline, config)
        print(f"wrote {args.baseline}")
        return 0
    result = regression.check(results_csv, args.baseline, tolerance=args.tolerance, config=config)
    print(regression.format_check(result))
    return 0 if result.ok else 1


def run_cache(args: argparse.Namespace) -> int:
    from clebench import image_cache

    root = image_cache.cache_dir(args.cache_dir)
    if args.action == "clear":
        count, freed = image_cache.clear(root)
        print(f"deleted {count} entries ({freed / 1e9:.2f} GB) from {root}")
        return 0
    entries = image_cache.list_entries(root)
    for entry in entries:
        print(f"{entry['name']}  {entry['images']} images  {entry['bytes'] / 1e9:.2f} GB  {entry['created']}  "
              f"{entry['origin']}")
    print(f"{len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e9:.2f} GB in {root}")
    return 0


COMMANDS = {"sweep": run_sweep, "report": run_report, "ranges": run_ranges, "check": run_check, "cache": run_cache}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as error:  # our errors say what to do; no traceback
        print(f"clebench {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clebench {args.command}: interrupted; finished rows are saved, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
