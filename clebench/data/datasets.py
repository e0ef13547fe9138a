"""Image data sets decoded once into a memory-mapped file, with deterministic class-balanced subsets.

A sweep evaluates the same images many times, so ``load_images`` decodes, resizes and center-crops them once
(``clebench.data.decode``) into one uint8 array [N, 3, H, W] in the on-disk image cache (``clebench.data.image_cache``),
which later loads, in any process, map instead of decoding; ``batches`` normalises slices of it on the fly.

Data sets (``list_datasets()``), found under a data root (argument, else env CLEBENCH_DATA):

* ``cifar10`` / ``cifar100``, splits "train" and "test" (alias "val"): the ImageFolder
  ``<root>/<dataset>/<split>/<class>/<image>`` (class folders in label order when sorted), else torchvision's
  binary release under ``<root>`` (``download=True`` fetches it).
* ``imagenet``: any folder of ImageNet wnid folders; ``split`` names it, relative to the root
  (``"imagenet-sample"``, ``"imagenet/val"``) or absolute. Labels are ImageNet-1k indices from
  ``imagenet_wnid_to_idx.json`` at the root (or ``wnid_to_idx=``), else sorted order if all 1000 wnids are present.
  The shared one-image-per-class sample has a single folder: name it as both the calibration and the evaluation
  split (its results are then not held-out accuracies).
* ``imagenette``: torchvision's Imagenette (10 ImageNet classes), splits "train" and "val" (alias "test"),
  labelled with ImageNet-1k indices; ``download=True`` fetches the 320 px version.
* ``imagefolder``: the user's own ``<root>/<split>/<class>/<image>``, ``root`` being that data set's folder; labels
  are model output indices from ``classes`` (``clebench.data.classes``; default: sorted folder order). Files that are
  not images are ignored and counted (``ImageSet.ignored``, one warning per load).
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from clebench.data import image_cache
from clebench.data.classes import Classes, class_indices
from clebench.data.decode import decode_into
from clebench.errors import UserError
from clebench.models import Preprocessing
from clebench.models.preprocessing import CIFAR10_PREPROCESSING, IMAGENET_PREPROCESSING

__all__ = ["ImageSet", "DatasetError", "list_datasets", "data_root", "dataset_preprocessing", "load_images",
           "imagefolder_classes", "to_device", "batches", "balanced_subset"]

_DATASETS = ("cifar10", "cifar100", "imagenet", "imagenette", "imagefolder")
_CIFAR = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
_SPLIT_ALIASES = {"cifar": {"train": "train", "test": "test", "val": "test"},
                  "imagenette": {"train": "train", "val": "val", "test": "val"}}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"n\d{8}")
_WNID_MAP_FILE = "imagenet_wnid_to_idx.json"
# ImageNet-1k indices of Imagenette's classes, for users without the wnid map file.
_IMAGENETTE_WNID_TO_IDX = {
    "n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
    "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701,
}
_IMAGENETTE_FOLDERS = ("imagenette2", "imagenette2-320", "imagenette2-160")
# What a model that brings no preprocessing of its own gets (cifar100 and imagefolder: the config must say).
_DEFAULT_PREPROCESSING = {"cifar10": CIFAR10_PREPROCESSING, "imagenet": IMAGENET_PREPROCESSING,
                          "imagenette": IMAGENET_PREPROCESSING}
_MAX_LISTED = 5
_RESIDENT_CHUNK = 1024  # images per copy when moving a set to the GPU

WnidMap = str | os.PathLike | Mapping[str, int]  # a JSON file ({wnid: index} or {"wnid_to_idx": {...}}) or a dict


@dataclass
class ImageSet:
    """Decoded images, in class order, then file order within a class."""

    images: torch.Tensor  # uint8 [N, 3, H, W], resized and center-cropped, not normalised; maps a file (or on a GPU)
    labels: torch.Tensor  # int64 [N], in the label space of `label_space`
    files: list[str]  # N relative paths (ImageFolder) or "<batch folder>[<index>]" (binary CIFAR)
    name: str  # e.g. "cifar10/test"
    label_space: str  # "cifar10", "cifar100", "imagenet" or "imagefolder" (model output indices from `classes`)
    converted: list[str] = field(default_factory=list)  # files decoded from a non-RGB mode (greyscale, CMYK, ...)
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_unreadable=True)
    ignored: list[str] = field(default_factory=list)  # files of the split's class folders that are not images

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class _Source:
    """A data set split before decoding: file names and labels in class order, and how to open one."""

    name: str
    label_space: str
    files: list[str]
    labels: list[int]
    open_image: Callable[[int], Image.Image]
    origin: Path  # the folder the files are in (ImageFolder) or the binary release's folder
    in_folder: bool  # files are paths relative to origin (else items of the binary release's files)
    ignored: list[str] = field(default_factory=list)  # non-image files in the class folders, relative to origin

    def paths(self, indices: Sequence[int]) -> list[Path] | None:
        """Files of ``indices`` (None for a binary release)."""
        return [self.origin / self.files[i] for i in indices] if self.in_folder else None

    def stat_names(self, indices: Sequence[int]) -> list[str]:
        """Files, relative to origin, whose size and modification time the decoded ``indices`` depend on."""
        if self.in_folder:
            return [self.files[i] for i in indices]
        return sorted(p.name for p in self.origin.iterdir() if p.is_file())


def list_datasets() -> list[str]:
    """Names load_images accepts."""
    return list(_DATASETS)


def dataset_preprocessing(dataset: str) -> Preprocessing | None:
    """The preprocessing for a model on ``dataset`` when the model has none of its own; None: the config gives it."""
    return _DEFAULT_PREPROCESSING.get(dataset)


def data_root(root: str | os.PathLike | None = None, *, create: bool = False) -> Path:
    """The data folder: ``root`` if given, else env CLEBENCH_DATA; ``create=True`` makes it (for downloads)."""
    if root is None:
        env = os.environ.get("CLEBENCH_DATA")
        if not env:
            raise FileNotFoundError("no data root given: pass root= (CLI: --data-root) or set CLEBENCH_DATA")
        path, origin = Path(env), "CLEBENCH_DATA"
    else:
        path, origin = Path(root), "the root argument"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} (from {origin}) is not a directory")
    return path


def balanced_subset(labels: Sequence[int], limit: int, seed: int | None = None) -> list[int]:
    """Indices of a class-balanced subset of at most ``limit`` items, ascending.

    Each class (in label order) gets ceil(limit / classes) items, or all it has; then single items are dropped
    from the last of the classes holding the most until ``limit`` remain. Without ``seed`` a class contributes
    its first items (index order); with ``seed`` a seeded random sample of the same size.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    classes = sorted(groups)
    if not classes:
        return []
    per_class = math.ceil(limit / len(classes))
    counts = [min(per_class, len(groups[c])) for c in classes]
    excess = sum(counts) - limit
    while excess > 0:
        most = max(counts)
        for k in reversed(range(len(classes))):
            if excess and counts[k] == most:
                counts[k] -= 1
                excess -= 1
    rng = None if seed is None else random.Random(seed)
    chosen = []
    for c, count in zip(classes, counts):
        members = groups[c]
        chosen.extend(members[:count] if rng is None else rng.sample(members, count))
    return sorted(chosen)


