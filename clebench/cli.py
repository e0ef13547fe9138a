"""Command line: `clebench sweep | report | ranges | inspect | check | export | gap | sensitivity | cache` (also
`python -m clebench ...`)."""
from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from pathlib import Path

import torch

from clebench.errors import UserError
from clebench.runtimes import MODES, RUNTIMES
from clebench.reporting.regression import DEFAULT_MIN_IMAGES

PACKAGE_DIR = Path(__file__).resolve().parent

EXAMPLES = """examples:
  clebench sweep configs/cifar10_ci.toml --data-root ../shared/data --models-dir ../shared/models
  clebench report runs/cifar10_ci
  clebench ranges mobilenet_v2_cifar10 --steps bn_fold+cls_relu6_clip --plot ranges.png
  clebench inspect my_models.py:build_net --input-size 3 96 96 --relu6 clip
  clebench check runs/cifar10_ci --baseline results/cifar10_ci/baseline.json --tolerance 0.5
  clebench export mobilenet_v2_cifar10 --steps bn_fold+cls_relu6_clip+hbf --quant w8a8_per_tensor_minmax --out m.onnx
  clebench gap mobilenet_v2_cifar10 --steps bn_fold --quant w8a8_per_tensor_minmax --runtime openvino
  clebench sensitivity configs/cifar10.toml --model mobilenet_v2_cifar10 --steps bn_fold --quant w4a8_per_tensor_minmax --images 500 --out runs/sens
  clebench cache ls
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
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


def add_data_arguments(command: argparse.ArgumentParser) -> None:
    """The data and model options of the commands that build one calibrated row (export, gap)."""
    command.add_argument("--dataset", default="cifar10", help="data set (default: cifar10)")
    command.add_argument("--calibration-split", default="train", help="calibration split (default: train)")
    command.add_argument("--calibration", type=positive_int, default=512, help="calibration images, class-balanced (default: 512)")
    command.add_argument("--data-root", help="folder holding the data sets (default: $CLEBENCH_DATA)")
    command.add_argument("--models-dir", help="folder holding <model>.pt checkpoints (default: $CLEBENCH_MODELS)")
    command.add_argument("--checkpoint", help="a checkpoint file for the model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clebench",
        description="Cross-Layer Equalization benchmark: sweeps of equalization steps x quantization settings.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, user errors included")
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
    sweep.add_argument("--no-cache", action="store_true",
                       help="decode the images for this run only, without the on-disk image cache ($CLEBENCH_CACHE)")
    sweep.add_argument("--engine", choices=["torch", *RUNTIMES],
                       help="simulation engine for quantized rows (default: the config's [eval] engine, else torch); "
                       "onnxruntime / openvino run the exported QDQ model on that runtime's float kernels (CPU, needs "
                       "the onnx / openvino extra)")
    sweep.add_argument("--deploy", nargs="*", choices=RUNTIMES, metavar="RUNTIME",
                       help="also run every quantized row on these runtimes' int8 kernels (onnxruntime, openvino; "
                       "default: the config's [eval] deploy); no name: deploy nowhere")
    sweep.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run the work units as Ray tasks: alone, on a Ray started here with this machine's CPUs/GPUs; "
                       "'auto' or HOST:PORT joins a running cluster (needs the ray extra)")
    sweep.add_argument("--gpus-per-task", type=non_negative_float, metavar="F",
                       help="with --ray: the fraction of a GPU each task reserves, e.g. 0.25 (default: config, else 0)")

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

    inspect = commands.add_parser(
        "inspect", help="what graph discovery sees in a model: BN folds, CLS sets, skipped layers, export gaps",
        description="Before any sweep: the BatchNorms bn_fold folds and into which layer, the cross-layer-scaling "
        "sets (pairs and conv-depthwise-conv triples) after the fold, each conv / linear layer in no set and why, "
        "and the ops the ONNX exporter cannot take (with a trial W8A8 export, given the onnx extra).")
    inspect.add_argument("model", help='a model name (`clebench ranges --list`), "timm:<name>", or a factory '
                         '"module:callable" / "file.py:callable" (e.g. torchvision.models:resnet18: random weights)')
    inspect.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                         help="input size (default: the model's preprocessing crop, else 3 224 224)")
    inspect.add_argument("--checkpoint", help="a checkpoint file for the model")
    inspect.add_argument("--models-dir", help="folder holding <model>.pt checkpoints (default: $CLEBENCH_MODELS)")
    inspect.add_argument("--relu6", choices=["replace", "keep", "clip"], default="keep",
                         help="ReLU6 policy: replace (relu6_to_relu + cls), keep (cls: chains end at ReLU6), clip "
                         "(cls_relu6_clip: scales across it) (default: keep)")
    inspect.add_argument("--json", action="store_true", help="print the findings as JSON")
    inspect.add_argument("--no-export", action="store_true", help="skip the trial ONNX export")

    check = commands.add_parser("check", help="compare a sweep with a committed baseline (CI gate)",
                                description="Exit 1 when a quantized accuracy fell more than --tolerance points and more "
                                "than --min-images images below the baseline, a baseline row is missing, or the "
                                "configuration differs. Reports per row how many images changed prediction.")
    check.add_argument("results_dir", type=Path, help="folder written by `clebench sweep`")
    check.add_argument("--baseline", type=Path, required=True, help="baseline JSON file")
    check.add_argument("--tolerance", type=non_negative_float, default=0.5, help="allowed top-1 drop in points (default: 0.5)")
    check.add_argument("--min-images", type=non_negative_int, default=DEFAULT_MIN_IMAGES,
                       help=f"allowed top-1 drop in images; a row fails only past both limits (default: {DEFAULT_MIN_IMAGES})")
    check.add_argument("--write-baseline", action="store_true", help="write the baseline from the results instead of checking")
    check.add_argument("--html", action="store_true",
                       help="also write RESULTS_DIR/report.html with the gate's table and the images whose prediction "
                       "changed (needs the evaluation images: --data-root)")
    check.add_argument("--data-root", help="folder holding the data sets, for --html's thumbnails (default: "
                       "$CLEBENCH_DATA, else the data root meta.json records)")

    export = commands.add_parser("export", help="export a quantized model as ONNX QDQ + AIMET encodings JSON",
                                 description="Build one sweep row's calibrated QuantSim and write it as an ONNX QDQ model "
                                 "that encodes its quantizers exactly (run it with ONNX Runtime), plus its encodings in "
                                 "AIMET's JSON format. Needs the onnx extra.")
    export.add_argument("model", help="zoo model name (see `clebench ranges --list`)")
    export.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    export.add_argument("--steps", default="bn_fold", help="step combination, e.g. bn_fold+cls_relu6_clip+hbf (default: "
                        "bn_fold); with adaround, AdaRound's defaults learn from the calibration images (minutes on a CPU)")
    export.add_argument("--quant", default="w8a8_per_tensor_minmax", help="quantization setting (default: w8a8_per_tensor_minmax)")
    export.add_argument("--encodings", type=Path, help="AIMET encodings JSON to write (default: OUT with .encodings.json)")
    export.add_argument("--int32-bias", action="store_true", help="int32 biases, as int8 kernels run them (default: as the setting says)")
    add_data_arguments(export)

    gap = commands.add_parser("gap", help="where a runtime parts from the simulation, layer by layer",
                              description="Build one sweep row's calibrated QuantSim, run it and its ONNX export on a "
                              "runtime on a few test images, and list per quantized activation, in graph order, the "
                              "SQNR (dB) of the runtime's tensor against the simulation's and the share of elements on "
                              "another grid point. Needs the onnx extra (and openvino for --runtime openvino).")
    gap.add_argument("model", help="zoo model name (see `clebench ranges --list`)")
    gap.add_argument("--steps", default="bn_fold", help="step combination (default: bn_fold)")
    gap.add_argument("--quant", default="w8a8_per_tensor_minmax", help="quantization setting (default: w8a8_per_tensor_minmax)")
    gap.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="runtime to compare (default: onnxruntime)")
    gap.add_argument("--mode", choices=MODES, default="int8",
                     help="int8: the runtime's integer kernels, with int32 biases (default); sim: its float kernels")
    gap.add_argument("--images", type=positive_int, default=32, help="test images, class-balanced (default: 32)")
    gap.add_argument("--split", default="test", help="split the images come from (default: test; imagenet-sample for the ImageNet sample)")
    gap.add_argument("--threshold", type=float, default=30.0, help="name the first tensor below this SQNR in dB (default: 30)")
    gap.add_argument("--csv", type=Path, help="also write the per-tensor table to this CSV file")
    gap.add_argument("--threads", type=positive_int, help="runtime threads (default: the runtime's)")
    add_data_arguments(gap)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer quantization sensitivity of one sweep row",
        description="Quantize one layer at a time, all but one layer, one layer's weights or its output activation only, "
        "and rank the layers by the output SQNR (dB) against FP32 on --images class-balanced evaluation images (top-1 "
        "beside it); writes OUT/sensitivity.csv (rows of other sweep rows kept) and OUT/sensitivity.json (command, "
        "time). Data, calibration and batch size come from CONFIG.")
    sensitivity.add_argument("config", type=Path, help="TOML sweep config whose [data] table is used (see configs/)")
    sensitivity.add_argument("--model", help="one of the config's models (default: its only model)")
    sensitivity.add_argument("--steps", required=True, help="step combination, e.g. bn_fold or bn_fold+cls_relu6_clip+hbf")
    sensitivity.add_argument("--quant", required=True, help="quantization setting, e.g. w4a8_per_tensor_minmax")
    sensitivity.add_argument("--images", type=positive_int,
                             help="class-balanced evaluation images; the cost is ~4 passes over them per layer "
                             "(default: CONFIG's [sensitivity] images, else 500)")
    sensitivity.add_argument("--out", type=Path, required=True, help="folder to write sensitivity.csv into (e.g. a sweep's)")
    sensitivity.add_argument("--data-root", help="folder holding the data sets (default: $CLEBENCH_DATA)")
    sensitivity.add_argument("--models-dir", help="folder holding <model>.pt checkpoints (default: $CLEBENCH_MODELS)")
    sensitivity.add_argument("--device", type=device_name, default="cpu", help="torch device (default: cpu)")
    sensitivity.add_argument("--no-progress", action="store_true", help="no progress bars")

    cache = commands.add_parser("cache", help="list or delete the decoded-image cache",
                                description="The decoded images load_images keeps on disk, one entry per data set "
                                "split, file list and resize/crop (default folder: $CLEBENCH_CACHE, else "
                                "~/.cache/clebench).")
    cache.add_argument("action", choices=["ls", "clear"], help="ls: list the entries; clear: delete them all")
    cache.add_argument("--cache-dir", type=Path, help="the cache folder (default: $CLEBENCH_CACHE or ~/.cache/clebench)")
    return parser


def calibrated_row(args: argparse.Namespace):
    """(the calibrated QuantSim of the row args.model / args.steps / args.quant, its calibration batches)."""
    from clebench.data import datasets
    from clebench.models import model_preprocessing
    from clebench.sweep.prepare import calibrated_sim, prepare_fp32

    state = prepare_fp32(args.model, args.steps, models_dir=args.models_dir, checkpoint=args.checkpoint)
    preprocessing = model_preprocessing(args.model)
    images = datasets.load_images(args.dataset, args.calibration_split, args.data_root, preprocessing, limit=args.calibration)
    calibration = list(datasets.batches(images, 500, preprocessing))
    return calibrated_sim(state, args.steps, args.quant, calibration), calibration


def run_export(args: argparse.Namespace) -> int:
    import time

    from clebench.runtimes.export import export_encodings, export_onnx

    sim, calibration = calibrated_row(args)
    started = time.perf_counter()
    path = export_onnx(sim, calibration[0][0][:1], args.out, int32_bias=True if args.int32_bias else None)
    seconds = time.perf_counter() - started
    encodings = export_encodings(sim, args.encodings or args.out.with_suffix(".encodings.json"))
    print(f"wrote {path} ({seconds:.2f} s) and {encodings}")
    return 0


def run_gap(args: argparse.Namespace) -> int:
    from clebench.data import datasets
    from clebench.models import model_preprocessing
    from clebench.runtimes.engines import runtime
    from clebench.runtimes.gap import format_gap, layer_gap

    runtime(args.runtime).runtime_info()  # a runtime that is not installed stops here, naming its extra
    sim, _ = calibrated_row(args)
    preprocessing = model_preprocessing(args.model)
    test = datasets.load_images(args.dataset, args.split, args.data_root, preprocessing, limit=args.images)
    inputs = next(iter(datasets.batches(test, args.images, preprocessing)))[0]
    gap = layer_gap(sim, inputs, runtime_name=args.runtime, mode=args.mode, threads=args.threads)
    title = (f"{args.model} {args.steps} {args.quant}: {args.runtime} ({args.mode}) against the torch simulation on "
             f"{len(inputs)} {args.dataset} {args.split} images")
    print(format_gap(gap, title, args.threshold))
    if args.csv:
        gap.table.to_csv(args.csv, index=False, float_format="%.4f")
        print(f"wrote {args.csv}")
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    import time

    from clebench.sweep.config import load_config
    from clebench.sweep.sensitivity import run_row_sensitivity

    config = load_config(args.config)
    names = [spec.name for spec in config.models]
    if args.model is None and len(names) > 1:
        raise ValueError(f"{args.config} has several models ({', '.join(names)}): choose one with --model")
    command = "clebench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    images = args.images or config.sensitivity.images
    started = time.perf_counter()
    table = run_row_sensitivity(config.with_models([args.model or names[0]]), args.steps, args.quant, args.out,
                                images=images, data_root=args.data_root, models_dir=args.models_dir,
                                device=args.device, progress=not args.no_progress, command=command)
    print(f"{args.out / 'sensitivity.csv'}: {len(table) - 2} units ranked on {images} images "
          f"({time.perf_counter() - started:.0f} s)")
    print(table.head(10).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(table.tail(2).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from clebench.sweep.config import load_config
    from clebench.reporting.report import write_report
    from clebench.sweep.run import run_sweep

    config = load_config(args.config)
    if args.limit is not None:
        config = config.with_limit(args.limit)
    if args.models:
        config = config.with_models(args.models)
    config = config.with_execution(ray=args.ray, gpus_per_task=args.gpus_per_task).with_engine(args.engine).with_deploy(args.deploy)
    out = args.out or Path("runs") / args.config.stem
    command = "clebench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    outcome = run_sweep(config, out, data_root=args.data_root, models_dir=args.models_dir, device=args.device,
                        progress=not args.no_progress, command=command, cache=not args.no_cache)
    (out / "config.toml").write_text(args.config.read_text())
    written = write_report(out)
    print(f"{len(outcome.table)} rows in {out / 'results.csv'} ({outcome.wall_seconds:.0f} s); "
          f"work this run: {outcome.work.__dict__}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from clebench.reporting.report import write_report

    for path in write_report(args.results_dir):
        print(path)
    return 0


def run_ranges(args: argparse.Namespace) -> int:
    from clebench import graph, ranges
    from clebench.sweep import steps
    from clebench.models import list_models, load_model
    from clebench.reporting.report import plot_layer_ranges

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


def run_inspect(args: argparse.Namespace) -> int:
    from clebench import inspection

    spec = inspection.model_spec(args.model, args.checkpoint, args.input_size)
    model, input_shape = inspection.load(spec, args.models_dir)
    result = inspection.inspect_model(model, args.model, input_shape, args.relu6, export=not args.no_export)
    print(inspection.to_json(result) if args.json else inspection.format_inspection(result))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from clebench.reporting import regression

    results_csv = args.results_dir / "results.csv"
    config = regression.results_config(args.results_dir)
    device = regression.results_device(args.results_dir)
    if args.write_baseline:
        if args.html:
            raise UserError("--html reports a check; it cannot be combined with --write-baseline")
        regression.write_baseline(results_csv, args.baseline, config, device)
        print(f"wrote {args.baseline}")
        return 0
    result = regression.check(results_csv, args.baseline, tolerance=args.tolerance, config=config,
                              min_images=args.min_images, device=device)
    print(regression.format_check(result))
    if args.html:
        print(f"wrote {write_check_report(args, result)}")
    return 0 if result.ok else 1


def write_check_report(args: argparse.Namespace, result) -> Path:
    """The results folder's report.html with the gate's section; a part of the folder that cannot be reported is
    named on the page and on stderr, without changing the gate's exit status."""
    import os

    from clebench.reporting.gate_page import check_section
    from clebench.reporting.report import write_report
    from clebench.sweep import results

    meta_path = args.results_dir / results.META_FILE
    recorded = results.read_json(meta_path).get("data_root") if meta_path.is_file() else None
    data_root = args.data_root or os.environ.get("CLEBENCH_DATA") or recorded
    section = check_section(result, args.results_dir, args.baseline, data_root)
    try:
        write_report(args.results_dir, extra_html=section)
    except (UserError, FileNotFoundError, ValueError) as error:
        print(f"clebench check: report.html is partial: {error}", file=sys.stderr)
    return args.results_dir / results.REPORT_FILE




def run_cache(args: argparse.Namespace) -> int:
    from clebench.data import image_cache

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


def is_user_error(error: BaseException) -> bool:
    """Whether `error` reports bad input (printed as one line) rather than a bug (which keeps its traceback).

    User errors: clebench's `UserError`s (bad config, step, checkpoint, missing optional extra ...), missing files,
    and a ValueError raised by clebench's own validation code; a ValueError raised inside torch, pandas ... is a bug.
    """
    if isinstance(error, (UserError, FileNotFoundError)):
        return True
    if not isinstance(error, ValueError):
        return False
    innermost = traceback.extract_tb(error.__traceback__)[-1:]
    return bool(innermost) and Path(innermost[0].filename).resolve().is_relative_to(PACKAGE_DIR)
COMMANDS = {"sweep": run_sweep, "report": run_report, "ranges": run_ranges, "inspect": run_inspect, "check": run_check,
            "export": run_export, "gap": run_gap, "sensitivity": run_sensitivity, "cache": run_cache}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as error:
        if args.debug or not is_user_error(error):
            raise
        print(f"clebench {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clebench {args.command}: interrupted; finished rows are saved, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
