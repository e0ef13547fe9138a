"""Sweep configuration: a TOML file (parsed with tomllib) validated into a frozen `SweepConfig`.

    models = ["resnet18_cifar10", "mobilenet_v2_cifar10"]   # or [[models]] tables: name = "...", checkpoint = "..."
                                                            # (a relative checkpoint is relative to the config file)
    steps = "paper"                                         # a preset ("paper", "ptq", "all") or ["bn_fold", "bn_fold+cls", ...]
    quant = ["w8a8_per_tensor_minmax", "w8a8_per_channel_minmax"]

    [data]
    dataset = "cifar10"          # cifar10 | cifar100 | imagenet | imagenette
    eval_split = "test"          # imagenet: a folder of wnid folders relative to the data root
    calibration_split = "train"
    limit = 1000                 # evaluation images, class-balanced (omit for all)
    calibration = 512            # calibration images from calibration_split, class-balanced
    batch_size = 256
    seed = 7                     # omit: the first files per class; set: a seeded random subset
    download = true              # cifar10 | cifar100 | imagenette: torchvision fetches them into the data root if absent

    [eval]                       # optional; the default evaluates the torch simulation only
    engine = "torch"             # or "onnxruntime" / "openvino": the simulation on that runtime's float kernels (CPU)
    deploy = ["onnxruntime", "openvino"]   # also run each quantized row on each runtime's integer kernels:
                                 # <target>_top1/_top5/_agreement/_integer_layers/_float_layers columns

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

    [sensitivity]                # optional; per-layer quantization sensitivity (clebench.sensitivity) of some rows
    images = 500                 # class-balanced evaluation images it ranks on (its cost scales with this)
    rows = [ { model = "mobilenet_v2_cifar10", steps = "bn_fold", quant = "w4a8_per_tensor_minmax" } ]
                                 # each a row of this sweep; written to sensitivity.csv / sensitivity.json

    [report]
    range_layers = ["first_depthwise"]   # layers whose per-channel ranges are plotted (Fig. 2); qualified names allowed

Every key is checked before any work starts; an error names the key and the allowed values. The hash covers what
changes the numbers, as written in the file: checkpoint paths as written (so clones in different folders agree), and
not `download`; the [adaround] options only where a combination runs AdaRound (so configs without it hash as they did
before the step existed); not [sensitivity], which adds sensitivity.csv and changes no number of the sweep's rows (so
it can be added to a finished sweep, whose folder it then shares; each measured row records its images).
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from clebench.adaround import AdaroundError, AdaroundSettings
from clebench.sweep import steps
from clebench.errors import UserError
from clebench.quant import QuantConfig
from clebench.runtimes import RUNTIMES

DATASETS = ("cifar10", "cifar100", "imagenet", "imagenette")
FIRST_DEPTHWISE = "first_depthwise"


class ConfigError(UserError):
    """A sweep configuration that cannot run."""


_UNHASHED = {"hashed": False}  # field metadata: left out of to_dict() and the hash


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoint: str | None = None  # the path loaders use: ~ expanded, a relative one joined to the config's folder
    # The path as the config file writes it: what to_dict() and the hash record (None: same as `checkpoint`).
    written_checkpoint: str | None = field(default=None, repr=False, compare=False, metadata=_UNHASHED)

    def __post_init__(self) -> None:
        if self.written_checkpoint is None:
            object.__setattr__(self, "written_checkpoint", self.checkpoint)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.written_checkpoint}


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

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("hashed", True)}


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

    @property
    def uses_adaround(self) -> bool:
        return any(steps.uses_adaround(combination) for combination in self.combinations)

    @property
    def combinations(self) -> list[steps.Combination]:
        return steps.resolve(self.steps)

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


_TOP_KEYS = {"models", "steps", "quant", "data", "report", "execution", "eval", "adaround", "sensitivity"}
_DATA_KEYS = {"dataset", "eval_split", "calibration_split", "limit", "calibration", "batch_size", "seed", "download"}
_MODEL_KEYS = {"name", "checkpoint"}
_REPORT_KEYS = {"range_layers"}
_EXECUTION_KEYS = {"ray", "gpus_per_task", "unit"}
_EVAL_KEYS = {"engine", "deploy"}
_ADAROUND_KEYS = {f.name for f in fields(AdaroundSpec)}
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
        _unknown(entry, _MODEL_KEYS, f"models entry {entry.get('name')!r}")
        checkpoint = entry.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ConfigError(f"models.{entry['name']}.checkpoint must be a path string, got {checkpoint!r}")
        resolved = None if checkpoint is None else _checkpoint_path(checkpoint, base_dir)
        specs.append(ModelSpec(entry["name"], resolved, written_checkpoint=checkpoint))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"models lists a model twice: {names}")
    return tuple(specs)


def _data(table: Any) -> DataSpec:
    if not isinstance(table, dict):
        raise ConfigError("[data] table is required (at least dataset = \"cifar10\" or another data set)")
    _unknown(table, _DATA_KEYS, "[data]")
    dataset = table.get("dataset")
    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    for key in ("eval_split", "calibration_split"):
        if key in table and not (isinstance(table[key], str) and table[key]):
            raise ConfigError(f"data.{key} must be a non-empty string, got {table[key]!r}")
    seed = table.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"data.seed must be a non-negative integer (or omitted), got {seed!r}")
    download = table.get("download", False)
    if not isinstance(download, bool):
        raise ConfigError(f"data.download must be true or false, got {download!r}")
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
    )


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
        combination = steps.parse_combination(entry["steps"])
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
        steps.resolve(step_spec)
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
        data = _data(raw.get("data"))
        config = SweepConfig(models, data, step_spec, quant, range_layers, execution, _eval(raw.get("eval", {})),
                             _adaround(raw.get("adaround", {}), data))
        return replace(config, sensitivity=_sensitivity(raw.get("sensitivity", {}), config))
    except (ConfigError, steps.StepError, ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a TOML sweep config; relative checkpoint paths in it are relative to its folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return parse_config(raw, str(path), path.resolve().parent)