class DatasetError(UserError):
    """A data set folder that cannot be read as asked: missing, empty, or holding no images in a class folder."""


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"image folder {folder} has no class sub-folders; expected {folder}/<class>/<image>")
    return classes


def _image_files(class_folder: Path) -> tuple[list[str], list[str]]:
    """(image file names, names of the other files) in ``class_folder``, sorted; hidden files are neither."""
    visible = sorted(p.name for p in class_folder.iterdir() if p.is_file() and not p.name.startswith("."))
    is_image = [Path(name).suffix.lower() in _IMAGE_EXTENSIONS for name in visible]
    files = [name for name, image in zip(visible, is_image) if image]
    if not files:
        raise DatasetError(
            f"class folder {class_folder} holds no images ({', '.join(_IMAGE_EXTENSIONS)}); add images or remove it"
        )
    return files, [name for name, image in zip(visible, is_image) if not image]


def _folder_source(folder: Path, name: str, label_space: str, class_to_label: Mapping[str, int]) -> _Source:
    """ImageFolder ``folder/<class>/<image>``: files sorted by label, then by file name."""
    entries, ignored = [], []
    for class_folder in _class_folders(folder):
        label = class_to_label[class_folder.name]
        images, others = _image_files(class_folder)
        entries.extend((label, f"{class_folder.name}/{f}") for f in images)
        ignored.extend(f"{class_folder.name}/{f}" for f in others)
    entries.sort()
    files = [f for _, f in entries]
    return _Source(name, label_space, files, [label for label, _ in entries], lambda i: Image.open(folder / files[i]),
                   folder.resolve(), in_folder=True, ignored=ignored)


