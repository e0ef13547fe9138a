"""Decoding image files into one uint8 [N, 3, crop h, crop w] array file, in parallel, pixel for pixel as PIL does.

Each image is decoded with PIL, converted to RGB, resized (shorter side, or to [height, width]; antialiased, through
torchvision's PIL path) and center-cropped into a numpy buffer, and each chunk of images is written into the ``.npy``
file with one write: no torch op runs per image.
Torch ops inside a thread pool were what capped the old decoder (their intra-op threads multiply with the pool's,
and they hold the GIL); PIL releases the GIL while it decodes and resizes, so threads scale on a few cores and a
process pool (each worker writing its rows of the same file) scales past the GIL on many.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
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
_local = threading.local()


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
    """(uint8 [3, crop h, crop w] or None, was it converted from a non-RGB mode, error message or "") for one image.

    An image smaller than the crop (possible only without a resize) is an error, not padded.
    """
    try:
        with open_image() as image:
            image.load()
            converted = image.mode != "RGB"
            rgb = image.convert("RGB") if converted else image  # convert() would copy an RGB image
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for broken files
        return None, False, f"{type(err).__name__}: {err}"
    resize = preprocessing.resize_size
    if resize is not None:
        rgb = TF.resize(rgb, resize, interpolation=InterpolationMode(preprocessing.interpolation))
    crop = preprocessing.crop_size
    if rgb.height < crop[0] or rgb.width < crop[1]:
        return None, False, f"its {rgb.height}x{rgb.width} pixels are smaller than the {crop[0]}x{crop[1]} crop"
    cropped = np.asarray(TF.center_crop(rgb, list(crop)))
    return cropped.transpose(2, 0, 1), converted, ""


def _decode_chunk(target: str, offset: int, first_row: int, openers: Sequence[Opener],
                  preprocessing: Preprocessing) -> Decoded:
    """Decode ``openers`` into rows ``first_row, first_row + 1, ...`` of the ``.npy`` file ``target``.

    offset: byte offset of row 0 in the file. The chunk is decoded into a small buffer and written with one write
    (twice as fast as writing image by image through a memory map); failed rows are written as zeros.
    """
    buffer = _buffer(len(openers), preprocessing.crop_size)
    found = Decoded()
    for k, open_image in enumerate(openers):
        image, converted, error = decode_image(open_image, preprocessing)
        if error:
            found.errors[first_row + k] = error
            buffer[k] = 0
            continue
        buffer[k] = image
        if converted:
            found.converted.append(first_row + k)
    with open(target, "r+b") as handle:
        handle.seek(offset + first_row * buffer[0].nbytes)
        handle.write(memoryview(buffer).cast("B"))
    return found


def _buffer(count: int, crop: tuple[int, int]) -> np.ndarray:
    """This thread's chunk buffer, uint8 [count, 3, crop h, crop w], reused: allocating one per chunk costs page
    faults."""
    shape = (max(count, _CHUNK), 3, *crop)
    if getattr(_local, "buffer", None) is None or _local.buffer.shape != shape:
        _local.buffer = np.empty(shape, dtype=np.uint8)
    return _local.buffer[:count]


def _executor(processes: bool, workers: int) -> Executor:
    if not processes:
        return ThreadPoolExecutor(max_workers=workers)
    # fork starts in milliseconds and the workers touch only PIL and numpy (no torch threads); elsewhere spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def decode_into(target: Path, count: int, preprocessing: Preprocessing, *, open_image: Callable[[int], Image.Image],
                paths: Sequence[str | os.PathLike] | None = None, workers: int | None = None,
                processes: bool | None = None, desc: str = "decoding", progress: bool = True) -> Decoded:
    """Decode ``count`` images into a new ``.npy`` file ``target`` holding uint8 [count, 3, crop h, crop w].

    open_image(i) opens image i; paths (optional) are the same images as files, which lets a process pool decode
    them. workers: pool size (default: the usable cores). processes: use a process pool (default: when there are
    paths, several workers and at least 2,000 images). Rows of undecodable images stay zero; see ``Decoded``.
    """
    workers = workers or default_workers()
    if processes is None:
        processes = paths is not None and workers > 1 and count >= _MIN_IMAGES_FOR_PROCESSES
    if processes and paths is None:
        raise ValueError("a process pool decodes image files: pass paths=")
    shape = (count, 3, *preprocessing.crop_size)
    offset = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape).offset
    found = Decoded()
    with _executor(processes, workers) as pool, \
            tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:
        futures = {}
        for start in range(0, count, _CHUNK):
            rows = range(start, min(start + _CHUNK, count))
            # Processes get picklable openers (file paths); threads can share the caller's opener.
            openers = [partial(Image.open, str(paths[i])) for i in rows] if processes else \
                [partial(open_image, i) for i in rows]
            futures[pool.submit(_decode_chunk, str(target), offset, start, openers, preprocessing)] = len(rows)
        for future in as_completed(futures):
            found.update(future.result())
            bar.update(futures[future])
    found.converted.sort()
    return found
