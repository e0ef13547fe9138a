"""clebench against AIMET (`aimet-torch`, needed here): do the two equalize models alike?

    /opt/aimetenv/bin/python scripts/peers/bench_peers_agreement.py [--models resnet18 ...]

clebench vs AIMET `equalize_model`, both with ReLU6 -> ReLU: the largest relative difference between
corresponding weights / biases (max |a - b| / max |a| per tensor, max over tensors, a = AIMET), the CLS set lists,
and the largest relative difference of FP32 logits on 64 real images (CIFAR-10 test for the checkpoints, the
ImageNet sample for the ImageNet-shape models).

Output: prints its table and merges its rows into results/bench/peers.csv (rows of this section replace older ones), then
rewrites results/bench/peers.md (scripts/peers/_peers.py). The machine is shared, so ratios are what matter. Without
AIMET the section is skipped.
"""
from __future__ import annotations

import argparse
import copy
import math
from types import SimpleNamespace

import _peers  # the scripts' shared helpers live beside them
import torch
from _peers import Row, SectionResult
from torch import nn

from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cross_layer_equalization import CrossLayerScaling, equalize_model

LOGIT_IMAGES = 64
WEIGHT_AGREEMENT_TARGET = 1e-5


def cls_set_names(tool: str, model: nn.Module, shape: tuple[int, ...], aimet: SimpleNamespace) -> list[tuple[str, ...]]:
    """The CLS sets `tool` finds in BN-folded, ReLU6 -> ReLU `model`, as tuples of module names."""
    probe = _peers.with_relu(model)
    if tool == "clebench":
        fold_all_batch_norms(probe)
        infos = CrossLayerScaling.scale_model(probe)
    else:
        aimet.batch_norm_fold.fold_all_batch_norms(probe, shape)
        infos = aimet.cross_layer_equalization.CrossLayerScaling.scale_model(probe, shape)
    names = {module: name for name, module in probe.named_modules()}
    return [
        tuple(names[p.layer1] for p in info.cls_pair_info_list) + (names[info.cls_pair_info_list[-1].layer2],)
        for info in infos
    ]


def largest_relative_difference(reference: dict[str, torch.Tensor],
                                other: dict[str, torch.Tensor]) -> tuple[float, str, list[str]]:
    """(max over shared float tensors of max|ref - other| / max|ref|, the worst tensor, keys not in both)."""
    unmatched = sorted(set(reference) ^ set(other))
    worst, worst_name = 0.0, ""
    for name, ref in reference.items():
        if name not in other or not ref.is_floating_point() or not ref.numel():
            continue
        scale = ref.abs().max().item()
        gap = (ref - other[name]).abs().max().item()
        relative = gap / scale if scale else (0.0 if gap == 0 else math.inf)
        if relative > worst:
            worst, worst_name = relative, name
    return worst, worst_name, unmatched


def describe_set_difference(ours: list[tuple[str, ...]], theirs: list[tuple[str, ...]]) -> str:
    only_ours = [s for s in ours if s not in theirs]
    only_theirs = [s for s in theirs if s not in ours]
    if not only_ours and not only_theirs:
        return "identical, same order" if ours == theirs else "same sets, different order"
    return f"only clebench: [{_listed_sets(only_ours)}]; only AIMET: [{_listed_sets(only_theirs)}]"


def _listed_sets(sets: list[tuple[str, ...]], shown: int = 4) -> str:
    return "; ".join("->".join(s) for s in sets[:shown]) + (" ..." if len(sets) > shown else "")


def agreement_for(model_name: str, args: argparse.Namespace, aimet: SimpleNamespace, result: SectionResult) -> None:
    model, shape = _peers.bench_model(model_name, args.models_dir)
    ours = copy.deepcopy(model)
    equalize_model(ours, shape)
    theirs = _peers.with_relu(model)
    aimet.cross_layer_equalization.equalize_model(theirs, shape)
    worst, worst_name, unmatched = largest_relative_difference(theirs.state_dict(), ours.state_dict())
    our_sets = cls_set_names("clebench", model, shape, aimet)
    their_sets = cls_set_names("aimet", model, shape, aimet)
    sets_note = describe_set_difference(our_sets, their_sets)
    images, preprocessing = _peers.sample_images(model_name, args.data, LOGIT_IMAGES)
    inputs = torch.cat(_peers.input_batches(images, preprocessing, LOGIT_IMAGES))
    with torch.no_grad():
        their_logits, our_logits = theirs(inputs), ours(inputs)
    logit_gap = ((our_logits - their_logits).abs().max() / their_logits.abs().max()).item()
    both = "clebench vs aimet"
    result.rows += [
        Row(model_name, "weights/biases max rel. diff", both, worst, "relative",
            f"worst: {worst_name}" + (f"; tensors in one model only: {unmatched}" if unmatched else "")),
        Row(model_name, "CLS sets", "clebench", len(our_sets), "sets"),
        Row(model_name, "CLS sets", "aimet", len(their_sets), "sets"),
        Row(model_name, "CLS sets in both", both, len(set(our_sets) & set(their_sets)), "sets", sets_note),
        Row(model_name, f"FP32 logits max rel. diff ({len(inputs)} real images)", both, logit_gap, "relative"),
    ]
    identical = our_sets == their_sets
    result.target(model_name, f"weights agree within {WEIGHT_AGREEMENT_TARGET:g} relative", worst, "relative",
                  worst <= WEIGHT_AGREEMENT_TARGET and not unmatched)
    result.target(model_name, "CLS set lists identical", float(identical), "bool", identical)
    print(f"  agreement {model_name}: weights {worst:.2e} ({worst_name}), sets: {sets_note}, logits {logit_gap:.2e}",
          flush=True)


def measure(args: argparse.Namespace, aimet: SimpleNamespace | None) -> SectionResult:
    if aimet is None:
        return SectionResult(skipped=_peers.aimet_missing_message())
    result = SectionResult()
    for model_name in args.models:
        try:
            agreement_for(model_name, args, aimet, result)
        except Exception as error:  # an AIMET failure is recorded; the section goes on with the next model
            result.rows.append(Row(model_name, "agreement", "aimet", math.nan, "", _peers.aimet_error(error)))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _peers.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=_peers.CLE_MODELS, default=list(_peers.CLE_MODELS),
                        help="models to equalize (default all four)")
    return parser


def main() -> None:
    _peers.run_section("agreement", measure, build_parser().parse_args())


if __name__ == "__main__":
    main()
