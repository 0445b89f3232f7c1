"""``create_store`` and ``open_store``: the entry points, and the backend registry.

Backends register only when their library imports (as xarray does), so a machine without h5py
simply has no "hdf5" backend instead of failing on ``import storage``.

A store's location is a local path or, for the zarr backend, an fsspec URL (``s3://bucket/x.zarr``,
``file:///shared/x.zarr``; :mod:`storage.urls`). HDF5 needs a local path: h5py reads files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import warnings
from typing import Any

import numpy as np

from storage import locking, urls
from storage.base import LogitStore, StoreWarning, checked_labels
from storage.errors import (
    FingerprintMismatchError,
    NotAStoreError,
    SchemaVersionError,
    StoreError,
    StoreExistsError,
)
from storage.layout import (
    DEFAULT_TOPK,
    SCHEMA_VERSION,
    Layout,
    auto_chunk_rows,
    auto_chunks_per_shard,
)

FORMAT_NAME = "logitbank-store"
#: Backends that take fsspec URLs as well as local paths.
URL_BACKENDS = ("zarr",)

BACKENDS: dict[str, type[LogitStore]] = {}
try:
    from storage.zarr_backend import ZarrLogitStore

    BACKENDS["zarr"] = ZarrLogitStore
except ImportError:  # zarr missing: no zarr backend
    pass
try:
    from storage.h5_backend import H5LogitStore

    BACKENDS["hdf5"] = H5LogitStore
except ImportError:  # h5py missing: no hdf5 backend
    pass


def get_backend(name: str) -> type[LogitStore]:
    if name not in BACKENDS:
        raise StoreError(
            f"unknown or unavailable backend {name!r}: choose one of "
            f"{', '.join(BACKENDS) or '(none: install zarr or h5py)'}"
        )
    return BACKENDS[name]


def make_layout(
    num_samples: int,
    num_classes: int,
    num_views: int = 1,
    encoding: str = "float16",
    chunk_rows: int | None = None,
    chunks_per_shard: int | None = None,
    topk: int | None = None,
    view_param_width: int = 0,
) -> Layout:
    """A validated layout, with chunk and shard sizes chosen when not given (None)."""
    from storage.encodings import ENCODINGS

    for name, value in (
        ("num_samples", num_samples),
        ("num_classes", num_classes),
        ("num_views", num_views),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise StoreError(f"{name} must be an integer, got {value!r}")
    num_samples, num_classes, num_views = int(num_samples), int(num_classes), int(num_views)
    if encoding not in ENCODINGS:
        raise StoreError(f"unknown encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    # A value given is used as given, or refused: never quietly replaced (0 by "auto", 2.5 by 2).
    chunk_rows = _count("chunk_rows", chunk_rows, 1, "None for automatic")
    chunks_per_shard = _count("chunks_per_shard", chunks_per_shard, 1, "None for automatic")
    view_param_width = _count("view_param_width", view_param_width, 0, "0 for none")
    k = 0  # only topk keeps k values; Layout refuses a k outside [1, C - 1]
    if encoding == "topk":
        k = _count("topk", topk, None, "None for the default")
        k = min(DEFAULT_TOPK, max(1, num_classes - 1)) if k is None else k
    if num_samples > 0 and num_classes >= 2:
        if chunk_rows is None:
            chunk_rows = auto_chunk_rows(num_samples, num_classes, encoding, k)
        if chunks_per_shard is None:
            chunks_per_shard = auto_chunks_per_shard(
                chunk_rows, num_samples, num_classes, encoding, k
            )
    return Layout(
        int(num_samples),
        int(num_classes),
        int(num_views),
        encoding,
        chunk_rows or 1,
        chunks_per_shard or 1,
        k,
        view_param_width,
    )


def _count(name: str, value: Any, low: int | None, otherwise: str) -> int | None:
    """``value`` as an int, None as None; a one-line StoreError for anything else or below
    ``low``: a bool, a fraction, a string, 0 where at least 1 is needed."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        what = "an integer" if low is None else f"an integer >= {low}"
        raise StoreError(f"{name} must be {what} ({otherwise}), got {value!r}")
    if low is not None and value < low:
        raise StoreError(f"{name} must be >= {low} ({otherwise}), got {value}")
    return int(value)


