"""Exit 1 unless two results folders hold the same rows: results.csv byte-identical apart from `seconds`, and
identical ranges.csv, channel_ranges.csv and per-image predictions (e.g. an in-process and a Ray run of one config).

    python scripts/same_rows.py RESULTS_DIR OTHER_RESULTS_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

from clebench.sweep.results import row_differences


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    first, second = map(Path, sys.argv[1:])
    found = row_differences(first, second)
    print(f"{first} vs {second}: " + ("; ".join(found) if found else "same rows"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
