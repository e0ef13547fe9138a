"""Sweep configuration: a TOML file (parsed with tomllib) validated into a frozen `SweepConfig`.

    models = ["resnet18_cifar10", "mobilenet_v2_cifar10"]   # or [[models]] tables (at the end of this example)
    steps = "paper"                                         # a preset ("paper", "ptq", "all") or ["bn_fold", "bn_fold+cls", ...]
    quant = ["w8a8_per_tensor_minmax", "w8a8_per_channel_minmax"]

    [data]
    dataset = "cifar10"          # cifar10 | cifar100 | imagenet | imagenette | imagefolder
    eval_split = "test"          # imagenet: a folder of wnid folders relative to the data root; imagefolder: of root
    calibration_split = "train"
    limit = 1000                 # evaluation images, class-balanced (omit for all)
    calibration = 512            # calibration images from calibration_split, class-balanced
    batch_size = 256
    seed = 7                     # omit: the first files per class; set: a seeded random subset
    download = true              # cifar10 | cifar100 | imagenette: torchvision fetches them into the data root if absent
    skip_unreadable = true       # leave undecodable images out (counted, with a warning) instead of stopping
    # imagefolder only: the user's <root>/<split>/<class>/<image> (clebench.data.classes)
    root = "my_images"           # relative to the config's folder
    classes = ["airplane", ...]  # the model's class names in output order; or { cat = 3, ... }; or a file
                                 # (JSON table / list, or one name per line); omit: sorted folder order

    [data.preprocess]            # optional; over each model's default (clebench.models.preprocessing)
    resize = 256                 # the shorter side, or [h, w]; or crop_pct = 0.875 (timm: resize = crop / crop_pct)
    crop = 224                   # or [h, w]
    interpolation = "bicubic"    # nearest | bilinear | bicubic
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

    [eval]                       # optional; the default evaluates the torch simulation only
    engine = "torch"             # or "onnxruntime" / "openvino": the simulation on that runtime's float kernels (CPU)
    deploy = ["onnxruntime", "openvino"]   # also run each quantized row on each runtime's integer kernels:
                                 # <target>_top1/_top5/_agreement/_integer_layers/_float_layers columns
                                 # (blank for rows whose activations are neither 8 nor 16 bits: no exact export)

    [execution]                  # optional; where it runs changes no number, so it is not part of the config hash
    ray = "local"                # or "auto" / "HOST:PORT": run the work units as Ray tasks
    gpus_per_task = 0.25
    unit = "prefix"              # or "model": one work unit per model

    [adaround]                   # optional; used by the `adaround` step (presets: "ptq"); defaults: the library's
    iterations = 1000            # optimization steps per layer
    calibration_images = 1024    # images AdaRound learns from, class-balanced from calibration_split
                                 # (omit: the [data] calibration images)
    reg_param = 0.01             # lambda, the rounding regularizer's weight
    beta_range = [20.0, 2.0]     # beta's annealing, start -> end
    warm_start = 0.2             # fraction of the iterations without the regularizer
    seed = 0                     # the sampling seed: same seed, data and device -> the same rounding

    [act_equalize]               # optional; used by the act_equalize steps (clebench.activation_equalization)
    alpha = 0.5                  # migration strength in [0, 1]: s = a^alpha / w^(1 - alpha) per channel

    [brevitas]                   # optional; used by the brevitas_equalize steps (clebench.peers.brevitas)
    iterations = 20              # graph-equalization rounds (Brevitas' PTQ benchmark: 20)

    [sensitivity]                # optional; per-layer quantization sensitivity (clebench.sensitivity) of some rows
    images = 500                 # class-balanced evaluation images it ranks on (its cost scales with this)
    rows = [ { model = "mobilenet_v2_cifar10", steps = "bn_fold", quant = "w4a8_per_tensor_minmax" } ]
                                 # each a row of this sweep; written to sensitivity.csv / sensitivity.json

    [report]
    range_layers = ["first_depthwise"]   # layers whose per-channel ranges are plotted (Fig. 2); qualified names allowed

    [custom_steps]               # optional; the config's own FP32 steps, usable in `steps` (clebench.sweep.custom_steps)
    my_eq = { callable = "my_steps.py:equalize", after = "bn_fold", kwargs = { iterations = 10 } }
                                 # fn(model, input_shape, **kwargs) -> model; "module:fn" or a file relative to the
                                 # config's folder; it runs right after `after` (a built-in FP32 step)

    [[models]]                   # instead of models = [...]: one table per model (clebench.models.sources)
    name = "my_net"              # the row label: a registry name, "timm:<name>", a `clebench.models` entry point,
                                 # or with a factory any label
    factory = "nets.py:build"    # "module:callable" or "file.py:callable" (relative to the config's folder, which
                                 # is also put on the import path)
    kwargs = { width = 2 }       # the factory's (or timm.create_model's, or the entry point's) keyword arguments
    checkpoint = "my_net.pth"    # relative to the config file; a state_dict bare or wrapped ("state_dict", "model",
                                 # ...), with module. prefixes or not, or .safetensors
    input_size = [3, 32, 32]     # [C, H, W]: the probe a non-registry model is checked on, and the default crop
    preprocess = { crop = 32 }   # over the model's default and [data.preprocess] (clebench.models.preprocessing)
    pretrained = false           # timm only: true downloads timm's weights (internet)
    full_model = false           # true: checkpoint is a whole pickled model, loaded with weights_only=False (runs
                                 # code from the file: only for a file you trust)

Every key is checked before any work starts; an error names the key and the allowed values. The hash covers what
changes the numbers, as written in the file: checkpoint paths and an imagefolder's root as written (so clones in
different folders agree), and not `download`; [data] classes (a file's content), preprocess and skip_unreadable only
where set; the [adaround] options only where a combination runs AdaRound (so configs without it hash as they did
before the step existed), the [act_equalize] options likewise only where a combination runs an act_equalize step,
[brevitas] only where one runs a brevitas_equalize step; not [sensitivity], which adds sensitivity.csv and changes
no number of the sweep's rows (so it can be added to a finished sweep, whose folder it then shares; each measured row
records its images).
[custom_steps] is hashed only where present (callable, after, kwargs and the sha256 of the defining file). A models
entry's keys besides name and checkpoint are hashed only where set (a factory as written, with the sha256 of the file
defining it, as a custom step), so entries of only name and checkpoint hash as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from clebench.activation_equalization import DEFAULT_ALPHA, check_alpha
from clebench.adaround import AdaroundError, AdaroundSettings
from clebench.sweep import steps
from clebench.sweep.custom_steps import CustomStep, parse_custom_steps
from clebench.data.classes import check_classes, read_classes_file
from clebench.callables import callable_source
from clebench.errors import UserError
from clebench.peers.brevitas import DEFAULT_ITERATIONS as BREVITAS_ITERATIONS, check_iterations
from clebench.models.preprocessing import parse_preprocess
from clebench.models.sources import InMemoryModel
from clebench.quant import QuantConfig
from clebench.runtimes import RUNTIMES

DATASETS = ("cifar10", "cifar100", "imagenet", "imagenette", "imagefolder")
FIRST_DEPTHWISE = "first_depthwise"


class ConfigError(UserError):
    """A sweep configuration that cannot run."""


_UNHASHED = {"hashed": False}  # field metadata: left out of to_dict() and the hash
_WHEN_SET = {"when_set": True}  # field metadata: in to_dict() only when not the default (old configs hash as before)


@dataclass(frozen=True)
class ModelSpec:
    """A models entry; clebench.models.sources says how it is resolved (registry, timm:, factory, entry point)."""

    name: str  # the row label (and, without a factory, the model's name)
    checkpoint: str | None = None  # the path loaders use: ~ expanded, a relative one joined to the config's folder
    # The path as the config file writes it: what to_dict() and the hash record (None: same as `checkpoint`).
    written_checkpoint: str | None = field(default=None, repr=False, compare=False, metadata=_UNHASHED)
    factory: str | None = field(default=None, metadata=_WHEN_SET)  # "module:callable" / "file.py:callable", as written
    # sha256 of the file defining the factory when the config was read (hashed; each process checks it)
    factory_sha256: str | None = field(default=None, metadata=_WHEN_SET)
    # The absolute folder a factory's file is relative to and that goes on the import path (the config's folder, else
    # the working directory at parse time), so that a Ray worker resolves the factory as the driver does.
    base_dir: str | None = field(default=None, metadata=_UNHASHED)
    kwargs: dict[str, Any] | None = field(default=None, hash=False, metadata=_WHEN_SET)  # the callable's arguments
    input_size: tuple[int, int, int] | None = field(default=None, metadata=_WHEN_SET)  # [C, H, W]: probe, default crop
    preprocess: dict[str, Any] | None = field(default=None, hash=False, metadata=_WHEN_SET)  # parse_preprocess dict
    pretrained: bool = field(default=False, metadata=_WHEN_SET)  # timm: the hub's weights (needs internet)
    full_model: bool = field(default=False, metadata=_WHEN_SET)  # the checkpoint is a pickled model (runs its code)
    # A model given as a Python object (clebench.sweep.api); hashed as its identity (class, fingerprint) when set
    in_memory: InMemoryModel | None = field(default=None, hash=False, compare=False, repr=False, metadata=_UNHASHED)

    def __post_init__(self) -> None:
        if self.written_checkpoint is None:
            object.__setattr__(self, "written_checkpoint", self.checkpoint)

    def to_dict(self) -> dict[str, Any]:
        """name and checkpoint as written, then each other key only where set (old entries hash as before); plain
        JSON data, as a config file writes it."""
        return json.loads(json.dumps({"name": self.name, "checkpoint": self.written_checkpoint,
                                      **{f.name: getattr(self, f.name) for f in fields(self)
                                         if f.metadata.get("when_set") and getattr(self, f.name) != f.default},
                                      **_in_memory_identity(self)}))


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    eval_split: str = "test"
    calibration_split: str = "train"
    limit: int | None = None
    calibration: int = 512
    batch_size: int = 256
    seed: int | None = None
    download: bool = field(default=False, metadata=_UNHASHED)  # may torchvision fetch a missing data set
    # imagefolder: the folder holding the splits, absolute (the config's folder joined to a relative one) ...
    root: str | None = field(default=None, metadata=_UNHASHED)
    # ... and as the config file writes it: what to_dict() and the hash record, as "root"
    written_root: str | None = field(default=None, repr=False, compare=False, metadata=_UNHASHED)
    # imagefolder: {folder: model output index} or the model's class names in output order (a file's content);
    # None: sorted folder order
    # (dicts: left out of the spec's hash(), which Ray's per-Settings resources key on; to_dict() has them)
    classes: dict[str, int] | tuple[str, ...] | None = field(default=None, hash=False, metadata=_WHEN_SET)
    preprocess: dict[str, Any] | None = field(default=None, hash=False, metadata=_WHEN_SET)  # a parse_preprocess dict
    skip_unreadable: bool = field(default=False, metadata=_WHEN_SET)  # leave undecodable images out, counted
    # torch data sets given as Python objects (clebench.sweep.api.InMemoryData); hashed as their identity when set
    in_memory: Any = field(default=None, hash=False, compare=False, repr=False, metadata=_UNHASHED)

    def to_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("hashed", True)
                 and not (f.metadata.get("when_set") and getattr(self, f.name) == f.default)}
        if self.written_root is not None:
            plain["root"] = self.written_root
        return plain | _in_memory_identity(self)


def _in_memory_identity(spec: ModelSpec | DataSpec) -> dict[str, Any]:
    """{"in_memory": identity} of a spec given as Python objects, {} otherwise (file configs hash as before)."""
    return {} if spec.in_memory is None else {"in_memory": dict(spec.in_memory.identity)}


ENGINES = ("torch", *RUNTIMES)
DEPLOY_TARGETS = RUNTIMES


@dataclass(frozen=True)
class EvalSpec:
    """How quantized rows are evaluated: `engine` runs the simulation (torch, or a runtime's float kernels on the
    exported QDQ model); each `deploy` target also runs the same network on that runtime's integer kernels."""

    engine: str = "torch"
    deploy: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutionSpec:
    """Where and how the sweep runs; it changes no number, so it is not part of the config hash."""

    ray: str | None = None  # None: in this process; "local": a Ray started here; "auto" / "HOST:PORT": a cluster
    gpus_per_task: float = 0.0  # fraction of a GPU each Ray task reserves
    unit: str = "prefix"  # work-unit granularity (clebench.sweep.plan.GRANULARITIES)


