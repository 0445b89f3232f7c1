"""Errors raised by the logit store.

Every message is one line that names the problem and what to do about it; the command line prints
it without a traceback and exits non-zero.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class: a store could not be created, opened, written or read as asked."""


class StoreExistsError(StoreError):
    """Creating a store where one already exists, without ``overwrite``."""


class NotAStoreError(StoreError):
    """The path holds no logit store (or one this version cannot read)."""


class SchemaVersionError(StoreError):
    """The store was written by a newer logitbank."""


class FingerprintMismatchError(StoreError):
    """The store was made from another dataset, model or preprocessing than the caller's."""


class WriterLockedError(StoreError):
    """Another process is writing the store."""


class StoreIncompleteError(StoreError):
    """Rows were asked for whose chunks are not marked done yet."""


class StoreCorruptError(StoreError):
    """A chunk failed its checksum, or a file the store needs is missing or truncated."""


class BadWriteError(StoreError, ValueError):
    """A write with the wrong shape or dtype, non-finite values, or rows out of range."""
