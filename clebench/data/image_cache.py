"""An on-disk cache of decoded images: one memory-mapped uint8 ``.npy`` per (source, file list, resize/crop/filter).

The first load of a data set split at a geometry decodes it into ``<cache>/<entry>/images.npy`` beside an
``index.json`` (files, labels, each source file's size and modification time); every later load, in any process,
maps that file instead of decoding. Mean/std are not part of the key: normalisation happens per batch.

* Location: env CLEBENCH_CACHE, else ``$XDG_CACHE_HOME/clebench``, else ``~/.cache/clebench``.
* Atomic: an entry is built in a hidden temporary folder and renamed into place, so a half-written entry is never
  read; builders of the same entry take turns on a lock file, and the later ones find the entry built.
* Checked on every hit: a source file whose size or modification time changed, a missing one, or an images file
  of the wrong length (truncated) invalidates the entry, with a warning, and it is rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clebench.models import Preprocessing

try:
    import fcntl
except ImportError:  # not POSIX: racing builders both build, and the rename keeps one
    fcntl = None

__all__ = ["CacheEntry", "CacheError", "cache_dir", "entry_name", "open_entry", "build_entry", "list_entries",
           "clear"]

FORMAT = 1  # bump when the stored pixels or the index change meaning
IMAGES, INDEX = "images.npy", "index.json"


class CacheError(Exception):
    """A cache entry that cannot be used (stale or damaged): the message says why."""


@dataclass
class CacheEntry:
    """An opened entry: ``images`` maps the file (copy-on-write, so nothing is copied unless written to)."""

    path: Path
    images: np.ndarray  # uint8 [N, 3, crop h, crop w], only the decodable files
    index: dict  # index.json: "files" and "labels" of all N' requested files, "skipped" {file: error}, ...


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path`` if given, else env CLEBENCH_CACHE, else the user cache folder + ``clebench``."""
    if path is not None:
        return Path(path)
    if os.environ.get("CLEBENCH_CACHE"):
        return Path(os.environ["CLEBENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clebench"


def entry_name(source_name: str, origin: str, files: Sequence[str], preprocessing: Preprocessing) -> str:
    """Folder name of the entry for these files of ``origin`` (an absolute folder) at this resize/crop/filter."""
    geometry = _geometry(preprocessing)
    key = json.dumps({"format": FORMAT, "origin": origin, "files": list(files), **geometry}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", source_name)
    resize = _size_text(geometry["resize"]) if geometry["resize"] else "none"
    return f"{readable}-{resize}-{_size_text(geometry['crop'])}-{geometry['interpolation']}-{digest}"


def _geometry(preprocessing: Preprocessing) -> dict:
    """What decides the pixels: the resize applied (crop_pct's included), the crop and the filter."""
    return {"resize": preprocessing.resize_size, "crop": preprocessing.crop, "interpolation": preprocessing.interpolation}


def _size_text(size: int | tuple[int, int]) -> str:
    return str(size) if isinstance(size, int) else "x".join(map(str, size))


def file_stats(paths: Sequence[Path]) -> list[list[int] | None]:
    """[size, mtime in ns] of each path, None where it is missing."""
    stats = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            stats.append(None)
        else:
            stats.append([stat.st_size, stat.st_mtime_ns])
    return stats


def open_entry(path: Path) -> CacheEntry | None:
    """The entry at ``path`` (None if there is none); CacheError if a source file changed or the entry is damaged."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        raise CacheError(f"its index is unreadable ({err})") from None
    if index.get("format") != FORMAT:
        raise CacheError(f"it has format {index.get('format')}, this clebench writes {FORMAT}")
    origin = Path(index["origin"])
    for name, old, new in zip(index["stat_names"], index["stats"], file_stats([origin / n for n in index["stat_names"]])):
        if new is None:
            raise CacheError(f"source file {origin / name} is missing")
        if new != old:
            raise CacheError(f"source file {origin / name} changed (size, mtime {old} -> {new})")
    try:
        images = np.load(path / IMAGES, mmap_mode="c")
    except (OSError, ValueError) as err:  # a truncated file cannot be mapped to its header's shape
        raise CacheError(f"{path / IMAGES} is damaged ({err})") from None
    if list(images.shape) != index["shape"] or images.dtype != np.uint8:
        raise CacheError(f"{path / IMAGES} holds {images.dtype} {list(images.shape)}, the index says uint8 "
                         f"{index['shape']}")
    return CacheEntry(path, images, index)


def build_entry(root: Path, name: str, index: dict, decode: Callable[[Path], dict]) -> CacheEntry:
    """Open entry ``root/name``, or build it: ``decode(images_path)`` writes the images and returns index fields.

    index: at least "origin" (absolute folder) and "stat_names" (the source files, relative to it, whose size and
    modification time the entry depends on). A stale or damaged entry, and a stale entry of the same source and
    geometry built from another file list, is deleted with a warning. Raises OSError when the folder is not writable.
    """
    path = root / name
    entry = _open_or_discard(path)
    if entry is not None:
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        entry = _open_or_discard(path)  # built by another process while this one waited
        if entry is not None:
            return entry
        for sibling in root.glob(f"{name.rsplit('-', 1)[0]}-*"):  # e.g. built before a file was deleted
            _open_or_discard(sibling)
        temporary = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            temporary.mkdir()
            origin = Path(index["origin"])
            stats = file_stats([origin / n for n in index["stat_names"]])  # before decoding: later changes count
            start = time.perf_counter()
            fields = decode(temporary / IMAGES)
            images = np.load(temporary / IMAGES, mmap_mode="r")
            full = {**index, **fields, "format": FORMAT, "shape": list(images.shape), "stats": stats,
                    "decode_seconds": round(time.perf_counter() - start, 3)}
            del images
            _write_synced(temporary / INDEX, json.dumps(full).encode())
            _fsync(temporary / IMAGES)
            with contextlib.suppress(OSError):  # another builder (without a lock) was first: keep theirs
                temporary.rename(path)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    entry = open_entry(path)
    if entry is None:
        raise CacheError(f"cache entry {path} vanished right after it was built")
    return entry


def _open_or_discard(path: Path) -> CacheEntry | None:
    try:
        return open_entry(path)
    except CacheError as err:
        warnings.warn(f"image cache entry {path} is invalid: {err}; deleting it", stacklevel=4)
        _remove(path)
        return None


def _remove(path: Path) -> None:
    """Move an entry aside (atomic: readers see all of it or none), then delete it."""
    doomed = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield


def _write_synced(path: Path, content: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def list_entries(root: Path) -> list[dict]:
    """{"name", "images", "bytes", "source", "origin", "geometry", "created"} of each complete entry."""
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not (path / INDEX).is_file():
            continue
        try:
            index = json.loads((path / INDEX).read_text())
        except (OSError, ValueError):
            index = {}
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        entries.append({"name": path.name, "images": (index.get("shape") or ["?"])[0], "bytes": size,
                        "source": index.get("name", "?"), "origin": index.get("origin", "?"),
                        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime((path / INDEX).stat().st_mtime))})
    return entries


def clear(root: Path) -> tuple[int, int]:
    """Delete every entry, lock and leftover temporary folder under ``root``; (entries deleted, bytes freed)."""
    count = freed = 0
    for entry in list_entries(root):
        _remove(root / entry["name"])
        count, freed = count + 1, freed + entry["bytes"]
    for leftover in root.glob(".*") if root.is_dir() else []:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return count, freed
