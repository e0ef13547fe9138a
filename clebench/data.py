"""Image data sets decoded once into memory, with deterministic class-balanced subsets.

A sweep evaluates the same images many times, so ``load_images`` decodes, resizes and center-crops them once
(PIL, in a thread pool) into one uint8 tensor [N, 3, H, W]; ``batches`` normalises slices of it on the fly.

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
"""
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from clebench.models import Preprocessing

__all__ = ["ImageSet", "list_datasets", "data_root", "load_images", "batches", "balanced_subset"]

_DATASETS = ("cifar10", "cifar100", "imagenet", "imagenette")
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
_MAX_LISTED = 5

WnidMap = str | os.PathLike | Mapping[str, int]  # a JSON file ({wnid: index} or {"wnid_to_idx": {...}}) or a dict


@dataclass
class ImageSet:
    """Decoded images held in memory, in class order, then file order within a class."""

    images: torch.Tensor  # uint8 [N, 3, H, W], resized and center-cropped, not normalised
    labels: torch.Tensor  # int64 [N], in the label space of `label_space`
    files: list[str]  # N relative paths (ImageFolder) or "<batch folder>[<index>]" (binary CIFAR)
    name: str  # e.g. "cifar10/test"
    label_space: str  # "cifar10", "cifar100" or "imagenet"
    converted: list[str] = field(default_factory=list)  # files decoded from a non-RGB mode (greyscale, CMYK, ...)
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_unreadable=True)

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


def list_datasets() -> list[str]:
    """Names load_images accepts."""
    return list(_DATASETS)


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


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {folder} has no class sub-folders; expected {folder}/<class>/<image>")
    return classes


def _image_files(class_folder: Path) -> list[str]:
    files = sorted(
        p.name for p in class_folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"class folder {class_folder} holds no images ({', '.join(_IMAGE_EXTENSIONS)}); add images or remove it"
        )
    return files


def _folder_source(folder: Path, name: str, label_space: str, class_to_label: Mapping[str, int]) -> _Source:
    """ImageFolder ``folder/<class>/<image>``: files sorted by label, then by file name."""
    entries = []
    for class_folder in _class_folders(folder):
        label = class_to_label[class_folder.name]
        entries.extend((label, f"{class_folder.name}/{f}") for f in _image_files(class_folder))
    entries.sort()
    files = [f for _, f in entries]
    return _Source(name, label_space, files, [label for label, _ in entries], lambda i: Image.open(folder / files[i]))


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
                   lambda k: Image.fromarray(data.data[order[k]]))


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


