"""Per-layer sensitivity: units, switching quantizers off, the ranking and the sum-of-parts row."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clebench import graph, sensitivity
from clebench.quant import QuantConfig, QuantSim


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        return self.fc(torch.flatten(self.pool(self.conv2(y) + self.conv3(y)), 1))


def _sim(model: nn.Module, x: torch.Tensor, bits: int = 4) -> QuantSim:
    sim = QuantSim(model, x[:1], QuantConfig(weight_bits=bits, act_bits=8))
    sim.calibrate([x], progress=False)
    return sim


def test_units_pair_each_layer_with_its_output_quantizer():
    torch.manual_seed(0)
    model, x = TwoBranch().eval(), torch.randn(8, 3, 6, 6)
    sim = _sim(model, x)
    found = sensitivity.units(sim)
    layers_ = [u for u in found if u.parameters]
    assert [u.name for u in layers_] == ["conv1", "conv2", "conv3", "fc"]
    assert layers_[0].activation == "relu"  # conv1 + ReLU are one fused op, quantized after the ReLU
    assert layers_[1].activation == "conv2" and layers_[3].activation == "fc"
    lone = {u.activation for u in found if not u.parameters}
    activations = {n for n in sim.quantizer_names() if not n.endswith((".weight", ".bias"))}
    assert lone == activations - {u.activation for u in layers_}  # the input, the add and the pooling
    assert lone and all(u.kind.startswith("activation") for u in found if not u.parameters)


def test_quantized_only_switches_quantizers_off_and_back():
    torch.manual_seed(0)
    model, x = TwoBranch().eval(), torch.randn(8, 3, 6, 6)
    sim = _sim(model, x)
    with torch.no_grad():
        full = sim.model(x)
        with sensitivity.quantized_only(sim, frozenset()):
            assert torch.equal(sim.model(x), model(x))  # nothing quantized: the FP32 function exactly
        with sensitivity.quantized_only(sim, frozenset(sim.quantizer_names())):
            assert torch.equal(sim.model(x), full)
        assert torch.equal(sim.model(x), full)  # restored afterwards
        assert not torch.equal(full, model(x))


def test_ranking_finds_the_layer_with_an_outlier_weight_and_states_the_sum_of_parts():
    """fc2 holds one weight 100x the others (reading a dead hidden unit, so the logits do not change): W4 per tensor
    rounds all its other weights to zero, so quantizing it alone costs far more than quantizing fc1; the
    sum-of-parts row adds the single-unit noise powers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0  # hidden unit 0 is always 0 after the ReLU
        model[2].weight[0, 0] = 100 * model[2].weight.abs().max()
    prepared = graph.prepare_model(model)
    x, labels = torch.randn(64, 16), torch.randint(0, 10, (64,))
    sim = _sim(prepared, x)
    table = sensitivity.sensitivity(sim, [(x, labels)], chunk=24, progress=False)
    units = table[table["kind"] != "model"].set_index("unit")
    assert units["rank"].idxmin() == "2"  # the outlier layer
    assert units.loc["2", "weight_only_sqnr_db"] < units.loc["0", "weight_only_sqnr_db"] - 10
    assert units.loc["2", "all_but_sqnr_db"] > units.loc["0", "all_but_sqnr_db"]  # leaving it out helps most
    whole, parts = (table.set_index("unit").loc[name] for name in (sensitivity.WHOLE_MODEL, sensitivity.SUM_OF_PARTS))
    signal = model(x).double().square().sum().item()
    noise = sum(signal / 10 ** (v / 10) for v in units["weight_only_sqnr_db"] if math.isfinite(v))
    assert parts["weight_only_sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-6)
    assert math.isfinite(whole["weight_only_sqnr_db"]) and whole["only_sqnr_db"] <= whole["weight_only_sqnr_db"] + 1
    assert (table["n_images"] == 64).all()


def test_replayed_passes_equal_full_passes_of_the_sim():
    """Each unit's passes recompute only what lies downstream of it; the result must equal running the whole sim."""
    torch.manual_seed(0)
    model, x = TwoBranch().eval(), torch.randn(12, 3, 6, 6)
    labels = torch.randint(0, 10, (12,))
    sim = _sim(model, x)
    table = sensitivity.sensitivity(sim, [(x[:7], labels[:7]), (x[7:], labels[7:])], chunk=5, progress=False)
    rows = table.set_index("unit")
    reference = model(x).double()
    everything = frozenset(sim.quantizer_names())
    with torch.no_grad():
        for unit in sensitivity.units(sim):
            for mode, enabled in (("only", unit.quantizers), ("all_but", everything - unit.quantizers)):
                with sensitivity.quantized_only(sim, enabled):
                    logits = sim.model(x).double()
                noise = (logits - reference).square().sum().item()
                expected = sensitivity.sqnr_db(reference.square().sum().item(), noise)
                assert rows.loc[unit.name, f"{mode}_sqnr_db"] == pytest.approx(expected, rel=1e-9), (unit.name, mode)
                top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
                assert rows.loc[unit.name, f"{mode}_top1"] == pytest.approx(top1)
    assert rows.loc[sensitivity.WHOLE_MODEL, "fp32_top1"] == pytest.approx(100 * (reference.argmax(1) == labels).double().mean().item())


def test_a_second_row_keeps_the_first_rows_and_a_rerun_replaces_its_own(tmp_path):
    import pandas as pd

    from clebench.sweep import results
    from clebench.sweep.results import RowKey

    def table(key: RowKey, units: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"unit": units, "rank": range(1, len(units) + 1)}).assign(
            model=key.model, steps=key.steps, quant=key.quant).reindex(columns=results.SENSITIVITY_COLUMNS)

    first, second = RowKey("m", "cifar10", "bn_fold", "w4a8_per_tensor_minmax"), RowKey("m", "cifar10", "bn_fold", "w8a8_per_tensor_minmax")
    results.write_sensitivity(tmp_path, first, table(first, ["a", "b"]), {"seconds": 1})
    results.write_sensitivity(tmp_path, second, table(second, ["c"]), {"seconds": 2})
    results.write_sensitivity(tmp_path, first, table(first, ["d"]), {"seconds": 3})
    written = pd.read_csv(tmp_path / results.SENSITIVITY_FILE)
    assert list(written.columns) == results.SENSITIVITY_COLUMNS
    assert list(zip(written["quant"], written["unit"])) == [(second.quant, "c"), (first.quant, "d")]
    meta = results.read_json(tmp_path / results.SENSITIVITY_META_FILE)
    assert {k: v["seconds"] for k, v in meta.items()} == {"|".join(first): 3, "|".join(second): 2}


@pytest.mark.slow
def test_the_command_ranks_a_cifar_row_and_refuses_bad_input(config_file, tmp_path):
    import subprocess
    import sys

    import pandas as pd

    from clebench.sweep import results

    command = [sys.executable, "-m", "clebench", "sensitivity", str(config_file), "--steps", "bn_fold", "--out", str(tmp_path),
               "--no-progress", "--images", "10"]
    bad = subprocess.run([*command, "--quant", "w4a8_per_tensor_nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    done = subprocess.run([*command, "--quant", "w4a8_per_tensor_minmax"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / results.SENSITIVITY_FILE)
    units = table[table["kind"] != "model"]
    assert sorted(units["rank"]) == list(range(1, len(units) + 1)) and len(units) > 53  # 53 layers, then adds ...
    assert list(table["unit"].tail(2)) == ["(whole model)", "(sum of single-unit parts)"]
    assert (table["n_images"] == 10).all() and (units["only_sqnr_db"] > 0).all()
    assert units["only_sqnr_db"].is_monotonic_increasing