def _cifar_source(dataset: str, split: str, root: Path, download: bool) -> _Source:
    split = _split(dataset, split, _SPLIT_ALIASES["cifar"])
    name = f"{dataset}/{split}"
    folder = root / dataset / split
    if folder.is_dir():
        classes = [p.name for p in _class_folders(folder)]
        expected = 10 if dataset == "cifar10" else 100
        if len(classes) != expected:
            raise ValueError(f"{folder} has {len(classes)} class folders, {dataset} has {expected}")
        return _folder_source(folder, name, dataset, {c: i for i, c in enumerate(classes)})
    dataset_class = _CIFAR[dataset]
    binary = root / dataset_class.base_folder
    if not (binary.is_dir() or download):
        raise FileNotFoundError(
            f"{dataset} not found: looked for the ImageFolder {folder} and torchvision's binary release {binary}; "
            "put one there, point root= / CLEBENCH_DATA at their parent, or pass download=True (needs internet)"
        )
    try:
        data = dataset_class(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: missing or corrupted files
        raise ValueError(f"{dataset} binary release in {binary} is unusable ({err})") from None
    # Label order, then original order within a class: the same order as the ImageFolder export.
    order = sorted(range(len(data.targets)), key=lambda i: (data.targets[i], i))
    files = [f"{dataset_class.base_folder}[{i}]" for i in order]
    return _Source(name, dataset, files, [data.targets[i] for i in order],
                   lambda k: Image.fromarray(data.data[order[k]]), binary.resolve(), in_folder=False)


def _split(dataset: str, split: str, aliases: Mapping[str, str]) -> str:
    if split not in aliases:
        raise ValueError(f"{dataset} has splits {sorted(aliases)}, got {split!r}")
    return aliases[split]


def _read_wnid_map(source: WnidMap) -> dict[str, int]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the wnid -> index map {path} ({err})") from None
    mapping = content.get("wnid_to_idx", content) if isinstance(content, dict) else None
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold {{wnid: index}} or {{\"wnid_to_idx\": {{wnid: index}}}}")
    return mapping


def _wnid_labels(folder: Path, root: Path, wnid_to_idx: WnidMap | None,
                 fallback: Mapping[str, int] | None = None) -> dict[str, int]:
    """ImageNet-1k index of each wnid folder in ``folder``."""
    wnids = [p.name for p in _class_folders(folder)]
    not_wnids = [w for w in wnids if not _WNID.fullmatch(w)]
    if not_wnids:
        raise ValueError(f"{folder} must hold ImageNet wnid folders (n########), found {not_wnids[:_MAX_LISTED]}")
    default_file = root / _WNID_MAP_FILE
    if wnid_to_idx is not None:
        mapping, origin = _read_wnid_map(wnid_to_idx), "wnid_to_idx="
    elif default_file.is_file():
        mapping, origin = _read_wnid_map(default_file), str(default_file)
    elif len(wnids) == 1000:
        mapping, origin = {w: i for i, w in enumerate(sorted(wnids))}, "sorted wnid order"
    elif fallback is not None:
        mapping, origin = dict(fallback), "the built-in Imagenette map"
    else:
        raise ValueError(
            f"cannot map the {len(wnids)} wnid folders of {folder} to ImageNet-1k indices: no {default_file}, and "
            f"only a folder with all 1000 classes can use sorted order; pass wnid_to_idx= (a JSON file or dict)"
        )
    unknown = [w for w in wnids if w not in mapping]
    if unknown:
        raise ValueError(f"wnids {unknown[:_MAX_LISTED]} of {folder} are missing from the map ({origin})")
    return {w: int(mapping[w]) for w in wnids}


def _imagenet_source(split: str | os.PathLike, root: Path, wnid_to_idx: WnidMap | None) -> _Source:
    candidates = [Path(split)] if Path(split).is_absolute() else [root / split, root / "imagenet" / split]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            f"imagenet split {split!r} not found: looked for {' and '.join(map(str, candidates))}; name a folder of "
            "wnid folders relative to the data root (e.g. 'imagenet-sample') or give its absolute path"
        )
    return _folder_source(folder, f"imagenet/{folder.name}", "imagenet", _wnid_labels(folder, root, wnid_to_idx))


def _imagenette_source(split: str, root: Path, download: bool, wnid_to_idx: WnidMap | None) -> _Source:
    split = _split("imagenette", split, _SPLIT_ALIASES["imagenette"])
    candidates = [root / folder / split for folder in _IMAGENETTE_FOLDERS]
    found = [c for c in candidates if c.is_dir()]
    if not found and download:
        torchvision.datasets.Imagenette(str(root), split=split, size="320px", download=True)
        found = [root / "imagenette2-320" / split]
    if not found:
        raise FileNotFoundError(
            f"imagenette {split} not found: looked for {', '.join(map(str, candidates))}; "
            "pass download=True (needs internet) or point root= / CLEBENCH_DATA at the folder holding it"
        )
    folder = found[0]
    labels = _wnid_labels(folder, root, wnid_to_idx, fallback=_IMAGENETTE_WNID_TO_IDX)
    return _folder_source(folder, f"imagenette/{split}", "imagenet", labels)


def _split_folder(root: Path, split: str | os.PathLike) -> Path:
    """``root/split`` of an imagefolder data set, checked to exist."""
    if not root.is_dir():
        raise DatasetError(f"data set root {root} (data.root) is not a folder; point it at the folder holding the "
                           "split folders")
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DatasetError(f"split {str(split)!r} is not a folder of {root} (its folders: "
                           f"{', '.join(found[:_MAX_LISTED]) or 'none'}); set data.eval_split / calibration_split")
    return folder


def imagefolder_classes(root: str | os.PathLike, splits: Sequence[str], classes: Classes | None) -> dict[str, int]:
    """{folder: model output index} over the class folders of every split of ``root`` (sorted order by default).

    Lists each split as ``load_images`` would, so a missing or empty split, a class folder without images and a
    folder ``classes`` lacks are each a one-line DatasetError / ClassesError here, before any image is decoded.
    """
    folders: dict[str, None] = {}
    for split in splits:
        folder = _split_folder(Path(root), split)
        names = []
        for class_folder in _class_folders(folder):
            _image_files(class_folder)  # raises for a class folder without images
            names.append(class_folder.name)
        class_indices(names, classes, str(folder))  # an unmapped folder's error names its split
        folders.update(dict.fromkeys(names))
    return class_indices(list(folders), classes, str(root))


def _imagefolder_source(split: str | os.PathLike, root: Path, classes: Classes | None) -> _Source:
    folder = _split_folder(root, split)
    labels = class_indices([p.name for p in _class_folders(folder)], classes, str(folder))
    return _folder_source(folder, f"{root.name}/{split}", "imagefolder", labels)


def _decode_to_file(source: _Source, indices: list[int], preprocessing: Preprocessing, progress: bool,
                    target: Path) -> dict:
    """Decode ``indices`` of ``source`` into the ``.npy`` file ``target``, leaving out undecodable files.

    Returns the index fields of what it wrote: "files" and "labels" of the rows, "converted" (files decoded from
    a non-RGB mode) and "skipped" {file: error}.
    """
    found = decode_into(target, len(indices), preprocessing, open_image=lambda row: source.open_image(indices[row]),
                        paths=source.paths(indices), desc=f"decoding {source.name}", progress=progress)
    keep = [row for row in range(len(indices)) if row not in found.errors]
    if found.errors:
        _compact(target, keep)
    return {
        "files": [source.files[indices[row]] for row in keep],
        "labels": [source.labels[indices[row]] for row in keep],
        "converted": [source.files[indices[row]] for row in found.converted],
        "skipped": {source.files[indices[row]]: error for row, error in sorted(found.errors.items())},
    }


def _compact(target: Path, keep: list[int], chunk: int = 1024) -> None:
    """Rewrite the ``.npy`` file ``target`` with only rows ``keep``, a chunk at a time."""
    full = target.with_name(f"{target.stem}-full.npy")
    target.rename(full)
    source = np.load(full, mmap_mode="r")
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(keep), *source.shape[1:]))
    for start in range(0, len(keep), chunk):
        out[start:start + chunk] = source[keep[start:start + chunk]]
    out.flush()
    del out, source
    full.unlink()


