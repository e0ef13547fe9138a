"""CI gate for a deployed sweep: exit 1 unless every row ran on every deploy target, with every conv / matmul layer
on integers (a float fallback is listed per row).

    python scripts/deploy/check_deploy.py runs/cifar10_ci_deploy

Output: prints each problem (or that there is none) to stdout and exits 1 if there is one; writes no file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clebench import timing
from clebench.reporting.report import read_results_table
from clebench.sweep.results import KEY_COLUMNS, deploy_column, deploy_targets


def problems(results_dir: Path) -> list[str]:
    """One line per row and target that did not run, or ran some conv / matmul layer in float."""
    table = read_results_table(results_dir / "results.csv")
    targets = deploy_targets(table.columns)
    if not targets:
        return [f"{results_dir}: no deploy target in results.csv"]
    found = []
    for _, row in table.iterrows():
        name = " ".join(str(row[c]) for c in KEY_COLUMNS)
        for target in targets:
            floats = row[deploy_column(target, "float_layers")]
            if row.isna()[deploy_column(target, "top1")]:
                found.append(f"{name}: not run on {target}")
            elif floats != 0:
                found.append(f"{name}: {target} ran {floats:.0f} conv/matmul layer(s) in float")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("results_dir", type=Path, help="the sweep's --out folder (its results.csv is read)")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    found = problems(args.results_dir)
    print("\n".join(found) if found else f"{args.results_dir}: every row ran every conv / matmul layer on integers "
          "on every deploy target")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
