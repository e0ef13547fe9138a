"""What the peer scripts in this folder share (compare_aimet*.py, bench_adaround.py, the bench_peers_*.py scripts): the optional AIMET peer, the models, the images,
the two quantization simulators set up the same way, and the results tables the bench scripts write.

AIMET (`aimet-torch`, pip extra `bench`) is loaded only on demand (clebench.peers.aimet), so the scripts still run
their clebench / torch.ao parts in an environment without it.

Both simulators get a BN-folded FP32 model and per-tensor min/max ("tf") encodings: symmetric signed weights,
asymmetric unsigned activations, float biases. AIMET 2.42 is set up the way its own PTQ guide does it:
`model_preparer.prepare_model` (turns functional adds into modules and gives each call of a reused module -- the
ReLU torchvision's BasicBlock calls twice -- its own module; without it the block's second ReLU output and the
residual add get no quantizer), then `batch_norm_fold.fold_all_batch_norms` (without it, QuantizationSimModel keeps
each BN as a float op and quantizes the unfolded conv weight), then QuantizationSimModel with the per-tensor
`default_config.json` shipped in the package (AIMET 2.x's default config file is the per-channel one).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
import torchvision
from torch import nn

from clebench import timing, utils
from clebench.batch_norm_fold import fold_all_batch_norms
from clebench.cli import positive_int  # the option type of every bench_peers script
from clebench.data.datasets import ImageSet, batches, load_images
from clebench.errors import MissingExtraError
from clebench.models import load_model, model_preprocessing
from clebench.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from clebench.peers import aimet as aimet_peer
from clebench.quant import QuantConfig, QuantSim

CIFAR_MODELS = ("resnet18_cifar10", "mobilenet_v2_cifar10")
IMAGENET_SHAPE_MODELS = ("resnet18", "mobilenet_v2")  # torchvision, random weights, randomized BN statistics
CLE_MODELS = IMAGENET_SHAPE_MODELS + CIFAR_MODELS  # what the CLE time and agreement benchmarks equalize
CIFAR_SHAPE = (1, 3, 32, 32)
IMAGENET_SHAPE = (1, 3, 224, 224)
CALIBRATION_IMAGES = 512
AIMET_INSTALL_HINT = (
    'AIMET is not installed for this Python ({python}): install the peer with pip install -e ".[bench]" '
    "(or run the script with a Python that has aimet-torch, e.g. /opt/aimetenv/bin/python)"
)


def aimet_missing_message() -> str:
    return AIMET_INSTALL_HINT.format(python=sys.executable)


def load_aimet() -> SimpleNamespace | None:
    """clebench.peers.aimet.load_aimet(), or None if aimet_torch cannot be imported."""
    try:
        return aimet_peer.load_aimet()
    except MissingExtraError:
        return None


def machine_summary(aimet: SimpleNamespace | None) -> str:
    """One line naming the CPU, the torch thread count and the library versions."""
    return timing.machine_summary(f"aimet-torch {aimet.version}" if aimet is not None else "aimet-torch missing")


def randomized_bn_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision `name` (ImageNet shape) with seeded random weights and BN statistics / affines a trained net has."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
    return model


def bench_model(name: str, models_dir: str | os.PathLike | None) -> tuple[nn.Module, tuple[int, ...]]:
    """(model in eval mode, input shape) for a CIFAR checkpoint or an ImageNet-shape torchvision model."""
    if name in CIFAR_MODELS:
        return load_model(name, models_dir=models_dir), CIFAR_SHAPE
    if name in IMAGENET_SHAPE_MODELS:
        return randomized_bn_model(name), IMAGENET_SHAPE
    raise ValueError(f"unknown benchmark model {name!r}; choose from {CIFAR_MODELS + IMAGENET_SHAPE_MODELS}")


def with_relu(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every nn.ReLU6 replaced by nn.ReLU (AIMET >= 2.4 no longer scales across ReLU6)."""
    model = copy.deepcopy(model)
    utils.replace_modules_of_type1_with_type2(model, nn.ReLU6, nn.ReLU)
    return model


def sample_images(name: str, data_root: str | os.PathLike | None, count: int) -> tuple[ImageSet, Preprocessing]:
    """`count` class-balanced real images for model `name`: CIFAR-10 test, or the ImageNet sample (224 px)."""
    if name in CIFAR_MODELS:
        preprocessing = model_preprocessing(name)
        return load_images("cifar10", "test", data_root, preprocessing, limit=count, progress=False), preprocessing
    images = load_images("imagenet", "imagenet-sample", data_root, IMAGENET_PREPROCESSING, limit=count, progress=False)
    return images, IMAGENET_PREPROCESSING


