"""AdaRound step time on large activations: transparent huge pages and the written-out loss, on and off, same run.

    python scripts/benchmarks/bench_adaround_memory.py [--repeats 3] [--iterations 10] [--images 256]

Two EfficientNet-Lite0-like layers at 112 x 112 with ReLU6 after them (a 16 -> 96 pointwise conv and a 96-channel
3 x 3 depthwise conv; random weights and inputs) run `--iterations` AdaRound steps on W4 per-tensor weights, batch 32
of `--images` samples, in four variants:

* THP on / off: PyTorch's THP_MEM_ALLOC_ENABLE (transparent huge pages for large CPU tensors). PyTorch reads it
  at its first allocation, so each measurement runs in a fresh process;
* loss written out / autograd: clebench's `_SquaredError` or the composed `reconstruction_loss`.

The variants run interleaved, `--repeats` times; the script prints the median milliseconds per step, the ratios
against all-off, and whether every variant learned the same V (neither change may move a bit).

Output: prints the tables to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys

from clebench import timing
from clebench.cli import positive_int

LAYERS = {"pointwise 16->96": (16, 96, 1, 1), "depthwise 96 3x3": (96, 96, 3, 96)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--iterations", type=positive_int, default=10, help="timed AdaRound steps per measurement")
    parser.add_argument("--images", type=positive_int, default=256, help="cached samples the steps draw batches of 32 from")
    parser.add_argument("--child", nargs=3, metavar=("LAYER", "LOSS", "THP"), help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def measure(layer_name: str, loss: str, iterations: int, images: int) -> dict:
    """Milliseconds per AdaRound step of one variant (in this process) and a digest of the learned V."""
    import torch
    from torch import nn

    import clebench.adaround.layer as adaround_layer
    from clebench.quant import QuantConfig
    from clebench.quant.encoding import weight_encoding

    torch.manual_seed(0)
    cin, cout, kernel, groups = LAYERS[layer_name]
    layer = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups)
    inputs = torch.randn(images, cin, 112, 112)
    activation = nn.ReLU6()
    with torch.no_grad():
        targets = activation(layer(inputs) + 0.01)
    encoding = weight_encoding(layer, QuantConfig.from_name("w4a8_per_tensor_minmax"))
    if loss == "autograd":  # the composed formula in place of the written-out function
        adaround_layer._SquaredError.apply = staticmethod(adaround_layer.reconstruction_loss)

    def run(steps: int):
        settings = adaround_layer.AdaroundSettings(iterations=steps)
        return adaround_layer.optimize_layer(layer, encoding, inputs, targets, activation, settings,
                                             torch.Generator().manual_seed(0))

    run(2)  # warm-up
    elapsed, rounding = timing.timed(lambda: run(iterations))
    milliseconds = elapsed / iterations * 1000
    digest = hashlib.sha256(rounding.v.detach().numpy().tobytes()).hexdigest()[:12]
    return {"ms_per_step": milliseconds, "v_digest": digest}


def child(args: argparse.Namespace, layer: str, loss: str, thp: str) -> dict:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if thp == "on" else "0", PYTHONPATH=os.getcwd())
    command = [sys.executable, __file__, "--iterations", str(args.iterations), "--images", str(args.images),
               "--child", layer, loss, thp]
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        layer, loss, _ = args.child
        print(json.dumps(measure(layer, loss, args.iterations, args.images)))
        return
    print(f"{' '.join(sys.argv)} on {os.cpu_count()} CPUs; the machine is shared, so compare rows of one run only")
    variants = list(itertools.product(("on", "off"), ("written out", "autograd")))
    for layer in LAYERS:
        times = {variant: [] for variant in variants}
        digests = set()
        for _ in range(args.repeats):
            for thp, loss in variants:
                result = child(args, layer, loss.split()[0], thp)
                times[(thp, loss)].append(result["ms_per_step"])
                digests.add(result["v_digest"])
        baseline = statistics.median(times[("off", "autograd")])
        print(f"\n{layer} at 112 x 112, batch 32 of {args.images}, {args.iterations} steps x {args.repeats} repeats")
        print(f"{'THP':>4} {'loss':>12} {'ms/step':>8} {'speed-up':>9}")
        for thp, loss in variants:
            median = statistics.median(times[(thp, loss)])
            print(f"{thp:>4} {loss:>12} {median:8.0f} {baseline / median:8.2f}x")
        print("same V in every variant:", "yes" if len(digests) == 1 else f"NO ({sorted(digests)})")


if __name__ == "__main__":
    main()
