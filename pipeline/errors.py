"""Errors of the pipeline (datasets, models, methods, stages).

A ``UserError`` is bad input from the person running logitbank: the CLI prints its one-line
message, without a traceback, and exits with status 2. Store errors (``storage.errors.StoreError``)
are treated the same way.
"""

from __future__ import annotations

import errno

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


_FULL = "free space on that disk or choose another run_dir"
_LOCKED = "make the folder writable or choose another run_dir"
_PATH = "check run_dir and the store, data and checkpoint paths in the config"
#: errno → (what happened, what to do). Anything else from the OS is a bug worth a traceback.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _FULL),
    errno.EDQUOT: ("disk quota exceeded", _FULL),
    errno.EACCES: ("permission denied", _LOCKED),
    errno.EPERM: ("operation not permitted", _LOCKED),
    errno.EROFS: ("read-only file system", _LOCKED),
    errno.ENOTDIR: ("a path component is a file, not a folder", _PATH),
    errno.EEXIST: ("a file is in the way of a folder to create", _PATH),
    errno.EISDIR: ("a folder is where a file belongs", _PATH),
    errno.ENOENT: ("no such file or folder", _PATH),
    errno.ENAMETOOLONG: ("a file name is too long for the file system", _PATH),
}


def os_error_message(exc: OSError) -> str | None:
    """The one line for an OSError that is the user's to fix (disk full, read-only or
    unwritable folder, a file where a folder belongs); None for any other (a bug)."""
    if exc.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[exc.errno]
    # A rename (os.replace of a temporary file) puts its destination, the path the user knows,
    # in filename2.
    path = exc.filename2 or exc.filename
    where = f" ({path})" if path else ""
    kept = "" if fix is _PATH else "; finished work is kept and a rerun resumes"
    return f"{what}{where}: {fix}{kept}"
