"""Simulated vs real int8 top-1 on the CIFAR-10 checkpoints: torch simulation, ONNX Runtime sim and ONNX Runtime int8.

For each model x step combination x weight bit-width (per tensor, 8-bit activations, min/max, calibrated on 512
training images): FP32, the torch simulation, onnxruntime-sim and onnxruntime-int8 top-1 on the first --images
class-balanced test images, and the share of images whose top-1 class equals the torch simulation's. The last
columns hold the torch simulation with int32 biases (``_int32bias``: biases rounded to the grid input scale x weight
scale, as int8 kernels need them) and int8's agreement with it, which separates the bias rounding from the rest of
the deployment gap.

    python scripts/deploy/deploy_gap.py --images 10000 --out results/bench/deploy_gap.md

Output: prints each table row to stdout as it goes and writes the markdown table to --out (rewritten after every row,
so a cut-short run keeps its rows).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from clebench import timing
from clebench.data.datasets import batches, load_images
from clebench.evaluation import agreement, evaluate
from clebench.models import model_preprocessing
from clebench.runtimes.engines import evaluate_quantized
from clebench.runtimes.onnxruntime import runtime_info
from clebench.sweep.prepare import calibrated_sim, prepare_fp32

ROWS = {
    "resnet18_cifar10": ["bn_fold", "bn_fold+cls+hbf"],
    "mobilenet_v2_cifar10": ["bn_fold", "bn_fold+cls_relu6_clip+hbf"],
}
QUANTS = ["w8a8_per_tensor_minmax", "w6a8_per_tensor_minmax", "w4a8_per_tensor_minmax"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models-dir", default="../shared/models")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--quant", nargs="+", choices=QUANTS, default=QUANTS)
    parser.add_argument("--out", type=Path, default=Path("results/bench/deploy_gap.md"))
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"Top-1 % on the first {args.images} class-balanced CIFAR-10 test images; W<b>A8 per tensor, min/max, "
        f"calibrated on {args.calibration} training images. sim = torch simulation; ort-sim / int8 agree = % of images "
        "whose top-1 class equals the torch simulation's.",
        "",
        "| model | steps | quant | FP32 | sim | ort-sim | ort-sim agree | int8 | int8 agree | sim - int8 "
        "| sim int32 bias | int8 agree with it | sim int32 bias - int8 |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    clock = timing.Stopwatch()
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models:
            combinations = ROWS[model_name]
            preprocessing = model_preprocessing(model_name)
            test = load_images("cifar10", "test", args.data_root, preprocessing, limit=args.images, progress=False)
            train = load_images("cifar10", "train", args.data_root, preprocessing, limit=args.calibration, progress=False)
            calibration = list(batches(train, 500, preprocessing))
            for combination in combinations:
                state = prepare_fp32(model_name, combination, models_dir=args.models_dir)
                fp32 = evaluate(state.model, batches(test, 500, preprocessing), progress=False)
                for quant in args.quant:
                    sim = calibrated_sim(state, combination, quant, calibration)
                    dummy = calibration[0][0][:1]
                    result = {engine: evaluate_quantized(sim, dummy, batches(test, 500, preprocessing), engine=engine,
                                                         workdir=workdir, threads=args.threads, progress=False)
                              for engine in ("torch", "onnxruntime-sim", "onnxruntime-int8")}
                    torch_sim, ort_sim, int8 = (result[e] for e in ("torch", "onnxruntime-sim", "onnxruntime-int8"))
                    int32_sim = evaluate(calibrated_sim(state, combination, f"{quant}_int32bias", calibration).model,
                                         batches(test, 500, preprocessing), progress=False)
                    line = (f"| {model_name} | {combination} | {quant} | {fp32['top1']:.2f} | {torch_sim['top1']:.2f} | "
                            f"{ort_sim['top1']:.2f} | {agreement(ort_sim, torch_sim):.2f} | {int8['top1']:.2f} | "
                            f"{agreement(int8, torch_sim):.2f} | {torch_sim['top1'] - int8['top1']:+.2f} | "
                            f"{int32_sim['top1']:.2f} | {agreement(int8, int32_sim):.2f} | "
                            f"{int32_sim['top1'] - int8['top1']:+.2f} |")
                    print(line, flush=True)
                    lines.append(line)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text("\n".join(lines) + "\n")  # rows so far, in case the run is cut short
    info = runtime_info()
    lines += ["", f"onnxruntime {info['onnxruntime_version']}, CPU {info['cpu']}, int8 GEMM path {info['int8_gemm_path']}, "
              f"{args.threads} threads; {clock.seconds:.0f} s in all."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
