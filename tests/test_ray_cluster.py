"""The sweep on a real two-node Ray cluster started as the README says (`ray start --head`, `ray start --address`),
with token authentication, on this machine: nodes without CLEBENCH_*, a driver that has them and RAY_ADDRESS.

Each node has one CPU, its own short temporary folder and its own process group, which the tests end themselves
(never `ray stop`, which stops every Ray of this user on the machine).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from clebench.sweep.results import KEY_COLUMNS, row_differences
from sweeps import run_sweep, sweep_command
from test_ray import broken_data_root

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

NODE_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, command line) of every process (whole lines, whatever COLUMNS says)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    return [(int(p), int(pp), int(g), args) for p, pp, g, args in (line.split(None, 3) for line in listing.splitlines())]


class Node:
    """One `ray start` node; its daemons keep the process group of the `ray start` command that made them."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
        command = ["ray", "start", "--num-cpus", "1", "--temp-dir", self.temp_dir, "--disable-usage-stats",
                   "--object-store-memory", str(200 * 2**20), *args]
        start = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        self.group: int | None = start.pid
        _, self.start_log = start.communicate(timeout=NODE_START_TIMEOUT_S)
        self.started = start.returncode == 0

    def alive(self) -> bool:
        return any(group == self.group and "raylet/raylet" in args for _, _, group, args in processes())

    def task_processes(self) -> list[int]:
        """Ray workers of this node that run a work unit (children of its raylet, in process groups of their own)."""
        raylets = {pid for pid, _, group, args in processes() if group == self.group and "raylet/raylet" in args}
        return [pid for pid, parent, _, args in processes() if parent in raylets and "ray::_execute_task" in args]

    def stop(self) -> None:
        """What `ray stop` does to this node alone: SIGTERM its processes, SIGKILL what is left after 5 s."""
        if self.group is None:
            return
        members = {pid for pid, _, group, _ in processes() if group == self.group}
        workers = {pid for pid, parent, _, _ in processes() if parent in members}  # in groups of their own
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            try:
                os.killpg(self.group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(group == self.group for _, _, group, _ in processes()):
                time.sleep(0.2)
        self.group = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Cluster:
    """A head node and worker nodes on this machine, with token authentication (the token in RAY_AUTH_TOKEN)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        self.nodes: list[Node] = []

    def node_env(self) -> dict[str, str]:
        """A node's environment: the token, and no CLEBENCH_* (workers must not need them) nor RAY_ADDRESS."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLEBENCH_") and k != "RAY_ADDRESS"}
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def driver_env(self, token: bool = True) -> dict[str, str]:
        env = os.environ | {"RAY_ADDRESS": self.address}
        if token:
            return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}

    def start_head(self) -> Node:
        return self._start("--head", "--port", str(self.port), "--include-dashboard", "false")

    def add_worker(self) -> Node:
        return self._start("--address", self.address)

    def _start(self, *args: str) -> Node:
        node = Node(self.node_env(), *args)
        self.nodes.append(node)  # stopped at the end even when it did not start
        assert node.started, node.start_log[-2000:]
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    try:
        cluster.start_head()
        cluster.add_worker()
        yield cluster
    finally:
        cluster.stop()


def sweep_on(cluster: Cluster, config: Path, out: Path, *extra: str, token: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(config, out, "--ray", "auto", *extra), env=cluster.driver_env(token),
                          capture_output=True, text=True, timeout=600)


def test_a_cluster_sweep_with_paths_from_the_driver_environment_writes_the_local_rows(cluster, config_file,
                                                                                      uninterrupted, tmp_path):
    out = tmp_path / "cluster"
    result = sweep_on(cluster, config_file, out)
    assert result.returncode == 0, result.stderr
    assert row_differences(out, uninterrupted) == []


def test_a_failed_unit_is_one_line_naming_it(cluster, config_file, data_root, tmp_path):
    root, broken = broken_data_root(data_root, tmp_path / "data")
    result = sweep_on(cluster, config_file, tmp_path / "failed", "--data-root", str(root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clebench sweep: error: work unit mobilenet_v2_cifar10") and str(broken) in lines[0]


def test_a_cluster_that_refuses_the_token_is_one_line_naming_the_address_and_the_fix(cluster, config_file, tmp_path):
    result = sweep_on(cluster, config_file, tmp_path / "refused", token=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{cluster.address} (from RAY_ADDRESS) refused the connection" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]


def test_an_unreachable_address_is_one_line(config_file, tmp_path):
    result = run_sweep(config_file, tmp_path / "unreachable", "--ray", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert result.stderr.startswith("clebench sweep: error: cannot reach a Ray cluster at 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_worker_node_that_leaves_mid_sweep_loses_no_row_and_a_rerun_finishes(cluster, config_file, uninterrupted,
                                                                               tmp_path):
    """The worker node is stopped while it runs a unit; a node that joins mid-sweep takes its place."""
    out = tmp_path / "leaving"
    leaving = cluster.nodes[-1]
    sweep = subprocess.Popen(sweep_command(config_file, out, "--ray", "auto"), env=cluster.driver_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not leaving.task_processes() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leaving.task_processes(), f"no unit ran on the worker node (sweep exit {sweep.poll()})"
    recorded = pd.read_csv(out / "results.csv") if (out / "results.csv").is_file() else None
    leaving.stop()
    cluster.add_worker()
    _, stderr = sweep.communicate(timeout=600)
    if sweep.returncode != 0:  # Ray could not retry the lost unit: one line, and the re-run finishes the sweep
        assert sweep.returncode == 2 and len(stderr.strip().splitlines()) == 1, stderr
        rerun = sweep_on(cluster, config_file, out)
        assert rerun.returncode == 0, rerun.stderr
    assert row_differences(out, uninterrupted) == []
    rows = pd.read_csv(out / "results.csv")
    assert not rows.duplicated(KEY_COLUMNS).any()
    if recorded is not None:  # rows recorded before the node left are kept as they were
        kept = rows.merge(recorded, on=KEY_COLUMNS, suffixes=("", "_before"))
        assert len(kept) == len(recorded) and (kept["seconds"] == kept["seconds_before"]).all()
