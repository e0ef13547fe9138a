"""NNCF's post-training quantization of a CIFAR-10 checkpoint, scored on OpenVINO's int8 CPU kernels: the reference
the sweep's nncf_quantize rows must equal.

    python scripts/peers/nncf_standalone.py --model resnet18_cifar10 [--limit 1000] [--calibration 256]
        [--channel-alignment | --smooth-quant] [--per-tensor]

Independent of the sweep's code: the torchvision network with the checkpoint loaded (clebench.models.load_model),
BN left in place, converted by openvino.convert_model and quantized by nncf.quantize as NNCF's examples call it (one
calibration image per item, subset_size = all of them, the performance preset, fast bias correction), with channel
alignment (--channel-alignment) or SmoothQuant on convolutions (--smooth-quant: alpha 0.05, model_type TRANSFORMER,
the only way NNCF's pipeline runs it) if asked, per-channel weights unless --per-tensor. Calibrated on the first
--calibration CIFAR-10 train images per class (class-balanced, sorted order, as a sweep without a seed takes them),
evaluated on --limit test images by OpenVINO on the CPU (one stream, torch's thread count). The sweep row of the
same pipeline is nncf_quantize (or _channel_alignment / _smooth_quant) under w8a8_per_channel_minmax
(w8a8_per_tensor_minmax with --per-tensor) with the same [data] limit / calibration / batch_size.

Output: prints the FP32 (torch) and the NNCF int8 (OpenVINO) top-1 to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from clebench import timing
from clebench.cli import positive_int
from clebench.data.datasets import batches, load_images
from clebench.evaluation import evaluate
from clebench.models import load_model, model_preprocessing

MODELS = ("resnet18_cifar10", "mobilenet_v2_cifar10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--limit", type=positive_int, default=1000, help="class-balanced test images")
    parser.add_argument("--calibration", type=positive_int, default=256, help="class-balanced train images")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--channel-alignment", action="store_true", help="NNCF's channel alignment on")
    variant.add_argument("--smooth-quant", action="store_true", help="NNCF's SmoothQuant on convolutions")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="CIFAR-10 checkpoints folder (default: env CLEBENCH_MODELS)")
    return parser


def nncf_model(model: torch.nn.Module, calibration: torch.Tensor, args: argparse.Namespace):
    """nncf.quantize of `model` converted to OpenVINO, calibrated on `calibration` [N, C, H, W] one image a time."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters, QuantizationParameters)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = ov.convert_model(model.eval(), example_input=calibration[:1])
    advanced = {"disable_channel_alignment": not args.channel_alignment,
                "weights_quantization_params": QuantizationParameters(per_channel=not args.per_tensor)}
    extra = {}
    if args.smooth_quant:
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=0.05, matmul=-1)
        extra["model_type"] = nncf.ModelType.TRANSFORMER
    dataset = nncf.Dataset([calibration[i:i + 1].numpy() for i in range(len(calibration))])
    return nncf.quantize(float_model, dataset, subset_size=len(calibration),
                         advanced_parameters=AdvancedQuantizationParameters(**advanced), **extra)


def openvino_top1(model, loader) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    correct = total = 0
    for inputs, labels in loader:
        request.infer({0: np.ascontiguousarray(inputs.numpy(), dtype=np.float32)})
        predicted = torch.from_numpy(request.get_output_tensor(0).data.copy()).argmax(1)
        correct += int((predicted == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    preprocessing = model_preprocessing(args.model)
    test = load_images("cifar10", "test", args.data, preprocessing, limit=args.limit, progress=False)
    train = load_images("cifar10", "train", args.data, preprocessing, limit=args.calibration, progress=False)
    calibration = torch.cat([inputs for inputs, _ in batches(train, args.batch_size, preprocessing)])
    model = load_model(args.model, models_dir=args.models_dir)
    fp32 = evaluate(model, batches(test, args.batch_size, preprocessing), progress=False)["top1"]
    quantized = openvino_top1(nncf_model(model, calibration, args), batches(test, args.batch_size, preprocessing))
    variant = "channel alignment" if args.channel_alignment else "SmoothQuant" if args.smooth_quant else "defaults"
    print(f"{args.model} NNCF ({variant}, {'per-tensor' if args.per_tensor else 'per-channel'} weights): FP32 top-1 "
          f"{fp32:.2f} on {len(test.labels)} test images, {len(train.labels)} calibration images")
    print(f"NNCF int8 on OpenVINO: top-1 {quantized:.2f}")


if __name__ == "__main__":
    main()
