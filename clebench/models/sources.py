"""Models a config's `[[models]]` entry names, wherever they come from.

An entry (a `ModelLike`: clebench.sweep.config.ModelSpec) is resolved in this order:

* ``factory = "module:callable"`` or ``"file.py:callable"``: the callable, called with ``kwargs``, builds the model
  (a file is relative to the config's folder, which is also put on the import path; clebench.callables);
* ``name = "timm:<model name>"``: ``timm.create_model(name, pretrained=pretrained, **kwargs)`` (the `timm` extra);
  preprocessing from the model's pretrained_cfg through timm's own resolve_data_config; ImageNet labels when it has
  timm's 1000 ImageNet classes;
* a name of the built-in registry (clebench.models.list_models: CIFAR-10 checkpoints, torchvision, ...);
* a name a package registers in the ``clebench.models`` entry-point group (ENTRY_POINT_GROUP), e.g. in its
  pyproject.toml: ``[project.entry-points."clebench.models"] my_net = "my_pkg.models:my_net"``.

A factory or entry-point callable returns an nn.Module and may say what its inputs are through two optional
attributes: ``preprocessing`` (a clebench.models.Preprocessing, or a dict of its fields) and ``label_space`` (the
data set whose label indices it predicts: "cifar10", "cifar100" or "imagenet"). Without ``label_space`` the labels are
unknown, and a sweep requires the model's outputs to cover the data set's classes. ``checkpoint`` is loaded into the
built model (clebench.models.checkpoint: wrapped, prefixed or .safetensors state_dicts); ``full_model = true`` reads
the checkpoint as a pickled whole model instead, which runs code from the file.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.metadata
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from clebench.callables import callable_source, load_callable
from clebench.errors import MissingExtraError, UserError

from .checkpoint import load_pickled_model, load_state_dict, load_weights
from .preprocessing import Preprocessing, PreprocessingError, Size, parse_preprocess
from .registry import list_models, load_model, model_label_space, model_preprocessing

__all__ = ["ENTRY_POINT_GROUP", "TIMM_PREFIX", "InMemoryModel", "ModelLike", "ModelSourceError", "load_spec_model",
           "spec_preprocessing", "spec_label_space", "probe_output_count"]

ENTRY_POINT_GROUP = "clebench.models"
TIMM_PREFIX = "timm:"
TIMM_IMAGENET_CLASSES = 1000


class ModelSourceError(UserError):
    """A model entry that cannot be built: a factory that is missing or raises, an unknown name, a model that
    rejects its input size."""


class ModelLike(Protocol):
    """What resolving a model needs of a [[models]] entry (clebench.sweep.config.ModelSpec has it)."""

    name: str
    checkpoint: str | None
    factory: str | None
    factory_sha256: str | None
    base_dir: str | None
    kwargs: Mapping[str, Any] | None
    input_size: tuple[int, int, int] | None
    preprocess: Mapping[str, Any] | None  # the entry's own
    pretrained: bool
    full_model: bool
    in_memory: InMemoryModel | None


@dataclass(frozen=True, eq=False)
class InMemoryModel:
    """A model given as a Python object (clebench.sweep.api): `given` (the module, or the callable that built it; its
    optional `preprocessing` / `label_space` attributes are read as a factory's), the built `module`, and the
    `identity` the config hash records (class and fingerprint). Shared, never copied (dataclasses.asdict keeps it)."""

    given: object
    module: nn.Module
    identity: Mapping[str, str]

    def __deepcopy__(self, memo: dict) -> InMemoryModel:
        return self


@dataclass(frozen=True)
class _Source:
    """How an entry's architecture is built, and what it says about its inputs and outputs."""

    build: Callable[[], nn.Module]  # the architecture, with the source's own weights where it has them
    preprocessing: Callable[[], Preprocessing | None]
    label_space: Callable[[], str | None]
    loads_checkpoint: bool = False  # the source reads `checkpoint` itself (the registry's loaders)


def _kwargs(spec: ModelLike) -> dict[str, Any]:
    return dict(spec.kwargs or {})


def _called(function: Callable, spec: ModelLike, what: str) -> nn.Module:
    """function(**kwargs), a ModelSourceError with its own message if it raises or returns no nn.Module."""
    try:
        model = function(**_kwargs(spec))
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0]
        raise ModelSourceError(f"models.{spec.name}: {what} raised {type(error).__name__}: {message}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"models.{spec.name}: {what} returned a {type(model).__name__}, not an nn.Module")
    return model


def _declared_preprocessing(function: Callable, where: str) -> Preprocessing | None:
    """A callable's `preprocessing` attribute as a Preprocessing (None without one)."""
    declared = getattr(function, "preprocessing", None)
    if declared is None or isinstance(declared, Preprocessing):
        return declared
    parsed = parse_preprocess(declared, f"{where}.preprocessing")
    try:
        return Preprocessing(**parsed)
    except TypeError:
        raise PreprocessingError(f"{where}.preprocessing needs at least crop, mean and std (and resize or crop_pct)"
                                 f", got {sorted(parsed)}") from None


def _callable_source(function: Callable, spec: ModelLike, what: str) -> _Source:
    return _Source(lambda: _called(function, spec, what), lambda: _declared_preprocessing(function, what),
                   lambda: getattr(function, "label_space", None))


def _factory_source(spec: ModelLike) -> _Source:
    """The factory, once its file is checked to be the one the config was read with (a Ray worker may see another)."""
    where = f"models.{spec.name}.factory"
    base_dir = None if spec.base_dir is None else Path(spec.base_dir)
    source = callable_source(spec.factory, base_dir, where)
    if spec.factory_sha256 is not None and source["sha256"] != spec.factory_sha256:
        raise ModelSourceError(f"{where}: {source['file']} changed since the config was read (sha256 "
                               f"{spec.factory_sha256} then, {source['sha256']} now); every process must build the "
                               "same model")
    return _callable_source(load_callable(spec.factory, base_dir, where), spec, f"factory {spec.factory}")


def _timm():
    try:
        import timm
        import timm.data
    except ImportError:
        raise MissingExtraError('timm:<name> models need timm: pip install -e ".[timm]"') from None
    return timm


def _timm_name(spec: ModelLike) -> str:
    name = spec.name[len(TIMM_PREFIX):]
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise ModelSourceError(f"models.{spec.name}: timm has no model {name!r}; {hint}timm.list_models() lists them")
    return name


def _timm_preprocessing(spec: ModelLike) -> Preprocessing:
    """The model's pretrained_cfg through timm.data.resolve_data_config (input size, crop_pct, crop_mode,
    interpolation, mean, std), resized as timm's eval transforms do; where clebench cannot (crop_mode "border", or
    "center" on a non-square input, which timm resizes keeping the aspect ratio) the entry must give its own resize."""
    timm = _timm()
    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(_timm_name(spec)).to_dict())
    crop, crop_pct, mode = tuple(config["input_size"][1:]), config["crop_pct"], config.get("crop_mode", "center")
    if mode == "center" and crop[0] == crop[1]:
        resize = None  # the shorter side to floor(crop / crop_pct)
    elif mode == "squash":
        resize, crop_pct = tuple(math.floor(side / crop_pct) for side in crop), None  # each side, aspect not kept
    else:
        resize, crop_pct = _entry_resize(spec, f"crop_mode {mode!r} on a {crop[0]}x{crop[1]} input"), None
    return Preprocessing(resize=resize, crop=crop, crop_pct=crop_pct, interpolation=config["interpolation"],
                         mean=tuple(config["mean"]), std=tuple(config["std"]))


