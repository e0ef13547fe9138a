"""torchvision's ImageNet classifiers, with weights read from the torch hub cache or a local file.

Nothing is downloaded unless the file is missing from the cache; a failed download becomes a
CheckpointNotFoundError that says where the file was expected and how to provide it.
"""
import os
import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights

from .checkpoint import CheckpointNotFoundError, load_state_dict, load_weights
from .preprocessing import Preprocessing

__all__ = ["torchvision_model_names", "load_torchvision_model", "torchvision_preprocessing", "hub_cache_path"]

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch hub convention: <name>-<sha256 prefix>.<ext>


def torchvision_model_names() -> list[str]:
    """Names of torchvision's image classification models (torchvision.models, not its sub-packages)."""
    return torchvision.models.list_models(module=torchvision.models)


def hub_cache_path(name: str) -> Path:
    """Where torch hub keeps the file of ``name``'s default ImageNet weights."""
    url = get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _build_kwargs(name: str, weights: torchvision.models.WeightsEnum) -> dict:
    """Constructor arguments torchvision's builder sets when it is given ``weights``."""
    kwargs: dict = {"num_classes": len(weights.meta["categories"])}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name == "maxvit_t":
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def _download(url: str, path: Path, name: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except (urllib.error.URLError, OSError) as err:
        raise CheckpointNotFoundError(
            f"ImageNet weights for {name!r} are not available offline: looked for {path} (torch hub cache) and "
            f"could not download {url} ({err}). Copy that file to {path}, or pass its path as "
            "checkpoint= (CLI: --checkpoint)"
        ) from None


def load_torchvision_model(name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """torchvision model ``name`` with its default ImageNet weights, from ``checkpoint`` or the hub cache.

    A hub-cache file is checked against the sha256 prefix in its name; a ``checkpoint`` file is not (it may
    be fine-tuned), but must fit the architecture.
    """
    weights = get_model_weights(name).DEFAULT
    if checkpoint is not None:
        path, sha256 = Path(checkpoint), None
    else:
        path = hub_cache_path(name)
        if not path.is_file():
            _download(weights.url, path, name)
        match = _HASH_IN_NAME.search(path.name)
        sha256 = match.group(1) if match else None
    model = get_model(name, weights=None, **_build_kwargs(name, weights))
    load_weights(model, load_state_dict(path, sha256=sha256), path, name)
    if name == "googlenet":  # torchvision drops googlenet's untrained auxiliary heads after loading
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    return model


def torchvision_preprocessing(name: str) -> Preprocessing:
    """Preprocessing that ``name``'s default ImageNet weights were evaluated with (from their transforms)."""
    transforms = get_model_weights(name).DEFAULT.transforms()
    return Preprocessing(
        resize=transforms.resize_size[0],
        crop=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )
