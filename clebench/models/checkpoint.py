"""Reading checkpoint files as people have them, with errors that name the file and say what is wrong with it.

A checkpoint is a bare state_dict, or one wrapped under a usual key (WRAPPER_KEYS: what training scripts save beside
the epoch and optimizer), from ``torch.save`` (always read with ``weights_only=True``) or a ``.safetensors`` file.
Prefixes that wrappers add to every key (``module.`` from DataParallel / DDP, ``_orig_mod.`` from torch.compile) are
stripped when the model has none. A pickled whole model is read only by `load_pickled_model`, which runs the file's
code: callers use it only where the user says so explicitly.
"""
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from clebench.errors import MissingExtraError, UserError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "WRAPPER_KEYS", "sha256_file", "load_state_dict",
           "load_pickled_model", "load_weights"]

_MAX_LISTED = 5
_MAX_REASON = 120
# Keys a state_dict is wrapped under, in the order they are tried: the trained weights before EMA copies (as timm's
# validate.py does without --use-ema), which are used only when a file holds nothing else.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema", "ema")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_PICKLED = "Weights only load failed"  # how torch.load(weights_only=True) refuses a file that needs arbitrary code


class CheckpointError(UserError):
    """A checkpoint file is unreadable, has the wrong sha256 or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file does not exist (also a FileNotFoundError)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    return path


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:_MAX_REASON]}"


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} cannot be read ({_reason(err)}); the file is truncated, corrupted or not a PyTorch "
        "state_dict: copy or download it again"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingExtraError(f'checkpoint {path} is a .safetensors file: pip install -e ".[safetensors]"') from None
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises SafetensorError, OSError, ... depending on the damage
        raise _unreadable(path, err) from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        if _PICKLED in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, not only tensors (a whole model saved with "
                "torch.save(model)?); clebench reads it with weights_only=True and will not run its code: save "
                "model.state_dict() instead, or, if you trust the file, set full_model = true in its [[models]] entry"
            ) from None
        raise _unreadable(path, err) from None


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrapped(content: object, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in what a checkpoint file holds: itself, or under the first of WRAPPER_KEYS it has."""
    if _is_state_dict(content):
        return dict(content)
    if isinstance(content, Mapping):
        key = next((k for k in WRAPPER_KEYS if isinstance(content.get(k), Mapping)), None)
        if key is not None:
            return _unwrapped(content[key], path)
        raise CheckpointError(
            f"checkpoint {path} holds a dict with keys {_listed([str(k) for k in content])} but no state_dict under "
            f"any of {', '.join(WRAPPER_KEYS)}; save the model's state_dict() under one of them, or alone"
        )
    raise CheckpointError(
        f"checkpoint {path} holds a {type(content).__name__}, not a state_dict (a mapping of parameter "
        "names to tensors); save it with torch.save(model.state_dict(), path)"
    )


def load_state_dict(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file (bare or under one of WRAPPER_KEYS; torch.save or .safetensors), on CPU.

    sha256: expected hex digest of the file, or a prefix of it (torch hub file names carry one).
    Raises CheckpointNotFoundError if the file is missing, CheckpointError if its hash differs, it cannot be read
    (truncated, corrupted, not a checkpoint, a pickled model) or it holds no state_dict.
    """
    path = _existing(path)
    if sha256 is not None:
        actual = sha256_file(path)
        if not actual.startswith(sha256.lower()):
            raise CheckpointError(
                f"checkpoint {path} has sha256 {actual}, expected {sha256}: the file is corrupted or is a "
                "different checkpoint; replace it with the published file (a checkpoint of your own goes in "
                "checkpoint= / --checkpoint, which skips this check)"
            )
    content = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return _unwrapped(content, path)


def load_pickled_model(path: str | os.PathLike) -> nn.Module:
    """A whole model saved with ``torch.save(model)``; unpickling runs code from the file, so only call this for a
    file the user has said to trust. CheckpointError if it is unreadable or holds something else."""
    path = _existing(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # besides damage: the model's class may not be importable here
        raise CheckpointError(
            f"pickled model {path} cannot be loaded ({_reason(err)}); its classes must be importable here"
        ) from None
    if not isinstance(content, nn.Module):
        raise CheckpointError(f"checkpoint {path} holds a {type(content).__name__}, not a pickled nn.Module; "
                              "drop full_model = true to read it as a state_dict")
    return content


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"{shown}, ..." if len(keys) > _MAX_LISTED else shown


def _without_wrapper_prefix(state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """`state_dict` without the DataParallel / DDP / torch.compile prefix that all its keys and none of the model's
    have (nested wrappers: each in turn)."""
    prefix = next((p for p in _KEY_PREFIXES if state_dict and all(k.startswith(p) for k in state_dict)
                   and not any(k.startswith(p) for k in expected)), None)
    if prefix is None:
        return state_dict
    return _without_wrapper_prefix({k[len(prefix):]: v for k, v in state_dict.items()}, expected)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 architecture: str) -> nn.Module:
    """Strictly load ``state_dict`` (read from ``path``) into ``model``; CheckpointError if it does not fit.

    A prefix of every key from a wrapper (``module.``, ``_orig_mod.``) is dropped where the model's keys have none.
    The error lists a few missing keys, unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    state_dict = _without_wrapper_prefix(dict(state_dict), expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {list(state_dict[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what}: {_listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the {architecture} architecture ({'; '.join(problems)}); "
            f"check that the file is a {architecture} checkpoint"
        )
    model.load_state_dict(state_dict, strict=True)
    return model