def _entry_resize(spec: ModelLike, what: str) -> Size:
    """The resize of the entry's own preprocess table, for a timm resize clebench cannot reproduce."""
    resize = (spec.preprocess or {}).get("resize")
    if resize is None:
        raise ModelSourceError(f"models.{spec.name}: timm's resize for {what} has no clebench equivalent; give "
                               "the entry preprocess = { resize = ... } (shorter side or [h, w])")
    return resize


def _timm_label_space(spec: ModelLike) -> str | None:
    trained = _timm().models.get_pretrained_cfg(_timm_name(spec)).num_classes
    classes = _kwargs(spec).get("num_classes", trained)
    return "imagenet" if trained == classes == TIMM_IMAGENET_CLASSES else None


def _timm_source(spec: ModelLike) -> _Source:
    def build() -> nn.Module:
        return _called(lambda **kwargs: _timm().create_model(_timm_name(spec), pretrained=spec.pretrained, **kwargs),
                       spec, "timm.create_model")

    return _Source(build, lambda: _timm_preprocessing(spec), lambda: _timm_label_space(spec))


def _registry_source(spec: ModelLike, models_dir: Path | None) -> _Source:
    return _Source(lambda: load_model(spec.name, models_dir=models_dir, checkpoint=spec.checkpoint),
                   lambda: model_preprocessing(spec.name), lambda: model_label_space(spec.name),
                   loads_checkpoint=True)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _entry_point_source(spec: ModelLike, entry: importlib.metadata.EntryPoint) -> _Source:
    what = f"entry point {entry.name} = {entry.value}"
    try:
        function = entry.load()
    except Exception as error:
        raise ModelSourceError(f"models.{spec.name}: loading {what} raised {type(error).__name__}: {error}") from None
    return _callable_source(function, spec, what)


