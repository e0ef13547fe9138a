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

Every key is checked before any work starts, against the schema below (SCHEMA: per table, each key's type, default,
allowed values or range and meaning, which the docs' config reference renders); an error names the key and the
allowed values. The hash covers what
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
from typing import Any, Callable

from clebench.activation_equalization import DEFAULT_ALPHA
from clebench.adaround import AdaroundError, AdaroundSettings
from clebench.sweep import steps
from clebench.sweep.custom_steps import CustomStep, parse_custom_steps
from clebench.data.classes import check_classes, read_classes_file
from clebench.callables import callable_source
from clebench.errors import UserError
from clebench.peers.brevitas import DEFAULT_ITERATIONS as BREVITAS_ITERATIONS
from clebench.models.preprocessing import PREPROCESS_KEYS, parse_preprocess
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
        return list(dict.fromkeys(peer for step, peer in steps.STEP_PEERS.items() if step in used))

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
        return replace(self, data=replace(self.data, limit=check_value(DATA["limit"], limit, "data.limit")))


# ---------------------------------------------------------------------------------------------------------------------
# The schema: every key of every table, declared once. The loader checks a table with check_table() (unknown keys,
# types, allowed values, ranges), the docs page (docs/hooks/config_reference.py) renders the same declarations, and
# what no single key can say (a key that depends on another, a row that must be a sweep row) is a small function below.

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()  # a Key's default: the key must be set


@dataclass(frozen=True)
class Key:
    """One key of a TOML table: its type, default, allowed values or range, meaning.

    type: a name of TYPES (what the value must be before `check`); default: the value when the key is omitted
    (REQUIRED: it may not be; None: nothing), as the spec dataclass holds it; choices: the allowed values (of each
    item, for a list); low / high: the allowed range (of each item; low_open / high_open: that end itself is
    not allowed); length: a list's length;
    unique: a list's items are distinct (the noun the error calls an item); expected: what the error says the value
    must be, where the type and range say less; check(value, "table.key") -> value: a further check and conversion
    (reading a file, another module's parser), raising an error that names the key; doc: the key's meaning.
    """

    name: str
    type: str
    doc: str
    default: Any = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    length: int | None = None
    unique: str | None = None
    expected: str | None = None
    check: Callable[[Any, str], Any] | None = field(default=None, compare=False)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def item_type(self) -> str:
        """The type of the value, or of each item of a list ("list of integers" -> "integer")."""
        return {"list of integers": "integer", "list of numbers": "number", "list of strings": "string"}.get(
            self.type, self.type)

    @property
    def allowed(self) -> str:
        """The allowed values or range in words ("" where the type says it all), for the docs page."""
        if self.choices is not None:
            return ", ".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return ""
        low = f"{'(' if self.low_open else '['}{_number_text(self.low)}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number_text(self.low)}"
        return f"{low}, {_number_text(self.high)}{')' if self.high_open else ']'}"

    def item_noun(self) -> str:
        """What the value (or each item of a list) must be: "a positive integer", "a number in [0, 1]"."""
        kind = self.item_type
        if kind == "integer" and self.high is None and (self.low == 1 or (self.low == 0 and self.low_open)):
            return "a positive integer"
        if kind == "integer" and self.high is None and self.low == 0:
            return "a non-negative integer"
        if kind == "number" and self.high is None and self.low == 0 and self.low_open:
            return "a positive number"
        noun = TYPES[kind][1]
        if self.allowed and kind in ("integer", "number"):
            return f"{noun} {'in ' if self.high is not None else ''}{self.allowed}"
        return noun

    def must(self, item: bool = False) -> str:
        """What the error says: "must be a positive integer (or omitted)", "must be one of torch, ..."; item: what
        each item of a list must be (its type and range are right, one item is out of range)."""
        if item:
            return f"must be {self.item_noun()} in each of its places"
        if self.expected is not None:
            return f"must {self.expected}"
        if self.choices is not None:
            return f"must be {'a list' if self.type.startswith('list') else 'one'} of {self.allowed}"
        noun = TYPES[self.type][1] if self.type.startswith("list") else self.item_noun()
        if self.length is not None:
            noun = f"{noun} of length {self.length}"
        return f"must be {noun}{' (or omitted)' if self.default is None else ''}"


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {  # a Key's type: (does a value have it, its name in errors)
    "string": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "integer": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "list of strings": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "a list of strings"),
    "list of numbers": (lambda v: isinstance(v, list) and all(_is_number(i) for i in v), "a list of numbers"),
    "list of integers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of integers"),
    "list": (lambda v: isinstance(v, list), "a list"),
    # checked by the key's own `check` (a value of several shapes)
    "string or list of strings": (lambda v: True, "a string or a non-empty list of strings"),
    "list of names or tables": (lambda v: True, "a non-empty list of model names or [[models]] tables"),
    "table, list or file": (lambda v: True, "a table, a list or a file name"),
    "integer or [height, width]": (lambda v: True, "a positive integer or [height, width]"),
}


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (its keys' defaults may be dicts)
class Table:
    """A TOML table of the config: its header as a file writes it ("" at the top level), the name its keys' errors
    start with ("data" -> data.limit), its meaning, its keys."""

    header: str
    where: str
    doc: str
    keys: tuple[Key, ...]
    spec: type | None = None  # the dataclass it fills, whose field defaults its keys' defaults are

    @property
    def names(self) -> set[str]:
        return {key.name for key in self.keys}

    def __getitem__(self, name: str) -> Key:
        return next(key for key in self.keys if key.name == name)


def check_value(key: Key, value: Any, path: str) -> Any:
    """`value` of `key` checked against its type, allowed values and range, then by its `check`: the parsed value
    (numbers as floats, lists as tuples) or a one-line ConfigError naming `path` ("data.limit") and what is allowed."""
    if value is None and key.default is None:
        return None  # omitted (the Python API writes None for an omitted key)
    listed = key.type.startswith("list") and isinstance(value, list)
    if not (TYPES[key.type][0](value) and (key.length is None or len(value) == key.length)
            and (key.choices is None or all(v in key.choices for v in (value if listed else [value])))):
        raise ConfigError(f"{path} {key.must()}, got {value!r}")
    if not all(_in_range(key, v) for v in (value if listed else [value])):
        raise ConfigError(f"{path} {key.must(item=listed)}, got {value!r}")
    if key.unique is not None and len(set(value)) != len(value):
        raise ConfigError(f"{path} lists a {key.unique} twice: {value!r}")
    if key.check is not None:
        value = key.check(value, path)
    if key.type == "number":
        return float(value)
    if key.type == "list of numbers":
        return tuple(float(v) for v in value)
    return tuple(value) if key.type in ("list of strings", "list of integers") else value


def _in_range(key: Key, value: Any) -> bool:
    if not _is_number(value):
        return True
    above = key.low is None or (value > key.low if key.low_open else value >= key.low)
    return above and (key.high is None or (value < key.high if key.high_open else value <= key.high))


def check_table(value: Any, keys: tuple[Key, ...], where: str, label: str) -> dict[str, Any]:
    """{key: parsed value, or the default where omitted} of a TOML table whose keys are `keys`; a one-line ConfigError
    for an unknown key (naming `label`, e.g. "[data]"), a missing required one, or a value `check_value` refuses."""
    if not isinstance(value, dict):
        raise ConfigError(f"{label} must be a table, got {value!r}")
    allowed = {key.name for key in keys}
    extra = sorted(set(value) - allowed)
    if extra:
        raise ConfigError(f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} in {label}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    parsed = {}
    for key in keys:
        path = f"{where}.{key.name}" if where else key.name
        if key.name in value:
            parsed[key.name] = check_value(key, value[key.name], path)
        elif key.required:
            raise ConfigError(f"{path} {key.must()}; it is missing from {label}")
        else:
            parsed[key.name] = key.default
    return parsed


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings, as a tuple."""
    if isinstance(value, str):
        value = [value]
    if not (TYPES["list of strings"][0](value) and value):
        raise ConfigError(f"{key} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _steps(value: Any, key: str) -> str | tuple[str, ...]:
    """A preset's name as written, or the list of combinations as a tuple (resolved by parse_config)."""
    return value if isinstance(value, str) else _string_list(value, key)


def _quant(value: Any, key: str) -> tuple[str, ...]:
    names = _string_list(value, key)
    for name in names:
        QuantConfig.from_name(name)
    return names


def _preprocess(value: Any, key: str) -> dict[str, Any]:
    return parse_preprocess(value, key)


_TABLE = "a table, below"

TOP = Table("", "", "The sweep: its models, step combinations and quant settings, then one table per concern.", (
    Key("models", "list of names or tables", "the models, one row label each: registry names, or [[models]] tables "
        "(below) for a factory, checkpoint, timm: model or entry point", REQUIRED),
    Key("steps", "string or list of strings", 'a preset ("paper", "ptq", "all") or the step combinations, e.g. '
        '["bn_fold", "bn_fold+cls"] (clebench.sweep.steps)', REQUIRED, check=_steps),
    Key("quant", "string or list of strings", 'the quant settings, e.g. "w8a8_per_tensor_minmax" '
        "(clebench.quant.QuantConfig.from_name)", REQUIRED, check=_quant),
    Key("data", "table", "the data set: " + _TABLE, REQUIRED,
        expected='be a table (at least dataset = "cifar10" or another data set)'),
    Key("report", "table", "the report's options: " + _TABLE, {}),
    Key("execution", "table", "where the sweep runs (not hashed): " + _TABLE, {}),
    Key("eval", "table", "the evaluation engine and deploy targets: " + _TABLE, {}),
    Key("adaround", "table", "the adaround step's options: " + _TABLE, {}),
    Key("act_equalize", "table", "the act_equalize steps' options: " + _TABLE, {}),
    Key("brevitas", "table", "the brevitas_equalize steps' options: " + _TABLE, {}),
    Key("sensitivity", "table", "per-layer quantization sensitivity of some rows (not hashed): " + _TABLE, {}),
    Key("custom_steps", "table", "the config's own FP32 steps, usable in steps: " + _TABLE, {},
        expected='be a table: NAME = { callable = "module:fn", after = "bn_fold" }'),
))

DATA = Table("[data]", "data", "The images the sweep calibrates and evaluates on.", (
    Key("dataset", "string", "the data set; imagefolder: the user's <root>/<split>/<class>/<image>", REQUIRED,
        choices=DATASETS),
    Key("eval_split", "string", "the evaluation split (imagenet: a folder of wnid folders relative to the data root; "
        "imagefolder: of root)", "test"),
    Key("calibration_split", "string", "the split calibration images come from", "train"),
    Key("limit", "integer", "evaluation images, class-balanced (omitted: all)", low=1),
    Key("calibration", "integer", "calibration images from calibration_split, class-balanced", 512, low=1),
    Key("batch_size", "integer", "images per evaluation batch", 256, low=1),
    Key("seed", "integer", "omitted: the first files per class; set: a seeded random subset", low=0),
    Key("download", "boolean", "cifar10 | cifar100 | imagenette: torchvision fetches them into the data root if "
        "absent (not hashed)", False),
    Key("preprocess", "table", "resize, crop, interpolation, mean, std over each model's default: [data.preprocess] "
        "below (hashed only where set)", check=_preprocess, expected=f"be a table of {', '.join(PREPROCESS_KEYS)}"),
    Key("skip_unreadable", "boolean", "leave undecodable images out (counted, with a warning) instead of stopping "
        "(hashed only where set)", False),
), DataSpec)

IMAGEFOLDER = Table('[data] with dataset = "imagefolder"', "data", "Keys [data] takes only for dataset = "
                    '"imagefolder" (clebench.data.classes).', (
    Key("root", "string", "the folder holding the splits, relative to the config's folder (hashed as written)",
        REQUIRED, expected='name the folder holding the splits of dataset = "imagefolder"'),
    Key("classes", "table, list or file", "the model's class names in output order, or { folder = output index }, "
        "or a file (JSON table / list, or one name per line; its content is hashed); omitted: sorted folder order"),
), DataSpec)

PREPROCESS = Table("[data.preprocess]", "data.preprocess", "Over each model's default preprocessing "
                   "(clebench.models.preprocessing, which checks these keys); a [[models]] entry's preprocess "
                   "takes the same keys.", (
    Key("resize", "integer or [height, width]", "the shorter side, or [h, w]"),
    Key("crop", "integer or [height, width]", "the crop's size, a square or [h, w]"),
    Key("crop_pct", "number", "instead of resize: resize = crop / crop_pct (timm's convention)"),
    Key("interpolation", "string", "the resize's interpolation", choices=("nearest", "bilinear", "bicubic")),
    Key("mean", "list of numbers", "per-channel mean subtracted", length=3),
    Key("std", "list of numbers", "per-channel standard deviation divided by", length=3),
))

MODEL = Table("[[models]]", "models.NAME", "One table per model instead of models = [...] "
              "(clebench.models.sources); its keys besides name and checkpoint are hashed only where set.", (
    Key("name", "string", 'the row label: a registry name, "timm:<name>", a clebench.models entry point, or with a '
        "factory any label", REQUIRED),
    Key("checkpoint", "string", "relative to the config file (hashed as written); a state_dict bare or wrapped "
        '("state_dict", "model", ...), with module. prefixes or not, or .safetensors',
        expected="be a path string (or omitted)"),
    Key("factory", "string", '"module:callable" or "file.py:callable" (relative to the config\'s folder, which is '
        "also put on the import path); its file's sha256 is hashed"),
    Key("kwargs", "table", "the factory's (or timm.create_model's, or the entry point's) keyword arguments",
        expected="be a table of the factory's keyword arguments"),
    Key("input_size", "list of integers", "[C, H, W]: the probe a non-registry model is checked on, and the default "
        "crop", length=3, low=1, expected="be [channels, height, width]"),
    Key("preprocess", "table", "over the model's default and [data.preprocess] (the same keys)",
        check=_preprocess, expected=f"be a table of {', '.join(PREPROCESS_KEYS)}"),
    Key("pretrained", "boolean", "timm only: true downloads timm's weights (internet)", False),
    Key("full_model", "boolean", "true: checkpoint is a whole pickled model, loaded with weights_only=False (runs "
        "code from the file: only for a file you trust)", False),
), ModelSpec)

EVAL = Table("[eval]", "eval", " ".join(EvalSpec.__doc__.split()), (
    Key("engine", "string", "the simulation's runtime: torch, or a runtime's float kernels on the exported QDQ "
        "model (CPU)", "torch", choices=ENGINES),
    Key("deploy", "list of strings", "also run each quantized row on each runtime's integer kernels: "
        "<target>_top1/_top5/_agreement/_integer_layers/_float_layers columns (blank for rows whose activations "
        "are neither 8 nor 16 bits)", (), choices=DEPLOY_TARGETS, unique="target"),
), EvalSpec)

EXECUTION = Table("[execution]", "execution", " ".join(ExecutionSpec.__doc__.split()), (
    Key("ray", "string", 'omitted: in this process; "local": a Ray started here; "auto" / "HOST:PORT": a Ray '
        "cluster (the work units run as Ray tasks)", expected='be "local", "auto" or "HOST:PORT" (or omitted)'),
    Key("gpus_per_task", "number", "the fraction of a GPU each Ray task reserves", 0.0, low=0, high=8,
        expected="be a number of GPUs in [0, 8] (0.25: four tasks share one)"),
    Key("unit", "string", "the work unit: prefix (one per model and FP32 prefix) or model (one per model)",
        "prefix", choices=("prefix", "model")),
), ExecutionSpec)

ADAROUND = Table("[adaround]", "adaround", "The adaround step's options (presets: ptq); hashed only where a "
                 "combination runs AdaRound. Defaults: the library's (clebench.adaround.AdaroundSettings).", (
    Key("iterations", "integer", "optimization steps per layer", _ADAROUND_DEFAULTS.iterations, low=1),
    Key("calibration_images", "integer", "images AdaRound learns from, class-balanced from calibration_split "
        "(omitted: the [data] calibration images)", low=1),
    Key("reg_param", "number", "lambda, the rounding regularizer's weight", _ADAROUND_DEFAULTS.reg_param, low=0),
    Key("beta_range", "list of numbers", "beta's annealing, [start, end]", _ADAROUND_DEFAULTS.beta_range, low=0,
        low_open=True, length=2, expected="be [start, end], two positive numbers"),
    Key("warm_start", "number", "the fraction of the iterations without the regularizer",
        _ADAROUND_DEFAULTS.warm_start, low=0, high=1, high_open=True),
    Key("seed", "integer", "the sampling seed: same seed, data and device -> the same rounding",
        _ADAROUND_DEFAULTS.seed, low=0),
), AdaroundSpec)

ACT_EQUALIZE = Table("[act_equalize]", "act_equalize", "The act_equalize steps' options "
                     "(clebench.activation_equalization); hashed only where a combination runs one.", (
    Key("alpha", "number", "SmoothQuant's migration strength: s = a^alpha / w^(1 - alpha) per channel",
        DEFAULT_ALPHA, low=0, high=1),
), ActEqualizeSpec)

BREVITAS = Table("[brevitas]", "brevitas", "The brevitas_equalize steps' options (clebench.peers.brevitas); "
                 "hashed only where a combination runs one.", (
    Key("iterations", "integer", "graph-equalization rounds (Brevitas' PTQ benchmark: 20)", BREVITAS_ITERATIONS,
        low=1),
), BrevitasSpec)

SENSITIVITY = Table("[sensitivity]", "sensitivity", "Per-layer quantization sensitivity (clebench.sensitivity) "
                    "of some of the sweep's rows, written to sensitivity.csv / sensitivity.json; not hashed (it "
                    "changes no number of the sweep's rows).", (
    Key("images", "integer", "class-balanced evaluation images it ranks on (its cost scales with this)",
        DEFAULT_SENSITIVITY_IMAGES, low=1),
    Key("rows", "list", "the rows measured, each a row of this sweep: rows entries below", (),
        expected="be a list of { model = ..., steps = ..., quant = ... } tables"),
), SensitivitySpec)

SENSITIVITY_ROW = Table("[sensitivity] rows entries", "sensitivity.rows[i]", " ".join(SensitivityRow.__doc__.split()), (
    Key("model", "string", "one of the sweep's models", REQUIRED, expected="be a string"),
    Key("steps", "string", 'one of the sweep\'s step combinations, e.g. "bn_fold+cls"', REQUIRED,
        expected="be a string"),
    Key("quant", "string", "one of the sweep's quant settings", REQUIRED, expected="be a string"),
), SensitivityRow)

REPORT = Table("[report]", "report", "The report's options.", (
    Key("range_layers", "string or list of strings", "layers whose per-channel ranges are plotted (Fig. 2); qualified names "
        "allowed", (FIRST_DEPTHWISE,), check=_string_list),
))

CUSTOM_STEP = Table("[custom_steps] NAME = { ... }", "custom_steps.NAME", "One of the config's own FP32 steps, "
                    "usable in steps as NAME (clebench.sweep.custom_steps, which checks these keys); hashed only "
                    "where present, with the sha256 of the defining file.", (
    Key("callable", "string", 'fn(model, input_shape, **kwargs) -> model: "module:fn" or a file relative to the '
        "config's folder", REQUIRED),
    Key("after", "string", "the built-in FP32 step it runs right after", REQUIRED, choices=steps.FP32_STEPS),
    Key("kwargs", "table", "the callable's keyword arguments", {}),
))

SCHEMA: tuple[Table, ...] = (TOP, DATA, IMAGEFOLDER, PREPROCESS, MODEL, EVAL, EXECUTION, ADAROUND, ACT_EQUALIZE,
                             BREVITAS, SENSITIVITY, SENSITIVITY_ROW, REPORT, CUSTOM_STEP)


def _checkpoint_path(written: str, base_dir: Path | None) -> str:
    path = Path(written).expanduser()
    return str(path) if base_dir is None or path.is_absolute() else os.path.normpath(base_dir / path)


# The tables' parsers: check_table() with the table's keys, then the rules that tie keys together.

def _models(value: Any, base_dir: Path | None) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"models {TOP['models'].must()}, got {value!r}")
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
    where = f"models.{entry['name']}"
    values = check_table(entry, MODEL.keys, where, f"models entry {entry['name']!r}")
    checkpoint, factory = values["checkpoint"], values["factory"]
    if values["full_model"] and (checkpoint is None or factory is not None or values["kwargs"] or values["pretrained"]):
        raise ConfigError(f"{where}.full_model: the checkpoint is the whole model; give checkpoint and no factory, "
                          "kwargs or pretrained")
    if values["pretrained"] and checkpoint is not None:
        raise ConfigError(f"{where}: give pretrained = true (the hub's weights) or a checkpoint, not both")
    folder = None if factory is None else (base_dir or Path.cwd()).resolve()
    source = None if factory is None else callable_source(factory, folder, f"{where}.factory")
    return ModelSpec(
        **values | {"checkpoint": None if checkpoint is None else _checkpoint_path(checkpoint, base_dir)},
        written_checkpoint=checkpoint, factory_sha256=None if source is None else source["sha256"],
        base_dir=None if folder is None else str(folder))


