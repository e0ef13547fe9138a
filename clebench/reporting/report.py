"""Tables and plots of a results directory, regenerated from its CSVs alone (see the schema in the sweep).

results.csv         -> results.md (the DFQ paper's Table 1 per model) and accuracy_<model>.png
ranges.csv          -> range_ratio_<model>.png (per-layer range ratio before / after cross-layer scaling)
channel_ranges.csv  -> fig2_channel_ranges_<model>.png (the paper's Fig. 2: per-channel weight ranges of one layer)
cle_sets.csv, cle_skipped.csv, cle_regions.csv, sensitivity.csv (when present) -> tables, and sensitivity.png
all of the above + meta.json -> report.html, one self-contained page (clebench.reporting.html)

Partial results (a sweep still running or interrupted) give partial tables and plots: a missing cell shows as "—",
and a file that cannot be read is named on report.html instead of its section.
Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas), so the caller's pyplot state is left alone.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from clebench.errors import UserError
from clebench.models.preprocessing import Preprocessing
from clebench.reporting import html
from clebench.runtimes import RUNTIME_LABELS
from clebench.sweep.results import (
    CHANNEL_RANGES_COLUMNS,
    CHANNEL_RANGES_FILE,
    CLE_REGIONS_FILE,
    CLE_SETS_FILE,
    CLE_SKIPPED_FILE,
    KEY_COLUMNS,
    META_FILE,
    RANGES_COLUMNS,
    RANGES_FILE,
    REPORT_FILE,
    RESULT_COLUMNS,
    RESULTS_FILE,
    SENSITIVITY_FILE,
    STEP_COST_COLUMNS,
    STEP_COSTS_FILE,
    deploy_column,
    deploy_targets,
    read_json,
    upgrade_legacy,
)
from clebench.sweep.plan import prefixes_of
from clebench.sweep.steps import NO_STEPS, STEP_ORDER, combination_name, quantizer_step, split_combination

STEP_LABELS = {
    "bn_fold": "BN fold",
    "relu6_to_relu": "ReLU6→ReLU",
    "aimet_cle": "AIMET CLE",
    "brevitas_equalize": "Brevitas equalization",
    "brevitas_equalize_no_merge_bias": "Brevitas equalization (no merge_bias)",
    "cls": "CLS",
    "cls_relu6_keep": "CLS (ReLU6 kept)",
    "cls_relu6_clip": "CLS (ReLU6 clip)",
    "cls_regions": "CLS regions",
    "cls_regions_relu6_clip": "CLS regions (ReLU6 clip)",
    "hbf": "HBF",
    "act_equalize": "act. equalization",
    "act_equalize_relu6_clip": "act. equalization (ReLU6 clip)",
    "adaround": "AdaRound",
    "bias_correction": "BC",
    "bias_correction_empirical": "BC (empirical)",
    "nncf_quantize": "NNCF",
    "nncf_quantize_channel_alignment": "NNCF (channel alignment)",
    "nncf_quantize_smooth_quant": "NNCF (SmoothQuant)",
}
ABBREVIATIONS = ("BN fold: batch-norm folding; CLS: cross-layer scaling (ReLU6 kept: chains end at ReLU6; ReLU6 clip: "
                 "scaled through ReLU6, made a per-channel clip); HBF: high-bias folding; AdaRound: learned weight rounding; "
                 "BC: analytical bias correction (empirical: from calibration data); NNCF: nncf.quantize's own int8 model of the "
                 "FP32 model, on OpenVINO only (no simulation).")
DEPLOY_NOTE = ("Each cell: simulated / {}'s int8 kernels (agreement: % of images with the same top-1 class as the "
               "simulation).")
DIAGNOSTICS = ((CLE_SETS_FILE, "CLE: cross-layer-scaling sets"), (CLE_SKIPPED_FILE, "CLE: layers left alone"),
               (CLE_REGIONS_FILE, "CLE: regions (one scale per channel shared by the region's layers)"),
               (SENSITIVITY_FILE, "Per-layer sensitivity"))
MISSING = html.MISSING
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


Table = tuple[list[str], list[list[str]], list[bool]]  # header, rows of cells, right-aligned per column


def accuracy_cells(group: pd.DataFrame, metric: str) -> Table:
    """One model's rows = step combinations, FP32, then `quant_<metric>` (delta) per quant setting.

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
    return ["Steps", "FP32", *quants], rows, [False] + [True] * (len(quants) + 1)


