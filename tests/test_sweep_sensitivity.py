"""A sweep's [sensitivity] table: validated up front, planned as units after their model's rows, measured with the
sweep's memo, written as `clebench sensitivity` writes it, skipped on a re-run unless its images change."""
from __future__ import annotations

import tomllib

import pandas as pd
import pytest

from clebench.sweep import plan, results
from clebench.sweep.config import ConfigError, SensitivityRow, parse_config
from clebench.sweep.results import RowKey
from sweeps import SENSITIVITY_CONFIG

W4, W8 = "w4a8_per_tensor_minmax", "w8a8_per_tensor_minmax"
ROW = {"model": "mobilenet_v2_cifar10", "steps": "bn_fold+cls_relu6_clip", "quant": W4}


def config_dict(sensitivity: dict | None = None) -> dict:
    raw = {"models": ["mobilenet_v2_cifar10", "resnet18_cifar10"], "steps": ["bn_fold", "bn_fold+cls_relu6_clip"],
           "quant": [W8, W4], "data": {"dataset": "cifar10"}}
    return raw if sensitivity is None else {**raw, "sensitivity": sensitivity}


def test_the_table_is_parsed_into_canonical_rows_and_left_out_of_the_hash():
    config = parse_config(config_dict({"images": 64, "rows": [{**ROW, "steps": " bn_fold + cls_relu6_clip "}]}))
    assert config.sensitivity.images == 64
    assert config.sensitivity.rows == (SensitivityRow("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip", W4),)
    plain = parse_config(config_dict())
    assert plain.sensitivity.rows == () and plain.sensitivity.images == 500
    assert config.hash == plain.hash and "sensitivity" not in config.to_dict()
    assert config.with_models(["resnet18_cifar10"]).sensitivity.rows == ()


@pytest.mark.parametrize("table, message", [
    ({"imags": 5}, r"unknown key 'imags' in \[sensitivity\]"),
    ({"images": 0}, "sensitivity.images must be a positive integer"),
    ({"images": "500"}, "sensitivity.images must be a positive integer"),
    ({"rows": ROW}, "sensitivity.rows must be a list"),
    ({"rows": ["mobilenet_v2_cifar10"]}, r"sensitivity.rows\[0\] must be a table"),
    ({"rows": [{**ROW, "quants": W4}]}, r"unknown key 'quants' in sensitivity.rows\[0\]"),
    ({"rows": [{"model": ROW["model"], "steps": ROW["steps"]}]}, r"sensitivity.rows\[0\].quant must be a string"),
    ({"rows": [ROW, {**ROW, "model": "resnet50"}]}, r"sensitivity.rows\[1\].model 'resnet50' is not one of the sweep's models"),
    ({"rows": [{**ROW, "steps": "bn_fold+relu6_to_relu"}]}, r"sensitivity.rows\[0\].steps 'bn_fold\+relu6_to_relu' is not one of the sweep's"),
    ({"rows": [{**ROW, "steps": "bn_fold+fold_more"}]}, r"sensitivity.rows\[0\].steps: unknown step 'fold_more'"),
    ({"rows": [{**ROW, "quant": "w4a8_per_channel_minmax"}]}, r"sensitivity.rows\[0\].quant 'w4a8_per_channel_minmax' is not one"),
    ({"rows": [{**ROW, "quant": "w4a8_per_layer"}]}, r"sensitivity.rows\[0\].quant: bad granularity"),
    ({"rows": [ROW, ROW]}, "sensitivity.rows lists a row twice"),
])
def test_a_bad_table_is_a_config_error_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config_dict(table), "sweep.toml")


def key(model: str, combination: str, quant: str) -> RowKey:
    return RowKey(model, "cifar10", combination, quant)


def test_each_unmeasured_row_is_a_unit_after_its_models_row_units():
    config = parse_config(config_dict({"rows": [
        {"model": "resnet18_cifar10", "steps": "bn_fold", "quant": W8}, ROW,
        {"model": "resnet18_cifar10", "steps": "bn_fold+cls_relu6_clip", "quant": W4}]}))
    usable = {spec.name: config.combinations for spec in config.models}
    measured = [key("resnet18_cifar10", "bn_fold", W8)]
    units = plan.plan(config, usable, measured=measured)
    assert [(u.model.name, len(u.rows), u.sensitivity) for u in units] == [
        ("mobilenet_v2_cifar10", 2, ()), ("mobilenet_v2_cifar10", 2, ()),
        ("mobilenet_v2_cifar10", 0, (key(*ROW.values()),)),
        ("resnet18_cifar10", 2, ()), ("resnet18_cifar10", 2, ()),
        ("resnet18_cifar10", 0, (key("resnet18_cifar10", "bn_fold+cls_relu6_clip", W4),)),
    ]
    assert units[2].prefixes == ((), ("bn_fold",), ("bn_fold", "cls_relu6_clip"))
    assert units[2].name == f"mobilenet_v2_cifar10: sensitivity of bn_fold+cls_relu6_clip {W4}"
    done = plan.row_order(config, usable)  # finished rows leave the sensitivity units
    assert [u.sensitivity for u in plan.plan(config, usable, done, granularity="model", measured=measured)] == [
        (key(*ROW.values()),), (key("resnet18_cifar10", "bn_fold+cls_relu6_clip", W4),)]


