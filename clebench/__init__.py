"""clebench: Cross-Layer Equalization (Nagel et al., ICCV 2019) with AIMET's API, an int8 simulator and a sweep harness."""

from clebench.evaluation import evaluate

__version__ = "0.1.0"
__all__ = ["evaluate", "__version__"]