def create_store(
    path: str | os.PathLike,
    num_samples: int,
    num_classes: int,
    num_views: int = 1,
    encoding: str = "float16",
    chunk_rows: int | None = None,
    backend: str = "zarr",
    fingerprint: dict | None = None,
    *,
    labels: Any = None,
    view_param_width: int = 0,
    topk: int | None = None,
    chunks_per_shard: int | None = None,
    compressor: str | None = None,
    overwrite: bool = False,
    attrs: dict | None = None,
) -> LogitStore:
    """Create an empty store and return it open for writing (it holds the writer lock).

    Args:
        path: a directory for zarr, a file for hdf5; for zarr also an fsspec URL
            (``s3://bucket/store.zarr``, ``file:///shared/store.zarr``).
        encoding: float32, float16, bfloat16, int8 or topk (``topk`` = k, default 32).
        chunk_rows: rows per chunk; by default about 1 MiB of logits per chunk.
        fingerprint: provenance (hashes of model, dataset, preprocessing; seed). Readers that
            pass their own fingerprint to :func:`open_store` are refused on a mismatch.
        labels: the dataset's labels (N,), stored for self-containment and checks.
        view_param_width: P, augmentation parameters stored per row (``view_params``).
        overwrite: replace an existing store at ``path`` (never anything else).
    """
    cls = get_backend(backend)
    path = os.fspath(path)
    if not urls.is_url(path):
        path = path.rstrip("/" + os.sep) or path  # "x.zarr/" names x.zarr
    _refuse_url(path, backend)
    layout = make_layout(
        num_samples,
        num_classes,
        num_views,
        encoding,
        chunk_rows,
        chunks_per_shard,
        topk,
        view_param_width,
    )
    labels = None if labels is None else checked_labels(labels, layout)
    fingerprint = plain_fingerprint(fingerprint or {})
    cls.check_compressor(compressor)
    if not urls.is_url(path):
        _recover_overwrite(path)
    aside = guard = None  # the store being replaced, moved aside until the new one is whole
    if _exists(path):
        existing = _read_attrs_any(path)
        if existing is None:
            raise StoreExistsError(
                f"{path} exists and is not a logit store: choose another path; nothing was changed"
            )
        if not overwrite:
            raise StoreExistsError(
                f"a store already exists at {path}: pass --overwrite to replace "
                f"it, or choose another path"
            )
        old = open_store(path, mode="a")  # refuses if someone is writing it; held till moved
        try:
            if urls.is_url(path):  # no rename on object stores
                BACKENDS[existing[0]].remove(path)
            else:
                # Its guard is held until the overwrite ends: a sweep (_recover_overwrite) then
                # leaves it alone, and only treats an aside nobody holds as left by a killed one.
                aside, guard = locking.new_aside(path)
                try:
                    os.rename(path, aside)
                except BaseException:
                    locking.drop_guard(aside, guard)
                    raise
        finally:
            old.close()
    store_attrs = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        **layout.to_attrs(),
        "stats_fields": ["max", "logsumexp", "mean", "std"],
        "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bfloat16_storage": "uint16 bit patterns: float32 = bits << 16",
        **(attrs or {}),
    }
    try:
        store = cls.create(path, layout, store_attrs, compressor, labels)
    except BaseException as exc:
        if aside is not None:  # the old store goes back, untouched (never over another's)
            locking.put_back(aside, path)
            if os.path.lexists(aside):
                guard.release()  # not back (the new store is there): a later sweep removes it
            else:
                locking.drop_guard(aside, guard)
        elif urls.is_url(path) and not isinstance(exc, (FileExistsError, StoreError)):
            # Built in place (no rename on object stores): one cut short (a full disk) would
            # block every rerun as "not a store"; it holds nothing yet, so it goes. A local
            # store is built under a temporary name, which its backend removes: never `path`,
            # which may be another process's store, created since the check above.
            with contextlib.suppress(OSError):
                cls.remove(path)
        raise
    if aside is not None:
        locking.discard_aside(aside, guard)  # a removal cut short is swept up by the next open
    return store


def _recover_overwrite(path: str) -> None:
    """Clean up beside a local ``path`` after an overwrite killed half-way
    (:func:`storage.locking.sweep_replaced`): the old store back when no new one was made,
    else removed; each said in a :class:`StoreWarning`."""
    restored, removed = locking.sweep_replaced(path, lambda p: _read_attrs_any(p) is not None)
    if restored:
        warnings.warn(
            f"store {path}: an overwrite of it was interrupted before the new store was made; "
            f"the old store it had moved aside ({os.path.basename(restored)}) is back in place",
            StoreWarning,
            stacklevel=3,
        )
    if removed:
        shown = ", ".join(os.path.basename(p) for p in removed)
        warnings.warn(
            f"store {path}: removed {shown}: the store(s) an interrupted overwrite replaced",
            StoreWarning,
            stacklevel=3,
        )


