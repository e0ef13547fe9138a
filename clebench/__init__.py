"""clebench: Cross-Layer Equalization (Nagel et al., ICCV 2019) with AIMET's API, an int8 simulator and a sweep harness."""

import os

# Large CPU tensors on transparent huge pages: an AdaRound step allocates and frees activations of ~150 MB, and
# faulting them in 4 KB pages costs as much as the arithmetic on EfficientNet-Lite0's 112 x 112 layers
# (scripts/bench_adaround_memory.py). PyTorch reads the variable once, at its first allocation, so it applies where
# clebench is imported before torch, as in the CLI; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from clebench.evaluation import evaluate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["evaluate", "__version__"]