def accuracy_table(group: pd.DataFrame, metric: str) -> str:
    """`accuracy_cells` as a markdown table."""
    return markdown_table(*accuracy_cells(group, metric))


def deploy_runtimes(results: pd.DataFrame) -> list[str]:
    """The deploy targets (clebench.runtimes.RUNTIME_LABELS) whose top-1 column holds a value in `results`."""
    return [t for t in deploy_targets(results.columns) if results[deploy_column(t, "top1")].notna().any()]


def deploy_cells(group: pd.DataFrame, target: str) -> Table:
    """One model's rows = step combinations; per quant setting 'simulated / `target` (agreement)' top-1 (%), and how
    many conv / matmul layers ran in float where any did."""
    quants = list(dict.fromkeys(group["quant"]))
    top1, agree, floats = (deploy_column(target, m) for m in ("top1", "agreement", "float_layers"))
    cells = group.set_index(["steps", "quant"])
    rows = []
    for steps in sorted_steps(group["steps"]):
        row = [step_label(steps)]
        for quant in quants:
            values = cells.loc[(steps, quant), ["quant_top1", top1]] if (steps, quant) in cells.index else None
            if values is None or values.isna().any():
                row.append(MISSING)
                continue
            agreement = cells.loc[(steps, quant), agree] if agree in cells.columns else math.nan
            cell = f"{values.iloc[0]:.2f} / {values.iloc[1]:.2f}" + ("" if pd.isna(agreement) else f" ({agreement:.1f})")
            fallback = cells.loc[(steps, quant), floats] if floats in cells.columns else 0
            row.append(cell if pd.isna(fallback) or fallback == 0 else f"{cell} ⚠ {int(fallback)} float layer(s)")
        rows.append(row)
    return ["Steps", *quants], rows, [False] + [True] * len(quants)


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


METHODS_NOTE = ("Each quantized cell: top-1 (%) simulated{}. FP32 steps: wall time of the row's FP32 steps on the "
                "machine of the sweep, in seconds (bias correction and AdaRound run per quantization setting: their "
                "time is in results.csv's seconds); layers changed: conv / linear layers whose weight or bias each "
                "step changed. A cell with one figure was not deployed (a 4-bit activation grid has no exact ONNX form); —: "
                "not run.")


def _costed_prefixes(steps: str) -> list[str]:
    """'bn_fold+cls+hbf+bias_correction' -> ['bn_fold', 'bn_fold+cls', 'bn_fold+cls+hbf'] (step_costs.csv keys); a
    row ending in an NNCF step also has its own name (NNCF's quantization time)."""
    combination = tuple(step_names(steps))
    fp32, _ = split_combination(combination)
    quantizer = [steps] if quantizer_step(combination) else []
    return [combination_name(prefix) for prefix in prefixes_of(fp32)[1:]] + quantizer


