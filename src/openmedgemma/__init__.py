"""openmedgemma: an open, weight-compatible implementation of MedGemma and MedSigLIP."""

from openmedgemma.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    OpenMedGemmaError,
    TokenizerError,
)

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


def __getattr__(name):
    # Lazy so that `openmedgemma --help` and the imaging tools start without importing torch.
    if name == "MedGemma":
        from openmedgemma.model.medgemma import MedGemma

        return MedGemma
    if name == "MedSigLIP":
        from openmedgemma.model.medsiglip import MedSigLIP

        return MedSigLIP
    raise AttributeError(f"module 'openmedgemma' has no attribute {name!r}")
