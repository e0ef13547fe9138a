"""Exit 1 unless two results folders hold the same rows: results.csv byte-identical apart from `seconds`, and
identical ranges.csv, channel_ranges.csv and per-image predictions (e.g. an in-process and a Ray run of one config).

    python scripts/results/same_rows.py RESULTS_DIR OTHER_RESULTS_DIR

Output: prints "same rows" or the differences to stdout, exit status 1 if there are any; writes no file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clebench import timing
from clebench.sweep.results import row_differences


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("first", type=Path, metavar="RESULTS_DIR", help="a sweep's --out folder")
    parser.add_argument("second", type=Path, metavar="OTHER_RESULTS_DIR", help="the other run's --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    first, second = args.first, args.second
    found = row_differences(first, second)
    print(f"{first} vs {second}: " + ("; ".join(found) if found else "same rows"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