def method_cells(group: pd.DataFrame, costs: pd.DataFrame) -> Table:
    """One model's methods table: rows = step combinations; per quant setting the simulated top-1 and each deployed
    runtime's int8 top-1 ("sim / ort / ov"; the simulation alone where no runtime ran the row); then the FP32 steps'
    wall time (s) and the layers each step changed (an NNCF row: its FP32 steps' and NNCF's quantization time,
    and the layers OpenVINO ran on integers).

    costs: the model's step_costs.csv rows (STEP_COST_COLUMNS); a prefix it lacks shows as not measured.
    """
    quants, runtimes = list(dict.fromkeys(group["quant"])), deploy_runtimes(group)
    cells, cost = group.set_index(["steps", "quant"]), costs.drop_duplicates("steps", keep="last").set_index("steps")
    rows = []
    for steps in sorted_steps(group["steps"]):
        row = [step_label(steps)]
        for quant in quants:
            values = (cells.loc[(steps, quant), ["quant_top1", *(deploy_column(t, "top1") for t in runtimes)]]
                      if (steps, quant) in cells.index else pd.Series([math.nan]))
            if quantizer_step(tuple(step_names(steps))):
                values.iloc[0] = math.nan  # an NNCF row has no simulation: its quant_top1 is OpenVINO's
            shown = values if values.iloc[1:].notna().any() else values.iloc[:1]  # not deployed: the simulation alone
            row.append(" / ".join(MISSING if pd.isna(v) else f"{v:.2f}" for v in shown))
        prefixes = _costed_prefixes(steps)
        if all(prefix in cost.index for prefix in prefixes):
            measured = cost.loc[prefixes]
            row += [f"{measured['step_seconds'].sum():.2f}",
                    ", ".join(f"{step} {int(n)}" for step, n in zip(measured["step"], measured["layers_changed"])) or "—"]
        else:
            row += [MISSING, MISSING]
        rows.append(row)
    return ["Steps", *quants, "FP32 steps (s)", "Layers changed"], rows, [False] + [True] * (len(quants) + 1) + [False]


def read_results_table(path: Path) -> pd.DataFrame:
    """results.csv (read_table), with an older folder's int8_* columns under ONNX Runtime's names and every deploy
    column numeric (blank: not deployed)."""
    results = upgrade_legacy(read_table(path, RESULT_COLUMNS, [*KEY_COLUMNS, "config_hash"]))
    numeric = [c for c in results.columns if c not in RESULT_COLUMNS]  # deploy and check columns (blank: not run)
    results[numeric] = results[numeric].apply(pd.to_numeric, errors="coerce")
    return results


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
        for target in deploy_runtimes(group):
            precision = layer_precision_line(group, target)
            lines += ["", f"### Simulated vs real int8 ({RUNTIME_LABELS[target]}) top-1 (%)", "",
                      DEPLOY_NOTE.format(RUNTIME_LABELS[target]), *([precision] if precision else []), "",
                      markdown_table(*deploy_cells(group, target))]
    return "\n".join(lines) + "\n"


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_accuracy(group: pd.DataFrame, path: Path, title: str) -> Path:
    """`accuracy_figure` saved to `path`; returns `path`."""
    return _save(accuracy_figure(group, title), path)


def accuracy_figure(group: pd.DataFrame, title: str) -> Figure:
    """Grouped dot chart of one model's rows: a band per step combination (pipeline order, top down), in it one dot per
    quant setting (quantized top-1, %; hollow: the same row on a deployed runtime, where recorded) and FP32 as a black
    bar. Dots, not lines: the step combinations are categories, not a continuum."""
    steps = sorted_steps(group["steps"])
    quants = list(dict.fromkeys(group["quant"]))
    runtimes = deploy_runtimes(group)
    figure = Figure(figsize=(9.0, 1.8 + 0.16 * len(steps) * (len(quants) + 1)), layout="constrained")
    ax = figure.subplots()
    band = np.arange(len(steps), dtype=float)
    for y in band[::2]:
        ax.axhspan(y - 0.5, y + 0.5, color="0.95", zorder=0)
    fp32 = group.groupby("steps")["fp32_top1"].mean().reindex(steps).to_numpy()
    ax.plot(fp32, band, linestyle="none", marker="|", markersize=12, markeredgewidth=2.5, color="black", label="FP32")
    offsets = (np.arange(len(quants)) - (len(quants) - 1) / 2) * (0.8 / max(len(quants), 1))
    markers = "osD^vP*X"
    for i, quant in enumerate(quants):
        rows = group[group["quant"] == quant].set_index("steps").reindex(steps)
        color, marker = f"C{i}", markers[i % len(markers)]
        ax.plot(rows["quant_top1"].to_numpy(), band + offsets[i], linestyle="none", marker=marker, color=color,
                markersize=7, label=f"{quant} (simulated)" if runtimes else quant)
        for runtime in runtimes:
            ax.plot(rows[deploy_column(runtime, "top1")].to_numpy(), band + offsets[i], linestyle="none",
                    marker=marker, markersize=11, markerfacecolor="none", markeredgecolor=color,
                    label=f"{quant}, int8 on {RUNTIME_LABELS[runtime]}")
    ax.set_yticks(band, [step_label(s) for s in steps], fontsize=8)
    ax.set_ylim(len(steps) - 0.5, -0.5)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_ylabel("steps applied before quantization")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(3, 1 + len(quants) * (1 + len(runtimes))), fontsize=8)
    return figure


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


