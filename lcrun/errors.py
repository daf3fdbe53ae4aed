"""User-facing errors: each says what is wrong and what to do, and is shown without a traceback."""


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
