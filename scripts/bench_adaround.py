"""AdaRound time: clebench's against AIMET's (aimet-torch 2.42), same API call, iterations and data, same run.

    python scripts/bench_adaround.py [--models mobilenet_v2_cifar10 resnet18_cifar10] [--layers 4]
        [--iterations 20 100] [--images 256] [--batch-size 64] [--threads 1]

Both tools get the same BN-folded CIFAR-10 checkpoint and run `Adaround.apply_adaround` with W4 per-tensor weights
(AIMET's per-tensor default_config.json, quant scheme "tf") on the same `--images` CIFAR-10 train images. To fit a
few minutes of CPU, only `--layers` conv / linear layers spread evenly over the depth are rounded; the others are in
`ignore_quant_ops_list` for both tools (they stay FP32). Per iteration count the script prints each tool's seconds
and milliseconds per layer-iteration (total / (layers x iterations), data caching included); with two iteration
counts also the marginal cost of one layer-iteration (the slope), and the ratios AIMET / clebench. Without
aimet-torch it times clebench alone and says so.
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings

import torch
from torch import nn

import _peers

from clebench import layers
from clebench.adaround.adaround_weight import Adaround, AdaroundParameters
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cli import positive_int
from clebench.models import model_preprocessing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="folder of the checkpoints (default: env CLEBENCH_MODELS)")
    parser.add_argument("--models", nargs="+", default=list(_peers.CIFAR_MODELS), choices=_peers.CIFAR_MODELS)
    parser.add_argument("--layers", type=positive_int, default=4, help="layers to round, spread over the depth")
    parser.add_argument("--iterations", type=positive_int, nargs="+", default=[20, 100])
    parser.add_argument("--images", type=positive_int, default=256, help="calibration images (class-balanced)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--bits", type=int, default=4, help="weight bits (AIMET needs >= 4)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    return parser.parse_args(argv)


def chosen_layers(model: nn.Module, count: int) -> list[str]:
    """Names of `count` conv / linear layers spread evenly over the model's layers."""
    names = [name for name, m in model.named_modules() if layers.is_layer(m)]
    step = max(1, len(names) // count)
    return names[step // 2::step][:count]


def run(tool, model: nn.Module, images: list[torch.Tensor], iterations: int, args, kept: list[str],
        config_file: str) -> float:
    """Seconds of one `tool.Adaround.apply_adaround` call on a copy of `model` that rounds the layers `kept`."""
    model = copy.deepcopy(model)
    others = [m for name, m in model.named_modules() if layers.is_layer(m) and name not in kept]
    params = tool.AdaroundParameters(images, len(images), default_num_iterations=iterations)
    with tempfile.TemporaryDirectory() as folder:
        return _peers.timed(lambda: tool.Adaround.apply_adaround(
            model, images[0][:1], params, folder, "bench", default_param_bw=args.bits,
            ignore_quant_ops_list=others, default_quant_scheme=tool.QuantScheme.post_training_tf,
            default_config_file=config_file))


def load_aimet_adaround():
    """aimet_torch's adaround module with QuantScheme attached, or None."""
    aimet = _peers.load_aimet()
    if aimet is None:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from aimet_torch.adaround import adaround_weight
        from aimet_torch.common.defs import QuantScheme
    adaround_weight.QuantScheme = QuantScheme
    logging.getLogger().setLevel(logging.ERROR)
    return adaround_weight, aimet


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    theirs, aimet = load_aimet_adaround()
    ours = argparse.Namespace(Adaround=Adaround, AdaroundParameters=AdaroundParameters,
                              QuantScheme=__import__("clebench.adaround", fromlist=["QuantScheme"]).QuantScheme)
    print(f"# {_peers.machine_summary(aimet)}")
    if theirs is None:
        print(f"# {_peers.aimet_missing_message()}: timing clebench only")
    config_file = aimet.per_tensor_config if aimet is not None else None
    for name in args.models:
        model, _ = _peers.bench_model(name, args.models_dir)
        fold_all_batch_norms(model)
        calibration, _ = _peers.cifar_images(name, args.data, 10)
        images = _peers.input_batches(calibration, model_preprocessing(name), args.batch_size)
        images = [x for x in torch.cat(images)[: args.images].split(args.batch_size)]
        kept = chosen_layers(model, args.layers)
        print(f"{name}: W{args.bits} per tensor, {sum(len(x) for x in images)} images in batches of "
              f"{args.batch_size}, layers {kept}")
        seconds = {}
        for iterations in args.iterations:
            for label, tool in (("clebench", ours), ("aimet", theirs)):
                if tool is not None:
                    seconds[label, iterations] = run(tool, model, images, iterations, args, kept,
                                                     config_file)
            print(format_row(seconds, iterations, len(kept)), flush=True)
        if len(args.iterations) > 1:
            print(format_slope(seconds, args.iterations[0], args.iterations[-1], len(kept)), flush=True)
    return 0


def format_row(seconds: dict, iterations: int, count: int) -> str:
    parts = [f"  {iterations:>6} iterations:"]
    for label in ("clebench", "aimet"):
        if (label, iterations) in seconds:
            value = seconds[label, iterations]
            parts.append(f"{label} {value:7.1f} s ({1000 * value / (count * iterations):6.1f} ms/layer-iteration)")
    if ("aimet", iterations) in seconds:
        parts.append(f"AIMET / clebench {seconds['aimet', iterations] / seconds['clebench', iterations]:.2f}x")
    return "  ".join(parts)


def format_slope(seconds: dict, low: int, high: int, count: int) -> str:
    slopes = {label: 1000 * (seconds[label, high] - seconds[label, low]) / (count * (high - low))
              for label in ("clebench", "aimet") if (label, high) in seconds}
    text = "  marginal: " + "  ".join(f"{label} {value:6.1f} ms/layer-iteration" for label, value in slopes.items())
    if "aimet" in slopes:
        text += f"  AIMET / clebench {slopes['aimet'] / slopes['clebench']:.2f}x"
    return text


if __name__ == "__main__":
    raise SystemExit(main())
