"""Errors a user can act on. The CLI prints these as one line; anything else is a bug."""


class OpenMedGemmaError(Exception):
    """Base class: the message names the file (when there is one) and the problem."""


class ConfigError(OpenMedGemmaError):
    """A config file or value is missing, unknown or out of range."""


class CheckpointError(OpenMedGemmaError):
    """A checkpoint folder cannot be loaded or written as asked."""


class TokenizerError(OpenMedGemmaError):
    """A tokenizer file is missing or does not carry the tokens MedGemma needs."""


class ImageError(OpenMedGemmaError):
    """An image file (PNG, DICOM, NIfTI, slide...) cannot be turned into model input."""


class DataError(OpenMedGemmaError):
    """A dataset folder or file is missing or not in the expected format."""


class RecordError(DataError):
    """A FHIR record (bundle, index, server) cannot be read as asked, or a patient / resource is not in it."""


class PacsError(OpenMedGemmaError):
    """A DICOMweb store cannot be reached, refuses the request, or does not hold what was asked."""
