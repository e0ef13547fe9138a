"""Model zoo: reference CIFAR-10 checkpoints, torchvision ImageNet models, tonylins MobileNetV2, EfficientNet-Lite0."""
from .checkpoint import CheckpointError, CheckpointNotFoundError
from .mobilenet_v2_tonylins import MobileNetV2
from .preprocessing import Preprocessing
from .registry import list_models, load_model, model_label_space, model_preprocessing, models_dir

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "MobileNetV2",
    "Preprocessing",
    "list_models",
    "load_model",
    "model_label_space",
    "model_preprocessing",
    "models_dir",
]
