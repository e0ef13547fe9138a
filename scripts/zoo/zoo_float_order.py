"""How far two float32 evaluations of the same quantized network may part: ONNX Runtime and the torch simulation,
each against the simulation evaluated in float64.

    python scripts/zoo/zoo_float_order.py [--models inception_v3 swin_t ...] [--out results/bench/zoo_float_order.md]

Same models and set-up as scripts/zoo/zoo_coverage.py's export column: random weights with randomized BN statistics,
BN fold + CLS + HBF, a W8A8 per-tensor QuantSim calibrated on 8 random inputs, the logits of those 8 inputs. Columns,
in steps of the output quantizer (max over all logits): ORT - sim (ONNX Runtime's float kernels, QDQ fusion off,
against the float32 torch simulation, as zoo_coverage.md reports it), sim - sim64 (the float32 simulation against
the same simulation run in float64: same grids, only the rounding of the float sums differs) and ORT - sim64.
Where sim - sim64 is as large as ORT - sim, the float32 simulation itself is that far from its exact arithmetic,
so the gap between two float32 engines is float summation order, not the export.

Output: prints the table to stdout as it goes; with --out, also writes it to that markdown file
(results/bench/zoo_float_order.md is the committed one).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from zoo_coverage import EXPORT_STEPS, build, check_export, input_size

from clebench import graph, timing
from clebench.cross_layer_equalization import equalize_model

# zoo_coverage.md's models beyond 2 steps (2026-12-01; squeezenet1_0 since its flatten fix), and three within it
DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "inception_v3", "maxvit_t", "regnet_x_16gf",
                  "regnet_y_16gf", "resnet101", "resnet152", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg19",
                  "wide_resnet101_2"]


def measure(name: str) -> list[str]:
    """The table cells of model `name`."""
    clock = timing.Stopwatch()
    model = graph.prepare_model(build(name))
    equalize_model(model, relu6="clip")
    result = check_export(model, input_size(name))
    cells = [f"{result.max_steps:.0f}", f"{100 * result.share_over_2_steps:.3f} %", f"{result.sim_float64_steps:.0f}",
             f"{result.runtime_float64_steps:.0f}"]
    return [name, *cells, f"{clock.seconds:.0f}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ["model", "ORT - sim", f"> {EXPORT_STEPS}", "sim - sim64", "ORT - sim64", "s"]
    lines = [f"Command: `python {' '.join(sys.argv)}` ({datetime.date.today()}, {timing.cpu_name()}, "
             f"{args.threads} torch thread(s), torch {torch.__version__}).", "",
             "Steps of the output quantizer, max over the 8 x classes logits (and for ORT - sim the share of logits "
             f"more than {EXPORT_STEPS} steps apart); sim = the float32 torch simulation, sim64 = the same simulation in float64, "
             "ORT = ONNX Runtime's float kernels on the exported QDQ model.", "",
             "| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    print("\n".join(lines), flush=True)
    for name in args.models:
        line = "| " + " | ".join(measure(name)) + " |"
        print(line, flush=True)
        lines.append(line)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