def _data(table: Any, base_dir: Path | None) -> DataSpec:
    imagefolder = isinstance(table, dict) and table.get("dataset") == "imagefolder"
    values = check_table(table, DATA.keys + (IMAGEFOLDER.keys if imagefolder else ()), "data", "[data]")
    if values["download"] and imagefolder:
        raise ConfigError("data.download: an imagefolder data set is not downloaded; remove the key")
    if not imagefolder:
        return DataSpec(**values)
    root, classes = values.pop("root"), values.pop("classes")
    if isinstance(classes, str):
        classes = read_classes_file(Path(_checkpoint_path(classes, base_dir)), "data.classes")
    return DataSpec(**values, root=_checkpoint_path(root, base_dir), written_root=root,
                    classes=None if classes is None else check_classes(classes, "data.classes"))


def _execution(table: Any) -> ExecutionSpec:
    return ExecutionSpec(**check_table(table, EXECUTION.keys, "execution", "[execution]"))


def _eval(table: Any) -> EvalSpec:
    return EvalSpec(**check_table(table, EVAL.keys, "eval", "[eval]"))


def _adaround(table: Any, data: DataSpec) -> AdaroundSpec:
    """The [adaround] options; calibration_images equal to the [data] calibration images is None (hashed alike)."""
    values = check_table(table, ADAROUND.keys, "adaround", "[adaround]")
    spec = AdaroundSpec(**values | {"calibration_images": None if values["calibration_images"] == data.calibration
                                    else values["calibration_images"]})
    try:
        spec.settings()  # the library's own checks, should the schema above ever allow more than it does
    except AdaroundError as error:
        raise ConfigError(f"[adaround]: {error}") from None
    return spec


