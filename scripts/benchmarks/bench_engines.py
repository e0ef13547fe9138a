"""Speed of the evaluation engines on the CIFAR-10 checkpoints (BN folded, W8A8 per tensor), from one run.

Engines: torch FP32 eager (contiguous and channels_last), the torch simulation (contiguous and channels_last),
onnxruntime-sim / -int8 and openvino-sim / -int8 (session creation / compilation included), plus the export time of
each ONNX variant, how many conv / matmul layers each runtime ran on integers, and where ONNX Runtime spends its kernel
time (its profiler, one more pass per mode).
Engines are interleaved over --repeats rounds and each one's fastest round is kept, as this machine is shared;
ratios are against the torch simulation in the same run.

    python scripts/benchmarks/bench_engines.py --images 2000 --threads 2 --out results/bench/engines.md

Output: prints each model's table rows to stdout as it goes; with --out, also writes the whole markdown (speed table
and kernel-time table) to that file (results/bench/engines.md is the committed one).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from clebench import timing
from clebench.data.datasets import batches, load_images
from clebench.evaluation import agreement, evaluate
from clebench.runtimes.export import export_onnx
from clebench.models import model_preprocessing
from clebench.runtimes import MODES, RUNTIMES
from clebench.runtimes.engines import runtime
from clebench.runtimes.onnxruntime import runtime_info, session_options
from clebench.sweep.prepare import calibrated_sim, prepare_fp32

MODELS = ("resnet18_cifar10", "mobilenet_v2_cifar10")


def op_shares(path: Path, mode: str, loader: list, threads: int, top: int = 5) -> str:
    """The op types taking most of Runtime's kernel time over one pass of `loader`, e.g. "Conv 73 %, ..."."""
    import onnxruntime

    options = session_options(mode, threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for inputs, _ in loader:
        session.run(None, {name: inputs.numpy()})
    totals: Counter = Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values())
    return ", ".join(f"{op} {100 * micros / whole:.0f} %" for op, micros in totals.most_common(top))


def runtime_engine(name: str, path: Path, mode: str, loader: list, threads: int):
    """A call that evaluates the model at `path` on runtime `name` in `mode` (compilation included)."""
    return lambda: runtime(name).evaluate_onnx(path, loader, mode=mode, threads=threads, progress=False)


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> tuple[list[str], list[str]]:
    """(speed table rows, kernel-time table rows) of model `name`."""
    preprocessing = model_preprocessing(name)
    test = load_images("cifar10", "test", args.data_root, preprocessing, limit=args.images, progress=False)
    train = load_images("cifar10", "train", args.data_root, preprocessing, limit=args.calibration, progress=False)
    state = prepare_fp32(name, "bn_fold", models_dir=args.models_dir)
    sim = calibrated_sim(state, "bn_fold", "w8a8_per_tensor_minmax", list(batches(train, 500, preprocessing)))
    dummy = torch.zeros(1, 3, preprocessing.crop, preprocessing.crop)
    export_seconds = {}
    paths = {}
    for mode, int32_bias in (("sim", None), ("int8", True)):
        export_seconds[mode], paths[mode] = timing.timed(lambda: export_onnx(sim, dummy, workdir / f"{name}_{mode}.onnx",
                                                                             int32_bias=int32_bias))
    loader = list(batches(test, 500, preprocessing))  # normalized once: only the engines are timed
    engines = {
        "torch FP32": lambda: evaluate(state.model, loader, progress=False, channels_last=False),
        "torch FP32 channels_last": lambda: evaluate(state.model, loader, progress=False, channels_last=True),
        "torch sim": lambda: evaluate(sim.model, loader, progress=False, channels_last=False),
        "torch sim channels_last": lambda: evaluate(sim.model, loader, progress=False, channels_last=True),
        **{f"{name}-{mode}": runtime_engine(name, paths[mode], mode, loader, args.threads)
           for name in RUNTIMES for mode in MODES},
    }
    results: dict[str, dict] = {}
    times = timing.interleaved(engines, args.repeats, results=results)
    best = {engine: min(seconds) for engine, seconds in times.items()}
    lines = []
    for engine in engines:
        same = agreement(results[engine], results["torch FP32" if engine.startswith("torch FP32") else "torch sim"])
        integer = ""
        if engine.split("-")[0] in RUNTIMES:
            runtime_name, mode = engine.rsplit("-", 1)
            precision = runtime(runtime_name).layer_precision(paths[mode], mode, args.threads)
            integer = f"{precision.integer} / {precision.total}"
        lines.append(f"| {name} | {engine} | {best[engine]:.2f} | {best['torch sim'] / best[engine]:.2f}x | "
                     f"{results[engine]['top1']:.2f} | {same:.2f} | {integer} |")
    lines.append(f"| {name} | export (sim / int8 variant) | {export_seconds['sim']:.2f} / {export_seconds['int8']:.2f} "
                 "| | | | |")
    shares = [f"| {name} | onnxruntime-{mode} | {op_shares(paths[mode], mode, loader, args.threads)} |"
              for mode in ("sim", "int8")]
    return lines, shares


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models-dir", default="../shared/models")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = runtime_info()
    lines = [
        f"{args.images} CIFAR-10 test images, batch 500, {args.threads} threads, fastest of {args.repeats} interleaved "
        f"rounds; onnxruntime {info['onnxruntime_version']}, openvino {runtime('openvino').runtime_info()['version']}, "
        f"torch {torch.__version__}, CPU {info['cpu']} (int8 GEMM path: {info['int8_gemm_path']}). same = % of images "
        "whose top-1 equals torch FP32's (FP32 rows) or the torch simulation's (the others); integer layers = conv / "
        "matmul layers the runtime ran on integers, of all.",
        "",
        "| model | engine | seconds | vs torch sim | top-1 | same | integer layers |",
        "|:--|:--|--:|--:|--:|--:|--:|",
    ]
    shares = ["", "Where Runtime spends its kernel time (share of the summed kernel times, largest five op types):", "",
              "| model | engine | op types |", "|:--|:--|:--|"]
    with tempfile.TemporaryDirectory() as workdir:
        for name in MODELS:
            speed, kernels = bench_model(name, args, Path(workdir))
            lines += speed
            shares += kernels
            print("\n".join(speed + kernels), flush=True)
    lines += shares
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
