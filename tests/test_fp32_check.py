"""The sweep's FP32 check (clebench.sweep.fp32_check): bounded steps, and where a broken model first diverges."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from conftest import randomize_batch_norms
from torch import nn

from clebench import graph
from clebench.sweep import fp32_check, steps


class Residual(nn.Module):
    """conv1 -> BN -> ReLU -> conv2, + x, -> ReLU -> conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.out_relu, self.conv3 = nn.Conv2d(4, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv3(self.out_relu(self.conv2(self.relu(self.bn(self.conv1(x)))) + x))


def states() -> tuple[steps.PipelineState, steps.PipelineState, torch.Tensor]:
    torch.manual_seed(0)
    before = steps.PipelineState(graph.prepare_model(randomize_batch_norms(Residual())))
    after = copy.deepcopy(before)
    steps.apply_fp32_step("bn_fold", after)
    return before, after, torch.randn(4, 3, 6, 6)


def outputs(*models: nn.Module, probe: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(probe) for model in models]


def test_an_exact_step_passes_and_returns_its_change():
    before, after, probe = states()
    change = fp32_check.check_step("bn_fold", "net", before.model, after.model, probe,
                                   *outputs(before.model, after.model, probe=probe))
    assert 0 < change < 1e-6
    assert fp32_check.first_divergence(before.model, after.model, probe, 1e-6) is None


def test_values_a_scaling_may_change_on_purpose_are_not_divergences():
    """conv1's channels x s, conv2's inputs / s: the ReLU between differs, but nothing after conv2 does."""
    before, after, probe = states()
    scale = torch.tensor([0.5, 2.0, 3.0, 0.25])
    with torch.no_grad():
        after.model.conv1.weight.mul_(scale.view(-1, 1, 1, 1)), after.model.conv1.bias.mul_(scale)
        after.model.conv2.weight.div_(scale.view(1, -1, 1, 1))
    assert fp32_check.first_divergence(before.model, after.model, probe, 1e-5) is None


def test_a_broken_step_stops_naming_the_first_value_that_differs():
    before, after, probe = states()
    with torch.no_grad():
        after.model.conv2.weight.mul_(2.0)  # conv2's output is a layer's: the residual add is the first to differ
    with pytest.raises(fp32_check.FP32StepError, match=r"net: step cls changed the FP32 output by rel .* \(> 0\.0001\) "
                                                       r"on 4 calibration images; the first value that differs is "
                                                       r"add\(conv2, x\) \(rel"):
        fp32_check.check_step("cls", "net", before.model, after.model, probe,
                              *outputs(before.model, after.model, probe=probe))


def test_steps_that_change_the_function_on_purpose_are_measured_not_bounded():
    before, after, probe = states()
    with torch.no_grad():
        after.model.conv3.bias.add_(1.0)
    change = fp32_check.check_step("relu6_to_relu", "net", before.model, after.model, probe,
                                   *outputs(before.model, after.model, probe=probe))
    assert change > 0.01
    assert "relu6_to_relu" not in fp32_check.TOLERANCES and "hbf" not in fp32_check.TOLERANCES


def test_a_rows_columns_keep_hbf_apart_from_the_exact_steps():
    columns = fp32_check.row_columns({"bn_fold": 2e-7, "cls": 5e-7, "hbf": 0.14, "relu6_to_relu": 0.3})
    assert columns == {"fp32_step_change": 5e-7, "hbf_fp32_change": 0.14}
    assert fp32_check.row_columns({})["fp32_step_change"] == 0.0 and pd.isna(fp32_check.row_columns({})["hbf_fp32_change"])


@pytest.mark.slow
def test_every_sweep_row_records_its_steps_fp32_change(uninterrupted):
    table = pd.read_csv(uninterrupted / "results.csv")
    assert (table["fp32_step_change"] > 0).all() and (table["fp32_step_change"] <= 1e-4).all()
    with_hbf = table["steps"].str.contains("hbf")
    assert with_hbf.any() and table.loc[with_hbf, "hbf_fp32_change"].notna().all()
    assert table.loc[~with_hbf, "hbf_fp32_change"].isna().all()