def sensitivity_value_column(frame: pd.DataFrame) -> str | None:
    """The column of a sensitivity table to chart: `clebench sensitivity`'s logit SQNR with only that unit quantized
    (the ranking), else the first numeric one whose name says top-1 change ('delta' and 'top1'), else the first with
    'top1', else the first floating-point one; None when it has none."""
    numeric = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    for wanted in (lambda c: c == "only_sqnr_db", lambda c: "delta" in c and "top1" in c, lambda c: "top1" in c,
                   lambda c: True):
        found = [c for c in numeric if wanted(c)]
        if found:
            return found[0]
    return None


def plot_per_row(frame: pd.DataFrame, value: str, path: Path, title: str) -> Path:
    """Horizontal bars of `value` per row, labelled by the row's text columns (e.g. layer and setting), in file order."""
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    labels = [" / ".join(str(v) for v in row) for row in frame[text].itertuples(index=False)] if text else list(map(str, frame.index))
    values = frame[value].to_numpy(dtype=float)
    figure = Figure(figsize=(9.0, min(1.6 + 0.2 * len(frame), 40.0)), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(frame))
    ax.barh(y, np.nan_to_num(values), color=np.where(values < 0, "C3", "C0"))
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(len(frame) - 0.5, -0.5)
    ax.axvline(0.0, color="black", linewidth=0.8)
    unit = " (dB; lower: more sensitive)" if value.endswith("sqnr_db") else (
        " (points)" if "delta" in value else " (%)" if "top1" in value else "")
    ax.set_xlabel(value + unit)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def _optional_table(path: Path, columns: Sequence[str], text_columns: Sequence[str]) -> pd.DataFrame:
    """The table, or an empty one if the file is missing or empty (a sweep writes it after results.csv)."""
    if not path.is_file():
        return pd.DataFrame(columns=list(columns))
    return read_table(path, columns, text_columns, allow_empty=True)


class Part(NamedTuple):
    """A piece of the report: HTML fragments for report.html and the files written for it."""

    html: list[str]
    written: list[Path]


