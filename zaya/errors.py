"""Exceptions whose messages are meant for people (the CLI prints them without a traceback)."""


class ZayaError(ValueError):
    """Base class for user-facing errors."""


class CheckpointError(ZayaError):
    """A checkpoint is missing, malformed, truncated or does not match its config."""


class ConfigError(ZayaError):
    """A config.json value is missing, of the wrong type, or an invalid combination."""


class ContextLengthError(ZayaError):
    """A request needs more context than the model or the configured limit allows."""
