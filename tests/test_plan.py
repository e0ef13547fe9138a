"""Planning a sweep: rows in config order, grouped into work units that share an FP32 prefix, done rows left out."""
from __future__ import annotations

import pytest

from clebench.sweep import plan

from clebench.sweep import steps
from clebench.sweep.config import parse_config
from clebench.sweep.results import RowKey

CONFIG = parse_config({
    "models": ["mobilenet_v2_cifar10", "resnet18_cifar10"],
    "steps": ["bn_fold", "bn_fold+cls_relu6_clip", "bn_fold+cls_relu6_clip+hbf", "bn_fold+cls_relu6_clip+hbf+bias_correction"],
    "quant": ["w8a8_per_tensor_minmax", "w4a8_per_tensor_minmax"],
    "data": {"dataset": "cifar10"},
})
USABLE = {spec.name: CONFIG.combinations for spec in CONFIG.models}


def key(model: str, steps_name: str, bits: int) -> RowKey:
    return RowKey(model, "cifar10", steps_name, f"w{bits}a8_per_tensor_minmax")


def test_row_order_is_model_then_steps_then_quant():
    rows = plan.row_order(CONFIG, USABLE)
    assert len(rows) == 16
    assert rows[:3] == [key("mobilenet_v2_cifar10", "bn_fold", 8), key("mobilenet_v2_cifar10", "bn_fold", 4),
                        key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip", 8)]


def test_prefix_units_group_a_prefix_with_its_bias_corrected_rows():
    units = plan.plan(CONFIG, USABLE)
    assert [(u.model.name, u.prefixes[-1]) for u in units] == [
        (model, prefix)
        for model in ("mobilenet_v2_cifar10", "resnet18_cifar10")
        for prefix in (("bn_fold",), ("bn_fold", "cls_relu6_clip"), ("bn_fold", "cls_relu6_clip", "hbf"))
    ]
    hbf = units[2]
    assert hbf.prefixes == ((), ("bn_fold",), ("bn_fold", "cls_relu6_clip"), ("bn_fold", "cls_relu6_clip", "hbf"))
    assert hbf.rows == (
        key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip+hbf", 8), key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip+hbf", 4),
        key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip+hbf+bias_correction", 8),
        key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip+hbf+bias_correction", 4),
    )
    assert sorted(k for u in units for k in u.rows) == sorted(plan.row_order(CONFIG, USABLE))


def test_model_units_hold_all_of_a_models_rows():
    units = plan.plan(CONFIG, USABLE, granularity="model")
    assert [u.model.name for u in units] == ["mobilenet_v2_cifar10", "resnet18_cifar10"]
    assert [len(u.rows) for u in units] == [8, 8] and len(units[0].prefixes) == 4


def test_done_rows_are_left_out_and_a_finished_unit_disappears():
    done = [key("mobilenet_v2_cifar10", "bn_fold", 8), key("mobilenet_v2_cifar10", "bn_fold", 4),
            key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip", 8)]
    units = plan.plan(CONFIG, USABLE, done)
    assert len(units) == 5 and units[0].rows == (key("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip", 4),)
    assert plan.plan(CONFIG, USABLE, plan.row_order(CONFIG, USABLE)) == []


def test_usable_combinations_limit_a_models_rows():
    usable = {"mobilenet_v2_cifar10": [("bn_fold",)], "resnet18_cifar10": CONFIG.combinations}
    assert [len(u.rows) for u in plan.plan(CONFIG, usable)] == [2, 2, 2, 4]


def test_prefixes_and_bad_granularity():
    assert plan.prefixes_of(("bn_fold", "cls")) == ((), ("bn_fold",), ("bn_fold", "cls"))
    assert plan.combination_of(key("m", steps.NO_STEPS, 8)) == ()
    with pytest.raises(ValueError, match="granularity must be one of prefix, model"):
        plan.plan(CONFIG, USABLE, granularity="row")


def test_prefixes_that_build_the_same_model_share_a_unit():
    """relu6_to_relu on ResNet18 changes nothing: with identities its prefix joins bn_fold's unit."""
    config = parse_config({"models": ["resnet18_cifar10"], "steps": ["bn_fold", "bn_fold+relu6_to_relu",
                                                                    "bn_fold+relu6_to_relu+cls", "bn_fold+cls"],
                           "quant": ["w8a8_per_tensor_minmax"], "data": {"dataset": "cifar10"}})
    usable = {"resnet18_cifar10": config.combinations}
    identities = {("resnet18_cifar10", p): name for p, name in [
        ((), "a"), (("bn_fold",), "b"), (("bn_fold", "relu6_to_relu"), "b"), (("bn_fold", "relu6_to_relu", "cls"), "c"),
        (("bn_fold", "cls"), "c")]}
    units = plan.plan(config, usable, identities=identities)
    assert [[k.steps for k in u.rows] for u in units] == [
        ["bn_fold", "bn_fold+relu6_to_relu"], ["bn_fold+relu6_to_relu+cls", "bn_fold+cls"]]
    assert units[1].prefixes == ((), ("bn_fold",), ("bn_fold", "relu6_to_relu"), ("bn_fold", "cls"),
                                 ("bn_fold", "relu6_to_relu", "cls"))  # parents before children
    assert len(plan.plan(config, usable)) == 4