def _results_part(results_dir: Path) -> Part:
    """results.md, and per model: its accuracy tables (top-1, top-5, each deployed runtime) and the accuracy chart."""
    results = read_results_table(results_dir / RESULTS_FILE)
    markdown_path = results_dir / "results.md"
    markdown_path.write_text(results_markdown(results), encoding="utf-8")
    written = [markdown_path]
    results, dropped = _deduplicated(results)
    groups = _groups(results)
    ambiguous = {m for m, _, _ in groups if sum(m == other for other, _, _ in groups) > 1}
    fragments = ["<h2>Accuracy</h2>",
                 f"<p class=\"note\">Quantized cells: top-1 or top-5 in % and, in parentheses, its change against the "
                 f"FP32 model that was quantized, in points; {MISSING} = not run (yet). {html.escape(ABBREVIATIONS)}</p>"]
    if dropped:
        fragments.append(f"<p class=\"note\">{dropped} repeated run(s) of the same row: the last one is shown.</p>")
    for model, dataset, group in groups:
        stem = _file_stem(f"{model}_{dataset}" if model in ambiguous else model)
        title = f"{model} on {dataset}: quantized top-1 ({_unique_text(group['n_images'])} images)"
        chart = plot_accuracy(group, results_dir / f"accuracy_{stem}.png", title)
        written.append(chart)
        fragments += [f"<h3>{html.escape(model)} on {html.escape(dataset)}</h3>",
                      f"<p class=\"note\">{_unique_text(group['n_images'])} evaluation images, "
                      f"{_unique_text(group['n_calibration'])} calibration images; config hash "
                      f"{html.escape(_unique_text(group['config_hash']))}.</p>",
                      html.figure(chart, f"{model}: quantized top-1 per step combination (FP32: black bar)")]
        for metric, name in (("top1", "Top-1"), ("top5", "Top-5")):
            fragments += [f"<h4>{name} accuracy (%)</h4>", html.table(*accuracy_cells(group, metric))]
        for target in deploy_runtimes(group):
            precision = layer_precision_line(group, target)
            fragments += [f"<h4>Simulated vs real int8 ({html.escape(RUNTIME_LABELS[target])}) top-1 (%)</h4>",
                          f"<p class=\"note\">{html.escape(DEPLOY_NOTE.format(RUNTIME_LABELS[target]))} "
                          f"{html.escape(precision)}</p>",
                          html.table(*deploy_cells(group, target))]
    return Part(fragments, written)


def _methods_part(results_dir: Path) -> Part:
    """Per model, every step combination's accuracy on every runtime beside its cost (step_costs.csv, when present)."""
    costs = _optional_table(results_dir / STEP_COSTS_FILE, STEP_COST_COLUMNS, ["model", "steps", "step"])
    if costs.empty:
        return Part([], [])
    results, _ = _deduplicated(read_results_table(results_dir / RESULTS_FILE))
    fragments = ["<h2>Methods: accuracy and cost</h2>"]
    for model, dataset, group in _groups(results):
        runtimes = "".join(f" / {RUNTIME_LABELS[t]} int8" for t in deploy_runtimes(group))
        fragments += [f"<h3>{html.escape(model)} on {html.escape(dataset)}</h3>",
                      f"<p class=\"note\">{html.escape(METHODS_NOTE.format(runtimes))}</p>",
                      html.table(*method_cells(group, costs[costs["model"] == model]))]
    return Part(fragments, [])


def _range_ratio_part(results_dir: Path) -> Part:
    """The range-ratio plot per model (ranges.csv)."""
    ranges = _optional_table(results_dir / RANGES_FILE, RANGES_COLUMNS, ["model", "steps", "layer", "kind"])
    written = [plot_range_ratios(ranges[ranges["model"] == model], results_dir / f"range_ratio_{_file_stem(model)}.png",
                                 model) for model in dict.fromkeys(ranges["model"])]
    fragments = [html.figure(path, f"{model}: per-layer weight range ratio before and after cross-layer scaling")
                 for model, path in zip(dict.fromkeys(ranges["model"]), written)]
    return Part(["<h2>Weight ranges per layer</h2>", *fragments] if fragments else [], written)


def _channel_ranges_part(results_dir: Path) -> Part:
    """The Fig. 2 box plot per model (channel_ranges.csv)."""
    channels = _optional_table(results_dir / CHANNEL_RANGES_FILE, CHANNEL_RANGES_COLUMNS, ["model", "steps", "layer"])
    written = [plot_channel_ranges(channels[channels["model"] == model],
                                   results_dir / f"fig2_channel_ranges_{_file_stem(model)}.png", model)
               for model in dict.fromkeys(channels["model"])]
    fragments = [html.figure(path, f"{model}: per-output-channel weights (the DFQ paper's Fig. 2)")
                 for model, path in zip(dict.fromkeys(channels["model"]), written)]
    return Part(["<h2>Weights per output channel</h2>", *fragments] if fragments else [], written)


