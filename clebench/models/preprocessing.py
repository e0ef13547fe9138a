"""What the data pipeline must do to an image before a given model sees it, and how a config overrides it.

``Preprocessing`` is resize -> center crop -> scale to [0, 1] -> normalise. A config's ``preprocess`` table
(``[data.preprocess]``, a ``[[models]]`` entry's ``preprocess``) is checked by ``parse_preprocess`` and laid over a
model's default by ``resolve_preprocessing``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clebench.errors import UserError

__all__ = ["Preprocessing", "PreprocessingError", "CIFAR10_PREPROCESSING", "IMAGENET_PREPROCESSING",
           "parse_preprocess", "resolve_preprocessing"]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
PREPROCESS_KEYS = ("resize", "crop", "crop_pct", "interpolation", "mean", "std")

Size = int | tuple[int, int]  # an int: the shorter side (resize) or a square (crop); a pair: [height, width]


class PreprocessingError(UserError):
    """Preprocessing values that cannot be applied (the message names the value and the fix)."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize -> center-crop -> scale to [0, 1] -> normalise per channel.

    resize: the shorter side in pixels (aspect kept), or (height, width); None = derived from crop_pct if given,
        else keep the size.
    crop: center-crop size in pixels, square (int) or (height, width); a square pair is stored as an int.
    mean, std: per RGB channel, on [0, 1]-scaled values.
    interpolation: resize filter, one of "nearest", "bilinear", "bicubic" (PIL, antialiased).
    crop_pct: timm's crop fraction: resize the shorter side to floor(crop / crop_pct) (square crop only; at most one
        of resize and crop_pct).
    """

    resize: Size | None
    crop: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        name = "Preprocessing."
        object.__setattr__(self, "resize", None if self.resize is None else _size(self.resize, name + "resize"))
        crop = _size(self.crop, name + "crop")
        object.__setattr__(self, "crop", crop[0] if isinstance(crop, tuple) and crop[0] == crop[1] else crop)
        object.__setattr__(self, "mean", _channels(self.mean, name + "mean"))
        object.__setattr__(self, "std", _channels(self.std, name + "std"))
        _interpolation(self.interpolation, name + "interpolation")
        if self.crop_pct is not None:
            _crop_pct(self.crop_pct, name + "crop_pct")
            if self.resize is not None:
                raise PreprocessingError(f"Preprocessing: give resize ({self.resize}) or crop_pct ({self.crop_pct}), "
                                         "not both")
            if isinstance(self.crop, tuple):
                raise PreprocessingError(f"Preprocessing: crop_pct needs a square crop, got {list(self.crop)}; give "
                                         "resize instead")
        self._check_crop_fits()

    def _check_crop_fits(self) -> None:
        resize = self.resize_size
        if resize is None:
            return
        bounds = (resize, resize) if isinstance(resize, int) else resize
        if any(c > r for c, r in zip(self.crop_size, bounds)):
            described = f"shorter side {resize}" if isinstance(resize, int) else f"{resize[0]}x{resize[1]}"
            raise PreprocessingError(
                f"crop {_text(self.crop)} is larger than the resized image ({described}); lower crop or raise resize")

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the images after the crop, in pixels."""
        return self.crop if isinstance(self.crop, tuple) else (self.crop, self.crop)

    @property
    def resize_size(self) -> Size | None:
        """The resize applied: the shorter side (int), (height, width), or None (keep the size)."""
        if self.crop_pct is not None:
            return math.floor(self.crop / self.crop_pct)
        return self.resize

    def to_dict(self) -> dict[str, Any]:
        """The fields, JSON-ready (pairs and triples as lists): ``Preprocessing(**p.to_dict()) == p``."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """One line for reports, e.g. "resize 256 (shorter side), crop 224, bilinear, mean (...), std (...)"."""
        resize = self.resize_size
        if resize is None:
            scaling = "no resize"
        else:
            scaling = f"resize {_text(resize)}{' (shorter side)' if isinstance(resize, int) else ''}"
            scaling += f" from crop_pct {self.crop_pct:g}" if self.crop_pct is not None else ""
        return ", ".join([scaling, f"crop {_text(self.crop)}", self.interpolation, f"mean {_numbers(self.mean)}",
                          f"std {_numbers(self.std)}"])


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _text(size: Size) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


def _size(value: Any, where: str) -> Size:
    """``value`` (a positive int or a pair of them) as an int or a (height, width) tuple."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive(v) for v in value):
        return int(value[0]), int(value[1])
    if _positive(value):
        return int(value)
    raise PreprocessingError(f"{where} must be a positive pixel count or [height, width], got {value!r}")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _crop_pct(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PreprocessingError(f"{where} must be a number in (0, 1] (timm's crop fraction), got {value!r}")
    return float(value)


def _interpolation(value: Any, where: str) -> str:
    if value not in _INTERPOLATIONS:
        raise PreprocessingError(f"{where} must be one of {', '.join(_INTERPOLATIONS)}, got {value!r}")
    return value


def _channels(value: Any, where: str) -> tuple[float, float, float]:
    """``value`` (3 numbers, R, G, B; a std's positive) as a tuple of floats."""
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise PreprocessingError(f"{where} must be 3 values (R, G, B on the [0, 1] scale), got {value!r}")
    if where.endswith("std") and min(value) <= 0:
        raise PreprocessingError(f"{where} must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def parse_preprocess(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A config's preprocess table, checked: {key: value} of the keys it sets, pairs and triples as tuples.

    Keys: resize (shorter side, or [h, w]), crop (int or [h, w]), crop_pct (in (0, 1]; not with resize),
    interpolation, mean, std (3 numbers each). Errors are one line naming ``where.key``.
    """
    if not isinstance(table, Mapping):
        raise PreprocessingError(f"{where} must be a table of {', '.join(PREPROCESS_KEYS)}, got {table!r}")
    unknown = sorted(set(table) - set(PREPROCESS_KEYS))
    if unknown:
        raise PreprocessingError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {where}; "
            f"allowed: {', '.join(PREPROCESS_KEYS)}")
    if "resize" in table and "crop_pct" in table:
        raise PreprocessingError(f"{where}: give resize or crop_pct, not both (crop_pct sets resize = crop / crop_pct)")
    parsed = {}
    for key, value in table.items():
        parsed[key] = _PARSERS[key](value, f"{where}.{key}")
    return parsed


_PARSERS = {"resize": _size, "crop": _size, "crop_pct": _crop_pct, "interpolation": _interpolation,
            "mean": _channels, "std": _channels}


def resolve_preprocessing(default: Preprocessing | None, *overrides: Mapping[str, Any] | None) -> Preprocessing:
    """``default`` with each override (a ``parse_preprocess`` dict, or None) laid over it in turn; later ones win.

    An override that sets resize without crop_pct drops an inherited crop_pct, and one that sets crop_pct without
    resize drops an inherited resize; one setting only crop keeps the inherited resize or crop_pct (so the crop
    must fit it). Without a default the overrides must give crop, mean and std. Raises PreprocessingError (one
    line) when the result cannot be applied.
    """
    names = dataclasses.fields(Preprocessing)
    if default is None:
        values = {"resize": None, **{f.name: f.default for f in names if f.default is not dataclasses.MISSING}}
    else:
        values = {f.name: getattr(default, f.name) for f in names}
    for override in overrides:
        if not override:
            continue
        if "resize" in override:
            values["crop_pct"] = None
        if "crop_pct" in override:
            values["resize"] = None
        values.update(override)
    missing = [key for key in ("crop", "mean", "std") if key not in values]
    if missing:
        raise PreprocessingError(f"no default preprocessing is known for this model: give {', '.join(missing)} "
                                 "(and resize or crop_pct) in [data.preprocess] or the models entry's preprocess")
    return Preprocessing(**values)


CIFAR10_PREPROCESSING = Preprocessing(
    resize=None, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
IMAGENET_PREPROCESSING = Preprocessing(
    resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
