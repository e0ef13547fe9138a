"""Execute a sweep's work units as Ray tasks (the `ray` extra): on this machine or on a running Ray cluster.

Each unit is one task. Ray schedules them on the CPUs / GPUs it has, retries a task whose worker process died, and
returns results as they finish; the driver records them (clebench.sweep.record), so rows land as soon as their unit is done.
Workers read data and checkpoints from the paths in `Settings` (every node must see them: a shared file system or
the same folder on each node) and share fingerprint-keyed work through a `DiskMemo` beside the results.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from clebench.errors import MissingExtraError, UserError
from clebench.sweep.execute import DiskMemo, Resources, Settings, UnitResult, execute_unit
from clebench.sweep.plan import WorkUnit

TASK_RETRIES = 3  # a unit whose worker process dies is re-run up to this often; an exception in it is not retried
_RESOURCES: dict[Settings, Resources] = {}  # per worker process: checkpoints and images stay loaded between tasks


class UnitFailedError(UserError):
    """A work unit raised on a Ray worker (its message names the unit and the error); rows recorded before it stay."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError('--ray needs Ray: pip install -e ".[ray]"') from None
    return ray


def _execute_task(unit: WorkUnit, settings: Settings, memo_dir: str) -> UnitResult:
    """The Ray task: one unit, with this worker's cached resources and the shared on-disk memo."""
    resources = _RESOURCES.setdefault(settings, Resources(settings))
    return execute_unit(unit, settings, resources, DiskMemo(Path(memo_dir)))


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT"), or start a local one with this machine's CPUs/GPUs."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
    except ConnectionError as error:
        raise ConnectionError(f"cannot reach a Ray cluster at {address!r} ({error}); start one with `ray start --head` "
                              "or pass --ray alone for a local Ray") from None


def execute_on_ray(units: list[WorkUnit], settings: Settings, memo_dir: Path, *, address: str | None = None,
                   gpus_per_task: float = 0.0) -> Iterator[UnitResult]:
    """Submit every unit at once and yield their results as they finish; leaving early cancels the rest.

    gpus_per_task: the fraction of a GPU each task reserves (0.25 lets four units share one card).
    """
    ray = _import_ray()
    connect(address)
    task = ray.remote(_execute_task).options(
        num_cpus=1, num_gpus=gpus_per_task, max_retries=TASK_RETRIES, retry_exceptions=False,
    )
    settings_ref = ray.put(settings)
    pending = {task.remote(unit, settings_ref, str(memo_dir)): unit for unit in units}
    try:
        while pending:
            (finished,), _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(finished)
            try:
                result = ray.get(finished)
            except ray.exceptions.RayTaskError as error:
                raise UnitFailedError(f"work unit {unit.name} failed on a Ray worker: "
                                      f"{type(error.cause).__name__}: {error.cause}") from error
            yield result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
