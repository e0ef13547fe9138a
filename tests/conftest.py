"""Shared fixtures: models with realistic BN statistics, and the paths of the shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from clebench.activations import ChannelClippedReLU
from sweeps import CONFIG, run_sweep


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
