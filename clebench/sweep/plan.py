"""Plan a sweep: its config -> the rows it must produce, grouped into work units. Pure: no model, data or torch work.

A work unit is one model's rows that share work. With granularity "prefix" (the default) a unit is one FP32 step
prefix and every row below it: the rows of that prefix with and without bias correction, for every quantization
setting; they share the FP32 model, its accuracy and its activation ranges. Granularity "model" puts all of a
model's rows in one unit (most sharing, least parallelism). Units come in config order, and so do their rows.

Each row of the config's [sensitivity] table whose per-layer sensitivity is not measured yet is a unit of its own
(its FP32 prefixes, no results row), placed after its model's row units: it then finds the activation ranges those
units memoized, and on Ray it runs in parallel with the rest.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from clebench.sweep import steps
from clebench.sweep.config import ModelSpec, SweepConfig
from clebench.sweep.results import RowKey

GRANULARITIES = ("prefix", "model")


@dataclass(frozen=True)
class WorkUnit:
    """Rows of one model that are computed together, and the FP32 step prefixes whose ranges they record."""

    model: ModelSpec
    rows: tuple[RowKey, ...]
    prefixes: tuple[steps.Combination, ...]  # every FP32 prefix the rows build, shortest first, no duplicates
    sensitivity: tuple[RowKey, ...] = ()  # rows whose per-layer sensitivity the unit measures

    @property
    def name(self) -> str:
        if self.sensitivity:
            return f"{self.model.name}: sensitivity of {', '.join(f'{k.steps} {k.quant}' for k in self.sensitivity)}"
        return f"{self.model.name}: {', '.join(steps.combination_name(p) for p in self.prefixes[-1:])}"


def combination_of(key: RowKey) -> steps.Combination:
    return () if key.steps == steps.NO_STEPS else tuple(key.steps.split("+"))


def row_order(config: SweepConfig, usable: Mapping[str, list[steps.Combination]]) -> list[RowKey]:
    """Every row of the sweep in config order: model, then step combination, then quantization setting (the
    settings a combination runs under: steps.runs_under)."""
    dataset = config.data.dataset
    return [
        RowKey(spec.name, dataset, steps.combination_name(combination), quant.name)
        for spec in config.models
        for combination in usable[spec.name]
        for quant in config.quant_configs
        if steps.runs_under(combination, quant)
    ]


def sensitivity_rows(config: SweepConfig) -> list[RowKey]:
    """The rows of the config's [sensitivity] table, in its order."""
    return [RowKey(row.model, config.data.dataset, row.steps, row.quant) for row in config.sensitivity.rows]


def sensitivity_unit(model: ModelSpec, key: RowKey) -> WorkUnit:
    """The unit that measures the per-layer sensitivity of row `key` (and computes no results row)."""
    fp32_steps, _ = steps.split_combination(combination_of(key))
    return WorkUnit(model, (), prefixes_of(fp32_steps), (key,))


def prefixes_of(fp32_steps: steps.Combination) -> tuple[steps.Combination, ...]:
    """(), then ("bn_fold",), ... up to fp32_steps itself: every state a pipeline passes through."""
    return tuple(fp32_steps[:n] for n in range(len(fp32_steps) + 1))


def plan(config: SweepConfig, usable: Mapping[str, list[steps.Combination]], done: Iterable[RowKey] = (),
         granularity: str = "prefix", identities: Mapping[tuple[str, steps.Combination], str] | None = None,
         measured: Iterable[RowKey] = ()) -> list[WorkUnit]:
    """The work units that produce the rows of `config` not in `done` and measure the sensitivity of its
    [sensitivity] rows not in `measured`.

    usable: per model name, the step combinations it runs (see `sweep.check_models`).
    identities: (model, FP32 prefix) -> an identity of the model that prefix builds (its fingerprint); prefixes that
        build the same model (a step that changes nothing, as relu6_to_relu on a network without ReLU6) then share a
        unit, so concurrent units never redo each other's work. Without it every prefix is its own identity.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    finished = set(done)
    groups: dict[tuple, list[RowKey]] = {}
    for key in row_order(config, usable):
        if key in finished:
            continue
        fp32_steps, _ = steps.split_combination(combination_of(key))
        identity = fp32_steps if identities is None else identities[(key.model, fp32_steps)]
        group = (key.model,) if granularity == "model" else (key.model, identity)
        groups.setdefault(group, []).append(key)
    specs = {spec.name: spec for spec in config.models}
    units = [WorkUnit(specs[group[0]], tuple(rows), _prefixes(rows)) for group, rows in groups.items()]
    measured = set(measured)
    unmeasured = [key for key in sensitivity_rows(config) if key not in measured]
    return [unit for spec in config.models for unit in (
        *(u for u in units if u.model == spec),
        *(sensitivity_unit(spec, key) for key in unmeasured if key.model == spec.name),
    )]


def _prefixes(rows: list[RowKey]) -> tuple[steps.Combination, ...]:
    ordered: dict[steps.Combination, None] = {}
    for key in rows:
        fp32_steps, _ = steps.split_combination(combination_of(key))
        ordered.update(dict.fromkeys(prefixes_of(fp32_steps)))
    return tuple(sorted(ordered, key=len))
