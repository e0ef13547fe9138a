"""QuantConfig: validation before any work, and the name <-> config round trip."""
from __future__ import annotations

import dataclasses

import pytest

from clebench.quant import QuantConfig


@pytest.mark.parametrize("config, name", [
    (QuantConfig(), "w8a8_per_tensor_minmax"),
    (QuantConfig(per_channel=True), "w8a8_per_channel_minmax"),
    (QuantConfig(weight_bits=6, act_bits=None), "w6afp_per_tensor_minmax"),
    (QuantConfig(weight_bits=4, calibration="mse"), "w4a8_per_tensor_mse"),
    (QuantConfig(calibration="percentile", percentile=99.9), "w8a8_per_tensor_percentile99.9"),
    (QuantConfig(calibration="percentile", percentile=100), "w8a8_per_tensor_percentile100"),
    (QuantConfig(weight_bits=16, act_bits=16, weight_symmetric=False, int32_bias=True),
     "w16a16_per_tensor_minmax_wasym_int32bias"),
    (QuantConfig(weight_bits=4, aimet_rules=True), "w4a8_per_tensor_minmax_aimet"),
    (QuantConfig(per_channel=True, int32_bias=True, aimet_rules=True), "w8a8_per_channel_minmax_int32bias_aimet"),
])
def test_name_and_its_inverse(config, name):
    assert config.name == name
    assert QuantConfig.from_name(name) == config


def test_every_field_combination_round_trips():
    for per_channel in (False, True):
        for symmetric in (False, True):
            calibrations = (("minmax", 99.99), ("mse", 99.99), ("percentile", 99.99), ("percentile", 99.5))
            for calibration, percentile in calibrations:
                for weight_bits, act_bits in ((2, 2), (5, None), (8, 8)):
                    config = QuantConfig(weight_bits, act_bits, per_channel, symmetric, calibration, percentile)
                    assert QuantConfig.from_name(config.name) == config


@pytest.mark.parametrize("field, value", [
    ("weight_bits", 1), ("weight_bits", 17), ("weight_bits", 8.0), ("weight_bits", True),
    ("act_bits", 0), ("act_bits", 32), ("calibration", "tf_enhanced"), ("percentile", 50), ("percentile", 100.5),
])
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_percentile_without_percentile_calibration_is_rejected():
    with pytest.raises(ValueError, match="calibration='percentile'"):
        QuantConfig(percentile=99.9)


def test_int32_bias_needs_quantized_activations():
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig(act_bits=None, int32_bias=True)


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="per_channel"):
        QuantConfig(per_channel=1)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().weight_bits = 4


@pytest.mark.parametrize("name, part", [
    ("w8x8_per_tensor_minmax", "w8x8"),
    ("w8a8_per_layer_minmax", "per_layer"),
    ("w8a8_per_tensor", "calibration"),
    ("w8a8_per_tensor_tf", "'tf'"),
    ("w8a8_per_tensor_minmax_int32bias_wasym", "order"),
    ("w8a8_per_tensor_minmax_fast", "fast"),
    ("w1a8_per_tensor_minmax", "weight_bits"),
])
def test_from_name_errors_name_the_bad_part(name, part):
    with pytest.raises(ValueError, match=part):
        QuantConfig.from_name(name)
