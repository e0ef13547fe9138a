"""A model of your own, and an equalization step of your own, as a clebench sweep config names them.

`build` is the factory (`factory = "my_net.py:build"`): here torchvision's ResNet18 with a CIFAR stem, the
architecture of the shared CIFAR-10 checkpoint. `clip_weights` is a custom step
(`[custom_steps] clip_weights = { callable = "my_net.py:clip_weights", after = "bn_fold" }`).
"""
import torch
import torchvision
from torch import nn


def build(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def clip_weights(model: nn.Module, input_shape: tuple[int, ...], sigmas: float = 4.0) -> nn.Module:
    """Clamp every conv's weights to mean +- `sigmas` standard deviations of their output channel: outliers that
    stretch a per-tensor grid go, at the cost of changing the function (rows show what that costs and buys)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                mean = weight.mean(dim=(1, 2, 3), keepdim=True)
                spread = sigmas * weight.std(dim=(1, 2, 3), keepdim=True)
                weight.copy_(torch.minimum(torch.maximum(weight, mean - spread), mean + spread))
    return model