def _decode_uncached(source: _Source, indices: list[int], preprocessing: Preprocessing,
                     progress: bool) -> tuple[np.ndarray, dict]:
    """Decode into a temporary file that is deleted once mapped: the images stay out of anonymous memory."""
    handle, name = tempfile.mkstemp(prefix="clebench-images-", suffix=".npy")
    os.close(handle)
    try:
        fields = _decode_to_file(source, indices, preprocessing, progress, Path(name))
        return np.load(name, mmap_mode="c"), fields
    finally:
        os.unlink(name)  # the mapping stays valid until the array is freed


def _decode_cached(source: _Source, indices: list[int], preprocessing: Preprocessing, progress: bool,
                   cache_dir: str | os.PathLike | None) -> tuple[np.ndarray, dict] | None:
    """Map the cache entry of these images, building it first if needed; None (with a warning) if unwritable."""
    root = image_cache.cache_dir(cache_dir)
    files = [source.files[i] for i in indices]
    name = image_cache.entry_name(source.name, str(source.origin), files, preprocessing)
    index = {"name": source.name, "label_space": source.label_space, "origin": str(source.origin),
             "stat_names": source.stat_names(indices), "preprocessing": dataclasses.asdict(preprocessing)}
    try:
        entry = image_cache.build_entry(
            root, name, index, lambda target: _decode_to_file(source, indices, preprocessing, progress, target))
    except OSError as err:
        warnings.warn(f"cannot use the image cache folder {root} ({err}); decoding without the cache (set "
                      "CLEBENCH_CACHE to a writable folder, or pass cache=False / --no-cache)", stacklevel=3)
        return None
    return entry.images, entry.index


