"""Exception types: every user-facing failure is one of these, with a one-line message naming the fix."""


def show(name: str, value) -> str:
    """An option as the user wrote it: `--steps 3` on the command line, `num_inference_steps=3` in Python."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


class DistriFusionError(ValueError):
    """Base class for errors caused by the user's input (shapes, configs, files)."""


class ConfigError(DistriFusionError):
    """A configuration field holds a value we do not support."""


class CheckpointError(DistriFusionError):
    """A weight file is missing, truncated, in the wrong format, or does not match the model."""


class NonFiniteError(DistriFusionError):
    """A latent or image went NaN or infinite: nothing is returned or written as if it were a result."""


class OutOfMemoryError(DistriFusionError):
    """A device ran out of memory: the message names the size, the devices and the options that use less."""
