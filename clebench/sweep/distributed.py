"""Execute a sweep's work units as Ray tasks (the `ray` extra): on this machine or on a running Ray cluster.

Each unit is one task. Ray schedules them on the CPUs / GPUs it has, retries a task whose worker process died, and
returns results as they finish; the driver records them (clebench.sweep.record), so rows land as soon as their unit is done.
Workers read data, checkpoints and the image cache from the absolute paths the driver resolved into `Settings` (every
node must see them: a shared file system or the same folder on each node; a worker never reads its own CLEBENCH_*)
and share fingerprint-keyed work through a `DiskMemo` beside the results. A node that leaves mid-sweep costs only the
units it was running: Ray re-runs them elsewhere, and rows already recorded stay.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from clebench.errors import MissingExtraError, UserError
from clebench.sweep.execute import DiskMemo, Resources, Settings, UnitResult, execute_unit
from clebench.sweep.plan import WorkUnit

TASK_RETRIES = 3  # a unit whose worker process dies is re-run up to this often; an exception in it is not retried
ADDRESS_VARIABLE = "RAY_ADDRESS"  # the cluster Ray's tools connect to; `--ray auto` honours it too
AUTH_REFUSALS = ("InvalidAuthToken", "Unauthenticated")  # what Ray logs when a cluster rejects this machine's token
REACH_TIMEOUT_S = 5.0
_RESOURCES: dict[Settings, Resources] = {}  # per worker process: checkpoints and images stay loaded between tasks


class UnitFailedError(UserError):
    """A work unit raised on a Ray worker (its message names the unit and the error); rows recorded before it stay."""


class RayConnectionError(UserError):
    """The Ray cluster that --ray names cannot be reached or refuses this machine; the message says what to fix."""


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


def cluster_address(address: str) -> str:
    """Where `--ray ADDRESS` connects: "local" (a Ray started here), HOST:PORT, or for "auto" the cluster named by
    RAY_ADDRESS when it is set (as Ray's own tools read it), else "auto" (the latest `ray start` on this machine)."""
    if address == "auto":
        return os.environ.get(ADDRESS_VARIABLE) or "auto"
    return address


def connect(address: str) -> None:
    """Start a local Ray ("local") or join the cluster at `address` ("auto", "HOST:PORT"); RayConnectionError if
    it cannot be reached or refuses the connection, in one line, without Ray's connection retries on the terminal."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    options = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if address == "local":
        ray.init(address="local", **options)
        return
    target = cluster_address(address)
    named = target if target == address else f"{target} (from {ADDRESS_VARIABLE})"
    _check_reachable(target, named)
    with _stderr_captured() as log:
        try:
            ray.init(address=target, **options)
            return
        except (ConnectionError, ray.exceptions.AuthenticationError) as error:
            failure, said = error, _read(log)
        except BaseException:
            sys.stderr.write(_read(log))  # not a connection problem: show what Ray said about it
            raise
    if isinstance(failure, ray.exceptions.AuthenticationError) or any(mark in said for mark in AUTH_REFUSALS):
        raise RayConnectionError(
            f"the Ray cluster at {named} refused the connection: it uses token authentication and this machine has "
            f"no token, or a different one; set RAY_AUTH_MODE=token and give it the head node's token (copy the head's "
            f"~/.ray/auth_token here, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)") from failure
    raise RayConnectionError(f"cannot connect to a Ray cluster at {named} ({failure}); start one with "
                             "`ray start --head`, or pass --ray alone for a Ray on this machine") from failure


def _check_reachable(target: str, named: str) -> None:
    """Fail fast when nothing listens at HOST:PORT (Ray itself retries for half a minute)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise RayConnectionError(f"cannot reach a Ray cluster at {named}: {error.strerror or error}; start one there "
                                 f"with `ray start --head --port {port}`, fix the address, or pass --ray alone for a "
                                 "Ray on this machine") from None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[IO[bytes]]:
    """This process's stderr (file descriptor 2, where Ray's C++ core logs each retry) sent to a temporary file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


def execute_on_ray(units: list[WorkUnit], settings: Settings, memo_dir: Path, *, address: str = "local",
                   gpus_per_task: float = 0.0) -> Iterator[UnitResult]:
    """Submit every unit at once and yield their results as they finish; leaving early cancels the rest.

    address: "local", "auto" or "HOST:PORT" (see `connect`). gpus_per_task: the fraction of a GPU each task
    reserves (0.25 lets four units share one card). A unit that fails raises UnitFailedError naming it.
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
            except ray.exceptions.RayError as error:
                raise UnitFailedError(f"work unit {unit.name} failed on a Ray worker: {_cause(error)}; rows "
                                      "recorded so far are kept (re-run the command to resume)") from error
            yield result
    finally:
        if pending:  # the cancelled tasks end in errors nobody reads: keep Ray from printing each at exit
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        for ref in pending:
            ray.cancel(ref, force=True)


def _cause(error: Exception) -> str:
    """The exception a unit raised (a RayTaskError wraps it), else Ray's own failure (a node lost ...), one line."""
    cause = getattr(error, "cause", None) or error
    message = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {message}"