def load_images(dataset: str, split: str | os.PathLike, root: str | os.PathLike | None,
                preprocessing: Preprocessing, *, limit: int | None = None, seed: int | None = None,
                download: bool = False, skip_unreadable: bool = False, wnid_to_idx: WnidMap | None = None,
                classes: Classes | None = None, progress: bool = True, cache: bool = True,
                cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """Decode a data set split (or a class-balanced subset of it), or map its decoded copy from the image cache.

    dataset, split: see the module docstring; root: data folder (None: env CLEBENCH_DATA), for imagefolder the
        data set's own folder.
    preprocessing: resize and crop applied now; its mean/std are applied later by ``batches``.
    limit: keep ``balanced_subset(labels, limit, seed)`` (the first files per class unless ``seed`` is given);
        None keeps every image (``seed`` then changes nothing).
    download: let torchvision fetch cifar10 / cifar100 / imagenette when they are not under ``root``.
    skip_unreadable: leave undecodable files out (listed in ``ImageSet.skipped``) instead of raising.
    wnid_to_idx: wnid -> ImageNet-1k index (JSON file or dict) for imagenet / imagenette.
    classes: imagefolder's folder -> output index (``clebench.data.classes``; None: sorted folder order of ``split``).
    cache: map the decoded images from the on-disk cache (``clebench.data.image_cache``), decoding them into it first if
        they are not there; False decodes into a temporary file instead. Either way ``images`` maps a file
        (copy-on-write), so a large set stays out of anonymous memory. cache_dir: the cache folder (default: env
        CLEBENCH_CACHE, else ~/.cache/clebench).
    """
    if dataset not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(_DATASETS)}")
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a clebench.models.Preprocessing, got {type(preprocessing).__name__}")
    if dataset == "imagefolder":
        source = _imagefolder_source(split, Path(root) if root is not None else data_root(None), classes)
    else:
        source = _named_source(dataset, split, data_root(root, create=download), download, wnid_to_idx)
    if source.ignored:
        warnings.warn(f"ignored {len(source.ignored)} files of {source.name} that are not images "
                      f"({', '.join(_IMAGE_EXTENSIONS)}): {', '.join(source.ignored[:_MAX_LISTED])}", stacklevel=2)
    indices = list(range(len(source.files))) if limit is None else balanced_subset(source.labels, limit, seed)
    decoded = _decode_cached(source, indices, preprocessing, progress, cache_dir) if cache else None
    images, fields = decoded or _decode_uncached(source, indices, preprocessing, progress)
    skipped = [f"{file} ({error})" for file, error in fields["skipped"].items()]
    if skipped and not skip_unreadable:
        raise DatasetError(
            f"{len(skipped)} of {len(indices)} images of {source.name} cannot be decoded: "
            f"{'; '.join(skipped[:_MAX_LISTED])}; fix or delete them, or pass skip_unreadable=True (config: "
            "data.skip_unreadable = true) to leave them out"
        )
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable images of {source.name}: "
                      f"{'; '.join(skipped[:_MAX_LISTED])}", stacklevel=2)
    return ImageSet(
        images=torch.from_numpy(images),  # shares the (copy-on-write) file mapping: nothing is copied
        labels=torch.tensor(fields["labels"], dtype=torch.int64),
        files=fields["files"],
        name=source.name,
        label_space=source.label_space,
        converted=fields["converted"],
        skipped=list(fields["skipped"]),
        ignored=source.ignored,
    )


