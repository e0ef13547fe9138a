"""Both runtimes on the CIFAR-10 checkpoints' BN-fold and CLE rows: the torch simulation, ONNX Runtime int8, OpenVINO
int8 and the openvino (sim) engine, with agreement, integer layers and cost.

For each model x step combination x quant setting (per tensor, 8-bit activations, min/max, calibrated on --calibration
class-balanced training images), on the first --images class-balanced test images: the torch simulation's top-1 and
seconds; per runtime the int8 top-1, agreement with the simulation (% of images with the same top-1 class), the
conv / matmul layers it ran on integers, and its cost (export + compile + evaluation, seconds); and the openvino
engine (OpenVINO's float kernels, the simulation's arithmetic): agreement and speed against the torch simulation.

    python scripts/deploy/deploy_runtimes.py --images 2000 --out results/bench/deploy_runtimes.md

Output: prints each table row to stdout as it goes, then writes the markdown table to --out.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch

from clebench import timing
from clebench.data.datasets import batches, load_images
from clebench.evaluation import agreement, evaluate
from clebench.models import model_preprocessing
from clebench.runtimes import RUNTIMES
from clebench.runtimes.engines import runtime
from clebench.runtimes.export import export_onnx
from clebench.sweep.prepare import calibrated_sim, prepare_fp32

ROWS = {
    "resnet18_cifar10": ["bn_fold", "bn_fold+cls+hbf"],
    "mobilenet_v2_cifar10": ["bn_fold", "bn_fold+cls_relu6_clip+hbf"],
}
QUANTS = ["w8a8_per_tensor_minmax", "w6a8_per_tensor_minmax", "w4a8_per_tensor_minmax"]
HEADER = ("| model | steps | quant | sim top-1 | sim s | ORT int8 top-1 | agree | integer layers | s | OV int8 top-1 | "
          "agree | integer layers | s | openvino engine agree | speed vs torch sim |")


def row(sim, loader: list, workdir: Path, threads: int) -> str:
    """The table cells of one calibrated sim, from `sim top-1` on."""
    seconds, reference = timing.timed(lambda: evaluate(sim.model, loader, progress=False))
    cells = [f"{reference['top1']:.2f}", f"{seconds:.1f}"]
    dummy = loader[0][0][:1]
    for name in RUNTIMES:
        module = runtime(name)

        def deploy():
            path = export_onnx(sim, dummy, workdir / f"{name}.onnx", int32_bias=True)
            return path, module.evaluate_onnx(path, loader, mode="int8", threads=threads, progress=False)

        cost, (path, int8) = timing.timed(deploy)
        precision = module.layer_precision(path, "int8", threads)
        cells += [f"{int8['top1']:.2f}", f"{agreement(int8, reference):.2f}", f"{precision.integer} / {precision.total}",
                  f"{cost:.1f}"]
    engine_seconds, engine = timing.timed(lambda: runtime("openvino").evaluate_onnx(
        export_onnx(sim, dummy, workdir / "sim.onnx"), loader, mode="sim", threads=threads, progress=False))
    return " | ".join(cells + [f"{agreement(engine, reference):.2f}", f"{seconds / engine_seconds:.2f}x"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models-dir", default="../shared/models")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--quant", nargs="+", default=QUANTS)
    parser.add_argument("--out", type=Path, default=Path("results/bench/deploy_runtimes.md"))
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = {name: runtime(name).runtime_info()["version"] for name in RUNTIMES}
    lines = [
        f"Command: `python {' '.join(sys.argv)}` ({datetime.date.today()}, {timing.machine_summary('aimet-torch missing')}).",
        "",
        f"First {args.images} class-balanced CIFAR-10 test images, batch 500, {args.threads} threads; per tensor, "
        f"8-bit activations, min/max, calibrated on {args.calibration} training images; int8 = int32 biases. "
        f"ONNX Runtime {versions['onnxruntime']}, OpenVINO {versions['openvino']}, torch {torch.__version__}. agree = % "
        "of images whose top-1 equals the torch simulation's; integer layers = conv / matmul layers run on integers, "
        "of all; s = seconds (runtimes: export + compile + evaluation); openvino engine = the simulation on "
        "OpenVINO's float kernels (LP transforms off, f32).",
        "",
        HEADER,
        "|:--|:--|:--|" + "--:|" * (HEADER.count("|") - 4),
    ]
    clock = timing.Stopwatch()
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models:
            preprocessing = model_preprocessing(model_name)
            test = load_images("cifar10", "test", args.data_root, preprocessing, limit=args.images, progress=False)
            train = load_images("cifar10", "train", args.data_root, preprocessing, limit=args.calibration, progress=False)
            calibration = list(batches(train, 500, preprocessing))
            loader = list(batches(test, 500, preprocessing))  # normalized once: only the engines are timed
            for combination in ROWS[model_name]:
                state = prepare_fp32(model_name, combination, models_dir=args.models_dir)
                for quant in args.quant:
                    sim = calibrated_sim(state, combination, quant, calibration)
                    line = f"| {model_name} | {combination} | {quant} | {row(sim, loader, Path(workdir), args.threads)} |"
                    print(line, flush=True)
                    lines.append(line)
    lines += ["", f"{clock.seconds:.0f} s in all."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
