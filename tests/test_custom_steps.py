"""[custom_steps]: a config's own FP32 steps from a file or a module, in combinations, hashed, recorded, on Ray."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import require_extra
from clebench import cli, graph
from clebench.sweep import steps
from clebench.sweep.config import ConfigError, SweepConfig, load_config, parse_config
from clebench.sweep.custom_steps import CustomStepError
from clebench.sweep.results import read_json, row_differences
from clebench.sweep.run import run_sweep

REPO = Path(__file__).resolve().parents[1]

STEPS_FILE = '''
import torch


def scale_classifier(model, input_shape, scale):
    """Multiply the last linear layer's weight and bias by `scale` (0: every logit 0, so every image is class 0)."""
    assert tuple(input_shape) == (1, 3, 32, 32), input_shape
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model


def identity(model, input_shape):
    return model


def copied(model, input_shape):
    import copy
    return copy.deepcopy(model)


def wrapped(model, input_shape):
    return torch.nn.Sequential(model)


def boom(model, input_shape):
    raise RuntimeError("no equalization today\\nsecond line")


def forgets_to_return(model, input_shape):
    model.eval()
'''

SWEEP = """
models = ["resnet18_cifar10"]
steps = ["bn_fold", "bn_fold+same", "bn_fold+flat"]
quant = ["w8a8_per_tensor_minmax"]

[custom_steps]
same = { callable = "my_steps.py:identity", after = "bn_fold" }
flat = { callable = "my_steps.py:scale_classifier", after = "bn_fold", kwargs = { scale = 0.0 } }

[data]
dataset = "cifar10"
limit = 20
calibration = 10
batch_size = 10
"""


def write_config(folder: Path, config: str = SWEEP, steps_file: str = STEPS_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_steps.py").write_text(steps_file)
    (folder / "sweep.toml").write_text(config)
    return folder / "sweep.toml"


def with_custom(folder: Path, custom: str, combinations: list[str], steps_file: str = STEPS_FILE) -> SweepConfig:
    config = SWEEP.replace('steps = ["bn_fold", "bn_fold+same", "bn_fold+flat"]', f"steps = {json.dumps(combinations)}")
    config = config.split("[custom_steps]")[0] + f"[custom_steps]\n{custom}\n\n[data]" + config.split("[data]")[1]
    return load_config(write_config(folder, config, steps_file))


# -- the config: names, order, hash ----------------------------------------------------------------------------


@pytest.mark.parametrize("custom, message", [
    ('cls = { callable = "my_steps.py:identity", after = "bn_fold" }', "custom_steps.cls: 'cls' is already a built-in step"),
    ('ptq = { callable = "my_steps.py:identity", after = "bn_fold" }', "custom_steps.ptq: 'ptq' is already a preset"),
    ('"a+b" = { callable = "my_steps.py:identity", after = "bn_fold" }', "custom_steps.a+b: a step name is letters"),
    ('x = { callable = "my_steps.py:identity", after = "adaround" }', "custom_steps.x.after must be one of the built-in FP32 steps (bn_fold, relu6_to_relu, aimet_cle, brevitas_equalize, brevitas_equalize_no_merge_bias, cls, cls_relu6_keep, cls_relu6_clip, cls_regions, cls_regions_relu6_clip, hbf, act_equalize, act_equalize_relu6_clip), got 'adaround'"),
    ('x = { callable = "my_steps.py:identity" }', "custom_steps.x.after must be one of the built-in FP32 steps"),
    ('x = { callable = "my_steps.identity", after = "bn_fold" }', 'custom_steps.x.callable must be "module:callable" or "file.py:callable"'),
    ('x = { callable = "missing.py:identity", after = "bn_fold" }', "custom_steps.x.callable: file"),
    ('x = { callable = "no_such_module_here:fn", after = "bn_fold" }', "custom_steps.x.callable: no module named 'no_such_module_here'"),
    ('x = { callable = "my_steps.py:identity", after = "bn_fold", kwargs = { input_shape = 1 } }', "custom_steps.x.kwargs: input_shape is passed by the sweep itself"),
    ('x = { callable = "my_steps.py:identity", after = "bn_fold", kwargs = { when = 1979-05-27 } }', "custom_steps.x.kwargs must hold strings"),
    ('x = { callable = "my_steps.py:identity", after = "bn_fold", where = 1 }', "unknown key 'where' in custom_steps.x"),
])
def test_a_bad_custom_step_is_one_line_naming_it(tmp_path, custom, message):
    with pytest.raises(ConfigError) as raised:
        with_custom(tmp_path, custom, ["bn_fold"])
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith(str(tmp_path / "sweep.toml"))


def test_a_custom_step_sits_right_after_its_step(tmp_path):
    config = with_custom(tmp_path, '\n'.join([
        'mine = { callable = "my_steps.py:identity", after = "cls" }',
        'also = { callable = "my_steps.py:identity", after = "cls" }',
        'first = { callable = "my_steps.py:identity", after = "bn_fold" }',
    ]), ["bn_fold+first+cls+mine+also+hbf+bias_correction", "first+mine"])
    peers = ("aimet_cle", "brevitas_equalize", "brevitas_equalize_no_merge_bias")
    assert steps.pipeline_order(config.custom_steps)[:9] == ("bn_fold", "first", "relu6_to_relu", *peers, "cls", "mine",
                                                             "also")
    assert config.combinations == [("bn_fold", "first", "cls", "mine", "also", "hbf", "bias_correction"), ("first", "mine")]
    assert steps.split_combination(config.combinations[0]) == (config.combinations[0][:-1], "bias_correction")
    with pytest.raises(ConfigError, match=r"steps 'bn_fold\+mine\+cls' are repeated or out of order; the pipeline "
                                          r"order is bn_fold -> first -> relu6_to_relu -> aimet_cle -> .* -> cls -> "
                                          r"mine -> also"):
        with_custom(tmp_path, 'mine = { callable = "my_steps.py:identity", after = "cls" }\n'
                    'also = { callable = "my_steps.py:identity", after = "cls" }\n'
                    'first = { callable = "my_steps.py:identity", after = "bn_fold" }', ["bn_fold+mine+cls"])
    with pytest.raises(ConfigError, match="unknown step 'other'; allowed steps .*bn_fold, first, relu6_to_relu"):
        with_custom(tmp_path, 'first = { callable = "my_steps.py:identity", after = "bn_fold" }', ["bn_fold+other"])


def test_the_built_in_rules_still_hold_around_a_custom_step(tmp_path):
    with pytest.raises(ConfigError, match="hbf needs a cross-layer-scaling step"):
        with_custom(tmp_path, 'x = { callable = "my_steps.py:identity", after = "bn_fold" }', ["bn_fold+x+hbf"])


def _meta_configs() -> list[tuple[str, dict, str]]:
    found = []
    for meta in sorted((REPO / "results").glob("*/meta.json")):
        recorded = json.loads(meta.read_text())
        found.append((meta.parent.name, recorded["config"], recorded["config_hash"]))
    baseline = json.loads((REPO / "results" / "cifar10_ci" / "baseline.json").read_text())["config"]
    return found + [("cifar10_ci baseline", baseline, read_json(REPO / "results" / "cifar10_ci" / "meta.json")["config_hash"])]


@pytest.mark.parametrize("name, recorded, expected", _meta_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_committed_configs_without_custom_steps_hash_as_they_were_recorded(name, recorded, expected):
    raw = {key: value for key, value in recorded.items() if key != "range_layers"}
    config = parse_config({**raw, "report": {"range_layers": recorded["range_layers"]}})
    assert config.to_dict() == recorded and "custom_steps" not in config.to_dict()
    assert config.hash == expected


def test_the_hash_covers_the_definition_and_the_file_content_not_the_folder(tmp_path):
    base = load_config(write_config(tmp_path / "a"))
    assert base.to_dict()["custom_steps"]["flat"] == {
        "callable": "my_steps.py:scale_classifier", "after": "bn_fold", "kwargs": {"scale": 0.0},
        "sha256": hashlib.sha256(STEPS_FILE.encode()).hexdigest()}
    assert load_config(write_config(tmp_path / "elsewhere")).hash == base.hash  # a clone in another folder
    changed = {
        "kwargs": SWEEP.replace("scale = 0.0", "scale = 0.5"),
        "after": SWEEP.replace('identity", after = "bn_fold"', 'identity", after = "relu6_to_relu"'),
        "callable": SWEEP.replace("my_steps.py:identity", "my_steps.py:copied"),
    }
    hashes = {key: load_config(write_config(tmp_path / key, text)).hash for key, text in changed.items()}
    hashes["file"] = load_config(write_config(tmp_path / "file", steps_file=STEPS_FILE + "\n# edited\n")).hash
    assert base.hash not in hashes.values() and len(set(hashes.values())) == 4


def test_a_module_callable_is_found_on_the_configs_folder_and_hashed(tmp_path):
    (tmp_path / "team_eq").mkdir()
    (tmp_path / "team_eq" / "__init__.py").write_text("")
    (tmp_path / "team_eq" / "steps_v2.py").write_text(STEPS_FILE)
    config = with_custom(tmp_path, 'mine = { callable = "team_eq.steps_v2:identity", after = "bn_fold" }', ["bn_fold+mine"])
    step = config.custom_steps[0]
    assert step.source() == {"callable": "team_eq.steps_v2:identity", "module": "team_eq.steps_v2",
                             "file": str((tmp_path / "team_eq" / "steps_v2.py").resolve()),
                             "sha256": hashlib.sha256(STEPS_FILE.encode()).hexdigest()}
    model = nn.Linear(2, 2)
    assert step.apply(steps.PipelineState(model, input_shape=(1, 3, 32, 32))) and step.function().__name__ == "identity"


# -- applying a step ------------------------------------------------------------------------------------------


class ConvBn(nn.Module):
    """conv -> BN -> ReLU -> conv2, a CLS pair whose BN leaves biases for high-bias folding to absorb."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.fc = nn.Conv2d(4, 4, 1), nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.weight.fill_(0.5), self.bn.bias.fill_(4.0)

    def forward(self, x):
        return self.fc(self.conv2(self.relu(self.bn(self.conv(x)))).mean((2, 3)))


def state_after(combination: str, config: SweepConfig) -> steps.PipelineState:
    state = steps.PipelineState(graph.prepare_model(ConvBn().eval()), input_shape=(1, 3, 8, 8))
    for step in steps.parse_combination(combination, config.custom_steps):
        steps.apply_fp32_step(step, state, config.custom_steps)
    return state


def test_a_step_that_returns_a_new_model_carries_what_earlier_steps_recorded_over(tmp_path):
    config = with_custom(tmp_path, 'fresh = { callable = "my_steps.py:copied", after = "cls" }\n'
                         'same = { callable = "my_steps.py:identity", after = "cls" }',
                         ["bn_fold+cls+fresh+hbf", "bn_fold+cls+same+hbf"])
    fresh, same = state_after("bn_fold+cls+fresh+hbf", config), state_after("bn_fold+cls+same+hbf", config)
    layers = {id(module) for module in fresh.model.modules()}
    pair = fresh.cls_infos[0].cls_pair_info_list[0]
    assert len(fresh.bn_map) == 1 and all(id(layer) in layers for layer in fresh.bn_map)
    assert id(pair.layer1) in layers and id(pair.layer2) in layers and pair.absorbed_bias.max() > 0
    expected = same.model.state_dict()  # high-bias folding changed the new model as it changes the model in place
    assert all(torch.equal(tensor, expected[name]) for name, tensor in fresh.model.state_dict().items())


def test_a_new_model_without_the_layers_earlier_steps_recorded_is_refused(tmp_path):
    config = with_custom(tmp_path, 'x = { callable = "my_steps.py:wrapped", after = "bn_fold" }', ["bn_fold+x"])
    with pytest.raises(CustomStepError, match="custom step 'x' returned a new model without the layer 'conv' that an "
                                              "earlier step recorded"):
        state_after("bn_fold+x", config)


@pytest.mark.parametrize("callable_, message", [
    ("boom", "custom step 'x' (my_steps.py:boom) raised RuntimeError: no equalization today"),
    ("forgets_to_return", "custom step 'x' (my_steps.py:forgets_to_return) returned a NoneType, not a torch.nn.Module"),
])
def test_a_step_that_raises_or_returns_no_model_is_one_line(tmp_path, callable_, message):
    config = with_custom(tmp_path, f'x = {{ callable = "my_steps.py:{callable_}", after = "bn_fold" }}', ["bn_fold+x"])
    with pytest.raises(CustomStepError) as raised:
        state_after("bn_fold+x", config)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_file_edited_after_the_config_was_read_is_refused(tmp_path):
    config = with_custom(tmp_path, 'x = { callable = "my_steps.py:identity", after = "bn_fold" }', ["bn_fold+x"])
    (tmp_path / "my_steps.py").write_text(STEPS_FILE + "\n# edited\n")
    with pytest.raises(CustomStepError, match=r"custom step 'x': .*my_steps.py changed since the config was read"):
        state_after("bn_fold+x", config)


# -- in a sweep ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_sweep(tmp_path_factory, data_root, models_dir) -> Path:
    folder = tmp_path_factory.mktemp("custom")
    out = folder / "out"
    run_sweep(load_config(write_config(folder)), out, progress=False)
    return out


@pytest.mark.slow
def test_custom_steps_run_in_the_sweep_and_are_recorded(custom_sweep):
    rows = pd.read_csv(custom_sweep / "results.csv").set_index("steps")
    assert list(rows.index) == ["bn_fold", "bn_fold+same", "bn_fold+flat"]
    numbers = ["fp32_top1", "fp32_top5", "quant_top1", "quant_top5"]
    assert rows.loc["bn_fold+same", numbers].equals(rows.loc["bn_fold", numbers])
    assert rows.loc["bn_fold", "fp32_top1"] > 50
    # every logit 0: each image is predicted as class 0, and 2 of the 20 class-balanced images are airplanes
    assert rows.loc["bn_fold+flat", "fp32_top1"] == 10.0 and rows.loc["bn_fold+flat", "quant_top1"] == 10.0
    meta = read_json(custom_sweep / "meta.json")
    sha256 = hashlib.sha256((custom_sweep.parent / "my_steps.py").read_bytes()).hexdigest()
    assert meta["custom_steps"]["flat"] == {"callable": "my_steps.py:scale_classifier", "module": None,
                                            "file": str((custom_sweep.parent / "my_steps.py").resolve()),
                                            "sha256": sha256}
    assert meta["config"]["custom_steps"]["same"]["sha256"] == sha256


@pytest.mark.slow
@pytest.mark.parametrize("callable_, message", [
    ("boom", "custom step 'x' (my_steps.py:boom) raised RuntimeError: no equalization today\n"),
    ("forgets_to_return", "custom step 'x' (my_steps.py:forgets_to_return) returned a NoneType"),
    ("missing", "custom_steps.x.callable: my_steps.py has no attribute 'missing'\n"),
])
def test_a_failing_custom_step_stops_the_sweep_before_any_row(tmp_path, capsys, data_root, models_dir, callable_,
                                                               message):
    config = SWEEP.replace('steps = ["bn_fold", "bn_fold+same", "bn_fold+flat"]', 'steps = ["bn_fold", "bn_fold+x"]')
    config = config.replace('same = { callable = "my_steps.py:identity"', f'x = {{ callable = "my_steps.py:{callable_}"')
    path = write_config(tmp_path, config)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"clebench sweep: error: {message}") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_custom_steps_run_on_ray_workers_as_here(custom_sweep, tmp_path):
    require_extra("ray")
    folder = tmp_path / "ray"
    config = load_config(write_config(folder)).with_execution(ray="local")
    run_sweep(config, folder / "out", progress=False)
    assert read_json(folder / "out" / "meta.json")["last_run_work"]["engine"] == "ray"
    assert row_differences(folder / "out", custom_sweep) == []
