"""openmedgemma.model"""

from openmedgemma.errors import CheckpointError, ConfigError  # what loading a checkpoint raises

__all__ = ["CheckpointError", "ConfigError"]
