"""clebench: Cross-Layer Equalization (Nagel et al., ICCV 2019) with AIMET's API, an int8 simulator and a sweep harness."""

from clebench.evaluation import evaluate

__version__ = "0.1.0"
__all__ = ["benchmark", "evaluate", "__version__"]


def __getattr__(name: str):
    """`clebench.benchmark` (clebench.sweep.api), imported on first use: the sweep harness is not needed before."""
    if name == "benchmark":
        from clebench.sweep.api import benchmark

        return benchmark
    raise AttributeError(f"module 'clebench' has no attribute {name!r}")
