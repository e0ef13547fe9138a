"""Which model output index each class folder of an ImageFolder data set stands for.

``classes`` is written one of three ways: a table {folder: index}; a list of the model's class names in output order
(folders are matched by name, so a data set may hold a subset of the model's classes); or a file holding either (a
JSON table or list, or a text file with one name per line). Without it, folders are labelled in sorted order.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clebench.errors import UserError

__all__ = ["ClassesError", "Classes", "check_classes", "read_classes_file", "class_indices"]

Classes = dict[str, int] | tuple[str, ...]  # {folder: index}, or class names in output order


class ClassesError(UserError):
    """A classes mapping that is malformed or does not cover the data set's folders."""


def check_classes(value: Any, where: str) -> Classes:
    """``value`` (a table {name: index >= 0} or a non-empty list of distinct names) as a ``Classes``."""
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in value.items()):
        return dict(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ClassesError(f"{where} lists {', '.join(map(repr, repeated[:5]))} more than once")
        return tuple(value)
    raise ClassesError(f"{where} must be a table {{folder = index}}, a list of the model's class names in output "
                       f"order, or a file holding one, got {_short(value)}")


def read_classes_file(path: Path, where: str) -> Classes:
    """The classes in ``path``: a JSON table or list (.json), else one class name per line (blank lines ignored)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ClassesError(f"{where}: cannot read {path} ({err.strerror or err})") from None
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise ClassesError(f"{where}: {path} is not valid JSON ({err})") from None
    else:
        content = [line.strip() for line in text.splitlines() if line.strip()]
    return check_classes(content, f"{where} ({path})")


def class_indices(folders: Sequence[str], classes: Classes | None, where: str) -> dict[str, int]:
    """{folder: model output index} of ``folders``; ClassesError naming the first folders ``classes`` lacks."""
    if classes is None:
        return {folder: index for index, folder in enumerate(sorted(folders))}
    indices = classes if isinstance(classes, dict) else {name: index for index, name in enumerate(classes)}
    missing = [folder for folder in folders if folder not in indices]
    if missing:
        raise ClassesError(f"folder{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing[:5]))}"
                           f"{' ...' if len(missing) > 5 else ''} of {where} not in data.classes; add "
                           f"{'them' if len(missing) > 1 else 'it'} (or rename the folder)")
    return {folder: indices[folder] for folder in folders}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