def _preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, crop, crop]: shorter side resized (antialiased), then center-cropped."""
    if preprocessing.resize is not None:
        image = TF.resize(image, preprocessing.resize, interpolation=InterpolationMode(preprocessing.interpolation))
    return TF.pil_to_tensor(TF.center_crop(image, preprocessing.crop))


def _decode(source: _Source, index: int, preprocessing: Preprocessing) -> tuple[torch.Tensor | None, bool, str]:
    """(image, was it converted from a non-RGB mode, error message or "") for one file."""
    try:
        with source.open_image(index) as image:
            image.load()
            converted = image.mode != "RGB"
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for broken files
        return None, False, f"{type(err).__name__}: {err}"
    return _preprocess(rgb, preprocessing), converted, ""


def _decode_all(source: _Source, indices: list[int], preprocessing: Preprocessing,
                progress: bool) -> tuple[torch.Tensor, list[str], dict[int, str]]:
    """Decode ``indices`` of ``source`` into uint8 [len(indices), 3, crop, crop], in order.

    Also returns the files converted to RGB and {row: "file (error)"} for undecodable files (rows left empty).
    """
    images = torch.empty((len(indices), 3, preprocessing.crop, preprocessing.crop), dtype=torch.uint8)
    converted, errors = [], {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, \
            tqdm(total=len(indices), desc=f"decoding {source.name}", unit="img", disable=not progress) as bar:
        results = pool.map(lambda i: _decode(source, i, preprocessing), indices)
        for row, (index, (image, was_converted, error)) in enumerate(zip(indices, results)):
            if error:
                errors[row] = f"{source.files[index]} ({error})"
            else:
                images[row] = image
                if was_converted:
                    converted.append(source.files[index])
            bar.update()
    return images, converted, errors


def load_images(dataset: str, split: str | os.PathLike, root: str | os.PathLike | None,
                preprocessing: Preprocessing, *, limit: int | None = None, seed: int | None = None,
                download: bool = False, skip_unreadable: bool = False, wnid_to_idx: WnidMap | None = None,
                progress: bool = True) -> ImageSet:
    """Decode a data set split (or a class-balanced subset of it) into memory.

    dataset, split: see the module docstring; root: data folder (None: env CLEBENCH_DATA).
    preprocessing: resize and crop applied now; its mean/std are applied later by ``batches``.
    limit: keep ``balanced_subset(labels, limit, seed)`` (the first files per class unless ``seed`` is given);
        None keeps every image (``seed`` then changes nothing).
    download: let torchvision fetch cifar10 / cifar100 / imagenette when they are not under ``root``.
    skip_unreadable: leave undecodable files out (listed in ``ImageSet.skipped``) instead of raising.
    wnid_to_idx: wnid -> ImageNet-1k index (JSON file or dict) for imagenet / imagenette.
    """
    if dataset not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(_DATASETS)}")
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a clebench.models.Preprocessing, got {type(preprocessing).__name__}")
    root_path = data_root(root, create=download)
    if dataset in _CIFAR:
        source = _cifar_source(dataset, split, root_path, download)
    elif dataset == "imagenet":
        source = _imagenet_source(split, root_path, wnid_to_idx)
    else:
        source = _imagenette_source(split, root_path, download, wnid_to_idx)
    indices = list(range(len(source.files))) if limit is None else balanced_subset(source.labels, limit, seed)
    images, converted, errors = _decode_all(source, indices, preprocessing, progress)
    if errors and not skip_unreadable:
        listed = "; ".join(list(errors.values())[:_MAX_LISTED])
        raise ValueError(
            f"{len(errors)} of {len(indices)} images of {source.name} cannot be decoded: {listed}; fix or delete "
            "them, or pass skip_unreadable=True to leave them out"
        )
    keep = [row for row in range(len(indices)) if row not in errors]
    if errors:
        warnings.warn(f"skipped {len(errors)} unreadable images of {source.name}: "
                      f"{'; '.join(list(errors.values())[:_MAX_LISTED])}", stacklevel=2)
        images = images[keep]
    kept = [indices[row] for row in keep]
    return ImageSet(
        images=images,
        labels=torch.tensor([source.labels[i] for i in kept], dtype=torch.int64),
        files=[source.files[i] for i in kept],
        name=source.name,
        label_space=source.label_space,
        converted=converted,
        skipped=[source.files[indices[row]] for row in errors],
    )


def batches(image_set: ImageSet, batch_size: int, preprocessing: Preprocessing,
            device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 [B, 3, H, W] normalised with preprocessing.mean/std, int64 labels [B]) on ``device``, in order.

    Arguments are checked now, not at the first batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    height, width = image_set.images.shape[-2:]
    if (height, width) != (preprocessing.crop, preprocessing.crop):
        raise ValueError(
            f"{image_set.name} images are {height}x{width} but the preprocessing crops {preprocessing.crop}: "
            "load the images with the model's preprocessing"
        )
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
    return _normalised_batches(image_set, batch_size, mean, std, device)


def _normalised_batches(image_set: ImageSet, batch_size: int, mean: torch.Tensor, std: torch.Tensor,
                        device: str | torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(image_set.images), batch_size):
        images = image_set.images[start:start + batch_size].to(device, non_blocking=True)
        labels = image_set.labels[start:start + batch_size].to(device, non_blocking=True)
        yield images.float().div_(255).sub_(mean).div_(std), labels
