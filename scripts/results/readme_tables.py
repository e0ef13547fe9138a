"""Regenerate the tables of README.md and of the documentation pages from the committed results folders.

Each block between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in README.md, the pages under docs/ (the site
shows them as committed) and results/cifar10/README.md is the output of BLOCKS[NAME], which reads one committed file
under results/; nothing is typed by hand. With --check nothing is written and the exit status is 1 when a file
differs from what the results give (CI runs it through tests/test_readme_tables.py).

    python scripts/results/readme_tables.py            # rewrite the blocks
    python scripts/results/readme_tables.py --check    # exit 1 and name the stale blocks

Output: rewrites the stale blocks in place in those files (nothing with --check) and prints which were stale.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from clebench import timing
from clebench.adaround import AdaroundSettings
from clebench.reporting.report import STEP_LABELS, method_cells, read_results_table
from clebench.sweep.results import KEY_COLUMNS, STEP_COSTS_FILE

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "results" / "cifar10" / "README.md"]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
MODEL_NAMES = {"resnet18_cifar10": "ResNet18", "mobilenet_v2_cifar10": "MobileNetV2",
               "efficientnet_lite0": "EfficientNet-Lite0"}
PAPER_MNV2 = [  # (steps, row label) of the MobileNetV2 CIFAR-10 headline table
    ("bn_fold", "BN fold"),
    ("bn_fold+relu6_to_relu", "+ ReLU6→ReLU"),
    ("bn_fold+relu6_to_relu+cls", "+ ReLU6→ReLU + CLS"),
    ("bn_fold+relu6_to_relu+cls+hbf+bias_correction", "+ ReLU6→ReLU + CLS + HBF + BC"),
    ("bn_fold+cls_relu6_clip", "+ CLS (ReLU6 clip)"),
    ("bn_fold+cls_relu6_clip+hbf+bias_correction", "+ CLS (ReLU6 clip) + HBF + BC"),
]
RESNET18_ROWS = [  # ResNet18 has no ReLU6: relu6_to_relu changes nothing, so its rows are plain BN fold + CLS + HBF
    ("bn_fold", "BN fold"),
    ("bn_fold+relu6_to_relu+cls+hbf", "+ CLS + HBF"),
    ("bn_fold+relu6_to_relu+cls+hbf+bias_correction", "+ CLS + HBF + bias correction"),
]
CIFAR10_MODEL_ROWS = {  # the rows of results/cifar10/README.md's table per model
    "resnet18_cifar10": RESNET18_ROWS,
    "mobilenet_v2_cifar10": [("bn_fold", "BN fold"), ("bn_fold+relu6_to_relu+cls+hbf", "+ ReLU6→ReLU + CLS + HBF"),
                             ("bn_fold+cls_relu6_clip+hbf", "+ CLS (ReLU6 clip) + HBF"),
                             ("bn_fold+cls_relu6_clip+hbf+bias_correction", "+ CLS (ReLU6 clip) + HBF + bias correction")],
}
CIFAR_QUANTS = [("w8a8_per_tensor_minmax", "W8A8"), ("w6a8_per_tensor_minmax", "W6A8"),
                ("w4a8_per_tensor_minmax", "W4A8"), ("w8a8_per_channel_minmax", "W8A8 per-channel")]


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table whose first `left` columns are left-aligned and the rest right-aligned."""
    rule = ["---" if i < left else "--:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, rule, *rows]) + "\n"


def _results(folder: str) -> pd.DataFrame:
    table = read_results_table(ROOT / "results" / folder / "results.csv")
    return table.drop_duplicates(KEY_COLUMNS, keep="last").set_index(["steps", "quant"])


def accuracy(folder: str, rows: Sequence[tuple[str, str]], quants: Sequence[tuple[str, str]], decimals: int,
             delta: bool) -> str:
    """Top-1 (%) of one model's results.csv: FP32 and each quant setting per step row; delta: '(change)' in points."""
    table = _results(folder)
    body = []
    for steps, label in rows:
        cells = [label, f"{table.loc[(steps, quants[0][0]), 'fp32_top1']:.{decimals}f}"]
        for quant, _ in quants:
            fp32, top1 = table.loc[(steps, quant), ["fp32_top1", "quant_top1"]]
            cells.append(f"{top1:.{decimals}f}" + (f" ({top1 - fp32:+.{decimals}f})" if delta else ""))
        body.append(cells)
    return markdown(["Steps", "FP32", *(name for _, name in quants)], body)


def cifar10_models() -> str:
    """Both CIFAR-10 checkpoints' paper rows side by side (results/cifar10/README.md)."""
    rows = []
    for model, steps_rows in CIFAR10_MODEL_ROWS.items():
        table = _results(f"cifar10/{model}")
        for steps, label in steps_rows:
            cells = [MODEL_NAMES[model], label, f"{table.loc[(steps, CIFAR_QUANTS[0][0]), 'fp32_top1']:.2f}"]
            cells += [f"{table.loc[(steps, quant), 'quant_top1']:.2f}" for quant, _ in CIFAR_QUANTS]
            rows.append(cells)
    return markdown(["model", "steps", "FP32", *(name for _, name in CIFAR_QUANTS)], rows, left=2)


def methods(folder: str, quants: Sequence[tuple[str, str]] | None = None, layers: bool = True) -> str:
    """Per model of results/<folder>, every method's top-1 (simulated / each runtime's int8) per quant setting, the
    FP32 steps' wall time and the layers each step changed (clebench.reporting.report.method_cells, as report.html
    shows it); quants: (quant, column label) to show, default all of them under their own names; layers: with the
    layers-changed column."""
    results = read_results_table(ROOT / "results" / folder / "results.csv").drop_duplicates(KEY_COLUMNS, keep="last")
    costs = pd.read_csv(ROOT / "results" / folder / STEP_COSTS_FILE)
    if quants is not None:
        results = results[results["quant"].isin([quant for quant, _ in quants])]
    labels = dict(quants or [])
    parts = []
    for model in dict.fromkeys(results["model"]):
        header, rows, _ = method_cells(results[results["model"] == model], costs[costs["model"] == model])
        if not layers:
            header, rows = header[:-1], [row[:-1] for row in rows]
        parts.append(f"**{MODEL_NAMES.get(model, model)}**\n\n" + markdown([labels.get(h, h) for h in header], rows))
    return "\n".join(parts)


PTQ_LADDER = [  # rows of the `ptq` preset; "{cls}" is the CLS step the model ran (cls, or cls_relu6_clip with ReLU6)
    "bn_fold", "bn_fold+{cls}+hbf", "bn_fold+{cls}+hbf+bias_correction", "bn_fold+{cls}+hbf+adaround", "bn_fold+adaround",
]
PTQ_QUANTS = [("w8a8_per_tensor_minmax", "W8A8"), ("w6a8_per_tensor_minmax", "W6A8"),
              ("w4a8_per_tensor_minmax", "W4A8"), ("w4a8_per_channel_minmax", "W4A8 per-channel")]


def ptq_ladder(folder: str, decimals: int = 2) -> str:
    """The `ptq` preset's rows per model: top-1 (%) simulated / on ONNX Runtime's int8 kernels, for the quant settings
    the folder has; rows it has not finished show "—". Last rows per model: AdaRound with CLE minus without, and
    the AdaRound rows' seconds (AdaRound, then the row's evaluation on both engines)."""
    table = _results(folder)
    quants = [(q, name) for q, name in PTQ_QUANTS if q in table.index.get_level_values("quant")]
    models = list(dict.fromkeys(read_results_table(ROOT / "results" / folder / "results.csv")["model"]))
    body = []
    for model in models:
        rows = table[table["model"] == model]
        ran = {s.split("+")[1] for s, _ in rows.index if s.startswith("bn_fold+cls")}
        cls = "cls_relu6_clip" if ran == {"cls_relu6_clip"} else "cls"  # a network with ReLU6 runs only the clip

        def top1(steps: str, quant: str, column: str = "quant_top1") -> float | None:
            return rows.loc[(steps, quant), column] if (steps, quant) in rows.index else None

        for steps in PTQ_LADDER:
            steps = steps.format(cls=cls)
            fp32 = next((top1(steps, q, "fp32_top1") for q, _ in quants if top1(steps, q) is not None), None)
            cells = [MODEL_NAMES.get(model, model), _steps_label(steps), "—" if fp32 is None else f"{fp32:.{decimals}f}"]
            for quant, _ in quants:
                sim, int8 = top1(steps, quant), top1(steps, quant, "onnxruntime_top1")
                cells.append("—" if sim is None else f"{sim:.{decimals}f} / {int8:.{decimals}f}")
            body.append(cells)
        with_cle, without = f"bn_fold+{cls}+hbf+adaround", "bn_fold+adaround"
        gains = [top1(with_cle, q) - top1(without, q) if None not in (top1(with_cle, q), top1(without, q)) else None
                 for q, _ in quants]
        body.append([MODEL_NAMES.get(model, model), "CLE's gain after AdaRound (points)", "",
                     *("—" if g is None else f"{g:+.{decimals}f}" for g in gains)])
        seconds = [[top1(steps, q, "seconds") for steps in (with_cle, without)] for q, _ in quants]
        body.append([MODEL_NAMES.get(model, model), "AdaRound rows' seconds, with / without CLE", "",
                     *(" / ".join("—" if t is None else f"{t:.0f}" for t in pair) for pair in seconds)])
    return markdown(["model", "steps", "FP32", *(f"{name} sim / int8" for _, name in quants)], body, left=2)


def _markdown_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the first markdown table in `path`, as {header: cell}; a repeated header gets " 2", " 3", ..."""
    text = path.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(text) if line.startswith("|"))
    lines = [line for line in text[first:first + next((k for k, line in enumerate(text[first:]) if not line.startswith("|")),
                                                      len(text) - first)]]
    header, seen = [], Counter()
    for cell in (c.strip() for c in lines[0].strip("|").split("|")):
        seen[cell] += 1
        header.append(cell if seen[cell] == 1 else f"{cell} {seen[cell]}")
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _steps_label(steps: str) -> str:
    """'bn_fold' -> 'BN fold'; 'bn_fold+cls+hbf' -> '+ CLS + HBF' (each row of a table starts from BN folding)."""
    names = steps.split("+")[1:]
    return "+ " + " + ".join(STEP_LABELS[n] for n in names) if names else "BN fold"


def deploy_gap() -> str:
    """results/bench/deploy_gap.md (scripts/deploy/deploy_gap.py), with readable model, step and weight names."""
    rows = []
    for row in _markdown_rows(ROOT / "results" / "bench" / "deploy_gap.md"):
        rows.append([MODEL_NAMES[row["model"]], _steps_label(row["steps"]), "W" + row["quant"][1],
                     row["FP32"], row["sim"], f"{row['ort-sim']} ({float(row['ort-sim agree']):.1f})",
                     f"{row['int8']} ({float(row['int8 agree']):.1f})", row["sim - int8"],
                     f"{row['sim int32 bias']} ({float(row['int8 agree with it']):.1f})", row["sim int32 bias - int8"]])
    return markdown(["model", "steps", "weights", "FP32", "sim (torch)", "onnxruntime-sim (agree)", "int8 (agree)",
                     "sim − int8", "sim, int32 bias (int8 agrees)", "its − int8"], rows, left=2)


def deploy_runtimes() -> str:
    """Both runtimes against the torch simulation, from results/bench/deploy_runtimes.md (scripts/deploy/deploy_runtimes.py)."""
    rows = []
    for row in _markdown_rows(ROOT / "results" / "bench" / "deploy_runtimes.md"):
        rows.append([MODEL_NAMES[row["model"]], _steps_label(row["steps"]), "W" + row["quant"][1], row["sim top-1"],
                     f"{row['ORT int8 top-1']} ({row['agree']})", f"{row['OV int8 top-1']} ({row['agree 2']})",
                     row["integer layers"] if row["integer layers"] == row["integer layers 2"] else
                     f"{row['integer layers']} / {row['integer layers 2']}",
                     f"{row['openvino engine agree']}, {row['speed vs torch sim']}"])
    return markdown(["model", "steps", "weights", "sim (torch)", "ONNX Runtime int8 (agree)", "OpenVINO int8 (agree)",
                     "integer layers", "openvino engine: agree, speed vs torch"], rows, left=2)


def engine_sweeps() -> str:
    """The full configs/cifar10.toml sweep per engine: wall time from each results folder's meta.json, and the openvino
    engine's rows against the torch engine's from results/bench/engine_agreement_openvino_*.md (scripts/results/compare_runs.py)."""
    body = []
    for model, short in (("resnet18_cifar10", "resnet18"), ("mobilenet_v2_cifar10", "mobilenet_v2")):
        walls = [json.loads((ROOT / "results" / folder / model / "meta.json").read_text())["last_run_work"]["wall_seconds"]
                 for folder in ("cifar10", "cifar10_openvino")]
        rows = [r for r in _markdown_rows(ROOT / "results" / "bench" / f"engine_agreement_openvino_{short}.md")
                if r["kind"] == "quant"]
        same = [float(r["same_top1_pct"]) for r in rows]
        body.append([MODEL_NAMES[model], *(f"{wall / 60:.0f} min" for wall in walls), str(len(rows)),
                     f"{min(same):.2f} / {sum(same) / len(same):.2f}", f"{sum(value >= 99.7 for value in same)} of {len(same)}",
                     f"{max(abs(float(r['delta'])) for r in rows):.2f}"])
    return markdown(["model", "torch engine (wall)", "openvino engine (wall)", "rows", "same top-1 % (min / mean)",
                     "rows ≥ 99.7 %", "max |Δ top-1| (points)"], body)


def adaround_aimet() -> str:
    """clebench's AdaRound against AIMET's, from results/bench/adaround_aimet.md (scripts/peers/compare_aimet_adaround.py)."""
    rows = _markdown_rows(ROOT / "results" / "bench" / "adaround_aimet.md")
    columns = list(rows[0])[1:]
    return markdown(["model", *columns], [[MODEL_NAMES[r["model"]], *(r[c] for c in columns)] for r in rows], left=2)


ADAROUND_TIME_ROW = re.compile(r"(\d+) iterations:\s+clebench\s+([\d.]+) s \(\s*([\d.]+) ms/layer-iteration\)\s+"
                               r"aimet\s+([\d.]+) s \(\s*([\d.]+) ms/layer-iteration\)\s+AIMET / clebench ([\d.]+x)"
                               r"(?:\s+\(per repeat ([^)]*)\))?")
ADAROUND_TIME_SLOPE = re.compile(r"marginal: clebench\s+([\d.]+) ms/layer-iteration\s+aimet\s+([\d.]+) "
                                 r"ms/layer-iteration\s+AIMET / clebench ([\d.]+x)")
ADAROUND_TIME_CONVOLUTION = re.compile(r"convolution alone:\s+([\d.]+) ms/layer-iteration")


def adaround_time() -> str:
    """Whole-model AdaRound seconds per tool at two iteration counts (with each repeat's ratio), the marginal cost of
    one layer-iteration and of its convolution alone, from results/bench/adaround_time_resnet18.txt (the output of
    scripts/peers/bench_adaround.py)."""
    text = (ROOT / "results" / "bench" / "adaround_time_resnet18.txt").read_text(encoding="utf-8")
    rows = [[f"{int(m[1]):,} iterations per layer", f"{float(m[4]):.0f} s", f"{float(m[2]):.0f} s",
             m[6] + (f" (per repeat {m[7]})" if m[7] else "")] for m in ADAROUND_TIME_ROW.finditer(text)]
    slope = ADAROUND_TIME_SLOPE.search(text)
    rows.append(["one more iteration of one layer (slope)", f"{slope[2]} ms", f"{slope[1]} ms", slope[3]])
    convolution = ADAROUND_TIME_CONVOLUTION.search(text)[1]
    rows.append(["the layer's convolution alone (forward + weight gradient on 32 samples), part of every sampled step",
                 f"{convolution} ms", f"{convolution} ms", ""])
    rows.append(["slope ratio if a clebench step were its convolution alone (AIMET's slope / convolution)", "", "",
                 f"{float(slope[2]) / float(convolution):.2f}x"])
    return markdown(["ResNet18, all 21 layers", "AIMET", "clebench", "AIMET / clebench"], rows)


def adaround_schedule() -> str:
    """MobileNetV2-CIFAR10's BN fold + AdaRound at W4A8 per tensor, at clebench's default AdaRound iterations
    (results/ptq_cifar10) and at AIMET's 10,000 (results/adaround_10k_cifar10): top-1 (%) and the row's seconds."""
    body = []
    for folder in ("ptq_cifar10", "adaround_10k_cifar10"):
        iterations = json.loads((ROOT / "results" / folder / "meta.json").read_text())["config"]["adaround"]["iterations"]
        table = _results(folder)
        row = table[table["model"] == "mobilenet_v2_cifar10"].loc[("bn_fold+adaround", "w4a8_per_tensor_minmax")]
        body.append([f"{iterations:,}", f"{AdaroundSettings(iterations=iterations).adam_learning_rate:g}",
                     f"{row['fp32_top1']:.2f}", f"{row['quant_top1']:.2f}", f"{row['onnxruntime_top1']:.2f}",
                     f"{row['seconds'] / 60:.0f}"])
    return markdown(["AdaRound iterations per layer", "Adam learning rate", "FP32", "W4A8 sim", "W4A8 int8",
                     "row minutes (AdaRound + evaluations)"], body)


def engine_speed() -> str:
    """Speed against the torch simulation, from results/bench/engines.md (scripts/benchmarks/bench_engines.py)."""
    rows = {(r["model"], r["engine"]): r["vs torch sim"] for r in _markdown_rows(ROOT / "results" / "bench" / "engines.md")}
    engines = ["onnxruntime-sim", "onnxruntime-int8", "torch sim channels_last", "torch FP32"]
    body = [[MODEL_NAMES[m], *(rows[(m, e)] for e in engines)] for m in ("mobilenet_v2_cifar10", "resnet18_cifar10")]
    return markdown(["", "onnxruntime-sim", "onnxruntime-int8", "torch sim, channels_last", "torch FP32"], body)


def simulation_cost() -> str:
    """W8A8 simulation time / FP32 time, from results/bench/peers.md (scripts/peers/bench_peers_simulation.py) and
    results/bench/engines.md (scripts/benchmarks/bench_engines.py)."""
    peers = [line for line in (ROOT / "results" / "bench" / "peers.md").read_text(encoding="utf-8").splitlines()
             if "eval time / FP32 eval time" in line]
    ratio = {line.split("|")[1].strip(): line.split("|")[5].strip() for line in peers}
    engines = {(r["model"], r["engine"]): float(r["seconds"]) for r in _markdown_rows(ROOT / "results" / "bench" / "engines.md")
               if r["seconds"] and "/" not in r["seconds"]}
    body = [[MODEL_NAMES[m], f"{float(ratio[m]):.2f}x",
             f"{engines[(m, 'torch sim')] / engines[(m, 'torch FP32')]:.2f}x"] for m in ("resnet18_cifar10", "mobilenet_v2_cifar10")]
    return markdown(["model", "vs FP32 with BNs (`bench_peers_simulation.py`)", "vs BN-folded FP32 (`bench_engines.py`)"], body)


BLOCKS: dict[str, Callable[[], str]] = {
    "imagenet_sample": lambda: accuracy("imagenet_sample", [
        ("bn_fold", "BN fold"),
        ("bn_fold+relu6_to_relu+cls+hbf", "+ ReLU6→ReLU + CLS + HBF (the paper, AIMET 1.x)"),
        ("bn_fold+cls_relu6_keep", "+ CLS with ReLU6 as chain end (AIMET 2.x)"),
        ("bn_fold+cls_relu6_clip", "+ CLS across ReLU6 as per-channel clip (`cls_relu6_clip`)"),
        ("bn_fold+cls_relu6_clip+hbf+bias_correction", "+ `cls_relu6_clip` + HBF + bias correction"),
    ], [("w6a8_per_tensor_minmax", "W6A8"), ("w8a8_per_tensor_minmax", "W8A8"), ("w8a8_per_channel_minmax", "W8A8 per-channel")],
        decimals=1, delta=False),
    "cifar10_mobilenet_v2": lambda: accuracy("cifar10/mobilenet_v2_cifar10", PAPER_MNV2, CIFAR_QUANTS, 2, delta=True),
    "cifar10_resnet18": lambda: accuracy("cifar10/resnet18_cifar10", RESNET18_ROWS, CIFAR_QUANTS, 2, delta=True),
    "cifar10_models": cifar10_models,
    "deploy_gap": deploy_gap,
    "methods-cifar10": lambda: methods("methods_cifar10", [*CIFAR_QUANTS, ("w8a4_per_tensor_minmax", "W8A4")]),
    "methods-cifar10-w4": lambda: methods("methods_cifar10", [("w4a8_per_tensor_minmax", "W4A8"),
                                                              ("w8a4_per_tensor_minmax", "W8A4")], layers=False),
    "methods-cifar10-nncf": lambda: methods("methods_cifar10_nncf", CIFAR_QUANTS[:1] + [("w8a8_per_channel_minmax",
                                                                                       "W8A8 per-channel")]),
    "ptq-cifar10": lambda: ptq_ladder("ptq_cifar10"),
    "ptq-imagenet-sample-lite0": lambda: ptq_ladder("ptq_imagenet_sample_lite0", decimals=1),
    "deploy_runtimes": deploy_runtimes,
    "engine_sweeps": engine_sweeps,
    "adaround_aimet": adaround_aimet,
    "adaround_schedule": adaround_schedule,
    "adaround_time": adaround_time,
    "engine_speed": engine_speed,
    "simulation_cost": simulation_cost,
}


def regenerate(text: str, source: str) -> str:
    """`text` with every marked block replaced by what its results give; an unknown name is an error."""
    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"{source}: unknown table {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return BLOCK.sub(block, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs from the results")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        new = regenerate(text, str(path.relative_to(ROOT)))
        names = [m["name"] for m in BLOCK.finditer(text)]
        changed = [n for n, old, fresh in zip(names, BLOCK.finditer(text), BLOCK.finditer(new)) if old["body"] != fresh["body"]]
        stale += [f"{path.relative_to(ROOT)}: table {name}" for name in changed]
        if new != text and not args.check:
            path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("out of date with results/ (run python scripts/results/readme_tables.py): " + "; ".join(stale), file=sys.stderr)
        return 1
    print(("stale: " if stale else "up to date: ") + ", ".join(stale or [str(p.relative_to(ROOT)) for p in FILES]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
