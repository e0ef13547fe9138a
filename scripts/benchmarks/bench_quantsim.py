"""Time W8A8 simulation against FP32 inference: same model (BN folded), same batches, same process.

    python scripts/benchmarks/bench_quantsim.py --models resnet18_cifar10 mobilenet_v2_cifar10 --threads 1

FP32 and simulated passes alternate, so machine noise hits both alike; the ratio of the medians is what counts.
Needs the CIFAR-10 images and checkpoints (--data / CLEBENCH_DATA, --models-dir / CLEBENCH_MODELS).

Output: prints one line per model (median FP32 and W8A8 seconds per pass, their ratio) to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from clebench import timing
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.data.datasets import batches, load_images
from clebench.models import load_model, model_preprocessing
from clebench.quant import QuantConfig, QuantSim


def inference_pass(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """One inference pass of `model` over every batch in `inputs`."""
    with torch.inference_mode():
        for x in inputs:
            model(x)


def bench(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(median FP32 seconds, median W8A8 seconds) per pass over the benchmark batches."""
    preprocessing = model_preprocessing(name)
    limit = args.batch_size * args.batches
    images = load_images("cifar10", "test", args.data, preprocessing, limit=limit, progress=False)
    inputs = [x for x, _ in batches(images, args.batch_size, preprocessing)]
    fp32 = load_model(name, models_dir=args.models_dir)
    fold_all_batch_norms(fp32)
    sim = QuantSim(copy.deepcopy(fp32), inputs[0][:1], QuantConfig())
    sim.calibrate(inputs, progress=False)
    for model in (fp32, sim.model):
        inference_pass(model, inputs[:1])  # warm-up: first-call allocations and kernel selection
    times = timing.interleaved({"fp32": lambda: inference_pass(fp32, inputs),
                                   "w8a8": lambda: inference_pass(sim.model, inputs)}, args.repeats)
    return statistics.median(times["fp32"]), statistics.median(times["w8a8"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar10", "mobilenet_v2_cifar10"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per model (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data", default=None, help="data root (default: CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="checkpoint folder (default: CLEBENCH_MODELS)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if min(args.batch_size, args.batches, args.repeats, args.threads) < 1:
        parser.error("--batch-size, --batches, --repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.batches} x {args.batch_size} images, "
          f"median of {args.repeats}")
    print(f"{'model':<24}{'fp32 s':>10}{'w8a8 s':>10}{'ratio':>8}")
    for name in args.models:
        fp32, w8a8 = bench(name, args)
        print(f"{name:<24}{fp32:>10.3f}{w8a8:>10.3f}{w8a8 / fp32:>8.2f}")


if __name__ == "__main__":
    main()
