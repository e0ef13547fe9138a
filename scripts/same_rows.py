"""Exit 1 unless two results folders hold the same rows: results.csv byte-identical apart from `seconds`, and
identical ranges.csv, channel_ranges.csv and per-image predictions (e.g. an in-process and a Ray run of one config).

    python scripts/same_rows.py RESULTS_DIR OTHER_RESULTS_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from clebench import results


def differences(first: Path, second: Path) -> list[str]:
    found = []
    tables = [pd.read_csv(d / results.RESULTS_FILE).drop(columns=results.TIMING_COLUMNS).to_csv() for d in (first, second)]
    if tables[0] != tables[1]:
        found.append(f"{results.RESULTS_FILE} differs (apart from seconds)")
    for name in (results.RANGES_FILE, results.CHANNEL_RANGES_FILE):
        if (first / name).read_bytes() != (second / name).read_bytes():
            found.append(f"{name} differs")
    ours, theirs = (results.read_predictions(d / results.PREDICTIONS_FILE) for d in (first, second))
    if ours.keys() != theirs.keys() or any((ours[k] != theirs[k]).any() for k in ours):
        found.append(f"{results.PREDICTIONS_FILE} differs")
    return found


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    first, second = map(Path, sys.argv[1:])
    found = differences(first, second)
    print(f"{first} vs {second}: " + ("; ".join(found) if found else "same rows"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
