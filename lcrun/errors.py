"""User-facing errors and warnings: each says what is wrong and what to do, and is shown without a
traceback."""


class LcrunError(Exception):
    """Base class for errors that the CLI prints as a one-line message."""


class ModelLoadError(LcrunError):
    """A model folder or file is missing, incomplete, corrupt or unsupported."""


class UnsupportedModelError(ModelLoadError):
    """The architecture, rope scaling or quantisation type is not one lcrun implements."""


class ContextOverflowError(LcrunError):
    """A prompt or conversation does not fit the configured context."""


class ConfigError(LcrunError):
    """A setting has a value lcrun cannot use."""


class CapacityError(LcrunError):
    """The requested context does not fit the memory limits."""


class TrainedWindowWarning(UserWarning):
    """--attention dense with --ctx past the model's trained window: the output there degrades."""


class IgnoredSettingWarning(UserWarning):
    """A setting that does not apply on this device, e.g. --gpu-mem on the CPU."""
