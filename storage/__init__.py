"""The logit store: raw teacher logits, (V views, N samples, C classes), chunked, checksummed.

    from storage import create_store, open_store
    store = create_store("teacher.zarr", num_samples=N, num_classes=C, num_views=V)
    store.write(view, start, logits)     # raw float logits; buffered to shard boundaries
    store.close()
    store = open_store("teacher.zarr")   # read-only
    store.read(indices, view=0)          # float32 (len(indices), C), decoded

This package imports neither ``pipeline`` nor ``stages``.
"""

from __future__ import annotations

from storage.api import (
    BACKENDS,
    check_fingerprint,
    create_store,
    get_backend,
    make_layout,
    open_store,
)
from storage.base import LogitStore, StoreWarning, VerifyReport
from storage.encodings import ENCODINGS
from storage.errors import (
    BadWriteError,
    FingerprintMismatchError,
    NotAStoreError,
    SchemaVersionError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    WriterLockedError,
)
from storage.layout import SCHEMA_VERSION, Layout

__all__ = [
    "BACKENDS",
    "ENCODINGS",
    "SCHEMA_VERSION",
    "BadWriteError",
    "FingerprintMismatchError",
    "Layout",
    "LogitStore",
    "NotAStoreError",
    "SchemaVersionError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreWarning",
    "VerifyReport",
    "WriterLockedError",
    "check_fingerprint",
    "create_store",
    "get_backend",
    "make_layout",
    "open_store",
]
