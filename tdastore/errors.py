"""Errors users see: each names the problem and the fix."""


class TdaStoreError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(TdaStoreError, ValueError):
    """A config key is unknown, mistyped or out of range."""


class DataError(TdaStoreError, ValueError):
    """The data set is empty, malformed, or holds NaN/Inf."""


class StoreError(TdaStoreError):
    """A store is missing, corrupt, or does not match the model / projection asked for."""


class GradientError(TdaStoreError, ValueError):
    """Gradients are not finite, or no parameter was selected."""
