"""Top-1 with and without AdaRound on the CIFAR-10 checkpoints: FP32, W<b>A8 per tensor after CLE, and the same
with AdaRound's weights (their encodings frozen in the QuantSim), with AdaRound's wall-clock and CPU time (with
`--threads 1` the CPU time is what the run takes on an otherwise idle core).

    python scripts/adaround_accuracy.py [--models ...] [--iterations 1000] [--images 512] [--limit 2000]

The models go through `--steps` first (default: BN fold + CLS + HBF, across ReLU6 as a per-channel clip where the
model has ReLU6); AdaRound and the activation calibration use the same `--images` CIFAR-10 train images (the first
of each class in sorted order), evaluation the first `--limit` test images of each class.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import _peers

from clebench.adaround import AdaroundSettings, apply_adaround_to_model
from clebench.cli import positive_int
from clebench.data.datasets import batches, load_images
from clebench.evaluation import evaluate
from clebench.models import model_preprocessing
from clebench.sweep.prepare import prepare_fp32
from clebench.quant import QuantConfig, QuantSim

STEPS = {"resnet18_cifar10": "bn_fold+cls+hbf", "mobilenet_v2_cifar10": "bn_fold+cls_relu6_clip+hbf"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="folder of the checkpoints (default: env CLEBENCH_MODELS)")
    parser.add_argument("--models", nargs="+", default=list(_peers.CIFAR_MODELS), choices=_peers.CIFAR_MODELS)
    parser.add_argument("--iterations", type=positive_int, default=AdaroundSettings().iterations)
    parser.add_argument("--images", type=positive_int, default=512, help="AdaRound / calibration images")
    parser.add_argument("--limit", type=positive_int, default=2000, help="class-balanced test images")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="also write the lines printed to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QuantConfig(weight_bits=args.weight_bits, act_bits=8)
    lines = [f"# python {' '.join(sys.argv)} ({datetime.date.today()}); {_peers.machine_summary(None)}"]
    print(lines[0], flush=True)
    for name in args.models:
        preprocessing = model_preprocessing(name)
        train = load_images("cifar10", "train", args.data, preprocessing, limit=args.images, progress=False)
        test = load_images("cifar10", "test", args.data, preprocessing, limit=args.limit, progress=False)
        calibration = list(batches(train, 64, preprocessing))
        state = prepare_fp32(name, STEPS[name], models_dir=args.models_dir)

        def top1(model) -> float:
            return evaluate(model, batches(test, 250, preprocessing), progress=False)["top1"]

        def quantized(model, encodings=None) -> float:
            sim = QuantSim(model, calibration[0][0][:1], config)
            if encodings:
                sim.freeze_param_encodings(encodings)
            sim.calibrate(calibration, progress=False)
            return top1(sim.model)

        start, cpu_start = time.perf_counter(), time.process_time()
        rounded, encodings = apply_adaround_to_model(state.model, config, [(x,) for x, _ in calibration],
                                                     AdaroundSettings(iterations=args.iterations))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        fp32, plain, ada = top1(state.model), quantized(state.model), quantized(rounded, encodings)
        lines.append(f"{name} {STEPS[name]} {config.name}, {len(test)} test images: FP32 {fp32:.2f}, without AdaRound "
                     f"{plain:.2f} ({plain - fp32:+.2f}), AdaRound {args.iterations} iterations {ada:.2f} "
                     f"({ada - fp32:+.2f}), AdaRound {len(encodings)} layers in {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU")
        print(lines[-1], flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
