"""A sweep from Python (notebooks, tests): `benchmark(config, models=..., datasets=...)` returns the results table.

The sweep is `clebench sweep`'s (clebench.sweep.run.run_sweep), and the table is its results.csv as pd.read_csv reads
it back, so a config gives the same frame from either. What the CLI cannot take is allowed here:

* models={name: nn.Module or a callable returning one}: the config's models entry of that name (created if the config
  has no `models`) uses the object instead of a registry name or a factory; the callable is called once. The config
  hash records the model's class and fingerprint (clebench.sweep.execute.fingerprint), so other weights give another
  hash and `clebench check` sees the change. Like a factory's, the object's optional `preprocessing` and
  `label_space` attributes say what its inputs are; without them the data set's default preprocessing applies and
  the model's outputs must cover the labels.
* datasets={"eval": Dataset, "calibration": Dataset}: map-style torch data sets of (image, label) items, the image a
  PIL image or a uint8 [C, H, W] tensor (a float tensor only if it is ToTensor's pixels / 255 exactly), the label the
  model's output index. They replace [data]'s files (its limit, calibration, batch_size, seed and preprocess still
  apply; the rows' dataset is "torch"); images are resized and cropped by the preprocessing as files are, and are
  not put in the image cache. The hash records each data set's class, length, labels and a few images' pixels.

Objects cannot travel to Ray workers, so [execution] ray with models= or datasets= is refused.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from clebench.data.datasets import ImageSet, balanced_subset
from clebench.data.decode import decode_image
from clebench.errors import UserError
from clebench.models import Preprocessing
from clebench.models.sources import InMemoryModel
from clebench.sweep import results
from clebench.sweep.config import SweepConfig, parse_config, read_config_file
from clebench.sweep.execute import fingerprint
from clebench.sweep.run import run_sweep

__all__ = ["ApiError", "InMemoryData", "TORCH_DATASET", "benchmark", "build_config"]

TORCH_DATASET = "torch"  # the rows' dataset when the images come from datasets=
SPLITS = ("eval", "calibration")
HASHED_SAMPLES = 8  # images per data set whose pixels the config hash covers (evenly spaced)
# [data] keys that name files, which datasets= replaces
_FILE_KEYS = ("dataset", "eval_split", "calibration_split", "download", "root", "classes", "skip_unreadable")

ModelGiven = nn.Module | Callable[[], nn.Module]


class ApiError(UserError):
    """A benchmark() argument that cannot run: an unknown model name, an object that is not a model, a data set
    item that is not (image, label)."""


def benchmark(config: Mapping[str, Any] | str | Path, *, models: Mapping[str, ModelGiven] | None = None,
              datasets: Mapping[str, Any] | None = None, out: str | Path | None = None,
              base_dir: str | Path | None = None, input_size: Sequence[int] | None = None,
              data_root: str | Path | None = None, models_dir: str | Path | None = None, device: str = "cpu",
              progress: bool = False, cache: bool = True) -> pd.DataFrame:
    """Run the sweep of `config` and return its results table (results.csv as pd.read_csv reads it).

    config: a TOML file, or a dict as tomllib parses one; a dict's relative paths are relative to `base_dir`
        (default: the working directory), a file's to its folder.
    models, datasets: Python objects for the sweep (module docstring). input_size: [C, H, W] of the in-memory
        models whose entry gives none.
    out: the results folder (re-running resumes it, as the CLI does); None: a temporary folder, deleted once read.
    data_root, models_dir, device, cache: as `clebench sweep`'s --data-root, --models-dir, --device, --no-cache.
    progress: progress bars (off by default: a notebook cell stays readable).
    """
    parsed = build_config(config, models=models, datasets=datasets, base_dir=base_dir, input_size=input_size)
    path = None if isinstance(config, Mapping) else Path(config)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="clebench-") as scratch:
            return _run(parsed, Path(scratch), path, data_root, models_dir, device, progress, cache)
    return _run(parsed, Path(out), path, data_root, models_dir, device, progress, cache)


def _run(config: SweepConfig, out: Path, path: Path | None, data_root: str | Path | None,
         models_dir: str | Path | None, device: str, progress: bool, cache: bool) -> pd.DataFrame:
    run_sweep(config, out, data_root=data_root, models_dir=models_dir, device=device, progress=progress, cache=cache)
    if path is not None:
        (out / "config.toml").write_text(path.read_text())  # as the CLI keeps it
    return pd.read_csv(out / results.RESULTS_FILE)


def build_config(config: Mapping[str, Any] | str | Path, *, models: Mapping[str, ModelGiven] | None = None,
                 datasets: Mapping[str, Any] | None = None, base_dir: str | Path | None = None,
                 input_size: Sequence[int] | None = None) -> SweepConfig:
    """The validated SweepConfig that benchmark() runs (arguments as there), the in-memory models and data sets in
    its specs; its `.hash` is the results' config_hash."""
    path = None if isinstance(config, Mapping) else Path(config)
    raw = dict(config) if path is None else read_config_file(path)
    models = dict(models or {})
    raw = _with_model_entries(raw, models, input_size)
    data = None if datasets is None else InMemoryData(datasets)
    if data is not None:
        raw = {**raw, "data": _data_table(raw.get("data", {}))}
    config = parse_config(raw, str(path or "config"), base_dir if path is None else path.resolve().parent)
    if config.execution.ray is not None and (models or data):
        raise ApiError("execution.ray: in-memory models and data sets cannot travel to Ray workers; run without "
                       'ray, or give the model as factory = "file.py:fn" and the images as an imagefolder')
    built = {name: _in_memory_model(name, given) for name, given in models.items()}
    config = replace(config, models=tuple(replace(spec, in_memory=built[spec.name]) if spec.name in built else spec
                                          for spec in config.models))
    if data is None:
        return config
    return replace(config, data=replace(config.data, dataset=TORCH_DATASET, eval_split=SPLITS[0],
                                        calibration_split=SPLITS[1], in_memory=data))


