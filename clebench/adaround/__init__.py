"""AdaRound (Nagel et al., ICML 2020): learned weight rounding, with AIMET's `adaround_weight` API."""
from clebench.adaround.adaround_weight import Adaround, AdaroundParameters, QuantScheme
from clebench.adaround.layer import AdaroundError, AdaroundSettings, optimize_layer
from clebench.adaround.model import apply_adaround_to_model

__all__ = [
    "Adaround",
    "AdaroundError",
    "AdaroundParameters",
    "AdaroundSettings",
    "QuantScheme",
    "apply_adaround_to_model",
    "optimize_layer",
]
