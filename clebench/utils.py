"""Model surgery helpers (AIMET `aimet_torch.utils` API)."""
from __future__ import annotations

from torch import nn


def replace_modules_of_type1_with_type2(model: nn.Module, type1: type[nn.Module], type2: type[nn.Module]) -> None:
    """Replace, recursively and in place, every submodule that is an instance of `type1` by a new `type2()`.

    The use is ReLU6 -> ReLU before cross-layer scaling. Each occurrence gets its own new module.
    """
    for name, child in model.named_children():
        if isinstance(child, type1):
            setattr(model, name, type2())
        else:
            replace_modules_of_type1_with_type2(child, type1, type2)
