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

import importlib

#: public name -> the submodule that defines it. Imported on first use (PEP 562), so that
#: ``import storage.errors`` (which ``pipeline.errors`` does) costs nothing and needs neither zarr
#: nor h5py, while ``from storage import open_store`` works as always.
_EXPORTS = {
    "storage.api": (
        "BACKENDS",
        "check_fingerprint",
        "create_store",
        "get_backend",
        "make_layout",
        "open_store",
    ),
    "storage.base": ("LogitStore", "StoreWarning", "VerifyReport"),
    "storage.encodings": ("ENCODINGS",),
    "storage.errors": (
        "BadWriteError",
        "FingerprintMismatchError",
        "NotAStoreError",
        "SchemaVersionError",
        "StoreCorruptError",
        "StoreError",
        "StoreExistsError",
        "StoreIncompleteError",
        "WriterLockedError",
    ),
    "storage.layout": ("SCHEMA_VERSION", "Layout"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