def _unknown(spec: ModelLike) -> ModelSourceError:
    names = list_models() + sorted(_entry_points())
    close = difflib.get_close_matches(spec.name, names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    return ModelSourceError(
        f"unknown model {spec.name!r}; {hint}give a registry name (clebench.models.list_models()), a "
        f'"timm:<name>", a name registered under the {ENTRY_POINT_GROUP} entry points, or factory = "module:callable"')


def _in_memory_source(spec: ModelLike) -> _Source:
    """An in-memory model: a copy of it (the caller's module stays as it is); no registry lookup, even by name."""
    given, where = spec.in_memory.given, f"models.{spec.name} (in memory)"
    return _Source(lambda: copy.deepcopy(spec.in_memory.module), lambda: _declared_preprocessing(given, where),
                   lambda: getattr(given, "label_space", None))


def _source(spec: ModelLike, models_dir: Path | None = None) -> _Source | None:
    """The entry's source; None for a pickled whole model of a name no source knows."""
    if spec.in_memory is not None:
        return _in_memory_source(spec)
    if spec.pretrained and (spec.factory is not None or not spec.name.startswith(TIMM_PREFIX)):
        raise ModelSourceError(f"models.{spec.name}: pretrained = true is for timm:<name> models only")
    if spec.factory is not None:
        return _factory_source(spec)
    if spec.name.startswith(TIMM_PREFIX):
        return _timm_source(spec)
    if spec.name in list_models():
        if spec.kwargs:
            raise ModelSourceError(f"models.{spec.name}: kwargs are for factory, timm and entry-point models; "
                                   "the registry's models take none")
        return _registry_source(spec, models_dir)
    entry = _entry_points().get(spec.name)
    if entry is not None:
        return _entry_point_source(spec, entry)
    if spec.full_model:
        return None
    raise _unknown(spec)


def load_spec_model(spec: ModelLike, models_dir: str | Path | None = None) -> nn.Module:
    """The entry's model with its weights, in eval mode, on CPU.

    models_dir: the registry's reference checkpoints (default: env CLEBENCH_MODELS). Raises a one-line UserError
    (ModelSourceError, CheckpointError, CallableError, MissingExtraError) naming the entry.
    """
    if spec.full_model:
        if spec.checkpoint is None:
            raise ModelSourceError(f"models.{spec.name}: full_model = true needs the pickled model as checkpoint")
        return load_pickled_model(spec.checkpoint).cpu().eval()
    source = _source(spec, None if models_dir is None else Path(models_dir))
    model = source.build()
    if spec.checkpoint is not None and not source.loads_checkpoint:
        load_weights(model, load_state_dict(spec.checkpoint), spec.checkpoint, spec.name)
    return model.cpu().eval()


def spec_preprocessing(spec: ModelLike, fallback: Preprocessing | None = None) -> Preprocessing | None:
    """The entry's default preprocessing, before [data.preprocess] and the entry's own `preprocess` are laid over it:
    the model's (registry, torchvision weights, timm pretrained_cfg, a callable's `preprocessing`), else `fallback`
    (the data set's default); `input_size` sets its crop. None where neither says anything."""
    source = _source(spec)
    default = (source.preprocessing() if source is not None else None) or fallback
    if default is None or spec.input_size is None:
        return default
    return dataclasses.replace(default, crop=tuple(spec.input_size[1:]))


def spec_label_space(spec: ModelLike) -> str | None:
    """The data set whose label indices the entry's model predicts ("cifar10", "cifar100", "imagenet"); None where
    unknown (a factory or entry point without `label_space`, a timm model with its own number of classes)."""
    source = _source(spec)
    return None if source is None else source.label_space()


def probe_output_count(model: nn.Module, input_size: tuple[int, int, int], name: str) -> int:
    """Outputs per image of `model` on one zero image of `input_size` ([C, H, W]); ModelSourceError (one line, with
    the model's own message) if the model rejects that input or does not return [1, classes] logits."""
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, *input_size))
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0]
        raise ModelSourceError(f"models.{name}: the model rejects input_size {list(input_size)} "
                               f"({type(error).__name__}: {message}); set input_size to what it takes") from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelSourceError(f"models.{name}: the model returns {shape} for one image, not [1, classes] logits")
    return output.shape[1]
