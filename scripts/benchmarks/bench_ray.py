"""Local vs Ray: wall time and work of the same sweep, Ray's overhead per task, and (with a GPU) one card shared by
1, 2 and 4 concurrent tasks.

    python scripts/benchmarks/bench_ray.py [--config configs/cifar10_ci.toml] [--limit N] [--markdown results/bench/ray.md]

Each sweep runs in a fresh process (`clebench sweep`, data and checkpoints from CLEBENCH_DATA / CLEBENCH_MODELS) into
a temporary folder: in-process, on a local Ray with prefix units, and on a local Ray with one unit per model. The
table gives wall time, the ratio to the in-process run, the work counters and whether results.csv (apart from
`seconds`) and ranges.csv are byte-identical to the in-process run's. The machine is shared, so compare ratios.

Output: prints the tables to stdout; with --markdown, also writes them to that file (results/bench/ray.md and
results/gpu/ray_gpu_sharing.md are such runs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from clebench import timing
from clebench.precision import fp32_precision
from clebench.sweep.results import read_json, row_differences

VARIANTS = {  # name -> (extra CLI arguments, extra TOML)
    "in-process": ([], ""),
    "ray, prefix units": (["--ray"], ""),
    "ray, model units": (["--ray"], '\n[execution]\nunit = "model"\n'),
}


def run_variant(config: Path, limit: int | None, extra_args: list[str], extra_toml: str, out: Path) -> dict:
    variant_config = out.parent / f"{out.name}.toml"
    variant_config.write_text(config.read_text() + extra_toml)
    command = [sys.executable, "-m", "clebench", "sweep", str(variant_config), "--out", str(out), "--no-progress",
               *extra_args, *(["--limit", str(limit)] if limit else [])]
    process_seconds = timing.seconds(lambda: subprocess.run(command, check=True, capture_output=True, text=True))
    work = read_json(out / "meta.json")["last_run_work"]
    return {"process_seconds": process_seconds, **work}


def task_overhead(tasks: int = 50) -> tuple[float, float]:
    """(median ms of one empty task's round trip, ms per task when `tasks` are submitted at once) on a local Ray."""
    import ray

    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    empty = ray.remote(lambda: None)
    ray.get([empty.remote() for _ in range(4)])  # start the workers first
    round_trips = [timing.seconds(lambda: ray.get(empty.remote())) for _ in range(tasks)]
    batched = timing.seconds(lambda: ray.get([empty.remote() for _ in range(tasks)])) / tasks
    ray.shutdown()
    return statistics.median(round_trips) * 1000, batched * 1000


def gpu_sharing(images: int = 20_000, batch: int = 250) -> list[tuple[int, float]]:
    """(concurrent tasks, images/s in total) for torchvision MobileNetV2 on synthetic 224 px batches on one GPU, TF32
    off as in a sweep."""
    import ray

    def evaluate(count: int) -> float:
        import torchvision

        model = torchvision.models.mobilenet_v2().cuda().eval()
        data = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        clock = timing.Stopwatch()
        with torch.inference_mode(), fp32_precision():
            for _ in range(count // batch):
                model(data.float().div_(255)).argmax(1)
        torch.cuda.synchronize()
        return clock.seconds

    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    rates = []
    for concurrent in (1, 2, 4):
        task = ray.remote(evaluate).options(num_gpus=1 / concurrent)
        ray.get([task.remote(batch) for _ in range(concurrent)])  # warm up each worker's CUDA context
        elapsed = timing.seconds(lambda: ray.get([task.remote(images // concurrent) for _ in range(concurrent)]))
        rates.append((concurrent, images / elapsed))
    ray.shutdown()
    return rates


def sweep_lines(config: Path, limit: int | None) -> list[str]:
    """The local vs Ray table and Ray's overhead per task."""
    lines = ["| run | wall s (process) | ratio to in-process | units | FP32 evals | calibrations | quantized evals | same rows |",
             "|:--|--:|--:|--:|--:|--:|--:|:--|"]
    with tempfile.TemporaryDirectory() as folder:
        outs = {}
        for name, (extra_args, extra_toml) in VARIANTS.items():
            outs[name] = Path(folder) / name.replace(" ", "_").replace(",", "")
            work = run_variant(config, limit, extra_args, extra_toml, outs[name])
            if name == "in-process":
                reference = work["process_seconds"]
            lines.append(
                f"| {name} | {work['process_seconds']:.1f} | {work['process_seconds'] / reference:.2f} | {work['units']} "
                f"| {work['fp32_evaluations']} | {work['calibrations']} | {work['quantized_evaluations']} "
                f"| {'NO' if row_differences(outs[name], outs['in-process']) else 'yes'} |"
            )
            print(lines[-1], flush=True)
    single, batched = task_overhead()
    return lines + ["", f"Ray overhead per empty task: {single:.1f} ms round trip alone, {batched:.2f} ms each when 50 "
                    "are submitted at once (local Ray, workers started)."]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10_ci.toml"))
    parser.add_argument("--limit", type=int, help="evaluation images (default: the config's)")
    parser.add_argument("--gpu-sharing-only", action="store_true", help="skip the sweeps and the overhead measurement")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    title = "One GPU shared by Ray tasks" if args.gpu_sharing_only else \
        f"Local vs Ray: `{args.config}`{f' --limit {args.limit}' if args.limit else ''}"
    lines = [f"# {title}", "",
             f"{timing.cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}", ""]
    if not args.gpu_sharing_only:
        lines += sweep_lines(args.config, args.limit)
    if torch.cuda.is_available():
        lines += ["", f"One {torch.cuda.get_device_name()} shared by concurrent tasks (MobileNetV2, synthetic 224 px, "
                  "batch 250, TF32 off, 20,000 images split evenly over the tasks):", "", "| tasks | images/s |", "|--:|--:|"]
        lines += [f"| {n} | {rate:,.0f} |" for n, rate in gpu_sharing()]
    else:
        lines += ["", "No GPU on this machine: the GPU-sharing measurement was skipped."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
