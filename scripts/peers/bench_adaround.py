"""AdaRound time: clebench's against AIMET's (aimet-torch 2.42), same API call, iterations and data, same run.

    python scripts/peers/bench_adaround.py [--models mobilenet_v2_cifar10 resnet18_cifar10] [--layers 4]
        [--iterations 20 100] [--images 256] [--batch-size 64] [--threads 1] [--repeats 3]

Both tools get the same BN-folded CIFAR-10 checkpoint and run `Adaround.apply_adaround` with W4 per-tensor weights
(AIMET's per-tensor default_config.json, quant scheme "tf") on the same `--images` CIFAR-10 train images. To fit a
few minutes of CPU, only `--layers` conv / linear layers spread evenly over the depth are rounded; the others are in
`ignore_quant_ops_list` for both tools (they stay FP32). Per iteration count the script prints each tool's seconds
and milliseconds per layer-iteration (total / (layers x iterations), data caching included); with two iteration
counts also the marginal cost of one layer-iteration (the slope), and the ratios AIMET / clebench. With --repeats N
each tool runs N times per iteration count, alternating which goes first (the machine's speed drifts): seconds are
medians, and each repeat's ratio is listed. Last, the convolution alone: each layer's forward and weight gradient
on one step's samples, which a sampled step of either tool computes, so the part of the slope that neither can save
without changing the step (timed before and after the AdaRound runs; the mean). Without aimet-torch it times
clebench alone and says so.

Output: prints the figures to stdout (each run's seconds to stderr as it goes); writes no file
(results/bench/adaround_time_resnet18.txt is such a run's output).
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import warnings

import torch
from torch import nn
from torch.func import functional_call

import _peers

from clebench import layers, timing
from clebench.adaround.adaround_weight import Adaround, AdaroundParameters
from clebench.adaround.layer import DEFAULT_BATCH_SIZE
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cli import positive_int
from clebench.models import model_preprocessing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="folder of the checkpoints (default: env CLEBENCH_MODELS)")
    parser.add_argument("--models", nargs="+", default=list(_peers.CIFAR_MODELS), choices=_peers.CIFAR_MODELS)
    parser.add_argument("--layers", type=positive_int, default=4, help="layers to round, spread over the depth")
    parser.add_argument("--iterations", type=positive_int, nargs="+", default=[20, 100])
    parser.add_argument("--images", type=positive_int, default=256, help="calibration images (class-balanced)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--bits", type=int, default=4, help="weight bits (AIMET needs >= 4)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs per tool and iteration count, alternating which tool goes first; seconds are medians")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
        return timing.seconds(lambda: tool.Adaround.apply_adaround(
            model, images[0][:1], params, folder, "bench", default_param_bw=args.bits,
            ignore_quant_ops_list=others, default_quant_scheme=tool.QuantScheme.post_training_tf,
            default_config_file=config_file), hold_gc=True)


def convolution_ms(model: nn.Module, images: list[torch.Tensor], kept: list[str], repeats: int = 20) -> float:
    """Milliseconds of one layer's forward and weight gradient (bias gradient included, as in a step) on
    DEFAULT_BATCH_SIZE samples of its FP32 inputs, mean over the layers `kept`."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    inputs = {}
    hooks = [modules[name].register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args[0]))
             for name in kept]
    with torch.no_grad():
        model(torch.cat(images)[:DEFAULT_BATCH_SIZE])
    for hook in hooks:
        hook.remove()
    total = 0.0
    for name in kept:
        layer, weight = modules[name], modules[name].weight.detach().clone().requires_grad_()

        def step() -> None:
            output = functional_call(layer, {"weight": weight}, (inputs[name],))
            output.backward(torch.ones_like(output))

        step()
        total += timing.seconds(lambda: [step() for _ in range(repeats)], hold_gc=True) / repeats
    return 1000 * total / len(kept)


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
        runs = {}
        convolution = convolution_ms(model, images, kept)
        for repeat in range(args.repeats):
            tools = (("clebench", ours), ("aimet", theirs))
            for iterations in args.iterations:
                for label, tool in tools if repeat % 2 == 0 else tools[::-1]:
                    if tool is not None:
                        runs.setdefault((label, iterations), []).append(
                            run(tool, model, images, iterations, args, kept, config_file))
                        print(f"  ({label}, {iterations} iterations, run {repeat + 1} of {args.repeats}: "
                              f"{runs[label, iterations][-1]:.1f} s)", file=sys.stderr, flush=True)
        seconds = medians(runs)
        for iterations in args.iterations:
            print(format_row(seconds, iterations, len(kept), per_repeat(runs, iterations)), flush=True)
        if len(args.iterations) > 1:
            print(format_slope(seconds, args.iterations[0], args.iterations[-1], len(kept)), flush=True)
        print(format_convolution((convolution + convolution_ms(model, images, kept)) / 2), flush=True)
    return 0


def medians(runs: dict) -> dict:
    """{(tool, iterations): median seconds} of {(tool, iterations): [seconds per repeat]}."""
    return {key: statistics.median(values) for key, values in runs.items()}


def per_repeat(runs: dict, iterations: int) -> list[float]:
    """AIMET / clebench seconds of each repeat at `iterations` (empty without AIMET)."""
    return [aimet / ours for aimet, ours in zip(runs.get(("aimet", iterations), []), runs[("clebench", iterations)])]


def format_row(seconds: dict, iterations: int, count: int, ratios: list[float] = ()) -> str:
    parts = [f"  {iterations:>6} iterations:"]
    for label in ("clebench", "aimet"):
        if (label, iterations) in seconds:
            value = seconds[label, iterations]
            parts.append(f"{label} {value:7.1f} s ({1000 * value / (count * iterations):6.1f} ms/layer-iteration)")
    if ("aimet", iterations) in seconds:
        parts.append(f"AIMET / clebench {seconds['aimet', iterations] / seconds['clebench', iterations]:.2f}x")
    if len(ratios) > 1:
        parts.append("(per repeat " + ", ".join(f"{ratio:.2f}x" for ratio in ratios) + ")")
    return "  ".join(parts)


def format_slope(seconds: dict, low: int, high: int, count: int) -> str:
    slopes = {label: 1000 * (seconds[label, high] - seconds[label, low]) / (count * (high - low))
              for label in ("clebench", "aimet") if (label, high) in seconds}
    text = "  marginal: " + "  ".join(f"{label} {value:6.1f} ms/layer-iteration" for label, value in slopes.items())
    if "aimet" in slopes:
        text += f"  AIMET / clebench {slopes['aimet'] / slopes['clebench']:.2f}x"
    return text


def format_convolution(milliseconds: float) -> str:
    return (f"  convolution alone: {milliseconds:6.1f} ms/layer-iteration (forward and weight gradient on "
            f"{DEFAULT_BATCH_SIZE} samples, mean over the layers; timed before and after the runs, mean)")


if __name__ == "__main__":
    raise SystemExit(main())
