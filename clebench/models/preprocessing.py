"""What the data pipeline must do to an image before a given model sees it."""
from dataclasses import dataclass

__all__ = ["Preprocessing", "CIFAR10_PREPROCESSING", "IMAGENET_PREPROCESSING"]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Resize -> center-crop -> scale to [0, 1] -> normalise per channel.

    resize: shorter-side resize in pixels (None = keep the size).
    crop: center-crop size in pixels (square).
    mean, std: per RGB channel, on [0, 1]-scaled values.
    interpolation: resize filter, one of "nearest", "bilinear", "bicubic" (PIL, antialiased).
    """

    resize: int | None
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"Preprocessing.resize must be a positive pixel count or None, got {self.resize}")
        if self.crop < 1:
            raise ValueError(f"Preprocessing.crop must be a positive pixel count, got {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"Preprocessing.mean and .std need 3 values (RGB), got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"Preprocessing.std must be positive, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"Preprocessing.interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}"
            )


CIFAR10_PREPROCESSING = Preprocessing(
    resize=None, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
IMAGENET_PREPROCESSING = Preprocessing(
    resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
