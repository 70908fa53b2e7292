"""openmedgemma: an open, weight-compatible implementation of MedGemma and MedSigLIP."""

from openmedgemma.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    OpenMedGemmaError,
    TokenizerError,
)
from openmedgemma.lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "MedGemma",
    "MedSigLIP",
    "OpenMedGemmaError",
    "ConfigError",
    "CheckpointError",
    "TokenizerError",
    "ImageError",
    "DataError",
]


# Lazy so that `openmedgemma --help` and the imaging tools start without importing torch.
__getattr__, __dir__ = lazy_exports(
    __name__, {"MedGemma": "openmedgemma.model.medgemma", "MedSigLIP": "openmedgemma.model.medsiglip"}
)
