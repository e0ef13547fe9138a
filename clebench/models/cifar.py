"""CIFAR-10 variants of torchvision ResNet18 and MobileNetV2 (the reference checkpoints' architectures).

Both keep full resolution early on, as 32x32 inputs leave no room for the ImageNet stems' 4x downsampling.
"""
from torch import nn
from torchvision import models

__all__ = ["resnet18_cifar10", "mobilenet_v2_cifar10", "CIFAR10_BUILDERS"]


def resnet18_cifar10() -> nn.Module:
    """torchvision resnet18(num_classes=10), 3x3 stride-1 stem conv, no max-pool."""
    model = models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mobilenet_v2_cifar10() -> nn.Module:
    """torchvision mobilenet_v2(num_classes=10) with stride 1 in the stem and in the first stride-2 block."""
    model = models.mobilenet_v2(num_classes=10)
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
    return model


CIFAR10_BUILDERS = {"resnet18_cifar10": resnet18_cifar10, "mobilenet_v2_cifar10": mobilenet_v2_cifar10}
