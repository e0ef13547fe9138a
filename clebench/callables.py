"""User code named in a config: "module:attr" (an importable module) or "file.py:attr" (a Python file).

A file is relative to `base_dir` (a config's folder), and `base_dir` goes on the import path, so the user's code
imports its neighbours. A file is loaded once per process and content, under a name derived from both.
`callable_source` says where the code lives and the sha256 of that file, which configs hash and meta.json records.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from clebench.errors import UserError


class CallableError(UserError):
    """A "module:attr" / "file.py:attr" reference that does not name a callable."""


def split_spec(spec: str, where: str) -> tuple[str, str]:
    """'pkg.mod:fn' -> ('pkg.mod', 'fn'); CallableError unless both parts are there."""
    module, _, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not module or not attr:
        raise CallableError(f'{where} must be "module:callable" or "file.py:callable", got {spec!r}')
    return module, attr


def is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _file_path(module: str, base_dir: Path | None) -> Path:
    path = Path(module).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _on_import_path(base_dir: Path | None) -> None:
    folder = str(Path(base_dir if base_dir is not None else Path.cwd()).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_file(module: str, base_dir: Path | None, where: str) -> Path | None:
    """The file that defines `module` (a file spec, or an importable module's source; None for one without a file),
    without running it; CallableError if there is none."""
    _on_import_path(base_dir)
    if is_file(module):
        path = _file_path(module, base_dir).resolve()
        if not path.is_file():
            raise CallableError(f"{where}: file {path} does not exist")
        return path
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as error:
        raise CallableError(f"{where}: cannot import {module!r}: {error}") from None
    if found is None:
        raise CallableError(f"{where}: no module named {module!r} (searched the import path and {base_dir})")
    return Path(found.origin) if found.origin and Path(found.origin).is_file() else None


def callable_source(spec: str, base_dir: Path | None, where: str) -> dict[str, str | None]:
    """{"module", "file", "sha256"} of the code `spec` names: the module name (None for a file), its file, and the
    sha256 of that file's bytes (None where the module has no file)."""
    module, _ = split_spec(spec, where)
    path = module_file(module, base_dir, where)
    return {"module": None if is_file(module) else module, "file": None if path is None else str(path),
            "sha256": None if path is None else sha256_of(path)}


def _load_file(path: Path, where: str) -> ModuleType:
    """The module of file `path`, run once per process and content (an edited file is loaded anew)."""
    identity = hashlib.sha1(f"{path}|{sha256_of(path)}".encode()).hexdigest()[:12]
    name = f"clebench_user_{path.stem}_{identity}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its classes then pickle, and a self-import finds it
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise CallableError(f"{where}: running {path} raised {type(error).__name__}: {error}") from None
    return module


def _import(module: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise CallableError(f"{where}: cannot import {module!r}: {error}") from None
    except Exception as error:
        raise CallableError(f"{where}: importing {module!r} raised {type(error).__name__}: {error}") from None


def load_callable(spec: str, base_dir: Path | None, where: str) -> Callable:
    """The callable `spec` names ("module:attr" or "file.py:attr", attr may be dotted); CallableError naming `where`
    when the module, the file or the attribute is missing, or is not callable."""
    module_name, attr = split_spec(spec, where)
    _on_import_path(base_dir)
    if is_file(module_name):
        module = _load_file(module_file(module_name, base_dir, where), where)
    else:
        module = _import(module_name, where)
    value = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise CallableError(f"{where}: {module_name} has no attribute {attr!r}")
        value = getattr(value, part)
    if not callable(value):
        raise CallableError(f"{where}: {spec} is a {type(value).__name__}, not a callable")
    return value
