"""What a newcomer meets first: the Python version pyproject promises, and the README's commands that CI runs."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_requires_python_covers_the_standard_modules_the_package_imports():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert spec.startswith(">=")
    minimum = tuple(int(part) for part in spec[2:].split("."))
    uses_tomllib = any("import tomllib" in path.read_text() for path in (ROOT / "clebench").rglob("*.py"))
    assert uses_tomllib and minimum >= (3, 11)  # tomllib is new in 3.11
    assert sys.version_info >= minimum


def test_ci_runs_the_readme_setup_commands_with_relative_shared_paths():
    commands = subprocess.run(["bash", str(ROOT / ".ci" / "readme_commands")], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert commands == [
        'pip install -e ".[dev,zoo,onnx,openvino,ray,timm,docs,bench,brevitas,nncf]"',
        "CLEBENCH_DATA=../shared/data CLEBENCH_MODELS=../shared/models python -m pytest -q",
    ]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # docs: tests/test_docs.py builds the site; bench / brevitas / nncf: the peer steps' tests (tests/test_peer_steps.py,
    # tests/test_nncf_steps.py)
    assert {"dev", "zoo", "onnx", "openvino", "ray", "timm", "docs", "bench", "brevitas", "nncf"} <= set(extras)
    run = (ROOT / ".ci" / "run").read_text()
    assert 'eval "$setup"' in run and "pytest" not in run  # the tests run only through the README's command
    # the runtimes cannot be skipped: tests of a missing extra fail under CI, and a sweep deploys to both
    assert run.index('export CI="${CI:-1}"') < run.index('eval "$setup"')
    assert "configs/cifar10_ci_deploy.toml" in run and "scripts/deploy/check_deploy.py" in run


def test_ci_runs_the_readme_bring_your_own_commands():
    commands = subprocess.run(["bash", str(ROOT / ".ci" / "readme_commands"), "Benchmark your own model"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert commands[0] == "python examples/bring_your_own/prepare.py ../shared"
    assert any("--ray" in c for c in commands) and any(c.startswith("clebench check") for c in commands)
    assert 'eval "$byo"' in (ROOT / ".ci" / "run").read_text()