def _act_equalize(table: Any) -> ActEqualizeSpec:
    return ActEqualizeSpec(**check_table(table, ACT_EQUALIZE.keys, "act_equalize", "[act_equalize]"))


def _brevitas(table: Any) -> BrevitasSpec:
    return BrevitasSpec(**check_table(table, BREVITAS.keys, "brevitas", "[brevitas]"))


def _report(table: Any) -> tuple[str, ...]:
    return check_table(table, REPORT.keys, "report", "[report]")["range_layers"]


def _sensitivity(table: Any, config: SweepConfig) -> SensitivitySpec:
    """The [sensitivity] table; each row must be one of `config`'s rows (a model, a combination, a setting of it)."""
    values = check_table(table, SENSITIVITY.keys, "sensitivity", "[sensitivity]")
    rows = tuple(_sensitivity_row(entry, f"sensitivity.rows[{index}]", config)
                 for index, entry in enumerate(values["rows"]))
    if len(set(rows)) != len(rows):
        raise ConfigError("sensitivity.rows lists a row twice")
    return SensitivitySpec(values["images"], rows)


def _sensitivity_row(entry: Any, where: str, config: SweepConfig) -> SensitivityRow:
    """A rows entry, which must name a model, a step combination and a quant setting of the sweep."""
    row = SensitivityRow(**check_table(entry, SENSITIVITY_ROW.keys, where, where))
    models = [spec.name for spec in config.models]
    if row.model not in models:
        raise ConfigError(f"{where}.model {row.model!r} is not one of the sweep's models ({', '.join(models)})")
    try:
        combination = steps.parse_combination(row.steps, config.custom_steps)
    except steps.StepError as error:
        raise ConfigError(f"{where}.steps: {error}") from None
    if steps.quantizer_step(combination):
        raise ConfigError(f"{where}.steps {entry['steps']!r}: an NNCF row has no simulation whose layers could be "
                          "measured one by one; choose a row that clebench's simulation quantizes")
    if combination not in config.combinations:
        combinations = [steps.combination_name(c) for c in config.combinations]
        raise ConfigError(f"{where}.steps {row.steps!r} is not one of the sweep's step combinations "
                          f"({', '.join(combinations)})")
    try:
        quant = QuantConfig.from_name(row.quant).name
    except ValueError as error:
        raise ConfigError(f"{where}.quant: {error}") from None
    settings = [setting.name for setting in config.quant_configs]
    if quant not in settings:
        raise ConfigError(f"{where}.quant {row.quant!r} is not one of the sweep's quant settings ({', '.join(settings)})")
    return SensitivityRow(row.model, steps.combination_name(combination), quant)


def parse_config(raw: dict[str, Any], source: str = "config", base_dir: str | Path | None = None) -> SweepConfig:
    """Validate a parsed TOML document; errors name `source` and the key.

    base_dir: the folder relative checkpoint paths are joined to (load_config: the config file's folder); None leaves
    them relative to the working directory.
    """
    try:
        folder = None if base_dir is None else Path(base_dir)
        top = check_table(raw, TOP.keys, "", "the top level")
        custom = parse_custom_steps(top["custom_steps"], folder)
        steps.resolve(top["steps"], custom)
        models = _models(top["models"], folder)
        execution = _execution(top["execution"])
        data = _data(top["data"], folder)
        config = SweepConfig(models, data, top["steps"], top["quant"], _report(top["report"]), execution,
                             _eval(top["eval"]), _adaround(top["adaround"], data), custom_steps=custom,
                             act_equalize=_act_equalize(top["act_equalize"]), brevitas=_brevitas(top["brevitas"]))
        return replace(config, sensitivity=_sensitivity(top["sensitivity"], config))
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