def cifar_images(name: str, data_root: str | os.PathLike | None, limit: int | None) -> tuple[ImageSet, ImageSet]:
    """(calibration: the first CALIBRATION_IMAGES train images per class in sorted order, evaluation: test images).

    limit: class-balanced test subset size (None: all 10,000).
    """
    preprocessing = model_preprocessing(name)
    calibration = load_images("cifar10", "train", data_root, preprocessing, limit=CALIBRATION_IMAGES, progress=False)
    evaluation = load_images("cifar10", "test", data_root, preprocessing, limit=limit, progress=False)
    return calibration, evaluation


def input_batches(image_set: ImageSet, preprocessing: Preprocessing, batch_size: int) -> list[torch.Tensor]:
    """The normalised images of `image_set` as a list of [B, 3, H, W] tensors."""
    return [images for images, _ in batches(image_set, batch_size, preprocessing)]


def clebench_quantsim(model: nn.Module, calibration: Iterable[torch.Tensor], weight_bits: int, act_bits: int,
                      input_shape: tuple[int, ...], *, aimet_rules: bool = False) -> nn.Module:
    """clebench's per-tensor min/max W<weight_bits>A<act_bits> simulation of BN-folded `model` (not modified).

    aimet_rules: AIMET's weight-scale and calibration rules (`QuantConfig.aimet_rules`) instead of the DFQ ones.
    """
    folded = copy.deepcopy(model)
    fold_all_batch_norms(folded)
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, calibration="minmax", aimet_rules=aimet_rules)
    sim = QuantSim(folded, torch.zeros(input_shape), config)
    sim.calibrate(calibration, progress=False)
    return sim.model


def _drop_depthwise_output_quantizers(sim_model: nn.Module) -> None:
    """Disable the output quantizer of every depthwise conv (groups == input channels) that AIMET quantizes.

    AIMET's supergroup matcher rejects depthwise convs (`_check_if_conv3d_or_depthwise_conv`), so with the shipped
    config a depthwise conv -> ReLU6 pair is quantized twice (after the conv and after the ReLU6), while a regular
    conv -> ReLU6 pair, and clebench for both, quantizes only after the activation.
    """
    for module in sim_model.modules():
        is_depthwise = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < module.groups == module.in_channels
        if is_depthwise and getattr(module, "output_quantizers", [None])[0] is not None:
            module.output_quantizers[0] = None