def _named_source(dataset: str, split: str | os.PathLike, root: Path, download: bool,
                  wnid_to_idx: WnidMap | None) -> _Source:
    """The source of a built-in data set (all but imagefolder) under the data root ``root``."""
    if dataset in _CIFAR:
        return _cifar_source(dataset, split, root, download)
    if dataset == "imagenet":
        return _imagenet_source(split, root, wnid_to_idx)
    return _imagenette_source(split, root, download, wnid_to_idx)


def to_device(image_set: ImageSet, device: str | torch.device, *, max_fraction: float = 0.5) -> ImageSet:
    """``image_set`` with its uint8 images and labels moved to ``device`` once, if they fit, else unchanged.

    They fit on a CUDA device when they take at most ``max_fraction`` of its free memory; ``batches`` then slices
    them on the device. A CPU device, or a set that does not fit, is returned as it is (``batches`` streams it from
    the file mapping through pinned memory). Call it once per sweep, not per evaluation.
    """
    device = torch.device(device)
    if device.type != "cuda" or image_set.images.device == device:
        return image_set
    free, _ = torch.cuda.mem_get_info(device)
    if image_set.images.nbytes > max_fraction * free:
        return image_set
    images = torch.empty(image_set.images.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(images), _RESIDENT_CHUNK):  # through the file mapping, a chunk at a time
        images[start:start + _RESIDENT_CHUNK].copy_(image_set.images[start:start + _RESIDENT_CHUNK])
    return dataclasses.replace(image_set, images=images, labels=image_set.labels.to(device))


def batches(image_set: ImageSet, batch_size: int, preprocessing: Preprocessing,
            device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 [B, 3, H, W] normalised with preprocessing.mean/std, int64 labels [B]) on ``device``, in order.

    Images are normalised per batch on ``device``; they come from slices of ``image_set.images`` (the file
    mapping, or the device after ``to_device``), or on CUDA from CPU images through two pinned buffers whose
    copies overlap compute. Arguments are checked now, not at the first batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    height, width = image_set.images.shape[-2:]
    if (height, width) != preprocessing.crop_size:
        raise ValueError(
            f"{image_set.name} images are {height}x{width} but the preprocessing crops "
            f"{'x'.join(map(str, preprocessing.crop_size))}: "
            "load the images with the model's preprocessing"
        )
    device = torch.device(device)
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
    staged = device.type == "cuda" and image_set.images.device.type == "cpu"
    raw = (_staged(image_set.images, image_set.labels, batch_size, device) if staged
           else _slices(image_set.images, image_set.labels, batch_size, device))
    return ((images.float().div_(255).sub_(mean).div_(std), labels) for images, labels in raw)


def _slices(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)


def _staged(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of CPU ``images`` copied to ``device`` through two buffers, batch k+1 staged before k is yielded.

    On CUDA the buffers are pinned and the host-to-device copy runs on a side stream, so it overlaps the compute
    on batch k; an event per buffer keeps a buffer from being refilled before its copy finished. Elsewhere the
    same double buffering runs with plain copies (which is what the CPU tests exercise).
    """
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    buffers = [torch.empty((batch_size, *images.shape[1:]), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied: list = [None, None]  # per buffer: the event marking its last copy to the device
    labels = labels.to(device)
    starts = range(0, len(images), batch_size)

    def stage(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, slot = starts[k], k % 2
        count = min(batch_size, len(images) - start)
        if copied[slot] is not None:
            copied[slot].synchronize()
        buffer = buffers[slot][:count]
        buffer.copy_(images[start:start + count])
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            on_device = buffer.to(device, non_blocking=cuda, copy=True)
        if cuda:
            copied[slot] = torch.cuda.Event()
            copied[slot].record(stream)
        return on_device, labels[start:start + count]

    pending = stage(0) if starts else None
    for k in range(len(starts)):
        batch, batch_labels = pending
        if cuda:
            torch.cuda.current_stream(device).wait_event(copied[k % 2])
            batch.record_stream(torch.cuda.current_stream(device))
        if k + 1 < len(starts):
            pending = stage(k + 1)
        yield batch, batch_labels
