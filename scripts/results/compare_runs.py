"""Per-row agreement of two results folders of the same rows run another way (engine, device, machine): top-1 of
each and the % of images whose top-1 class is the same, for the quantized rows (and FP32 once per model).

    python scripts/results/compare_runs.py RESULTS_DIR OTHER_RESULTS_DIR [--markdown FILE]

Unlike `clebench check`, the configs may differ (e.g. `[eval] engine`); the rows compared are those both folders
hold, matched on model, dataset, steps and quant, and both must have evaluated the same images.

Output: prints the table and its summary to stdout; with --markdown, also writes them to that file
(results/bench/engine_agreement_*.md are such files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from clebench import timing
from clebench.reporting.report import markdown_table
from clebench.sweep.results import KEY_COLUMNS, PREDICTIONS_FILE, RESULTS_FILE, RowKey, labels_name, prediction_name, read_predictions


def agreement_table(first: Path, second: Path) -> pd.DataFrame:
    """One row per (row key, "fp32" | "quant") held by both folders: top-1 of each, their difference, % same top-1."""
    tables = [pd.read_csv(folder / RESULTS_FILE) for folder in (first, second)]
    predictions = [read_predictions(folder / PREDICTIONS_FILE) for folder in (first, second)]
    rows = tables[0].merge(tables[1], on=KEY_COLUMNS, suffixes=("", "_other"))
    records, seen_fp32 = [], set()
    for row in rows.itertuples(index=False):
        key = RowKey(*(getattr(row, column) for column in KEY_COLUMNS))
        labels = [p[labels_name(key.model, key.dataset)] for p in predictions]
        if len(labels[0]) != len(labels[1]) or (labels[0] != labels[1]).any():
            raise SystemExit(f"{key.model}/{key.dataset}: the two folders evaluated different images")
        kinds = ["quant"] if (key.model, key.steps) in seen_fp32 else ["fp32", "quant"]
        seen_fp32.add((key.model, key.steps))
        for kind in kinds:
            ours, theirs = (p[prediction_name(key, kind)] for p in predictions)
            top1 = [100.0 * (p == labels[0]).mean() for p in (ours, theirs)]
            records.append({**key._asdict(), "kind": kind, "top1": top1[0], "top1_other": top1[1],
                            "delta": top1[1] - top1[0], "same_top1_pct": 100.0 * (ours == theirs).mean(),
                            "images": len(ours)})
    return pd.DataFrame(records)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("first", type=Path, metavar="RESULTS_DIR", help="the reference run's --out folder")
    parser.add_argument("second", type=Path, metavar="OTHER_RESULTS_DIR", help="the other run's --out folder")
    parser.add_argument("--markdown", type=Path, help="also write the table and its summary to this file")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    table = agreement_table(args.first, args.second)
    if table.empty:
        print(f"{args.first} and {args.second} share no rows", file=sys.stderr)
        return 1
    quant = table[table["kind"] == "quant"]
    summary = (f"{args.first} vs {args.second}: {len(quant)} quantized rows of {table['images'].iloc[0]} images; same "
               f"top-1 class on {quant['same_top1_pct'].min():.2f} % of images at least (mean "
               f"{quant['same_top1_pct'].mean():.3f} %), |top-1 difference| at most {quant['delta'].abs().max():.2f} "
               f"points; FP32 rows: same top-1 on {table.loc[table['kind'] == 'fp32', 'same_top1_pct'].min():.2f} % at least")
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    text = markdown_table(list(table.columns), cells, [t != object for t in table.dtypes]) + "\n\n" + summary + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
