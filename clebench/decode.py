"""Decoding image files into one uint8 [N, 3, crop, crop] array file, in parallel, pixel for pixel as PIL does.

Each image is decoded with PIL, converted to RGB, resized (shorter side, antialiased, through torchvision's PIL
path) and center-cropped, then written straight into a memory-mapped ``.npy`` file: no torch op runs per image.
Torch ops inside a thread pool were what capped the old decoder (their intra-op threads multiply with the pool's,
and they hold the GIL); PIL releases the GIL while it decodes and resizes, so threads scale on a few cores and a
process pool (each worker writing its rows of the same file) scales past the GIL on many.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from clebench.models import Preprocessing

__all__ = ["Decoded", "decode_image", "decode_into", "default_workers"]

# Images per task: large enough to amortise a task's overhead, small enough for a smooth progress bar.
_CHUNK = 64
# Below this many images a process pool's start-up costs more than it saves.
_MIN_IMAGES_FOR_PROCESSES = 2_000

Opener = Callable[[], Image.Image]


@dataclass
class Decoded:
    """What decoding rows of the array found: rows converted from a non-RGB mode, and {row: error} of failures."""

    converted: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def update(self, other: Decoded) -> None:
        self.converted.extend(other.converted)
        self.errors.update(other.errors)


def default_workers() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_image(open_image: Opener, preprocessing: Preprocessing) -> tuple[np.ndarray | None, bool, str]:
    """(uint8 [3, crop, crop] or None, was it converted from a non-RGB mode, error message or "") for one image."""
    try:
        with open_image() as image:
            image.load()
            converted = image.mode != "RGB"
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for broken files
        return None, False, f"{type(err).__name__}: {err}"
    if preprocessing.resize is not None:
        rgb = TF.resize(rgb, preprocessing.resize, interpolation=InterpolationMode(preprocessing.interpolation))
    cropped = np.asarray(TF.center_crop(rgb, preprocessing.crop))
    return cropped.transpose(2, 0, 1), converted, ""


def _fill(out: np.ndarray, rows: Sequence[int], openers: Sequence[Opener], preprocessing: Preprocessing) -> Decoded:
    """Decode ``openers`` into ``out[rows]``; failed rows are left as they are."""
    found = Decoded()
    for row, open_image in zip(rows, openers):
        image, converted, error = decode_image(open_image, preprocessing)
        if error:
            found.errors[row] = error
            continue
        out[row] = image
        if converted:
            found.converted.append(row)
    return found


def _fill_file(target: str, rows: Sequence[int], paths: Sequence[str], preprocessing: Preprocessing) -> Decoded:
    """A process-pool task: open the shared ``.npy`` file and fill ``rows`` from the image files ``paths``."""
    out = np.load(target, mmap_mode="r+")
    found = _fill(out, rows, [partial(Image.open, p) for p in paths], preprocessing)
    out.flush()
    return found


def _executor(processes: bool, workers: int) -> Executor:
    if not processes:
        return ThreadPoolExecutor(max_workers=workers)
    # fork starts in milliseconds and the workers touch only PIL and numpy (no torch threads); elsewhere spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def decode_into(target: Path, count: int, preprocessing: Preprocessing, *, open_image: Callable[[int], Image.Image],
                paths: Sequence[str | os.PathLike] | None = None, workers: int | None = None,
                processes: bool | None = None, desc: str = "decoding", progress: bool = True) -> Decoded:
    """Decode ``count`` images into a new ``.npy`` file ``target`` holding uint8 [count, 3, crop, crop].

    open_image(i) opens image i; paths (optional) are the same images as files, which lets a process pool decode
    them. workers: pool size (default: the usable cores). processes: use a process pool (default: when there are
    paths, several workers and at least 2,000 images). Rows of undecodable images stay zero; see ``Decoded``.
    """
    workers = workers or default_workers()
    if processes is None:
        processes = paths is not None and workers > 1 and count >= _MIN_IMAGES_FOR_PROCESSES
    if processes and paths is None:
        raise ValueError("a process pool decodes image files: pass paths=")
    crop = preprocessing.crop
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(count, 3, crop, crop))
    found = Decoded()
    chunks = [range(start, min(start + _CHUNK, count)) for start in range(0, count, _CHUNK)]
    with _executor(processes, workers) as pool, \
            tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:
        if processes:
            futures = {pool.submit(_fill_file, str(target), list(rows), [str(paths[i]) for i in rows], preprocessing):
                       len(rows) for rows in chunks}
        else:
            futures = {pool.submit(_fill, out, rows, [partial(open_image, i) for i in rows], preprocessing): len(rows)
                       for rows in chunks}
        for future in as_completed(futures):
            found.update(future.result())
            bar.update(futures[future])
    out.flush()
    del out
    found.converted.sort()
    return found
