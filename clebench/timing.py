"""Wall-clock timing and the machine's description, shared by the scripts in scripts/ (and meta.json's CPU name).

One place for what every timing script used to write out for itself: `seconds` / `timed` (perf_counter around one
call, garbage collection optionally held off as timeit does), `interleaved` (several calls, round after round, so
machine noise hits them alike), `Stopwatch` (wall and CPU seconds since it started), `cpu_name` / `machine_summary`
(the CPU model from /proc/cpuinfo, and a one-line summary of the machine and the versions), and `HelpFormatter`,
the scripts' --help layout.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def cpu_name(fallback: str | None = None) -> str:
    """The CPU model name (/proc/cpuinfo's first "model name"); where that is absent or unreadable, `fallback` or,
    without one, platform's answer (processor, else machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback if fallback is not None else (platform.processor() or platform.machine())


def machine_summary(*versions: str) -> str:
    """'<CPU>, <n> logical CPUs, torch.set_num_threads(<n>), torch <v>, torchvision <v>, <versions...>, Python <v>'."""
    import torch
    import torchvision

    return ", ".join([cpu_name(), f"{os.cpu_count()} logical CPUs", f"torch.set_num_threads({torch.get_num_threads()})",
                      f"torch {torch.__version__}", f"torchvision {torchvision.__version__}", *versions,
                      f"Python {platform.python_version()}"])


def timed(call: Callable[[], T], *, hold_gc: bool = False) -> tuple[float, T]:
    """(wall seconds one call of `call` takes, its result).

    hold_gc: collect garbage before the call and hold collection off during it (as timeit does).
    """
    if hold_gc:
        gc.collect()
        gc.disable()
    try:
        started = time.perf_counter()
        result = call()
        return time.perf_counter() - started, result
    finally:
        if hold_gc:
            gc.enable()


def seconds(call: Callable[[], object], *, hold_gc: bool = False) -> float:
    """Wall seconds one call of `call` takes (`timed` without the result)."""
    return timed(call, hold_gc=hold_gc)[0]


def interleaved(calls: Mapping[str, Callable[[], T]], rounds: int, *,
                results: dict[str, T] | None = None) -> dict[str, list[float]]:
    """Every call once per round, in the mapping's order, `rounds` times, so machine noise hits them alike:
    {name: its seconds in each round}; the caller reduces them (min: the fastest round; or the median).

    results: a dict to receive each call's last result (without one, each result is dropped as it comes).
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            elapsed, result = timed(call)
            times[name].append(elapsed)
            if results is not None:
                results[name] = result
            del result
    return times


class Stopwatch:
    """Started on creation: `seconds` (wall, perf_counter) and `cpu_seconds` (this process, process_time) since."""

    def __init__(self) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_started


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the scripts: the description as written (its usage lines kept), each option's default appended
    unless its help already names one (or the default is None / False: nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        nothing = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if nothing or not optional or "default" in help_text.lower():
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()
