"""Shared fixtures: models with realistic BN statistics, and the paths of the shared data."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from clebench.activations import ChannelClippedReLU
from clebench.quant import QuantConfig, QuantSim
from clebench.quant.encoding import Encoding
from sweeps import CONFIG, run_sweep


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script_path(name: str) -> Path:
    """scripts/<group>/<name>.py: script names are unique across the groups."""
    found = sorted(SCRIPTS.glob(f"*/{name}.py"))
    if len(found) != 1:
        raise LookupError(f"{len(found)} scripts named {name}.py under {SCRIPTS}")
    return found[0]


def load_script(name: str) -> ModuleType:
    """scripts/<group>/<name>.py as module `name` (the scripts are no package), loaded once per test session. Its
    folder goes on sys.path first, as running the script puts it there, so it imports the helpers beside it."""
    if name not in sys.modules:
        path = script_path(name)
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (in place), as a trained net has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


class DataDependent(nn.Module):
    """A model torch.fx cannot trace: its forward branches on a tensor value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def set_weight(layer: nn.Module, values, bias=None) -> nn.Module:
    """`layer` with its weight set to `values` (reshaped to the weight's shape) and, if given, its bias to `bias`."""
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values, dtype=torch.float32).reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def assert_layer(layer: nn.Module, weight, bias) -> None:
    """`layer`'s weight, as [out channels, the rest], and bias equal `weight` and `bias`."""
    torch.testing.assert_close(layer.weight.detach().reshape(len(bias), -1), torch.tensor(weight, dtype=torch.float32))
    torch.testing.assert_close(layer.bias.detach(), torch.tensor(bias, dtype=torch.float32))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _env_path(variable: str) -> Path | None:
    """The folder named by env `variable`, made absolute: the README sets relative paths (../shared/data)."""
    value = os.environ.get(variable)
    return Path(value).resolve() if value and Path(value).is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _env_path("CLEBENCH_DATA")
    if root is None:
        pytest.skip("CLEBENCH_DATA is not set to the shared data directory")
    return root


@pytest.fixture(scope="session")
def models_dir() -> Path:
    root = _env_path("CLEBENCH_MODELS")
    if root is None:
        pytest.skip("CLEBENCH_MODELS is not set to the shared checkpoints directory")
    return root


@pytest.fixture(scope="session")
def config_file(tmp_path_factory, data_root, models_dir) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="session")
def uninterrupted(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweeps") / "uninterrupted"
    result = run_sweep(config_file, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def benchmark_rerun(config_file, tmp_path_factory):
    """The same tiny config run a second time, from Python (clebench.benchmark, out= a folder): (its frame, its
    folder). test_api checks the frame is the CLI's results.csv; test_sweep that the second run's rows are the first's
    byte for byte. One run serves both (each was a full 8-row sweep of its own)."""
    import clebench

    out = tmp_path_factory.mktemp("sweeps") / "rerun"
    return clebench.benchmark(config_file, out=out), out


class ClippedNet(nn.Module):
    """conv + ReLU, conv + per-channel clip, conv + ReLU6, a residual add, pooling, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.clip = ChannelClippedReLU(torch.tensor([0.5, 1.0, 2.0, 6.0]))
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.clip(self.conv2(self.relu(self.conv1(x))))
        y = self.relu6(self.conv3(y)) + y
        return self.fc(torch.flatten(self.pool(y), 1))

@pytest.fixture(autouse=True, scope="session")
def _private_image_cache(tmp_path_factory):
    """Tests (and the CLI runs they start) write decoded images into a temporary cache, never the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CLEBENCH_CACHE", str(tmp_path_factory.mktemp("image-cache")))
    yield
    patch.undo()


def require_extra(module: str):
    """Import an optional extra's module for a test file: skip without it, except under CI (env CI set), where the
    extra is installed on purpose and a missing one must fail the run rather than skip its tests."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


# An exactly representable sim (tests of the runtimes: they must reproduce it bit for bit).

INPUT = torch.zeros(1, 3, 8, 8)
GRID = (-8.0, 7.9375)  # an 8-bit asymmetric grid with scale exactly 1/16 (zero point 128)


def exact_sim(config: QuantConfig = QuantConfig()) -> QuantSim:
    """A sim whose every product and sum is exact in float32: weights k/64 on a frozen scale of 1/64, activations on
    1/16 steps, biases on 1/1024 steps, so any summation order gives the same bits and both engines must agree exactly.

    |k| <= 64, so a uint8 activation times an int8 weight, summed in pairs as AVX2's vpmaddubsw does (CPUs without
    VNNI), stays within int16 (2 * 255 * 64 = 32640): the integer kernels cannot saturate on any x86 CPU.
    """
    generator = torch.Generator().manual_seed(0)
    model = ClippedNet().eval()
    with torch.no_grad():
        for layer in (model.conv1, model.conv2, model.conv3, model.fc):
            layer.weight.copy_(torch.randint(-64, 65, layer.weight.shape, generator=generator).float() / 64)
            layer.bias.copy_(torch.randint(-512, 512, layer.bias.shape, generator=generator).float() / 1024)
    sim = QuantSim(model, INPUT, config)
    sim.freeze_param_encodings({f"{name}.weight": Encoding(torch.tensor(1 / 64), torch.tensor(0, dtype=torch.int32), 8, True)
                                for name in ("conv1", "conv2", "conv3", "fc")})
    sim.set_activation_ranges({name: GRID for name in sim.quantizer_names() if not name.endswith((".weight", ".bias"))})
    return sim


def loader(batches: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, 8, 8, generator=generator) * 3, torch.randint(0, 3, (32,), generator=generator))
            for _ in range(batches)]


