"""Run CLE on every torchvision classification model and write results/zoo_coverage.md.

    python scripts/zoo_coverage.py [--models REGEX ...] [--output results/zoo_coverage.md] [--threads 1]

What each model goes through is described in clebench/zoo_coverage.py. One model failing does not stop the run;
the table is rewritten after every model. Exit status 1 if any model FAILs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from clebench.errors import UserError
from clebench.zoo_coverage import check_model, render, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="regexes matched against full model names (default: all)")
    parser.add_argument("--output", default="results/zoo_coverage.md", help="markdown report to write")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        names = select(args.models)
    except UserError as error:
        raise SystemExit(str(error)) from None
    command = shlex.join(["python", *sys.argv])  # quoted: a --models regex may hold shell characters
    results = []
    for i, name in enumerate(names, 1):
        result = check_model(name)
        results.append(result)
        print(f"[{i}/{len(names)}] {name}: {result.status} ({result.seconds:.1f} s) {'; '.join(result.problems)}", flush=True)
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as file:
            file.write(render(results, command, args.threads, finished=i == len(names)))
    sys.exit(1 if any(r.status == "FAIL" for r in results) else 0)


if __name__ == "__main__":
    main()
