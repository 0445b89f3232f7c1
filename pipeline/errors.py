"""Errors of the pipeline (datasets, models, methods, stages).

A ``UserError`` is bad input from the person running logitbank: the CLI prints its one-line
message, without a traceback, and exits with status 2. Store errors (``storage.errors.StoreError``)
are treated the same way.
"""

from __future__ import annotations

from storage.errors import StoreError


class UserError(Exception):
    """Bad input (config, argument, file): one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config key that does not exist, or a value out of its allowed range."""


class DatasetError(UserError):
    """Dataset files missing, truncated or inconsistent."""


class MethodError(UserError, ValueError):
    """An unknown method or composition, or a method parameter out of range."""


class ModelError(UserError, ValueError):
    """An unknown model name, or a checkpoint that does not fit the model."""


#: What the command line reports as one line and exit status 2, never as a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UserError, StoreError)
