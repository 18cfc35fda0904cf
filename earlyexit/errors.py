"""Every user-facing error of the package, in one place.

An ``EarlyExitError`` carries a one-line message; the command line prints it
without a traceback and exits with code 2. Subclasses name where it came from.
"""

from __future__ import annotations


class EarlyExitError(Exception):
    """A user-facing error: its message is one line, shown without a traceback."""


class ConfigError(EarlyExitError, ValueError):
    """A configuration value is unknown or out of range (raised when the config is built)."""


class CheckpointError(EarlyExitError):
    """A checkpoint or weights file is missing, corrupt or does not fit the model."""


class DataError(EarlyExitError):
    """A dataset cannot be found, read or split as asked."""


class TrainingError(EarlyExitError):
    """Training cannot go on (e.g. a non-finite loss)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message says what was kept (the CLI prints it and exits with code 130)."""


__all__ = ["EarlyExitError", "ConfigError", "CheckpointError", "DataError", "TrainingError", "RunInterrupted"]
