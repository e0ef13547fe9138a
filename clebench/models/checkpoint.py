"""Reading state_dict files with errors that name the file and say what is wrong with it."""
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from clebench.errors import UserError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "sha256_file", "load_state_dict", "load_weights"]

_MAX_LISTED = 5
_MAX_REASON = 120


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


def load_state_dict(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state_dict saved with torch.save, on CPU, with ``weights_only=True``.

    sha256: expected hex digest of the file, or a prefix of it (torch hub file names carry one).
    Raises CheckpointNotFoundError if the file is missing, CheckpointError if its hash differs, it cannot
    be unpickled (truncated, corrupted, not a torch file) or it is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    if sha256 is not None:
        actual = sha256_file(path)
        if not actual.startswith(sha256.lower()):
            raise CheckpointError(
                f"checkpoint {path} has sha256 {actual}, expected {sha256}: the file is corrupted or is a "
                "different checkpoint; replace it with the published file (a checkpoint of your own goes in "
                "checkpoint= / --checkpoint, which skips this check)"
            )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        reason = (str(err).strip().splitlines() or [""])[0][:_MAX_REASON]
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); the file is truncated, "
            "corrupted or not a PyTorch state_dict: copy or download it again"
        ) from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state_dict).__name__}, not a state_dict (a mapping of parameter "
            "names to tensors); save it with torch.save(model.state_dict(), path)"
        )
    return dict(state_dict)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"{shown}, ..." if len(keys) > _MAX_LISTED else shown


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 architecture: str) -> nn.Module:
    """Strictly load ``state_dict`` (read from ``path``) into ``model``; CheckpointError if it does not fit.

    The error lists a few missing keys, unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
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