def _diagnostics_part(results_dir: Path) -> Part:
    """The CLE and sensitivity CSVs, when present, as tables with whatever columns they have; sensitivity.csv also
    as a chart of its `sensitivity_value_column` per row."""
    fragments, written = [], []
    for name, title in DIAGNOSTICS:
        path = results_dir / name
        if not path.is_file():
            continue
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable CSV file ({error})") from None
        fragments += [f"<h3>{html.escape(title)} (<code>{name}</code>, {len(frame)} rows)</h3>"]
        value = sensitivity_value_column(frame) if name == SENSITIVITY_FILE else None
        if value is not None and len(frame):
            chart = plot_per_row(frame, value, results_dir / "sensitivity.png", f"{title}: {value} per row")
            written.append(chart)
            fragments.append(html.figure(chart, f"{title}: {value}"))
        fragments.append(html.frame_table(frame))
    return Part(["<h2>CLE diagnostics and sensitivity</h2>", *fragments] if fragments else [], written)


def _meta_part(results_dir: Path) -> Part:
    """meta.json: the machine, versions and work counters, and the configuration (config.toml as written)."""
    fragments = []
    meta_path = results_dir / META_FILE
    if meta_path.is_file():
        meta = read_json(meta_path)
        fragments += [*_preprocessing_table(meta.get("preprocessing") or {}),
                      "<h3>Machine, versions and work (<code>meta.json</code>)</h3>",
                      html.key_values(html.flatten({k: v for k, v in meta.items()
                                                    if k not in ("config", "preprocessing")})),
                      "<h3>Effective configuration (<code>meta.json</code>)</h3>",
                      html.key_values(html.flatten(meta.get("config") or {}))]
    config_path = results_dir / "config.toml"
    if config_path.is_file():
        fragments += ["<h3>Config file as given (<code>config.toml</code>)</h3>",
                      f"<pre>{html.escape(config_path.read_text(encoding='utf-8'))}</pre>"]
    return Part(["<h2>Configuration and machine</h2>", *fragments] if fragments else [], [])


def _preprocessing_table(recorded: dict) -> list[str]:
    """meta.json's "preprocessing" ({model: Preprocessing.to_dict()}) as a table of one line per model."""
    if not recorded:
        return []
    rows = [(model, Preprocessing(**fields).describe()) for model, fields in recorded.items()]
    return ["<h3>Preprocessing of each model's images (<code>meta.json</code>)</h3>",
            html.table(["model", "resize, center crop, filter, normalisation"], rows, [False, False])]


REPORT_PARTS = (_results_part, _methods_part, _range_ratio_part, _channel_ranges_part, _diagnostics_part, _meta_part)


def write_report(results_dir: Path, extra_html: Sequence[str] = (), html_name: str = REPORT_FILE) -> list[Path]:
    """(Re)generate results.md, every plot and report.html from the files in `results_dir`; returns the written paths.

    results.csv must exist and hold at least one row; ranges.csv, channel_ranges.csv, the diagnostics CSVs and
    meta.json are reported when present. Each part is independent: a part whose file is unreadable shows its error
    in report.html, which is always written (partial or interrupted folders give a partial page), and the first such
    error is raised after it. extra_html: fragments placed right after the title (e.g. the regression gate's).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist; pass the directory the sweep wrote")
    written, body, errors = [], [], []
    for part in REPORT_PARTS:
        try:
            fragments, paths = part(results_dir)
        except (FileNotFoundError, ValueError, UserError) as error:
            errors.append(error)
            fragments, paths = [f"<p class=\"problem\">Not shown: {html.escape(str(error))}</p>"], []
        body += fragments
        written += paths
    header = [f"<p class=\"note\">Written by <code>clebench report</code> from the files of <code>"
              f"{html.escape(str(results_dir))}</code>; every image is inline, so this file can be moved alone.</p>"]
    page_path = results_dir / html_name
    page_path.write_text(html.page(f"clebench report: {results_dir.resolve().name}", [*header, *extra_html, *body]),
                         encoding="utf-8")
    written.append(page_path)
    if errors:
        raise errors[0]
    return written
