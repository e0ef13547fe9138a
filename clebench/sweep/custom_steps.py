"""A sweep config's own FP32 steps, the [custom_steps] table, beside the built-in ones:

    [custom_steps]
    my_eq = { callable = "my_steps.py:equalize", after = "bn_fold", kwargs = { iterations = 10 } }
    steps = ["bn_fold", "bn_fold+my_eq", "bn_fold+my_eq+cls"]

`equalize(model, input_shape, **kwargs)` gets the FP32 model part-way through the pipeline (a torch.fx GraphModule in
eval mode) and the sweep's input shape (N, C, H, W) = (1, 3, crop height, crop width), and returns the model: the
same one changed in place, or a new one. The step sits in pipeline order right after `after`, a built-in FP32 step
(several custom steps after one step: in config order). "module:fn" is imported, "file.py:fn" is loaded from the
file, relative to the config's folder, which also goes on the import path.

A CustomStep is plain data: it travels inside the config to Ray workers, and each process loads its callable when it
first applies it, checking that the defining file is still the one whose sha256 the config hash covers.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from clebench.callables import callable_source, is_file, load_callable, split_spec
from clebench.errors import UserError
from clebench.sweep.steps import FP32_STEPS, NO_STEPS, PRESETS, STEP_ORDER, PipelineState

KEYS = {"callable", "after", "kwargs"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED_KWARGS = ("model", "input_shape")


class CustomStepError(UserError):
    """A custom step that is badly defined, raises, or does not return a model."""


@dataclass(frozen=True)
class CustomStep:
    """One [custom_steps] entry. sha256: of the file defining the callable when the config was read (None for a
    module without a file); file and base_dir (absolute) say where it is, and are not part of the config hash."""

    name: str
    callable: str  # as the config writes it
    after: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    sha256: str | None = None
    file: str | None = field(default=None, compare=False)
    base_dir: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """What the config hash covers: the definition as written and the defining file's content hash."""
        return {"callable": self.callable, "after": self.after, "kwargs": self.kwargs, "sha256": self.sha256}

    def source(self) -> dict[str, str | None]:
        """meta.json's record of the step's code: callable, module (None for a file), file, sha256."""
        module, _ = split_spec(self.callable, self._where)
        return {"callable": self.callable, "module": None if is_file(module) else module, "file": self.file,
                "sha256": self.sha256}

    @property
    def _where(self) -> str:
        return f"custom_steps.{self.name}.callable"

    def function(self) -> Callable:
        """The step's callable, loaded in this process; CustomStepError if its file changed since the config was
        read (a Ray worker that sees another version of it, or an edit mid-sweep)."""
        base_dir = None if self.base_dir is None else Path(self.base_dir)
        now = callable_source(self.callable, base_dir, self._where)["sha256"]
        if now != self.sha256:
            raise CustomStepError(f"custom step {self.name!r}: {self.file} changed since the config was read "
                                  f"(sha256 {self.sha256} then, {now} now); every process must run the same code")
        return load_callable(self.callable, base_dir, self._where)

    def apply(self, state: PipelineState) -> bool:
        """Run the step on `state` (its model replaced by the one the step returns); always counts as a change."""
        function = self.function()
        try:
            result = function(state.model, state.input_shape, **copy.deepcopy(self.kwargs))
        except Exception as error:
            message = (str(error).strip().splitlines() or [""])[0]
            raise CustomStepError(f"custom step {self.name!r} ({self.callable}) raised "
                                  f"{type(error).__name__}: {message}") from error
        if not isinstance(result, nn.Module):
            raise CustomStepError(f"custom step {self.name!r} ({self.callable}) returned a {type(result).__name__}, "
                                  "not a torch.nn.Module: return the model (changed in place, or a new one)")
        if result is not state.model:
            _carry_over(state, result, self.name)
            state.model = result.to(_device(state.model)).eval()
        return True


def _device(model: nn.Module):
    return next((tensor.device for tensor in model.state_dict().values()), "cpu")


def _carry_over(state: PipelineState, new: nn.Module, name: str) -> None:
    """Point what earlier steps recorded (the BN fold map, the CLS sets) at the same-named modules of `new`."""
    names = {id(module): module_name for module_name, module in state.model.named_modules()}
    modules = dict(new.named_modules())

    def same(module: nn.Module) -> nn.Module:
        module_name = names.get(id(module))
        if module_name not in modules:
            raise CustomStepError(f"custom step {name!r} returned a new model without the layer {module_name!r} "
                                  "that an earlier step recorded; change the model in place or keep its layer names")
        return modules[module_name]

    state.bn_map = {same(layer): bn for layer, bn in state.bn_map.items()}
    for info in state.cls_infos:
        for pair in info.cls_pair_info_list:
            pair.layer1, pair.layer2 = same(pair.layer1), same(pair.layer2)
            if pair.clip is not None:
                pair.clip = same(pair.clip)


def _reserved_names() -> dict[str, str]:
    """The names a custom step may not take, and what each already is."""
    return ({name: "a built-in step" for name in STEP_ORDER} | {name: "a preset" for name in (*PRESETS, "all")}
            | {NO_STEPS: "the empty combination"})


def parse_custom_steps(table: Any, base_dir: Path | None) -> tuple[CustomStep, ...]:
    """The [custom_steps] table, checked; each defining file is found and hashed, not run.

    base_dir: the config's folder (None: the working directory).
    """
    if not isinstance(table, dict):
        raise CustomStepError('[custom_steps] must be a table: NAME = { callable = "module:fn", after = "bn_fold" }')
    folder = (Path.cwd() if base_dir is None else Path(base_dir)).resolve()
    return tuple(_custom_step(name, entry, folder) for name, entry in table.items())


def _custom_step(name: str, entry: Any, folder: Path) -> CustomStep:
    where = f"custom_steps.{name}"
    if not _NAME.match(name):
        raise CustomStepError(f"{where}: a step name is letters, digits and underscores, not starting with a digit")
    reserved = _reserved_names()
    if name in reserved:
        raise CustomStepError(f"{where}: {name!r} is already {reserved[name]}; choose another name")
    if not isinstance(entry, dict):
        raise CustomStepError(f'{where} must be a table {{ callable = "module:fn", after = "bn_fold" }}, got {entry!r}')
    extra = sorted(set(entry) - KEYS)
    if extra:
        raise CustomStepError(f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} in {where}; "
                              f"allowed: {', '.join(sorted(KEYS))}")
    if entry.get("after") not in FP32_STEPS:
        raise CustomStepError(f"{where}.after must be one of the built-in FP32 steps ({', '.join(FP32_STEPS)}), "
                              f"got {entry.get('after')!r}")
    source = callable_source(entry.get("callable"), folder, f"{where}.callable")
    return CustomStep(name, entry["callable"], entry["after"], _kwargs(entry.get("kwargs", {}), where),
                      source["sha256"], source["file"], str(folder))


def _kwargs(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CustomStepError(f"{where}.kwargs must be a table of the callable's keyword arguments, got {value!r}")
    taken = [key for key in _RESERVED_KWARGS if key in value]
    if taken:
        raise CustomStepError(f"{where}.kwargs: {', '.join(taken)} is passed by the sweep itself")
    try:
        json.dumps(value)
    except TypeError as error:
        raise CustomStepError(f"{where}.kwargs must hold strings, numbers, booleans, arrays and tables "
                              f"({error})") from None
    return value
