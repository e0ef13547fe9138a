"""Model zoo: reference CIFAR-10 checkpoints, torchvision ImageNet models, tonylins MobileNetV2, EfficientNet-Lite0;
and models from anywhere a config's [[models]] entry names (sources: factories, timm:, entry points)."""
from .checkpoint import CheckpointError, CheckpointNotFoundError
from .mobilenet_v2_tonylins import MobileNetV2
from .preprocessing import Preprocessing
from .registry import list_models, load_model, model_label_space, model_preprocessing, models_dir
from .sources import (ENTRY_POINT_GROUP, ModelSourceError, load_spec_model, probe_output_count, spec_label_space,
                      spec_preprocessing)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CheckpointError",
    "CheckpointNotFoundError",
    "MobileNetV2",
    "ModelSourceError",
    "Preprocessing",
    "list_models",
    "load_model",
    "load_spec_model",
    "model_label_space",
    "model_preprocessing",
    "models_dir",
    "probe_output_count",
    "spec_label_space",
    "spec_preprocessing",
]
