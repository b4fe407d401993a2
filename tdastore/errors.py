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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (the CLI installs the handler), so a job stops as on Ctrl-C."""

    exit_code = 143


class Interrupted(KeyboardInterrupt):
    """A job stopped by Ctrl-C or SIGTERM between its units: what was finished is kept."""

    def __init__(self, where: str, exit_code: int = 130):
        super().__init__(where)
        self.where, self.exit_code = where, exit_code

    def __str__(self) -> str:
        return f"interrupted at {self.where}: finished units are kept; rerun the same command to resume"