def test_a_row_the_sweep_skips_for_its_model_stops_the_sweep_before_any_work():
    from clebench.sweep.run import SweepError, check_sensitivity_rows

    config = parse_config(config_dict({"rows": [ROW]}))
    usable = {spec.name: config.combinations for spec in config.models}
    check_sensitivity_rows(config, usable)
    skipped = {**usable, "mobilenet_v2_cifar10": config.combinations[:1]}  # as a preset skips what a model cannot take
    with pytest.raises(SweepError, match=r"\[sensitivity\] row mobilenet_v2_cifar10 bn_fold\+cls_relu6_clip .*skips it"):
        check_sensitivity_rows(config, skipped)


def small_table(row: RowKey, units: list[str], images: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"unit": units, "rank": range(1, len(units) + 1)}).assign(
        model=row.model, steps=row.steps, quant=row.quant, n_images=images).reindex(columns=results.SENSITIVITY_COLUMNS)


def test_the_writer_keeps_the_given_order_and_re_runs_know_what_is_measured(tmp_path):
    first, second, other = key("m", "bn_fold", W4), key("m", "bn_fold", W8), key("n", "bn_fold", W4)
    order = [first, second]
    results.write_sensitivity(tmp_path, other, small_table(other, ["x"]), {"images": 4})  # a standalone run's
    results.write_sensitivity(tmp_path, second, small_table(second, ["c"]), {"images_requested": 4}, order)
    results.write_sensitivity(tmp_path, first, small_table(first, ["a", "b"]), {"images_requested": 8}, order)
    written = pd.read_csv(tmp_path / results.SENSITIVITY_FILE)
    assert list(zip(written["quant"], written["unit"])) == [(W4, "a"), (W4, "b"), (W8, "c"), (W4, "x")]
    assert list(results.read_json(tmp_path / results.SENSITIVITY_META_FILE)) == ["|".join(k) for k in (first, second, other)]
    assert results.measured_sensitivity(tmp_path, 4) == {second, other}  # `other`: written before images_requested
    assert results.measured_sensitivity(tmp_path, 8) == {first}
    written[written["unit"] != "c"].to_csv(tmp_path / results.SENSITIVITY_FILE, index=False)
    assert results.measured_sensitivity(tmp_path, 4) == {other}  # a row the table lost is measured again


@pytest.mark.slow
def test_a_sweep_measures_its_rows_with_its_memo_as_the_command_does(tmp_path, data_root, models_dir, monkeypatch):
    from clebench.sweep.run import run_sweep
    from clebench.sweep.sensitivity import run_row_sensitivity

    written = []  # every table handed to the one writer, unrounded
    original = results.write_sensitivity
    monkeypatch.setattr(results, "write_sensitivity", lambda *args, **kw: (written.append(args[2]), original(*args, **kw)))
    config = parse_config(tomllib.loads(SENSITIVITY_CONFIG.format(images=3)))
    out = tmp_path / "sweep"
    work = run_sweep(config, out, data_root=data_root, models_dir=models_dir, progress=False).work
    # two rows, two FP32 models, two activation calibrations: the sensitivity row reuses its row's ranges
    assert (work.rows, work.fp32_evaluations, work.calibrations, work.sensitivity_rows) == (2, 2, 2, 1)

    alone = tmp_path / "alone"
    run_row_sensitivity(config, "bn_fold+cls_relu6_clip", W4, alone, images=3, data_root=data_root,
                        models_dir=models_dir, progress=False)
    pd.testing.assert_frame_equal(written[0], written[1], check_exact=False, rtol=0, atol=1e-6)
    assert (out / results.SENSITIVITY_FILE).read_bytes() == (alone / results.SENSITIVITY_FILE).read_bytes()
    assert len(written[0]) > 53 and (written[0]["n_images"] == 3).all()  # 53 layers, then adds, the input ...
    entry = results.read_json(out / results.SENSITIVITY_META_FILE)["|".join(key(*ROW.values()))]
    assert (entry["images"], entry["images_requested"], entry["calibration_images"]) == (3, 3, 10)
    assert entry["config_hash"] == config.hash

    again = run_sweep(config, out, data_root=data_root, models_dir=models_dir, progress=False).work
    assert (again.rows, again.calibrations, again.sensitivity_rows) == (0, 0, 0)
    more = parse_config(tomllib.loads(SENSITIVITY_CONFIG.format(images=4)))
    assert more.hash == config.hash  # the same folder takes it
    changed = run_sweep(more, out, data_root=data_root, models_dir=models_dir, progress=False).work
    assert (changed.rows, changed.calibrations, changed.sensitivity_rows) == (0, 1, 1)  # its own memo: calibrates
    assert (pd.read_csv(out / results.SENSITIVITY_FILE)["n_images"] == 4).all()
