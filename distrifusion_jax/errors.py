"""Exception types: every user-facing failure is one of these, with a one-line message naming the fix."""


class DistriFusionError(ValueError):
    """Base class for errors caused by the user's input (shapes, configs, files)."""


class ConfigError(DistriFusionError):
    """A configuration field holds a value we do not support."""


class CheckpointError(DistriFusionError):
    """A weight file is missing, truncated, in the wrong format, or does not match the model."""