_ADAROUND_DEFAULTS = AdaroundSettings()


@dataclass(frozen=True)
class AdaroundSpec:
    """The `adaround` step's options (defaults: AdaroundSettings'); calibration_images None: the [data] calibration
    images."""

    iterations: int = _ADAROUND_DEFAULTS.iterations
    calibration_images: int | None = None
    reg_param: float = _ADAROUND_DEFAULTS.reg_param
    beta_range: tuple[float, float] = _ADAROUND_DEFAULTS.beta_range
    warm_start: float = _ADAROUND_DEFAULTS.warm_start
    seed: int = _ADAROUND_DEFAULTS.seed

    def settings(self) -> AdaroundSettings:
        return AdaroundSettings(iterations=self.iterations, reg_param=self.reg_param, beta_range=self.beta_range,
                                warm_start=self.warm_start, seed=self.seed)

    @property
    def key(self) -> str:
        """Identity of the options, for memo keys."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class ActEqualizeSpec:
    """The act_equalize steps' options: alpha, SmoothQuant's migration strength."""

    alpha: float = DEFAULT_ALPHA


@dataclass(frozen=True)
class BrevitasSpec:
    """The brevitas_equalize steps' options: Brevitas' graph-equalization rounds."""

    iterations: int = BREVITAS_ITERATIONS


DEFAULT_SENSITIVITY_IMAGES = 500


@dataclass(frozen=True)
class SensitivityRow:
    """A sweep row whose per-layer sensitivity is measured; steps and quant as the results table names them."""

    model: str
    steps: str
    quant: str


@dataclass(frozen=True)
class SensitivitySpec:
    """The [sensitivity] table: the rows whose per-layer sensitivity the sweep measures, on `images` class-balanced
    evaluation images."""

    images: int = DEFAULT_SENSITIVITY_IMAGES
    rows: tuple[SensitivityRow, ...] = ()


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[ModelSpec, ...]
    data: DataSpec
    steps: str | tuple[str, ...]
    quant: tuple[str, ...]
    range_layers: tuple[str, ...] = (FIRST_DEPTHWISE,)
    execution: ExecutionSpec = ExecutionSpec()
    eval: EvalSpec = EvalSpec()
    adaround: AdaroundSpec = AdaroundSpec()
    sensitivity: SensitivitySpec = SensitivitySpec()
    custom_steps: tuple[CustomStep, ...] = ()
    act_equalize: ActEqualizeSpec = ActEqualizeSpec()
    brevitas: BrevitasSpec = BrevitasSpec()

    @property
    def uses_adaround(self) -> bool:
        return any(steps.uses_adaround(combination) for combination in self.combinations)

    @property
    def uses_act_equalize(self) -> bool:
        return any(set(combination) & set(steps.ACT_EQUALIZE_STEPS) for combination in self.combinations)

    @property
    def peers(self) -> list[str]:
        """The peer toolkits (keys of clebench.peers.PEERS) that the sweep's steps run, in pipeline order."""
        used = {step for combination in self.combinations for step in combination}
        return list(dict.fromkeys(peer for step, peer in steps.PEER_STEPS.items() if step in used))

    @property
    def combinations(self) -> list[steps.Combination]:
        return steps.resolve(self.steps, self.custom_steps)

    @property
    def quant_configs(self) -> list[QuantConfig]:
        return [QuantConfig.from_name(name) for name in self.quant]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable): what baselines store and the hash covers (not `execution`, not
        `sensitivity`: neither changes a number of the sweep's rows)."""
        plain = {**asdict(self), "models": [spec.to_dict() for spec in self.models], "data": self.data.to_dict()}
        del plain["execution"], plain["sensitivity"]
        if self.eval == EvalSpec():
            del plain["eval"]  # the default: configs hash as they did before [eval] existed
        if not self.uses_adaround:
            del plain["adaround"]  # changes no number: configs hash as they did before the step existed
        if not self.uses_act_equalize:
            del plain["act_equalize"]  # the same
        if "brevitas" not in self.peers:
            del plain["brevitas"]  # the same
        del plain["custom_steps"]
        if self.custom_steps:  # only where present: other configs hash as they did before custom steps existed
            plain["custom_steps"] = {step.name: step.to_dict() for step in self.custom_steps}
        return json.loads(json.dumps(plain))

    @property
    def hash(self) -> str:
        """12 hex characters identifying everything that changes the numbers."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def with_models(self, names: list[str]) -> SweepConfig:
        """The same sweep restricted to some of its models (e.g. to split it across machines)."""
        known = [spec.name for spec in self.models]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(f"--models {', '.join(unknown)}: not in the config's models ({', '.join(known)})")
        rows = tuple(row for row in self.sensitivity.rows if row.model in names)
        return replace(self, models=tuple(spec for spec in self.models if spec.name in names),
                       sensitivity=replace(self.sensitivity, rows=rows))

    def with_execution(self, **changes: Any) -> SweepConfig:
        """The same sweep run elsewhere (e.g. ray="auto"); None values leave a setting as it is."""
        execution = replace(self.execution, **{k: v for k, v in changes.items() if v is not None})
        return replace(self, execution=_execution(asdict(execution)))

    def with_engine(self, engine: str | None) -> SweepConfig:
        """The same sweep with another simulation engine (None: unchanged)."""
        if engine is None:
            return self
        return replace(self, eval=_eval({"engine": engine, "deploy": list(self.eval.deploy)}))

    def with_deploy(self, targets: list[str] | None) -> SweepConfig:
        """The same sweep deployed to `targets` as well (None: unchanged; [] deploys nowhere)."""
        if targets is None:
            return self
        return replace(self, eval=_eval({"engine": self.eval.engine, "deploy": list(targets)}))

    def with_limit(self, limit: int | None) -> SweepConfig:
        return replace(self, data=replace(self.data, limit=_positive_int(limit, "data.limit", allow_none=True)))


_TOP_KEYS = {"models", "steps", "quant", "data", "report", "execution", "eval", "adaround", "sensitivity",
             "custom_steps", "act_equalize", "brevitas"}
_DATA_KEYS = {"dataset", "eval_split", "calibration_split", "limit", "calibration", "batch_size", "seed", "download",
              "preprocess", "skip_unreadable"}
_IMAGEFOLDER_KEYS = {"root", "classes"}
_MODEL_KEYS = {"name", "checkpoint", "factory", "kwargs", "input_size", "preprocess", "pretrained", "full_model"}
_REPORT_KEYS = {"range_layers"}
_EXECUTION_KEYS = {"ray", "gpus_per_task", "unit"}
_EVAL_KEYS = {"engine", "deploy"}
_ADAROUND_KEYS = {f.name for f in fields(AdaroundSpec)}
_ACT_EQUALIZE_KEYS = {f.name for f in fields(ActEqualizeSpec)}
_BREVITAS_KEYS = {f.name for f in fields(BrevitasSpec)}
_SENSITIVITY_KEYS = {f.name for f in fields(SensitivitySpec)}
_SENSITIVITY_ROW_KEYS = {f.name for f in fields(SensitivityRow)}
_UNITS = ("prefix", "model")


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} in {where}; allowed: {', '.join(sorted(allowed))}")


def _positive_int(value: Any, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer{' (or omitted)' if allow_none else ''}, got {value!r}")
    return value


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _checkpoint_path(written: str, base_dir: Path | None) -> str:
    path = Path(written).expanduser()
    return str(path) if base_dir is None or path.is_absolute() else os.path.normpath(base_dir / path)


def _models(value: Any, base_dir: Path | None) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"models must be a non-empty list of model names or [[models]] tables, got {value!r}")
    specs = []
    for entry in value:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"each models entry needs a string name, got {entry!r}")
        specs.append(_model(entry, base_dir))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"models lists a model twice: {names}")
    return tuple(specs)


def _model(entry: dict, base_dir: Path | None) -> ModelSpec:
    """One models entry, checked (that its factory imports and its checkpoint fits is checked when it loads)."""
    name = entry["name"]
    where = f"models.{name}"
    _unknown(entry, _MODEL_KEYS, f"models entry {name!r}")
    checkpoint, factory = entry.get("checkpoint"), entry.get("factory")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ConfigError(f"{where}.checkpoint must be a path string, got {checkpoint!r}")
    folder = None if factory is None else (base_dir or Path.cwd()).resolve()
    source = None if factory is None else callable_source(factory, folder, f"{where}.factory")
    kwargs = entry.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.kwargs must be a table of the factory's keyword arguments, got {kwargs!r}")
    pretrained, full_model = _bool(entry, "pretrained", where), _bool(entry, "full_model", where)
    if full_model and (checkpoint is None or factory is not None or kwargs or pretrained):
        raise ConfigError(f"{where}.full_model: the checkpoint is the whole model; give checkpoint and no factory, "
                          "kwargs or pretrained")
    if pretrained and checkpoint is not None:
        raise ConfigError(f"{where}: give pretrained = true (the hub's weights) or a checkpoint, not both")
    preprocess = entry.get("preprocess")
    return ModelSpec(
        name, None if checkpoint is None else _checkpoint_path(checkpoint, base_dir), written_checkpoint=checkpoint,
        factory=factory, factory_sha256=None if source is None else source["sha256"],
        base_dir=None if folder is None else str(folder),
        kwargs=kwargs, input_size=_input_size(entry.get("input_size"), where), pretrained=pretrained,
        preprocess=None if preprocess is None else parse_preprocess(preprocess, f"{where}.preprocess"),
        full_model=full_model)


def _input_size(value: Any, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3 and all(_positive_int(v, f"{where}.input_size") for v in value)):
        raise ConfigError(f"{where}.input_size must be [channels, height, width], got {value!r}")
    return tuple(value)


def _data(table: Any, base_dir: Path | None) -> DataSpec:
    if not isinstance(table, dict):
        raise ConfigError("[data] table is required (at least dataset = \"cifar10\" or another data set)")
    dataset = table.get("dataset")
    _unknown(table, _DATA_KEYS | (_IMAGEFOLDER_KEYS if dataset == "imagefolder" else set()), "[data]")
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    for key in ("eval_split", "calibration_split"):
        if key in table and not (isinstance(table[key], str) and table[key]):
            raise ConfigError(f"data.{key} must be a non-empty string, got {table[key]!r}")
    seed = table.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"data.seed must be a non-negative integer (or omitted), got {seed!r}")
    download, skip_unreadable = (_bool(table, key) for key in ("download", "skip_unreadable"))
    if download and dataset == "imagefolder":
        raise ConfigError("data.download: an imagefolder data set is not downloaded; remove the key")
    preprocess = table.get("preprocess")
    defaults = DataSpec(dataset)
    return DataSpec(
        dataset=dataset,
        eval_split=table.get("eval_split", defaults.eval_split),
        calibration_split=table.get("calibration_split", defaults.calibration_split),
        limit=_positive_int(table.get("limit"), "data.limit", allow_none=True),
        calibration=_positive_int(table.get("calibration", defaults.calibration), "data.calibration"),
        batch_size=_positive_int(table.get("batch_size", defaults.batch_size), "data.batch_size"),
        seed=seed,
        download=download,
        preprocess=None if preprocess is None else parse_preprocess(preprocess, "data.preprocess"),
        skip_unreadable=skip_unreadable,
        **(_imagefolder(table, base_dir) if dataset == "imagefolder" else {}),
    )


def _bool(table: dict, key: str, where: str = "data") -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _imagefolder(table: dict, base_dir: Path | None) -> dict[str, Any]:
    """DataSpec fields of an imagefolder data set: root (resolved and as written) and classes."""
    root = table.get("root")
    if not (isinstance(root, str) and root):
        raise ConfigError(f'data.root must name the folder holding the splits of dataset = "imagefolder", got {root!r}')
    classes = table.get("classes")
    if isinstance(classes, str):
        classes = read_classes_file(Path(_checkpoint_path(classes, base_dir)), "data.classes")
    return {"root": _checkpoint_path(root, base_dir), "written_root": root,
            "classes": None if classes is None else check_classes(classes, "data.classes")}


def _execution(table: Any) -> ExecutionSpec:
    if not isinstance(table, dict):
        raise ConfigError("[execution] must be a table")
    _unknown(table, _EXECUTION_KEYS, "[execution]")
    ray = table.get("ray")
    if ray is not None and not (isinstance(ray, str) and ray):
        raise ConfigError(f'execution.ray must be "local", "auto" or "HOST:PORT" (or omitted), got {ray!r}')
    gpus = table.get("gpus_per_task", 0.0)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 8:
        raise ConfigError(f"execution.gpus_per_task must be a number of GPUs in [0, 8] (0.25: four tasks share one), got {gpus!r}")
    unit = table.get("unit", "prefix")
    if unit not in _UNITS:
        raise ConfigError(f"execution.unit must be one of {', '.join(_UNITS)}, got {unit!r}")
    return ExecutionSpec(ray, float(gpus), unit)


def _eval(table: Any) -> EvalSpec:
    if not isinstance(table, dict):
        raise ConfigError("[eval] must be a table")
    _unknown(table, _EVAL_KEYS, "[eval]")
    engine = table.get("engine", "torch")
    if engine not in ENGINES:
        raise ConfigError(f"eval.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    deploy = table.get("deploy", [])
    if not isinstance(deploy, list) or any(target not in DEPLOY_TARGETS for target in deploy):
        raise ConfigError(f"eval.deploy must be a list of {', '.join(DEPLOY_TARGETS)}, got {deploy!r}")
    if len(set(deploy)) != len(deploy):
        raise ConfigError(f"eval.deploy lists a target twice: {deploy!r}")
    return EvalSpec(engine, tuple(deploy))


def _adaround(table: Any, data: DataSpec) -> AdaroundSpec:
    if not isinstance(table, dict):
        raise ConfigError("[adaround] must be a table")
    _unknown(table, _ADAROUND_KEYS, "[adaround]")
    options = dict(table)
    images = _positive_int(options.pop("calibration_images", None), "adaround.calibration_images", allow_none=True)
    if "beta_range" in options and isinstance(options["beta_range"], list):
        options["beta_range"] = tuple(options["beta_range"])
    for key, value in options.items():  # one key at a time, so that the error names it
        try:
            AdaroundSettings(**{key: value})
        except AdaroundError as error:
            raise ConfigError(f"adaround.{key}: {error}") from None
    if "beta_range" in options:
        options["beta_range"] = tuple(float(b) for b in options["beta_range"])
    for key in ("reg_param", "warm_start"):
        if key in options:
            options[key] = float(options[key])
    return AdaroundSpec(calibration_images=None if images == data.calibration else images, **options)


def _act_equalize(table: Any) -> ActEqualizeSpec:
    if not isinstance(table, dict):
        raise ConfigError("[act_equalize] must be a table")
    _unknown(table, _ACT_EQUALIZE_KEYS, "[act_equalize]")
    alpha = table.get("alpha", DEFAULT_ALPHA)
    try:
        check_alpha(alpha)
    except ValueError as error:
        raise ConfigError(f"act_equalize.{error}") from None
    return ActEqualizeSpec(float(alpha))


def _brevitas(table: Any) -> BrevitasSpec:
    if not isinstance(table, dict):
        raise ConfigError("[brevitas] must be a table")
    _unknown(table, _BREVITAS_KEYS, "[brevitas]")
    try:
        return BrevitasSpec(check_iterations(table.get("iterations", BREVITAS_ITERATIONS)))
    except UserError as error:
        raise ConfigError(f"brevitas.{error}") from None


def _sensitivity(table: Any, config: SweepConfig) -> SensitivitySpec:
    """The [sensitivity] table; each row must be one of `config`'s rows (a model, a combination, a setting of it)."""
    if not isinstance(table, dict):
        raise ConfigError("[sensitivity] must be a table")
    _unknown(table, _SENSITIVITY_KEYS, "[sensitivity]")
    images = _positive_int(table.get("images", DEFAULT_SENSITIVITY_IMAGES), "sensitivity.images")
    entries = table.get("rows", [])
    if not isinstance(entries, list):
        raise ConfigError(f"sensitivity.rows must be a list of {{ model = ..., steps = ..., quant = ... }} tables, got {entries!r}")
    rows = tuple(_sensitivity_row(entry, f"sensitivity.rows[{index}]", config) for index, entry in enumerate(entries))
    if len(set(rows)) != len(rows):
        raise ConfigError("sensitivity.rows lists a row twice")
    return SensitivitySpec(images, rows)


def _sensitivity_row(entry: Any, where: str, config: SweepConfig) -> SensitivityRow:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table {{ model = ..., steps = ..., quant = ... }}, got {entry!r}")
    _unknown(entry, _SENSITIVITY_ROW_KEYS, where)
    for key in sorted(_SENSITIVITY_ROW_KEYS):
        if not isinstance(entry.get(key), str):
            raise ConfigError(f"{where}.{key} must be a string, got {entry.get(key)!r}")
    models = [spec.name for spec in config.models]
    if entry["model"] not in models:
        raise ConfigError(f"{where}.model {entry['model']!r} is not one of the sweep's models ({', '.join(models)})")
    try:
        combination = steps.parse_combination(entry["steps"], config.custom_steps)
    except steps.StepError as error:
        raise ConfigError(f"{where}.steps: {error}") from None
    if combination not in config.combinations:
        combinations = [steps.combination_name(c) for c in config.combinations]
        raise ConfigError(f"{where}.steps {entry['steps']!r} is not one of the sweep's step combinations "
                          f"({', '.join(combinations)})")
    try:
        quant = QuantConfig.from_name(entry["quant"]).name
    except ValueError as error:
        raise ConfigError(f"{where}.quant: {error}") from None
    settings = [setting.name for setting in config.quant_configs]
    if quant not in settings:
        raise ConfigError(f"{where}.quant {entry['quant']!r} is not one of the sweep's quant settings ({', '.join(settings)})")
    return SensitivityRow(entry["model"], steps.combination_name(combination), quant)


def parse_config(raw: dict[str, Any], source: str = "config", base_dir: str | Path | None = None) -> SweepConfig:
    """Validate a parsed TOML document; errors name `source` and the key.

    base_dir: the folder relative checkpoint paths are joined to (load_config: the config file's folder); None leaves
    them relative to the working directory.
    """
    try:
        _unknown(raw, _TOP_KEYS, "the top level")
        for key in ("models", "steps", "quant"):
            if key not in raw:
                raise ConfigError(f"missing required key {key!r}")
        step_spec = raw["steps"] if isinstance(raw["steps"], str) else _string_list(raw["steps"], "steps")
        custom = parse_custom_steps(raw.get("custom_steps", {}), None if base_dir is None else Path(base_dir))
        steps.resolve(step_spec, custom)
        quant = _string_list(raw["quant"], "quant")
        for name in quant:
            QuantConfig.from_name(name)
        report = raw.get("report", {})
        if not isinstance(report, dict):
            raise ConfigError("[report] must be a table")
        _unknown(report, _REPORT_KEYS, "[report]")
        range_layers = _string_list(report.get("range_layers", [FIRST_DEPTHWISE]), "report.range_layers")
        models = _models(raw["models"], None if base_dir is None else Path(base_dir))
        execution = _execution(raw.get("execution", {}))
        data = _data(raw.get("data"), None if base_dir is None else Path(base_dir))
        config = SweepConfig(models, data, step_spec, quant, range_layers, execution, _eval(raw.get("eval", {})),
                             _adaround(raw.get("adaround", {}), data), custom_steps=custom,
                             act_equalize=_act_equalize(raw.get("act_equalize", {})),
                             brevitas=_brevitas(raw.get("brevitas", {})))
        return replace(config, sensitivity=_sensitivity(raw.get("sensitivity", {}), config))
    except (ConfigError, steps.StepError, ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML document of a sweep config file, not validated yet; a one-line ConfigError if unreadable."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a TOML sweep config; relative checkpoint paths in it are relative to its folder."""
    path = Path(path)
    return parse_config(read_config_file(path), str(path), path.resolve().parent)
