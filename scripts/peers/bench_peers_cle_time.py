"""clebench against its peers, cross-layer equalization time: clebench, AIMET (`aimet-torch`, optional) and
PyTorch's `torch.ao.quantization._equalize`.

    /opt/aimetenv/bin/python scripts/peers/bench_peers_cle_time.py [--models resnet18 ...] [--fresh-runs 3] [--repeats 5]

Wall time of cross-layer equalization on torchvision ResNet18 / MobileNetV2 (random weights, randomized BN
statistics, input (1, 3, 224, 224)) and on the two CIFAR-10 checkpoints (input (1, 3, 32, 32)). "first call" is the
call in a fresh process (graph tracing and any lazy set-up included; imports and model building excluded), median
over `--fresh-runs` processes; "repeated call" is the median of `--repeats` further calls, each on a fresh deep copy;
the tools take turns run by run, so that load changes on the shared machine hit all of them alike.
Garbage is collected before, and collection held off during, every timed call (as timeit does).
clebench: `equalize_model(model, shape)` (BN fold, ReLU6 -> ReLU, CLS, high-bias fold). AIMET: its `equalize_model`
on a copy whose ReLU6s are already ReLUs (AIMET >= 2.4 warns and leaves conv -> ReLU6 -> conv unscaled).
torch.ao: `equalize(model, pairs, threshold=1e-4)` (iterates pairwise scaling to convergence; no BN fold, no
high-bias fold) on a model BN-folded beforehand (untimed), with the pairs clebench finds, minus those whose second
layer is a depthwise conv: torch.ao reads the second layer's input ranges on weight axis 1, which has size 1 for a
depthwise conv, so of each conv -> depthwise -> conv triple only the depthwise -> conv pair remains.

Output: prints its table and merges its rows into results/bench/peers.csv (rows of this section replace older ones), then
rewrites results/bench/peers.md (scripts/peers/_peers.py). The machine is shared, so ratios are what matter. Without
AIMET the clebench and torch.ao columns still run.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import _peers  # the scripts' shared helpers live beside them
from _peers import Row, SectionResult
from torch import nn
from torch.ao.quantization import _equalize as torch_ao

from clebench import layers, timing
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, equalize_model

CLE_TOOLS = ("clebench", "aimet", "torch.ao")
TORCH_AO_THRESHOLD = 1e-4  # torch.ao's default convergence threshold
SPEEDUP_TARGET = 10.0


def torch_ao_pairs(model: nn.Module) -> list[list[str]]:
    """Module-name pairs torch.ao can equalize: clebench's CLS pairs whose second layer is not depthwise."""
    probe = _peers.with_relu(model)
    fold_all_batch_norms(probe)
    names = {module: name for name, module in probe.named_modules()}
    return [
        [names[pair.layer1], names[pair.layer2]]
        for info in CrossLayerScaling.scale_model(probe)
        for pair in info.cls_pair_info_list
        if not layers.is_depthwise(pair.layer2)
    ]


def cle_call_factory(tool: str, model: nn.Module, shape: tuple[int, ...],
                     aimet: SimpleNamespace | None) -> Callable[[], Callable[[], object]]:
    """A factory whose every call makes a fresh copy (untimed) and returns the CLE call to time on it."""
    if tool == "clebench":
        def make() -> Callable[[], object]:
            fresh = copy.deepcopy(model)
            return lambda: equalize_model(fresh, shape)
    elif tool == "aimet":
        def make() -> Callable[[], object]:
            fresh = _peers.with_relu(model)
            return lambda: aimet.cross_layer_equalization.equalize_model(fresh, shape)
    elif tool == "torch.ao":
        pairs = torch_ao_pairs(model)
        folded = copy.deepcopy(model)
        fold_all_batch_norms(folded)

        def make() -> Callable[[], object]:
            fresh, fresh_pairs = copy.deepcopy(folded), copy.deepcopy(pairs)  # equalize rewrites the list it gets
            return lambda: torch_ao.equalize(fresh, fresh_pairs, threshold=TORCH_AO_THRESHOLD)
    else:
        raise ValueError(f"unknown CLE tool {tool!r}; choose from {CLE_TOOLS}")
    return make