def plain_fingerprint(fingerprint: dict) -> dict:
    """``fingerprint`` as the store's JSON attributes give it back (tuples become lists, numpy
    scalars numbers), so a store compares equal to the fingerprint it was made with."""

    def plain(value: Any) -> Any:
        if isinstance(value, (np.generic, np.ndarray)):
            return value.tolist()
        raise StoreError(
            f"fingerprint values must be strings, numbers, lists or mappings, got "
            f"{type(value).__name__}: {value!r}"[:200]
        )

    if not isinstance(fingerprint, dict):
        raise StoreError(f"fingerprint must be a mapping, got {type(fingerprint).__name__}")
    return json.loads(json.dumps(fingerprint, default=plain))


def open_store(
    path: str | os.PathLike, mode: str = "r", fingerprint: dict | None = None
) -> LogitStore:
    """Open a store: ``mode="r"`` to read (default), ``"a"`` to resume writing (takes the lock).

    With ``fingerprint``, every key it names must match the store's, else
    :class:`FingerprintMismatchError` shows both.
    """
    if mode not in ("r", "a", "task"):
        raise StoreError(f"mode must be 'r' (read) or 'a' (resume writing), got {mode!r}")
    path = os.fspath(path)
    if urls.is_url(path) and path.rstrip("/").endswith((".h5", ".hdf5")):
        _refuse_url(path, "hdf5")  # an HDF5 file by its name: refused before any network call
    if mode == "a" and not urls.is_url(path):
        _recover_overwrite(path)
    found = _read_attrs_any(path)
    if found is None:
        what = _why_not_a_store(path)
        aside = None if urls.is_url(path) else next(iter(locking.replaced_stores(path)), None)
        if aside is not None and not _exists(path):
            raise NotAStoreError(
                f"{path} does not exist: the store an overwrite replaces waits at {aside}; if "
                f"that overwrite was interrupted, open the path with mode='a' (or rerun "
                f"precompute) to put it back"
            )
        if "zarr" not in BACKENDS and os.path.isfile(os.path.join(path, "zarr.json")):
            raise NotAStoreError(
                f"{path} is a zarr store, but zarr is not installed: run `make setup`"
            )
        raise NotAStoreError(
            f"{path} {what}: give the path of a store made by precompute "
            f"(a .zarr directory or an .h5 file)"
        )
    backend, attrs = found
    version = attrs.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise NotAStoreError(
            f"store {path} has no valid schema_version (got {version!r}): its metadata is "
            f"damaged; run precompute again into a new path"
        )
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"store {path} has schema version {version}, newer than this "
            f"logitbank reads ({SCHEMA_VERSION}): upgrade logitbank"
        )
    required = [f.name for f in dataclasses.fields(Layout) if f.default is dataclasses.MISSING]
    lacking = [k for k in required if k not in attrs]
    if lacking:  # Layout checks the types of those that are there
        raise NotAStoreError(
            f"store {path} lacks the attribute(s) {', '.join(lacking)}: its metadata is damaged; "
            f"run precompute again into a new path"
        )
    layout = Layout(**{k: attrs[k] for k in Layout.__dataclass_fields__ if k in attrs})
    if fingerprint:
        check_fingerprint(path, attrs.get("fingerprint", {}), fingerprint)
    return BACKENDS[backend].open(path, mode, layout, attrs)


def check_fingerprint(path: str, stored: dict, expected: dict) -> None:
    """Refuse a store made from other inputs than ``expected`` (keys it does not name are free)."""
    expected = plain_fingerprint(expected)
    diff = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: store {a!r} vs expected {b!r}" for k, (a, b) in diff.items())
        raise FingerprintMismatchError(
            f"store {path} was made from other inputs ({shown}): point to the store made for this "
            f"dataset and config, or run precompute again into a new path"
        )


def _refuse_url(path: str, backend: str) -> None:
    if urls.is_url(path) and backend not in URL_BACKENDS:
        raise StoreError(
            f"the {backend} backend needs a local path, not the URL {path}: h5py reads local "
            f"files only; use backend zarr for shared or object storage, or a mounted path"
        )


def _why_not_a_store(path: str) -> str:
    """Why ``path`` opened as no store: it does not exist, the OS refuses it (a symlink loop, a
    name too long: not "does not exist"), or it is something else."""
    if urls.is_url(path):
        return "does not exist" if not _exists(path) else "is not a logit store"
    try:
        os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})"
    return "is not a logit store"


def _exists(path: str) -> bool:
    if urls.is_url(path):
        fs, root = urls.filesystem(path)
        return bool(fs.exists(root))
    return os.path.lexists(path)


def _read_attrs_any(path: str) -> tuple[str, dict] | None:
    for name, cls in BACKENDS.items():
        if urls.is_url(path) and name not in URL_BACKENDS:
            continue
        attrs = cls.read_attrs(path)
        if attrs is not None and attrs.get("format") == FORMAT_NAME:
            return name, attrs
    return None
