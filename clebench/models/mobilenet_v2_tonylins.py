"""MobileNetV2 with the module layout and state_dict key names of the "tonylins" PyTorch port.

github.com/tonylins/pytorch-mobilenet-v2 (ImageNet checkpoint ``mobilenetv2_1.0-f2a8633.pth.tar``, 71.8 % top-1),
the MobileNetV2 variant used by many data-free quantization papers. Same computation as torchvision's, with
flat ``conv`` Sequentials instead of Conv2dNormActivation wrappers. The classifier is Sequential(Dropout, Linear)
as in torchvision; the published checkpoint's bare-Linear keys ``classifier.weight/bias`` are renamed to
``classifier.1.*`` by ``clebench.models.load_model``.
"""
import math

from torch import Tensor, nn

__all__ = ["MobileNetV2", "InvertedResidual"]

# (expand ratio t, output channels c, repeats n, first stride s) per stage, from the MobileNetV2 paper, table 2.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _round_up8(channels: float) -> int:
    return int(math.ceil(channels / 8) * 8)


def _conv_bn_relu6(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """[pw conv 1x1 -> BN -> ReLU6 ->] dw conv 3x3 -> BN -> ReLU6 -> pw-linear conv 1x1 -> BN (+ input).

    The expansion conv is absent when ``expand_ratio == 1``; the residual is added when the block keeps
    the shape (stride 1 and inp == oup).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(inp * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        expand = [] if expand_ratio == 1 else list(_conv_bn_relu6(inp, hidden, 1, 1))
        self.conv = nn.Sequential(
            *expand,
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``input_size`` x ``input_size`` RGB images [N, 3, H, W] -> logits [N, n_class].

    ``features[0]`` is the stem conv, ``features[1..17]`` the inverted residual blocks, ``features[18]`` the
    1x1 conv to 1280 channels; global average pooling, then ``classifier`` = Dropout(0.2), Linear.
    """

    def __init__(self, n_class: int = 1000, input_size: int = 224, width_mult: float = 1.0):
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"MobileNetV2 input_size must be a multiple of 32 (5 stride-2 stages), got {input_size}")
        # As in the original: the stem stays at 32 channels, the t=1 stage is not scaled, and the head
        # only grows (never shrinks) with width_mult.
        input_channel = 32
        self.last_channel = _round_up8(1280 * width_mult) if width_mult > 1.0 else 1280
        layers: list[nn.Module] = [_conv_bn_relu6(3, input_channel, 3, 2)]
        for t, c, n, s in _STAGES:
            output_channel = _round_up8(c * width_mult) if t > 1 else c
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        layers.append(_conv_bn_relu6(input_channel, self.last_channel, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, n_class))
        self._initialize_weights()

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.mean(3).mean(2)
        return self.classifier(x)

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
