"""Brevitas' pre-quantization pipeline on a CIFAR-10 checkpoint, quantized by clebench.quant.QuantSim: the reference
the sweep's brevitas_equalize rows must equal.

    python scripts/peers/brevitas_standalone.py --model mobilenet_v2_cifar10 [--limit 1000] [--calibration 256]
        [--iterations 20] [--no-merge-bias] [--keep-relu6] [--quant w8a8_per_tensor_minmax w4a8_per_tensor_minmax]

Independent of the sweep's code: the model is the torchvision network with the checkpoint loaded
(clebench.models.load_model), Brevitas' `preprocess_for_quantize` runs on it as Brevitas' ImageNet PTQ benchmark
calls it (BN merge, ReLU6 -> ReLU unless --keep-relu6, graph equalization of --iterations rounds, merge_bias unless
--no-merge-bias), and each setting is a QuantSim calibrated on the first --calibration CIFAR-10 train images per class
(class-balanced, sorted order, as a sweep without a seed takes them) and evaluated on --limit test images. Prints
FP32 and each setting's top-1; the sweep row of the same pipeline is relu6_to_relu+brevitas_equalize (or
brevitas_equalize with --keep-relu6; _no_merge_bias with --no-merge-bias) with [brevitas] iterations and the same
[data] limit / calibration / batch_size.

Output: prints FP32 and each setting's top-1 to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from clebench import timing
from clebench.cli import positive_int
from clebench.data.datasets import ImageSet, batches, load_images
from clebench.evaluation import evaluate
from clebench.models import load_model, model_preprocessing
from clebench.models.preprocessing import Preprocessing
from clebench.precision import fp32_precision
from clebench.quant import QuantConfig, QuantSim

MODELS = ("resnet18_cifar10", "mobilenet_v2_cifar10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--quant", nargs="+", default=["w8a8_per_tensor_minmax", "w4a8_per_tensor_minmax"])
    parser.add_argument("--limit", type=positive_int, default=1000, help="class-balanced test images (default 1000)")
    parser.add_argument("--calibration", type=positive_int, default=256, help="class-balanced train images")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--iterations", type=positive_int, default=20, help="graph-equalization rounds (default 20)")
    parser.add_argument("--no-merge-bias", action="store_true", help="equalize without merge_bias")
    parser.add_argument("--keep-relu6", action="store_true", help="keep ReLU6 (Brevitas' relu6_to_relu=False)")
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="CIFAR-10 checkpoints folder (default: env CLEBENCH_MODELS)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def brevitas_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Brevitas' preprocess_for_quantize of `model`, with the benchmark's defaults but the three options."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from brevitas.graph.quantize import preprocess_for_quantize
    return preprocess_for_quantize(model.eval(), equalize_iters=args.iterations,
                                   equalize_merge_bias=not args.no_merge_bias, relu6_to_relu=not args.keep_relu6)


def top1(model: nn.Module, images: ImageSet, preprocessing: Preprocessing, batch_size: int) -> float:
    return evaluate(model, batches(images, batch_size, preprocessing), progress=False)["top1"]


def quantized_top1(model: nn.Module, quant: str, calibration: list[tuple[torch.Tensor, torch.Tensor]],
                   images: ImageSet, preprocessing: Preprocessing, batch_size: int) -> float:
    """Top-1 of a QuantSim of `model` under `quant`, calibrated on `calibration` (as a sweep row without
    bias correction or AdaRound)."""
    sim = QuantSim(model, calibration[0][0][:1], QuantConfig.from_name(quant))
    sim.calibrate(calibration, progress=False)
    return top1(sim.model, images, preprocessing, batch_size)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    preprocessing = model_preprocessing(args.model)
    test = load_images("cifar10", "test", args.data, preprocessing, limit=args.limit, progress=False)
    train = load_images("cifar10", "train", args.data, preprocessing, limit=args.calibration, progress=False)
    calibration = list(batches(train, args.batch_size, preprocessing))
    with fp32_precision():
        model = brevitas_model(load_model(args.model, models_dir=args.models_dir), args)
        fp32 = top1(model, test, preprocessing, args.batch_size)
        print(f"{args.model} Brevitas (iterations {args.iterations}, merge_bias {not args.no_merge_bias}, "
              f"relu6_to_relu {not args.keep_relu6}): FP32 top-1 {fp32:.2f} on {len(test.labels)} test images, "
              f"{len(train.labels)} calibration images")
        for quant in args.quant:
            value = quantized_top1(model, quant, calibration, test, preprocessing, args.batch_size)
            print(f"{quant}: top-1 {value:.2f}", flush=True)


if __name__ == "__main__":
    main()
