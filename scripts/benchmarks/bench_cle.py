"""Time `equalize_model` (BN fold + ReLU6->ReLU + CLS + HBF) on torchvision ResNet18 and MobileNetV2.

    python scripts/benchmarks/bench_cle.py [--repeats 7] [--threads 1]

Prints the median, min and max wall time per model over fresh copies of a model with random weights and
randomized BN statistics (the work CLE does does not depend on the values). CLE is a one-off step per sweep
row, so the target is "well under a second" on a 2-core CPU.

Output: prints the table to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torchvision
from torch import nn

from clebench import timing
from clebench.cross_layer_equalization import equalize_model


def randomized(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def time_equalize(model: nn.Module, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(model)
        times.append(timing.seconds(lambda: equalize_model(fresh, (1, 3, 224, 224))))
    return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model (default 7)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch.get_num_threads())")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# equalize_model timing: {timing.cpu_name()}, torch {torch.__version__}, {args.threads} threads")
    print(f"{'model':<14} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name in ("resnet18", "mobilenet_v2"):
        times = [t * 1000 for t in time_equalize(randomized(name), args.repeats)]
        print(f"{name:<14} {statistics.median(times):>10.1f} {min(times):>8.1f} {max(times):>8.1f}")


if __name__ == "__main__":
    main()