def _with_model_entries(raw: dict[str, Any], models: dict[str, ModelGiven],
                        input_size: Sequence[int] | None) -> dict[str, Any]:
    """`raw` with an entry per in-memory model (created where the config has no `models`), given `input_size`."""
    entries = raw.get("models", list(models))
    if not isinstance(entries, list):
        return raw  # parse_config says what a models list is
    entries = [{"name": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else entry
               for entry in entries]  # copies: the caller's config stays as it is
    names = [entry.get("name") for entry in entries if isinstance(entry, dict)]
    for name in models:
        if name not in names:
            raise ApiError(f"models={{{name!r}: ...}}: the config has no model {name!r} (its models: "
                           f"{', '.join(map(str, names))}); name one of them, or leave `models` out of the config")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") in models:
            _check_entry(entry)
            if input_size is not None:
                entry.setdefault("input_size", list(input_size))
    return {**raw, "models": entries}


def _check_entry(entry: dict[str, Any]) -> None:
    """An in-memory model's entry may not also say how to build it."""
    building = sorted({"factory", "kwargs", "pretrained", "full_model"} & set(entry))
    if building:
        raise ApiError(f"models.{entry['name']}: given in models=, so it takes no {', '.join(building)}; remove "
                       "them from the entry or the model from models=")


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _in_memory_model(name: str, given: ModelGiven) -> InMemoryModel:
    """The model of `given` (called once if it is a callable) with its identity."""
    module = given
    if not isinstance(given, nn.Module):
        if not callable(given):
            raise ApiError(f"models[{name!r}] is a {type(given).__name__}, not an nn.Module or a callable "
                           "returning one")
        try:
            module = given()
        except Exception as error:
            message = (str(error).strip().splitlines() or [""])[0]
            raise ApiError(f"models[{name!r}]() raised {type(error).__name__}: {message}") from None
        if not isinstance(module, nn.Module):
            raise ApiError(f"models[{name!r}]() returned a {type(module).__name__}, not an nn.Module")
    return InMemoryModel(given, module, {"class": _qualified(type(module)), "fingerprint": fingerprint(module)})


def _data_table(table: Any) -> dict[str, Any]:
    """[data] for datasets=: no keys that name files; the others are validated as for any data set (through a
    stand-in dataset name that build_config replaces)."""
    if not isinstance(table, dict):
        raise ApiError("[data] must be a table")
    named = [key for key in _FILE_KEYS if key in table]
    if named:
        raise ApiError(f"data.{named[0]}: the images come from datasets=; remove "
                       f"{', '.join('data.' + key for key in named)} from the config")
    return {**table, "dataset": "cifar10"}


class InMemoryData:
    """The torch data sets of datasets=, in the DataSpec: the labels, identity and image sets the sweep asks for.
    Shared, never copied (dataclasses.asdict keeps it)."""

    def __init__(self, datasets: Any) -> None:
        if not isinstance(datasets, Mapping) or sorted(datasets) != sorted(SPLITS):
            keys = sorted(datasets) if isinstance(datasets, Mapping) else type(datasets).__name__
            raise ApiError(f"datasets= takes {{'eval': Dataset, 'calibration': Dataset}}, got {keys}")
        self.splits = {split: _TorchImages.of(datasets[split], f"datasets[{split!r}]") for split in SPLITS}
        self.identity = {split: images.identity() for split, images in self.splits.items()}
        self.outputs_needed = max(max(images.labels) for images in self.splits.values()) + 1

    def __deepcopy__(self, memo: dict) -> InMemoryData:
        return self

    def image_set(self, split: str, limit: int | None, seed: int | None, preprocessing: Preprocessing) -> ImageSet:
        """`limit` class-balanced images of `split` (all: None), resized and cropped, in class order (as
        clebench.data.datasets.load_images selects and orders files)."""
        return self.splits[split].image_set(split, limit, seed, preprocessing)


@dataclass(frozen=True)
class _TorchImages:
    """One torch data set and its labels (from its `targets` where it has them, as torchvision's do)."""

    dataset: Any
    where: str
    labels: list[int]

    @classmethod
    def of(cls, dataset: Any, where: str) -> _TorchImages:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ApiError(f"{where} is a {type(dataset).__name__}; give a map-style torch Dataset "
                           "(__len__ and __getitem__)")
        if len(dataset) == 0:
            raise ApiError(f"{where} is empty")
        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) == len(dataset):
            labels = [_label(value, f"{where}.targets[{index}]") for index, value in enumerate(targets)]
        else:
            labels = [_item(dataset, index, where)[1] for index in range(len(dataset))]
        return cls(dataset, where, labels)

    def item(self, index: int) -> tuple[Image.Image, int]:
        """Item `index` as (PIL image, label), its label checked against `labels`."""
        image, label = _item(self.dataset, index, self.where)
        if label != self.labels[index]:
            raise ApiError(f"{self.where}[{index}] has label {label} but its targets say {self.labels[index]}")
        return _pil(image, f"{self.where}[{index}]"), label

    def identity(self) -> dict[str, Any]:
        """Class, length, and a sha256 of every label and of the pixels of HASHED_SAMPLES evenly spaced images."""
        digest = hashlib.sha256(json.dumps(self.labels).encode())
        count = len(self.labels)
        for index in sorted({k * (count - 1) // max(HASHED_SAMPLES - 1, 1) for k in range(HASHED_SAMPLES)}):
            image = self.item(index)[0]
            digest.update(f"{image.mode} {image.size}".encode())
            digest.update(image.tobytes())
        return {"class": _qualified(type(self.dataset)), "length": count, "sha256": digest.hexdigest()[:16]}

    def image_set(self, split: str, limit: int | None, seed: int | None, preprocessing: Preprocessing) -> ImageSet:
        chosen = range(len(self.labels)) if limit is None else balanced_subset(self.labels, limit, seed)
        chosen = sorted(chosen, key=lambda index: (self.labels[index], index))
        decoded = [self._decode(index, preprocessing) for index in chosen]
        pixels = np.ascontiguousarray(np.stack([image for image, _ in decoded]))  # NCHW, as load_images: a
        # channels-last stack (what stacking decode's transposed views gives) would change the convolutions' sums
        return ImageSet(images=torch.from_numpy(pixels),
                        labels=torch.tensor([self.labels[index] for index in chosen], dtype=torch.int64),
                        files=[f"{split}[{index}]" for index in chosen], name=f"{TORCH_DATASET}/{split}",
                        label_space=TORCH_DATASET,
                        converted=[f"{split}[{index}]" for index, (_, mode) in zip(chosen, decoded) if mode])

    def _decode(self, index: int, preprocessing: Preprocessing) -> tuple[np.ndarray, bool]:
        """uint8 [3, H, W] of item `index`, resized and cropped as a file is (clebench.data.decode), and whether it
        was converted from another mode than RGB."""
        image = self.item(index)[0]
        pixels, converted, error = decode_image(lambda: image, preprocessing)
        if error:
            raise ApiError(f"{self.where}[{index}]: {error}")
        return pixels, converted


def _item(dataset: Any, index: int, where: str) -> tuple[Any, int]:
    item = dataset[index]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        kind = (f"a {len(item)}-item {type(item).__name__}" if isinstance(item, (tuple, list))
                else type(item).__name__)
        raise ApiError(f"{where}[{index}] is {kind}, not an (image, label) pair")
    return item[0], _label(item[1], f"{where}[{index}]")


def _label(value: Any, where: str) -> int:
    """An output index: an int (or an integer 0-d tensor / numpy integer) >= 0."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ApiError(f"{where}: the label is {value!r}; give the model's output index, an int >= 0")
    return int(value)


def _pil(image: Any, where: str) -> Image.Image:
    """A PIL image, or a [C, H, W] tensor (C = 1 or 3) of uint8 pixels or ToTensor's pixels / 255, as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if not (isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] in (1, 3)):
        kind = f"a {list(image.shape)} tensor" if isinstance(image, torch.Tensor) else f"a {type(image).__name__}"
        raise ApiError(f"{where}: the image is {kind}; give a PIL image or a uint8 [C, H, W] tensor (C = 1 or 3)")
    if image.is_floating_point():
        image = _pixels(image, where)
    elif image.dtype != torch.uint8:
        raise ApiError(f"{where}: the image tensor is {image.dtype}; give uint8 pixels (or a PIL image)")
    array = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _pixels(image: torch.Tensor, where: str) -> torch.Tensor:
    """The uint8 pixels of ToTensor's output (pixels / 255), exactly; any other float image is refused, as the sweep
    cannot tell how it was normalised."""
    scaled = image.detach().double() * 255
    pixels = scaled.round()
    if pixels.min() < 0 or pixels.max() > 255 or (scaled - pixels).abs().max() > 1e-3:
        raise ApiError(f"{where}: a float image that is not ToTensor's pixels / 255 (normalised, or resampled?) "
                       "cannot be turned back into the pixels the sweep normalises itself; give PIL images or uint8 "
                       "tensors (drop Normalize from the transform) and set mean and std in [data.preprocess]")
    return pixels.to(torch.uint8)
