"""The three code examples of AIMET's "Cross Layer Equalization Primitive API" page, unchanged but for the import.

Differences from the page, all forced by this machine: torchvision weights are random (no download), BN statistics are
randomized so that folding does real work, and each example returns its model so the test can check the outcome.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import randomize_batch_norms, relative_error
from torchvision import models

from clebench import batch_norm_fold, cross_layer_equalization, utils
from clebench.models import MobileNetV2


def resnet18():
    torch.manual_seed(0)
    return randomize_batch_norms(models.resnet18())


def cross_layer_equalization_auto_step_by_step(model):
    model = model.eval()
    input_shape = (1, 3, 224, 224)
    # Fold BatchNorm layers
    folded_pairs = batch_norm_fold.fold_all_batch_norms(model, input_shape)
    bn_dict = {}
    for conv_bn in folded_pairs:
        bn_dict[conv_bn[0]] = conv_bn[1]

    # Replace any ReLU6 layers with ReLU
    utils.replace_modules_of_type1_with_type2(model, torch.nn.ReLU6, torch.nn.ReLU)

    # Perform cross-layer scaling on applicable layer sets
    cls_set_info_list = cross_layer_equalization.CrossLayerScaling.scale_model(model, input_shape)

    # Perform high-bias fold
    cross_layer_equalization.HighBiasFold.bias_fold(cls_set_info_list, bn_dict)
    return model, cls_set_info_list


def cross_layer_equalization_manual(model):
    model = model.eval()

    # Batch Norm Fold
    # Create a list of conv/linear and BN layers for folding forward or backward
    layer_list = [(model.conv1, model.bn1),
                  (model.layer1[0].conv1, model.layer1[0].bn1)]

    # Save the corresponding BN layers (needed only for high bias folding)
    bn_dict = {}
    for conv_bn in layer_list:
        bn_dict[conv_bn[0]] = conv_bn[1]

    batch_norm_fold.fold_given_batch_norms(model, layer_list)

    # Replace any ReLU6 layers with ReLU
    utils.replace_modules_of_type1_with_type2(model, torch.nn.ReLU6, torch.nn.ReLU)

    # Cross Layer Scaling
    # Create a list of consecutive conv layers to be equalized
    consecutive_layer_list = [(model.conv1, model.layer1[0].conv1),
                              (model.layer1[0].conv1, model.layer1[0].conv2)]

    scaling_factor_list = cross_layer_equalization.CrossLayerScaling.scale_cls_sets(consecutive_layer_list)

    # High Bias Fold
    # Create a list of consecutive conv layers whose previous layers bias has to be folded to next layers bias
    ClsSetInfo = cross_layer_equalization.ClsSetInfo
    ClsPairInfo = cross_layer_equalization.ClsSetInfo.ClsSetLayerPairInfo
    cls_set_info_list = [ClsSetInfo(ClsPairInfo(model.conv1, model.layer1[0].conv1, scaling_factor_list[0], True)),
                         ClsSetInfo(ClsPairInfo(model.layer1[0].conv1, model.layer1[0].conv2, scaling_factor_list[1], True))]

    cross_layer_equalization.HighBiasFold.bias_fold(cls_set_info_list, bn_dict)
    return model, scaling_factor_list


def cross_layer_equalization_depthwise_layers():
    model = MobileNetV2().to(torch.device('cpu'))
    model.eval()
    randomize_batch_norms(model)
    # Batch Norm Fold
    # Create a list of conv/linear and BN layers for folding forward or backward
    layer_list = [(model.features[0][0], model.features[0][1]),
                  (model.features[1].conv[0], model.features[1].conv[1]),
                  (model.features[1].conv[3], model.features[1].conv[4])]

    # Save the corresponding BN layers (needed only for high bias folding)
    bn_dict = {}
    for conv_bn in layer_list:
        bn_dict[conv_bn[0]] = conv_bn[1]

    batch_norm_fold.fold_given_batch_norms(model, layer_list)

    # Replace any ReLU6 layers with ReLU
    utils.replace_modules_of_type1_with_type2(model, torch.nn.ReLU6, torch.nn.ReLU)

    # Cross Layer Scaling
    # Create a list of consecutive conv layers to be equalized
    consecutive_layer_list = [(model.features[0][0], model.features[1].conv[0], model.features[1].conv[3])]
    scaling_factor_list = cross_layer_equalization.CrossLayerScaling.scale_cls_sets(consecutive_layer_list)

    # High Bias Fold
    # Create a list of consecutive conv layers whose previous layers bias has to be folded to next layers bias
    ClsSetInfo = cross_layer_equalization.ClsSetInfo
    ClsPairInfo = cross_layer_equalization.ClsSetInfo.ClsSetLayerPairInfo
    cls_set_info_list = [ClsSetInfo(ClsPairInfo(model.features[0][0], model.features[1].conv[0], scaling_factor_list[0][0], True)),
                         ClsSetInfo(ClsPairInfo(model.features[1].conv[0], model.features[1].conv[3], scaling_factor_list[0][1], True))]

    cross_layer_equalization.HighBiasFold.bias_fold(cls_set_info_list, bn_dict)
    return model, scaling_factor_list


def test_auto_step_by_step_on_resnet18():
    model = resnet18()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    model, infos = cross_layer_equalization_auto_step_by_step(model)
    assert len(infos) == 8
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert relative_error(model(x), expected) < 0.05  # HBF is exact but for padded borders


def test_manual_on_resnet18_scales_what_was_listed():
    original = resnet18()
    model, factors = cross_layer_equalization_manual(copy.deepcopy(original))
    assert [f.shape for f in factors] == [(64,), (64,)]
    assert isinstance(model.bn1, torch.nn.Identity) and isinstance(model.layer1[0].bn1, torch.nn.Identity)
    assert isinstance(model.layer1[0].bn2, torch.nn.BatchNorm2d)  # not listed, not folded
    assert torch.equal(model.layer2[0].conv1.weight, original.layer2[0].conv1.weight)
    r1 = model.layer1[0].conv1.weight.abs().amax(dim=(1, 2, 3))
    r2 = model.layer1[0].conv2.weight.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)


def test_manual_depthwise_on_tonylins_mobilenet_v2():
    model, factors = cross_layer_equalization_depthwise_layers()
    ((s12, s23),) = factors
    assert s12.shape == s23.shape == (32,) and np.isfinite(s12).all() and np.isfinite(s23).all()
    ranges = [
        model.features[0][0].weight.abs().amax(dim=(1, 2, 3)),
        model.features[1].conv[0].weight.abs().amax(dim=(1, 2, 3)),
        model.features[1].conv[3].weight.abs().amax(dim=(0, 2, 3)),
    ]
    torch.testing.assert_close(ranges[0], ranges[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(ranges[1], ranges[2], rtol=1e-5, atol=0)
    assert not any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
