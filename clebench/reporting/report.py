"""Tables and plots of a results directory, regenerated from its CSVs alone (see the schema in the sweep).

results.csv         -> results.md (the DFQ paper's Table 1 per model) and accuracy_<model>.png
ranges.csv          -> range_ratio_<model>.png (per-layer range ratio before / after cross-layer scaling)
channel_ranges.csv  -> fig2_channel_ranges_<model>.png (the paper's Fig. 2: per-channel weight ranges of one layer)

Partial results (a sweep still running or interrupted) give partial tables and plots: a missing cell shows as "—".
Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas), so the caller's pyplot state is left alone.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from clebench.runtimes import RUNTIME_LABELS
from clebench.sweep.results import (CHANNEL_RANGES_COLUMNS, KEY_COLUMNS, RANGES_COLUMNS, RESULT_COLUMNS, deploy_column,
                                    deploy_targets, upgrade_legacy)
from clebench.sweep.steps import NO_STEPS, STEP_ORDER

STEP_LABELS = {
    "bn_fold": "BN fold",
    "relu6_to_relu": "ReLU6→ReLU",
    "cls": "CLS",
    "cls_relu6_keep": "CLS (ReLU6 kept)",
    "cls_relu6_clip": "CLS (ReLU6 clip)",
    "hbf": "HBF",
    "bias_correction": "BC",
    "bias_correction_empirical": "BC (empirical)",
}
ABBREVIATIONS = ("BN fold: batch-norm folding; CLS: cross-layer scaling (ReLU6 kept: chains end at ReLU6; ReLU6 clip: "
                 "scaled through ReLU6, made a per-channel clip); HBF: high-bias folding; BC: analytical bias correction "
                 "(empirical: from calibration data).")
MISSING = "—"
DPI = 150


def step_names(steps: str) -> list[str]:
    """'bn_fold+cls' -> ['bn_fold', 'cls']; 'none' -> []."""
    return [] if steps == NO_STEPS else steps.split("+")


def step_label(steps: str) -> str:
    """Readable form of a steps string: 'bn_fold+relu6_to_relu+cls' -> 'BN fold + ReLU6→ReLU + CLS'."""
    names = step_names(steps)
    return " + ".join(STEP_LABELS.get(name, name) for name in names) if names else "original"


def steps_sort_key(steps: str) -> tuple[tuple[int, str], ...]:
    """Pipeline order: each combination right after its longest listed prefix, so cumulative rows read top-down.

    Unknown step names sort after the known ones, alphabetically.
    """
    return tuple((STEP_ORDER.index(n), "") if n in STEP_ORDER else (len(STEP_ORDER), n) for n in step_names(steps))


def sorted_steps(steps: Sequence[str]) -> list[str]:
    return sorted(set(steps), key=steps_sort_key)


def read_table(path: Path, columns: Sequence[str], text_columns: Sequence[str], allow_empty: bool = False) -> pd.DataFrame:
    """Read a results-directory CSV, checking it exists, has the schema's columns and (unless allow_empty) a row.

    text_columns stay strings as written ('none', a config hash '001234abcdef'); every other listed column is numeric.
    allow_empty: an empty file or a header alone gives an empty frame with `columns` (a sweep that just started).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the sweep into {path.parent} first (or pass the right "
                                f"results directory)")
    numeric = [c for c in columns if c not in text_columns]
    try:
        frame = pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False,
                            na_values={c: ["", "nan", "NaN"] for c in numeric})
    except pd.errors.EmptyDataError:
        if allow_empty:
            return pd.DataFrame(columns=list(columns))
        raise ValueError(f"{path} is empty; the sweep has not written any row yet") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; expected {list(columns)} (was it written by the sweep?)")
    if frame.empty and not allow_empty:
        raise ValueError(f"{path} has a header but no rows; the sweep has not finished any run yet")
    not_numbers = [c for c in numeric if not frame.empty and not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numbers:
        column = not_numbers[0]
        raise ValueError(f"{path}: column {column!r} must hold numbers, got e.g. {frame[column].iloc[0]!r}")
    return frame


def read_results_table(path: Path) -> pd.DataFrame:
    """results.csv (read_table), with an older folder's int8_* columns under ONNX Runtime's names and every deploy
    column numeric (blank: not deployed)."""
    results = upgrade_legacy(read_table(path, RESULT_COLUMNS, [*KEY_COLUMNS, "config_hash"]))
    deployed = [c for c in results.columns if c not in RESULT_COLUMNS]
    results[deployed] = results[deployed].apply(pd.to_numeric, errors="coerce")
    return results


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _unique_text(values: pd.Series) -> str:
    return ", ".join(sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values}))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[bool]) -> str:
    """A GitHub-flavoured markdown table with padded columns; '|' inside cells is escaped."""
    cells = [[str(c).replace("|", r"\|") for c in row] for row in [header, *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    pad = lambda text, i: text.rjust(widths[i]) if right_aligned[i] else text.ljust(widths[i])  # noqa: E731
    lines = ["| " + " | ".join(pad(text, i) for i, text in enumerate(row)) + " |" for row in cells]
    rule = "|" + "|".join(("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1)) for w, right in zip(widths, right_aligned)) + "|"
    return "\n".join([lines[0], rule, *lines[1:]])


def _fp32_cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return MISSING
    low, high = values.min(), values.max()
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}"


def accuracy_table(group: pd.DataFrame, metric: str) -> str:
    """Markdown table of one model: rows = step combinations, FP32, then `quant_<metric>` (delta) per quant setting.

    metric: 'top1' or 'top5'. Each delta is against the FP32 accuracy of the model that setting quantized.
    """
    quants = list(dict.fromkeys(group["quant"]))
    cells = group.set_index(["steps", "quant"])
    rows = []
    for steps in sorted_steps(group["steps"]):
        row = [step_label(steps), _fp32_cell(group.loc[group["steps"] == steps, f"fp32_{metric}"])]
        for quant in quants:
            if (steps, quant) not in cells.index:
                row.append(MISSING)
                continue
            fp32, quantized = cells.loc[(steps, quant), [f"fp32_{metric}", f"quant_{metric}"]]
            row.append(MISSING if pd.isna(quantized) else f"{quantized:.2f} ({quantized - fp32:+.2f})")
        rows.append(row)
    return markdown_table(["Steps", "FP32", *quants], rows, [False] + [True] * (len(quants) + 1))


def deploy_table(group: pd.DataFrame, target: str) -> str:
    """Markdown table of one model: per step combination and quant setting, the simulated top-1, the top-1 of the
    same network on deploy `target`'s integer kernels and their agreement (% of images with the same top-1 class);
    a row whose conv / matmul layers did not all run on integers says how many ran in float."""
    quants = list(dict.fromkeys(group["quant"]))
    top1, agree, floats = (deploy_column(target, m) for m in ("top1", "agreement", "float_layers"))
    cells = group.set_index(["steps", "quant"])
    rows = []
    for steps in sorted_steps(group["steps"]):
        row = [step_label(steps)]
        for quant in quants:
            values = cells.loc[(steps, quant), ["quant_top1", top1, agree]] if (steps, quant) in cells.index else None
            if values is None or values.isna().any():
                row.append(MISSING)
                continue
            cell = f"{values.iloc[0]:.2f} / {values.iloc[1]:.2f} ({values.iloc[2]:.1f})"
            fallback = cells.loc[(steps, quant), floats] if floats in cells.columns else 0
            row.append(cell if pd.isna(fallback) or fallback == 0 else f"{cell} ⚠ {int(fallback)} float layer(s)")
        rows.append(row)
    return markdown_table(["Steps", *quants], rows, [False] + [True] * len(quants))


def layer_precision_line(group: pd.DataFrame, target: str) -> str:
    """How `target` ran the conv / matmul layers of this model's rows, from the _integer_layers / _float_layers
    columns ("" for folders written before they existed)."""
    integer, floats = deploy_column(target, "integer_layers"), deploy_column(target, "float_layers")
    if integer not in group or group[integer].isna().all():
        return ""
    known = group[group[integer].notna()]
    fell_back = int((known[floats] > 0).sum())
    totals = sorted({int(i + f) for i, f in zip(known[integer], known[floats])})
    summary = (f"every conv / matmul layer ran on integers in all {len(known)} rows" if not fell_back else
               f"{fell_back} of {len(known)} rows ran some conv / matmul layers in float (marked ⚠)")
    return f"{RUNTIME_LABELS[target]}: {summary} ({'/'.join(map(str, totals))} such layers per row)."


def _groups(results: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(model, dataset, rows) in order of first appearance."""
    keys = list(dict.fromkeys(zip(results["model"], results["dataset"])))
    return [(m, d, results[(results["model"] == m) & (results["dataset"] == d)]) for m, d in keys]


def _deduplicated(results: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The last row of each model x dataset x steps x quant (a resumed sweep may re-run some), where it first appeared.

    Keeping first-appearance positions keeps the model and quant-setting order of the tables stable.
    """
    order = results.drop_duplicates(KEY_COLUMNS, keep="first")[KEY_COLUMNS]
    kept = order.merge(results.drop_duplicates(KEY_COLUMNS, keep="last"), on=KEY_COLUMNS, how="left")
    return kept, len(results) - len(kept)


def results_markdown(results: pd.DataFrame, source: str = "results.csv") -> str:
    """results.md: per model and dataset, a top-1 and a top-5 table in the layout of the DFQ paper's Table 1."""
    results, dropped = _deduplicated(results)
    lines = [
        "# clebench results",
        "",
        f"From `{source}` ({len(results)} runs; config hash {_unique_text(results['config_hash'])}).",
        "Quantized columns: accuracy in % with its change against the FP32 model that was quantized, in points, in "
        f"parentheses; {MISSING} = not run (yet).",
        ABBREVIATIONS,
    ]
    if dropped:
        lines.append(f"{dropped} repeated run(s) of the same model, dataset, steps and quant setting: the last one is shown.")
    for model, dataset, group in _groups(results):
        lines += [
            "",
            f"## {model} on {dataset}",
            "",
            f"{_unique_text(group['n_images'])} evaluation images, {_unique_text(group['n_calibration'])} calibration "
            f"images; config hash {_unique_text(group['config_hash'])}.",
        ]
        for metric, title in (("top1", "Top-1"), ("top5", "Top-5")):
            lines += ["", f"### {title} accuracy (%)", "", accuracy_table(group, metric)]
        for target in deploy_targets(group.columns):
            if group[deploy_column(target, "top1")].notna().any():
                precision = layer_precision_line(group, target)
                lines += ["", f"### Simulated vs real int8 ({RUNTIME_LABELS[target]}) top-1 (%)", "",
                          "Each cell: simulated / int8 kernels (agreement: % of images with the same top-1 class).",
                          *([precision] if precision else []), "", deploy_table(group, target)]
    return "\n".join(lines) + "\n"


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_accuracy(group: pd.DataFrame, path: Path, title: str) -> Path:
    """Quantized top-1 (%) per step combination, one line per quant setting (dotted / dash-dotted: the same on ONNX
    Runtime's / OpenVINO's int8 kernels, where the sweep deployed it), FP32 dashed; rows of one model."""
    steps = sorted_steps(group["steps"])
    x = np.arange(len(steps))
    figure = Figure(figsize=(max(6.4, 1.3 * len(steps) + 3.0), 4.8), layout="constrained")
    ax = figure.subplots()
    fp32 = group.groupby("steps")["fp32_top1"].mean().reindex(steps)
    ax.plot(x, fp32.to_numpy(), "k--", marker="_", markersize=12, label="FP32")
    markers = "osD^vP*X"
    for i, quant in enumerate(dict.fromkeys(group["quant"])):
        rows = group[group["quant"] == quant].set_index("steps")
        line, = ax.plot(x, rows["quant_top1"].reindex(steps).to_numpy(), marker=markers[i % len(markers)], label=quant)
        for target, style in zip(deploy_targets(rows.columns), (":", "-.")):
            column = deploy_column(target, "top1")
            if rows[column].notna().any():
                ax.plot(x, rows[column].reindex(steps).to_numpy(), marker=markers[i % len(markers)], linestyle=style,
                        color=line.get_color(), markerfacecolor="none", label=f"{quant}, int8 ({RUNTIME_LABELS[target]})")
    ax.set_xticks(x, [step_label(s).replace(" + ", "\n+ ") for s in steps], fontsize=8)
    ax.set_xlabel("steps applied before quantization")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def _draw_range_ratios(ax: Axes, frame: pd.DataFrame, label: str, color: str) -> None:
    """One line of per-layer range_ratio against layer index (rows in graph order); depthwise layers ringed."""
    x = np.arange(len(frame))
    ratio = frame["range_ratio"].to_numpy(dtype=float)
    ax.plot(x, ratio, marker=".", color=color, label=label)
    depthwise = (frame["kind"] == "depthwise").to_numpy()
    ax.plot(x[depthwise], ratio[depthwise], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
            markeredgecolor=color)


def _finish_range_ratio_axes(ax: Axes, title: str, any_depthwise: bool) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("layer index (graph order)")
    ax.set_ylabel("weight range ratio max$_c$ r$_c$ / min$_c$ r$_c$")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_depthwise:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                              markeredgecolor="grey"))
        labels.append("depthwise layer")
    ax.legend(handles, labels, fontsize=8)


def _range_ratio_figure(n_layers: int) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(min(max(6.4, 0.14 * n_layers + 2.0), 16.0), 4.8), layout="constrained")
    return figure, figure.subplots()


def plot_layer_ranges(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Per-layer range_ratio (log y) of one `layer_ranges` table, depthwise layers ringed; returns `path`."""
    missing = [c for c in ("layer", "kind", "range_ratio") if c not in df.columns]
    if missing:
        raise ValueError(f"plot_layer_ranges needs a clebench.ranges.layer_ranges table; this one lacks {missing}")
    figure, ax = _range_ratio_figure(len(df))
    _draw_range_ratios(ax, df, "range ratio", "C0")
    _finish_range_ratio_axes(ax, title, bool((df["kind"] == "depthwise").any()))
    return _save(figure, path)


def range_ratio_prefixes(steps: Sequence[str]) -> list[str]:
    """The step prefixes to compare: the one ending in bn_fold and those ending in a cls* step (else all present)."""
    chosen = [s for s in steps if step_names(s) and (step_names(s)[-1] == "bn_fold" or step_names(s)[-1].startswith("cls"))]
    return sorted_steps(chosen or steps)


def plot_range_ratios(ranges: pd.DataFrame, path: Path, model: str) -> Path:
    """range_ratio per layer before (after BN folding) and after each cross-layer-scaling variant, for one model."""
    prefixes = range_ratio_prefixes(list(ranges["steps"]))
    figure, ax = _range_ratio_figure(int(ranges.groupby("steps").size().max()))
    for i, steps in enumerate(prefixes):
        _draw_range_ratios(ax, ranges[ranges["steps"] == steps], step_label(steps), f"C{i}")
    _finish_range_ratio_axes(ax, f"{model}: per-output-channel weight range ratio per layer",
                             bool((ranges["kind"] == "depthwise").any()))
    return _save(figure, path)


def plot_channel_ranges(channels: pd.DataFrame, path: Path, model: str) -> Path:
    """The paper's Fig. 2: box per output channel (whiskers min / max, box q1 / q3, median line) of one model.

    One row of panels per layer, one column per compared step prefix (BN folded, then each cross-layer-scaling
    variant; prefixes that leave the weights as they were add nothing), all on the same y axis.
    """
    layer_names = list(dict.fromkeys(channels["layer"]))
    prefixes = range_ratio_prefixes(list(dict.fromkeys(channels["steps"])))
    n_channels = int(channels.groupby(["layer", "steps"]).size().max())
    panel_width = min(max(4.0, 0.12 * n_channels + 1.5), 12.0)
    figure = Figure(figsize=(panel_width * len(prefixes), 3.6 * len(layer_names) + 0.6), layout="constrained")
    axes = figure.subplots(len(layer_names), len(prefixes), sharey=True, squeeze=False)
    for row, layer in enumerate(layer_names):
        for col, steps in enumerate(prefixes):
            ax = axes[row, col]
            frame = channels[(channels["layer"] == layer) & (channels["steps"] == steps)]
            stats = [{"whislo": r.min, "q1": r.q1, "med": r.median, "q3": r.q3, "whishi": r.max, "fliers": []}
                     for r in frame.itertuples()]
            if stats:
                ax.bxp(stats, positions=frame["channel"].to_numpy(), widths=0.6, showfliers=False, manage_ticks=False,
                       patch_artist=True, boxprops={"facecolor": "lightsteelblue"}, medianprops={"color": "C1"})
            ax.axhline(0.0, color="grey", linewidth=0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(step_label(steps) if len(layer_names) == 1 else f"{layer}: {step_label(steps)}", fontsize=10)
            ax.set_xlabel("output channel")
            if col == 0:
                ax.set_ylabel("weight value")
    shown = layer_names[0] if len(layer_names) == 1 else ", ".join(layer_names)
    figure.suptitle(f"{model}: weights per output channel of layer {shown}")
    legend = [Patch(facecolor="lightsteelblue", edgecolor="black", label="q1–q3"),
              Line2D([], [], color="C1", label="median"), Line2D([], [], color="black", label="whiskers: min / max")]
    figure.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8)
    return _save(figure, path)


def _optional_table(path: Path, columns: Sequence[str], text_columns: Sequence[str]) -> pd.DataFrame:
    """The table, or an empty one if the file is missing or empty (a sweep writes it after results.csv)."""
    if not path.is_file():
        return pd.DataFrame(columns=list(columns))
    return read_table(path, columns, text_columns, allow_empty=True)


def write_report(results_dir: Path) -> list[Path]:
    """(Re)generate results.md and every plot from the CSVs in `results_dir`; returns the written paths.

    results.csv must exist and hold at least one row; ranges.csv and channel_ranges.csv are plotted when present.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist; pass the directory the sweep wrote")
    results = read_results_table(results_dir / "results.csv")
    markdown_path = results_dir / "results.md"
    markdown_path.write_text(results_markdown(results), encoding="utf-8")
    written = [markdown_path]
    results, _ = _deduplicated(results)
    groups = _groups(results)
    ambiguous = {m for m, _, _ in groups if sum(m == other for other, _, _ in groups) > 1}
    for model, dataset, group in groups:
        stem = _file_stem(f"{model}_{dataset}" if model in ambiguous else model)
        title = f"{model} on {dataset}: quantized top-1 ({_unique_text(group['n_images'])} images)"
        written.append(plot_accuracy(group, results_dir / f"accuracy_{stem}.png", title))
    ranges = _optional_table(results_dir / "ranges.csv", RANGES_COLUMNS, ["model", "steps", "layer", "kind"])
    for model in dict.fromkeys(ranges["model"]):
        rows = ranges[ranges["model"] == model]
        written.append(plot_range_ratios(rows, results_dir / f"range_ratio_{_file_stem(model)}.png", model))
    channels = _optional_table(results_dir / "channel_ranges.csv", CHANNEL_RANGES_COLUMNS, ["model", "steps", "layer"])
    for model in dict.fromkeys(channels["model"]):
        rows = channels[channels["model"] == model]
        written.append(plot_channel_ranges(rows, results_dir / f"fig2_channel_ranges_{_file_stem(model)}.png", model))
    return written