def _forward_all(model: nn.Module, images: Iterable[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in images:
            model(batch)


def aimet_quantsim(aimet: SimpleNamespace, model: nn.Module, calibration: Sequence[torch.Tensor], weight_bits: int,
                   act_bits: int, input_shape: tuple[int, ...], *, match_placement: bool = True) -> nn.Module:
    """AIMET's per-tensor "tf" QuantizationSimModel of `model` (not modified), prepared and BN-folded first.

    match_placement: drop the depthwise-conv output quantizers that AIMET adds and clebench does not (see
    `_drop_depthwise_output_quantizers`), so that both place quantizers at the same tensors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = aimet.model_preparer.prepare_model(copy.deepcopy(model).eval())
        dummy = torch.zeros(input_shape)
        aimet.batch_norm_fold.fold_all_batch_norms(prepared, input_shape, dummy_input=dummy)
        sim = aimet.quantsim.QuantizationSimModel(
            prepared, dummy, quant_scheme="tf", default_param_bw=weight_bits, default_output_bw=act_bits,
            config_file=aimet.per_tensor_config,
        )
    if match_placement:
        _drop_depthwise_output_quantizers(sim.model)
    sim.compute_encodings(_forward_all, calibration)
    return sim.model.eval()


def aimet_error(error: Exception) -> str:
    """A one-line record of an AIMET failure for the result tables."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"AIMET failed: {type(error).__name__}: {first}"


# ---------------------------------------------------------------------------------------------------- results
# Every bench_peers_<section>.py script measures one section, prints its table and merges its rows into
# results/bench/peers.csv (rows of the same section replace older ones), then rewrites results/bench/peers.md.

SECTIONS = ("cle-time", "agreement", "simulation", "sweep")  # the scripts bench_peers_cle_time.py, ... in peers.md order
CSV_COLUMNS = ("section", "model", "measure", "tool", "value", "unit", "note", "machine", "date")
TARGET_TOOL = "target"  # rows of this tool are pass / fail checks, listed under each section's table
RESULTS_DIR = Path(__file__).resolve().parents[2] / "results" / "bench"


@dataclass
class Row:
    """One measured number; a row with tool == TARGET_TOOL states a target and whether it was met (note)."""

    model: str
    measure: str
    tool: str
    value: float
    unit: str
    note: str = ""


@dataclass
class SectionResult:
    rows: list[Row] = field(default_factory=list)
    skipped: str = ""  # why the section did not run, if it did not

    def target(self, model: str, measure: str, value: float, unit: str, met: bool) -> None:
        self.rows.append(Row(model, measure, TARGET_TOOL, value, unit, "met" if met else "MISSED"))


def format_value(value: float) -> str:
    if math.isnan(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:,.2f}"


def section_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measurements: one row per model / measure / unit, one column per tool, in first-seen order; targets)."""
    targets = frame[frame["tool"] == TARGET_TOOL][["model", "measure", "value", "unit", "note"]]
    measured = frame[frame["tool"] != TARGET_TOOL]
    tools = list(dict.fromkeys(measured["tool"]))
    table: dict[tuple[str, str, str], dict] = {}
    for row in measured.itertuples():
        record = table.setdefault((row.model, row.measure, row.unit), {
            "model": row.model, "measure": row.measure, "unit": row.unit, **dict.fromkeys(tools, math.nan), "note": "",
        })
        record[row.tool] = row.value
        record["note"] = "; ".join(filter(None, [record["note"], row.note]))
    wide = pd.DataFrame(list(table.values()))
    return (wide if wide["note"].any() else wide.drop(columns="note")), targets


def target_line(target) -> str:
    """'<model>: <target>: <value> <unit> -- met|MISSED' for a target row (a namedtuple from itertuples)."""
    value = ("yes" if target.value else "no") if target.unit == "bool" else f"{format_value(target.value)} {target.unit}"
    return f"{target.model}: {target.measure}: {value} -- {target.note}"


def tools_of(wide: pd.DataFrame) -> list[str]:
    """The value columns of a section table (one per tool)."""
    return [c for c in wide.columns if c not in ("model", "measure", "unit", "note")]


def markdown_table(frame: pd.DataFrame) -> str:
    cells = [[format_value(v) if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def render(frame: pd.DataFrame) -> str:
    """Markdown for every section in `frame` (the merged CSV)."""
    parts = ["# clebench vs peers", "",
             "Generated by scripts/peers/bench_peers_*.py; the machine is shared, so compare ratios, not absolute times.", ""]
    for section, rows in frame.groupby("section", sort=False):
        wide, targets = section_tables(rows)
        parts += [f"## {section}", "", f"Machine: {rows['machine'].iloc[0]}; run {rows['date'].iloc[0]}.", "",
                  markdown_table(wide), ""]
        if len(targets):
            parts += ["Targets:", ""] + [
                f"- {target_line(t)}" for t in targets.itertuples()
            ] + [""]
    return "\n".join(parts)


def write_results(rows: pd.DataFrame, out: Path) -> None:
    """Merge `rows` into out/peers.csv (replacing rows of the same sections) and rewrite out/peers.md."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "peers.csv"
    if csv_path.is_file():
        old = pd.read_csv(csv_path, keep_default_na=False, na_values=[""], dtype={"note": str})
        old["note"] = old["note"].fillna("")
        rows = pd.concat([old[~old["section"].isin(set(rows["section"]))], rows], ignore_index=True)
    order = {name: index for index, name in enumerate(SECTIONS)}  # sections in script order, unknown ones last
    rows = rows.sort_values("section", key=lambda column: column.map(lambda name: order.get(name, len(order))),
                            kind="stable")[list(CSV_COLUMNS)]
    rows.to_csv(csv_path, index=False)
    (out / "peers.md").write_text(render(rows))
    print(f"wrote {csv_path} and {out / 'peers.md'}")


def parser(description: str) -> argparse.ArgumentParser:
    """The options every bench_peers script takes: data, checkpoints, threads and where the tables go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=timing.HelpFormatter)
    parser.add_argument("--data", default=None, help="data root (default: env CLEBENCH_DATA)")
    parser.add_argument("--models-dir", default=None, help="CIFAR-10 checkpoints folder (default: env CLEBENCH_MODELS)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch.set_num_threads value (default 1: CLE is many small ops, which extra threads on a "
                             "busy machine only slow down)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="folder of peers.csv / peers.md (default: results/bench in the repository)")
    return parser


def run_section(section: str, measure: Callable[[argparse.Namespace, SimpleNamespace | None], SectionResult],
                args: argparse.Namespace) -> None:
    """Load AIMET if present, run `measure(args, aimet)`, print its table and targets, and record its rows."""
    torch.set_num_threads(args.threads)
    aimet = load_aimet()
    machine = machine_summary(aimet)
    print(f"# {machine}")
    if aimet is None:
        print(f"# {aimet_missing_message()}; AIMET columns are left out")
    print(f"## {section}", flush=True)
    try:
        result = measure(args, aimet)
    except FileNotFoundError as error:  # data or checkpoints not where the arguments / environment say
        raise SystemExit(f"error: {error}") from None
    if result.skipped:
        print(f"  skipped: {result.skipped}")
        return
    frame = pd.DataFrame([asdict(row) for row in result.rows], columns=list(Row.__dataclass_fields__))
    frame.insert(0, "section", section)
    frame["machine"], frame["date"] = machine, datetime.datetime.now().isoformat(timespec="seconds")
    wide, targets = section_tables(frame)
    print(wide.to_string(index=False, na_rep="-", formatters=dict.fromkeys(tools_of(wide), format_value)))
    for target in targets.itertuples():
        print(f"  target {target_line(target)}")
    write_results(frame, args.out)