def first_call_in_fresh_process(tool: str, model_name: str, models_dir: str | None, threads: int) -> float:
    """Runs in a spawned interpreter: seconds of the process's first CLE call (imports and model building excluded)."""
    import torch

    torch.set_num_threads(threads)
    aimet = _peers.load_aimet() if tool == "aimet" else None
    if tool == "aimet" and aimet is None:
        raise RuntimeError(_peers.aimet_missing_message())
    model, shape = _peers.bench_model(model_name, models_dir)
    return timing.seconds(cle_call_factory(tool, model, shape, aimet)(), hold_gc=True)


def first_call_seconds(tool: str, model_name: str, args: argparse.Namespace) -> float:
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing traced or cached yet
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as fresh:
        return fresh.submit(first_call_in_fresh_process, tool, model_name, args.models_dir, args.threads).result()


def time_cle(tools: list[str], model_name: str, args: argparse.Namespace, aimet: SimpleNamespace | None) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """({tool: (median first-call seconds over fresh processes, median repeated-call seconds)}, {tool: failure}).

    The tools take turns, run by run, so that load changes on a shared machine hit every tool alike.
    """
    model, shape = _peers.bench_model(model_name, args.models_dir)
    makers, failures = {}, {}
    for tool in tools:
        try:
            makers[tool] = cle_call_factory(tool, model, shape, aimet)
            makers[tool]()()  # warm-up; the first call is measured in fresh processes below
        except Exception as error:  # a peer failing on a model is a result; clebench failing is a bug
            if tool == "clebench":
                raise
            makers.pop(tool, None)
            failures[tool] = _peers.aimet_error(error) if tool == "aimet" else f"torch.ao failed: {type(error).__name__}: {error}"
    first = {tool: [] for tool in makers}
    repeated = {tool: [] for tool in makers}
    for _ in range(args.fresh_runs):
        for tool in makers:
            first[tool].append(first_call_seconds(tool, model_name, args))
    for _ in range(args.repeats):
        for tool, make in makers.items():
            repeated[tool].append(timing.seconds(make(), hold_gc=True))
    return {tool: (statistics.median(first[tool]), statistics.median(repeated[tool])) for tool in makers}, failures


def measure(args: argparse.Namespace, aimet: SimpleNamespace | None) -> SectionResult:
    result = SectionResult()
    tools = [t for t in CLE_TOOLS if t != "aimet" or aimet is not None]
    for model_name in args.models:
        seconds, failures = time_cle(tools, model_name, args, aimet)
        for tool, note in failures.items():
            result.rows.append(Row(model_name, "first call", tool, math.nan, "ms", note))
        for tool, values in seconds.items():
            for measure, value in zip(("first call", "repeated call"), values):
                result.rows.append(Row(model_name, measure, tool, 1000 * value, "ms"))
            print(f"  cle-time {model_name} {tool}: first {1000 * values[0]:.1f} ms, repeated {1000 * values[1]:.1f} ms",
                  flush=True)
        if "aimet" in seconds:
            for index, measure in enumerate(("first call", "repeated call")):
                speedup = seconds["aimet"][index] / seconds["clebench"][index]
                result.target(model_name, f"clebench >= {SPEEDUP_TARGET:g}x faster than AIMET, {measure}", speedup, "x",
                              speedup >= SPEEDUP_TARGET)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _peers.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=_peers.CLE_MODELS, default=list(_peers.CLE_MODELS),
                        help="models to equalize (default all four)")
    parser.add_argument("--fresh-runs", type=_peers.positive_int, default=3,
                        help="fresh processes per first-call time (median)")
    parser.add_argument("--repeats", type=_peers.positive_int, default=5,
                        help="repeated CLE calls per model and tool (median)")
    return parser


def main() -> None:
    _peers.run_section("cle-time", measure, build_parser().parse_args())


if __name__ == "__main__":
    main()
