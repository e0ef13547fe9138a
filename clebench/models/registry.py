"""Model registry: name -> (model with weights, preprocessing, label space)."""
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .checkpoint import CheckpointNotFoundError, load_state_dict, load_weights
from .cifar import CIFAR10_BUILDERS
from .efficientnet_lite import EFFICIENTNET_LITE_PREPROCESSING, load_efficientnet_lite0
from .mobilenet_v2_tonylins import MobileNetV2
from .preprocessing import CIFAR10_PREPROCESSING, IMAGENET_PREPROCESSING, Preprocessing
from .torchvision_imagenet import load_torchvision_model, torchvision_model_names, torchvision_preprocessing

__all__ = ["list_models", "load_model", "model_preprocessing", "model_label_space", "CIFAR10_SHA256"]

# sha256 of the reference checkpoints in <CLEBENCH_MODELS>/<name>.pt (see shared/README.md).
CIFAR10_SHA256 = {
    "resnet18_cifar10": "e1cb959cac27756f872fe884b967a8d9186e3816276665baf830a810cbb1ef77",
    "mobilenet_v2_cifar10": "554fd941863ad51a1f58fe57456211ed05b538eca8957023b3f5a462f3430467",
}

_Loader = Callable[[str, Path | None, Path | None], nn.Module]  # (name, models_dir, checkpoint) -> model
# The published tonylins checkpoint has a bare Linear head; MobileNetV2 here has classifier = (Dropout, Linear).
_TONYLINS_RENAMES = {"classifier.weight": "classifier.1.weight", "classifier.bias": "classifier.1.bias"}


@dataclass(frozen=True)
class _Entry:
    load: _Loader
    preprocessing: Callable[[str], Preprocessing]
    label_space: str


def models_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder of the reference checkpoints: ``path`` if given, else env CLEBENCH_MODELS, else None."""
    if path is not None:
        return Path(path)
    env = os.environ.get("CLEBENCH_MODELS")
    return Path(env) if env else None


def _models_dir(path: Path | None) -> Path:
    found = models_dir(path)
    if found is None:
        raise CheckpointNotFoundError(
            "no models directory given: pass models_dir= (CLI: --models-dir) or set CLEBENCH_MODELS to the folder "
            "holding <name>.pt, or pass checkpoint= (CLI: --checkpoint) with the file itself"
        )
    return found


def _load_cifar10(name: str, models_dir: Path | None, checkpoint: Path | None) -> nn.Module:
    if checkpoint is not None:  # the user's own training run: no reference hash to compare with
        path, sha256 = checkpoint, None
    else:
        path, sha256 = _models_dir(models_dir) / f"{name}.pt", CIFAR10_SHA256[name]
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"checkpoint for {name!r} not found: looked for {path}; point --models-dir / models_dir= or "
                "CLEBENCH_MODELS at the folder holding it, or pass checkpoint= (CLI: --checkpoint)"
            )
    return load_weights(CIFAR10_BUILDERS[name](), load_state_dict(path, sha256=sha256), path, name)


def _load_tonylins(name: str, models_dir: Path | None, checkpoint: Path | None) -> nn.Module:
    if checkpoint is None:
        raise CheckpointNotFoundError(
            f"{name!r} needs the ImageNet checkpoint of github.com/tonylins/pytorch-mobilenet-v2 "
            "(mobilenetv2_1.0-f2a8633.pth.tar): pass its path as checkpoint= (CLI: --checkpoint)"
        )
    state_dict = {_TONYLINS_RENAMES.get(k, k): v for k, v in load_state_dict(checkpoint).items()}
    return load_weights(MobileNetV2(), state_dict, checkpoint, name)


def _load_efficientnet_lite0(name: str, models_dir: Path | None, checkpoint: Path | None) -> nn.Module:
    return load_efficientnet_lite0(checkpoint)


def _load_torchvision(name: str, models_dir: Path | None, checkpoint: Path | None) -> nn.Module:
    return load_torchvision_model(name, checkpoint)


_CUSTOM = {
    **{name: _Entry(_load_cifar10, lambda _: CIFAR10_PREPROCESSING, "cifar10") for name in CIFAR10_BUILDERS},
    "mobilenet_v2_tonylins": _Entry(_load_tonylins, lambda _: IMAGENET_PREPROCESSING, "imagenet"),
    "efficientnet_lite0": _Entry(_load_efficientnet_lite0, lambda _: EFFICIENTNET_LITE_PREPROCESSING, "imagenet"),
}
_TORCHVISION = _Entry(_load_torchvision, torchvision_preprocessing, "imagenet")


def list_models() -> list[str]:
    """All model names load_model accepts, sorted."""
    return sorted(set(_CUSTOM) | set(torchvision_model_names()))


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name in _CUSTOM:
        return _CUSTOM[name]
    if name in torchvision_model_names():
        return _TORCHVISION
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    raise ValueError(f"unknown model {name!r}; {hint}clebench.models.list_models() lists all names")


def load_model(name: str, *, models_dir: str | os.PathLike | None = None,
               checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Model ``name`` with its trained weights, in eval mode, on CPU.

    models_dir: folder of the CIFAR-10 reference checkpoints (default: env CLEBENCH_MODELS).
    checkpoint: a state_dict file to load instead of the default weights (required for
        mobilenet_v2_tonylins); it is not checked against a reference hash.
    Raises CheckpointError (a ValueError; CheckpointNotFoundError for a missing file) naming the file.
    """
    entry = _entry(name)
    model = entry.load(name, None if models_dir is None else Path(models_dir),
                       None if checkpoint is None else Path(checkpoint))
    return model.cpu().eval()


def model_preprocessing(name: str) -> Preprocessing:
    """What the data pipeline must do to an image for model ``name``."""
    return _entry(name).preprocessing(name)


def model_label_space(name: str) -> str:
    """"cifar10" or "imagenet": which data set's label indices model ``name`` predicts."""
    return _entry(name).label_space
