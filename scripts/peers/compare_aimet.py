"""Top-1 of clebench's simulated per-tensor min/max quantization against AIMET's QuantizationSimModel.

    /opt/aimetenv/bin/python scripts/peers/compare_aimet.py [--limit 2000] [--weight-bits 8 6 4] [--cle]

For each CIFAR-10 reference checkpoint and each W<b>A8 setting, both simulators calibrate on the same 512 CIFAR-10
train images (the first files of each class in sorted order) and are evaluated on the same CIFAR-10 test images
(`--limit`: a class-balanced subset; default all 10,000). clebench runs twice: with its default (DFQ) encoding rules
and with `QuantConfig(aimet_rules=True)`. Prints the three top-1s and both differences to AIMET; exits with status 1
if AIMET fails or the like-for-like difference (AIMET rules in both tools) exceeds `--tolerance` (0.5 points). The
default-rules difference is what the two rule choices below are worth.

How the two are made to simulate the same network (AIMET 2.42, read from its source and checked on both models):
* BN: AIMET's QuantizationSimModel does not fold BN. It keeps each BN as a float op after a conv whose *unfolded*
  weight it quantizes, moves the conv's output quantizer behind the BN, and does not quantize BN parameters. Both
  tools therefore get a BN-folded model: clebench `fold_all_batch_norms`, AIMET `fold_all_batch_norms` (the two
  folds agree to ~1e-7 relative).
* Graph: AIMET places quantizers per module. On the raw torchvision ResNet18 it quantizes neither the residual add
  (a functional `+=`, no module to hold a quantizer) nor the output of the block's ReLU module, which torchvision
  calls twice (AIMET leaves that module's one output quantizer off), so every block's activations run unquantized.
  AIMET's `model_preparer.prepare_model`, which its PTQ guide runs first, makes the add a module and gives each ReLU
  call its own module; both tools then quantize the same tensors.
* Placement (per-tensor `default_config.json`): model input, every op output, and weights are quantized; biases are
  not; supergroups Conv+ReLU/ReLU6, Add+ReLU, Gemm+ReLU quantize only after the activation. clebench's QuantSim places
  quantizers the same way, with one exception: AIMET's supergroup matcher rejects depthwise convs, so it quantizes a
  depthwise conv's output *and* the ReLU6 after it (17 extra quantizers in MobileNetV2). `--aimet-placement matched`
  (default) switches those off; `shipped` keeps them.
* Encodings: quant_scheme "tf" (min/max), default_param_bw = b, default_output_bw = 8; activations asymmetric unsigned
  8-bit with 0 on the grid (identical rule in both). Two rules differ from clebench's defaults (the DFQ setting), and
  `QuantConfig.aimet_rules` switches clebench to AIMET's for both:
  - AIMET's symmetric weight scale is max(max / (2^(b-1) - 1), -min / 2^(b-1)), so it uses the level -2^(b-1) when
    the negative side dominates; clebench's is max|w| / (2^(b-1) - 1).
  - AIMET calibrates activation ranges with the weights already quantized; clebench with FP32 weights.

`--cle` runs each tool's own `equalize_model` first (ReLU6 -> ReLU in both, as AIMET >= 2.4 no longer does it).

Output: prints the table (and any DISAGREE / NOT COMPARED line) to stdout; writes no file.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn

import _peers  # the scripts' shared helpers live beside them

from clebench import timing
from clebench.cross_layer_equalization import equalize_model
from clebench.data.datasets import batches
from clebench.evaluation import evaluate
from clebench.models import load_model, model_preprocessing
from clebench.peers import aimet as aimet_peer


@dataclass
class Comparison:
    model: str
    setting: str
    clebench: float  # default (DFQ) encoding rules
    clebench_aimet_rules: float
    aimet: float | None  # None: AIMET failed (see `error`)
    error: str = ""

    @property
    def difference(self) -> float | None:
        """clebench with AIMET's rules minus AIMET: the implementations' disagreement."""
        return None if self.aimet is None else self.clebench_aimet_rules - self.aimet

    @property
    def rules_difference(self) -> float | None:
        """clebench with its default rules minus AIMET: what the two rule choices are worth."""
        return None if self.aimet is None else self.clebench - self.aimet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data", default=None, help="data root holding cifar10/ (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="folder of the CIFAR-10 checkpoints (default: env CLEBENCH_MODELS)")
    parser.add_argument("--models", nargs="+", default=list(_peers.CIFAR_MODELS), choices=_peers.CIFAR_MODELS)
    parser.add_argument("--weight-bits", nargs="+", type=int, default=[8, 6, 4], help="weight bit widths (default 8 6 4)")
    parser.add_argument("--act-bits", type=int, default=8, help="activation bit width (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="class-balanced test subset size (default: all 10,000)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads value")
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest allowed |top-1 difference| in points")
    parser.add_argument("--aimet-placement", choices=("matched", "shipped"), default="matched",
                        help="matched: drop AIMET's extra depthwise-conv output quantizers (default); shipped: keep them")
    parser.add_argument("--cle", action="store_true", help="equalize with each tool's equalize_model before quantizing")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive image count, got {args.limit}")
    if args.threads < 1 or args.batch_size < 1:
        parser.error("--threads and --batch-size must be positive")
    bad_bits = [b for b in [*args.weight_bits, args.act_bits] if not 4 <= b <= 16]
    if bad_bits:
        parser.error(f"bit widths must lie in [4, 16] (AIMET supports >= 4, clebench <= 16), got {bad_bits}")
    return args


def aimet_equalized(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | str:
    """An AIMET-equalized copy of `model` with ReLU6 -> ReLU (the sweep's relu6_to_relu+aimet_cle), or the failure."""
    try:
        return aimet_peer.equalize(_peers.with_relu(model), input_shape)
    except Exception as error:  # recorded in every row of the model
        return _peers.aimet_error(error)


def aimet_top1(aimet, model: nn.Module | str, calibration: list[torch.Tensor], bits: int, args: argparse.Namespace,
               top1) -> tuple[float | None, str]:
    """(AIMET top-1, "") or (None, the failure); `model` is the failure of an earlier AIMET step if it is a str."""
    if isinstance(model, str):
        return None, model
    try:
        sim = _peers.aimet_quantsim(aimet, model, calibration, bits, args.act_bits, _peers.CIFAR_SHAPE,
                                    match_placement=args.aimet_placement == "matched")
        return top1(sim), ""
    except Exception as error:  # any AIMET failure is a result to record, not a reason to stop
        return None, _peers.aimet_error(error)


def compare_model(name: str, aimet, args: argparse.Namespace) -> list[Comparison]:
    preprocessing = model_preprocessing(name)
    calibration_set, test_set = _peers.cifar_images(name, args.data, args.limit)
    calibration = _peers.input_batches(calibration_set, preprocessing, args.batch_size)
    model = load_model(name, models_dir=args.models_dir)

    def top1(network: nn.Module) -> float:
        return evaluate(network, batches(test_set, args.batch_size, preprocessing), progress=False)["top1"]

    print(f"{name}: FP32 top-1 {top1(model):.2f} on {len(test_set)} test images", flush=True)
    ours, theirs = model, model
    if args.cle:
        ours = copy.deepcopy(model)
        equalize_model(ours, _peers.CIFAR_SHAPE)
        theirs = aimet_equalized(model, _peers.CIFAR_SHAPE)
    results = []
    for bits in args.weight_bits:
        setting = f"W{bits}A{args.act_bits}{' +CLE' if args.cle else ''}"
        clebench_top1 = [
            top1(_peers.clebench_quantsim(ours, calibration, bits, args.act_bits, _peers.CIFAR_SHAPE, aimet_rules=rules))
            for rules in (False, True)
        ]
        result = Comparison(name, setting, *clebench_top1, *aimet_top1(aimet, theirs, calibration, bits, args, top1))
        print(format_row(result), flush=True)
        results.append(result)
    return results


HEADER = f"{'model':<22} {'setting':<10} {'clebench':>9} {'clebench':>9} {'AIMET':>7} {'diff':>8} {'diff':>8}\n" + \
         f"{'':<22} {'':<10} {'default':>9} {'AIMET':>9} {'':>7} {'default':>8} {'AIMET':>8}\n" + \
         f"{'':<22} {'':<10} {'rules':>9} {'rules':>9} {'':>7} {'rules':>8} {'rules':>8}"


def format_row(result: Comparison) -> str:
    start = f"{result.model:<22} {result.setting:<10} {result.clebench:>9.2f} {result.clebench_aimet_rules:>9.2f}"
    if result.aimet is None:
        return f"{start} {'-':>7} {'-':>8} {'-':>8}  {result.error}"
    return f"{start} {result.aimet:>7.2f} {result.rules_difference:>+8.2f} {result.difference:>+8.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    aimet = _peers.load_aimet()
    if aimet is None:
        raise SystemExit(_peers.aimet_missing_message())
    print(f"# {_peers.machine_summary(aimet)}")
    print(f"# AIMET config {aimet.per_tensor_config}, quant_scheme 'tf', placement {args.aimet_placement}; "
          f"calibration {_peers.CALIBRATION_IMAGES} CIFAR-10 train images; top-1 in %, differences in points")
    print(HEADER)
    try:
        results = [row for name in args.models for row in compare_model(name, aimet, args)]
    except FileNotFoundError as error:  # data or checkpoints not where the arguments / environment say
        raise SystemExit(f"error: {error}") from None
    failed = [r for r in results if r.aimet is None]
    off = [r for r in results if r.difference is not None and abs(r.difference) > args.tolerance]
    for r in off:
        print(f"DISAGREE: {r.model} {r.setting}: clebench (AIMET rules) {r.clebench_aimet_rules:.2f} vs AIMET "
              f"{r.aimet:.2f} (|{r.difference:+.2f}| > {args.tolerance})")
    for r in failed:
        print(f"NOT COMPARED: {r.model} {r.setting}: {r.error}")
    return 1 if off or failed else 0


if __name__ == "__main__":
    sys.exit(main())
