"""The zarr v3 backend (the default): a directory, one sharded array per row quantity.

Chunks ``(1, chunk_rows, C)`` sit inside shards ``(1, shard_rows, C)``: one file per shard, a
crc32c checksum per chunk (and on each shard's index), no general-purpose compressor unless asked
for — on logits it gains < 10 % and costs 2-3x on reads. Shards are written whole, so no write is
ever a read-modify-write; each file is written to a temporary name and renamed, so a reader sees a
shard entirely or not at all. Uncompressed shards on a local disk are written and read directly
(``storage.shard_reader``), byte for byte as zarr lays them out; the rest goes through zarr.

A store may also live at an fsspec URL (``s3://…``, ``file://…``; :mod:`storage.urls`): it goes
through zarr's ``FsspecStore`` alone. The writer lock is an ``flock`` where the store's file system
is this machine's (a path, a ``file://`` URL); object storage has no such lock, so there the one
writer of a store is the coordinator by contract (see :class:`ZarrLogitStore`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

import numpy as np
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from storage import urls
from storage.base import LogitStore, _first, name_final
from storage.errors import StoreCorruptError, StoreExistsError
from storage.layout import LABEL_CHUNK_ROWS, Layout
from storage.locking import WriterLock, remove_abandoned
from storage.shard_reader import ShardReader, supports_fast_path, write_shard

COMPRESSORS = {"zstd": lambda: ZstdCodec(level=3), "gzip": lambda: GzipCodec(level=5)}
LOCK_NAME = ".writer.lock"


def _zarr_store(path: str, read_only: bool) -> str | FsspecStore:
    """What zarr opens: the local directory, or an ``FsspecStore`` for a URL."""
    if not urls.is_url(path):
        return path
    fs, root = urls.filesystem(path)  # first: a missing package (s3fs …) is one line
    if urls.is_local_url(path):  # whole-file writes made atomic, as on object storage
        return FsspecStore(
            AsyncFileSystemWrapper(fs, asynchronous=True), path=root, read_only=read_only
        )
    return FsspecStore.from_url(path, read_only=read_only)


def _writer_lock(path: str) -> WriterLock | None:
    """The writer lock of a store, taken; None on object storage (no lock there, by contract)."""
    if urls.is_url(path):
        if not urls.is_local_url(path):
            return None
        _, path = urls.filesystem(path)
    lock = WriterLock(Path(path) / LOCK_NAME, path)
    lock.acquire()
    return lock


def _rename_new(building: str, final: str) -> None:
    """Move the store built at ``building`` to ``final``, which must not have been made since."""
    try:
        os.rename(building, final)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise StoreExistsError(
                f"a store was created at {final} by another process meanwhile: choose another "
                f"path; nothing was changed"
            ) from None
        raise


class ZarrLogitStore(LogitStore):
    """The zarr backend. On object storage (a non-``file://`` URL) there is no writer lock:
    ``flock`` needs a local file, and an object store offers no lock that a killed writer would
    release. The coordinator that runs ``precompute`` is then the single writer by contract —
    it alone creates the store and writes ``done``; dask tasks write only their own shards — and
    starting two precomputes on one store URL at once is the user's mistake to avoid."""

    backend = "zarr"
    compressors = tuple(COMPRESSORS)
    supports_parallel_write = True

    def __init__(
        self,
        path: str,
        mode: str,
        layout: Layout,
        attrs: dict,
        group: zarr.Group,
        lock: WriterLock | None,
    ) -> None:
        super().__init__(path, mode, layout, attrs)
        self._group = group
        self._lock = lock
        self._arrays: dict[str, zarr.Array] = {}
        self._fast: dict[str, ShardReader | None] = {}
        self._seen_keys: set[str] = set()  # shard keys known to exist (URL stores: verify)

    # ---- creation / opening ----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str,
        layout: Layout,
        attrs: dict,
        compressor: str | None,
        labels: np.ndarray | None,
    ) -> ZarrLogitStore:
        cls.check_compressor(compressor)
        if urls.is_url(path):
            fs, root = urls.filesystem(path)
            if fs.exists(root) and fs.ls(root):
                raise StoreExistsError(
                    f"{path} exists and is not empty: choose another URL; nothing was changed"
                )
            if urls.is_local_url(path):
                fs.makedirs(root, exist_ok=True)
        final = path
        if not urls.is_url(path):
            # Built under a temporary name and renamed into place when whole: a creation killed
            # half-way leaves no half-made store at `final` for a rerun to trip over.
            remove_abandoned(final, LOCK_NAME)
            path = f"{final}.creating-{uuid.uuid4().hex[:12]}"
            os.makedirs(path, exist_ok=False)
        lock = None
        try:
            lock = _writer_lock(path)
            group = cls._build(path, layout, attrs, compressor, labels)
            if path != final:  # the lock's flock follows the renamed file
                _rename_new(path, final)
                group = zarr.open_group(final, mode="r+", zarr_format=3)
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if path != final:
                shutil.rmtree(path, ignore_errors=True)
                name_final(exc, path, final)
            raise
        return cls(final, "w", layout, attrs, group, lock)

    @staticmethod
    def _build(
        path: str, layout: Layout, attrs: dict, compressor: str | None, labels: np.ndarray | None
    ) -> zarr.Group:
        """The group and its empty arrays at ``path``."""
        codecs = ([COMPRESSORS[compressor]()] if compressor else []) + [Crc32cCodec()]
        group = zarr.create_group(
            store=_zarr_store(path, read_only=False), zarr_format=3, attributes=attrs
        )
        shard, chunk = layout.shard_rows, layout.chunk_rows
        arrays = dict(layout.arrays())
        for name, (dtype, width) in arrays.items():
            tail = () if width is None else (width,)
            group.create_array(
                name,
                shape=(layout.num_views, layout.num_samples, *tail),
                dtype=dtype,
                chunks=(1, chunk, *tail),
                shards=(1, shard, *tail),
                compressors=codecs,
                # NaN marks never-written float rows: a read that bypasses `done` sees it at once.
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
                dimension_names=("view", "sample", "class" if name == "logits" else name)[
                    : 2 + len(tail)
                ],
            )
        group.create_array(
            "labels",
            shape=(layout.num_samples,),
            dtype="int64",
            chunks=(min(layout.num_samples, LABEL_CHUNK_ROWS),),
            compressors=codecs,
            fill_value=-1,
            dimension_names=("sample",),
        )
        if labels is not None:
            group["labels"][:] = labels
        group.create_array(
            "done",
            shape=(layout.num_views, layout.num_chunks),
            dtype="uint8",
            chunks=(1, layout.num_chunks),
            compressors=codecs,
            fill_value=0,
            dimension_names=("view", "chunk"),
        )
        return group

    @classmethod
    def open(cls, path: str, mode: str, layout: Layout, attrs: dict) -> ZarrLogitStore:
        lock = _writer_lock(path) if mode in ("a", "w") else None
        if lock is not None:  # a local path or a file:// URL: its files are on this machine
            _remove_partials(lock.store_path)
        try:
            group = zarr.open_group(
                _zarr_store(path, read_only=mode == "r"),
                mode="r" if mode == "r" else "r+",
                zarr_format=3,
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(path, mode, layout, attrs, group, lock)

    @staticmethod
    def read_attrs(path: str) -> dict | None:
        """The group attributes, or None if ``path`` is no zarr v3 group."""
        if urls.is_url(path):
            fs, root = urls.filesystem(path)
            if not fs.isfile(urls.join(root, "zarr.json")):
                return None
        else:
            try:  # is_file() would call an unreadable folder "no store"
                if not stat.S_ISREG(os.stat(Path(path) / "zarr.json").st_mode):
                    return None
            except PermissionError:
                raise  # one line from the command line: permission denied (the path)
            except OSError:
                return None
        try:
            return dict(
                zarr.open_group(_zarr_store(path, read_only=True), mode="r", zarr_format=3).attrs
            )
        except PermissionError:
            raise
        except (ValueError, OSError, KeyError, TypeError):
            return None

    @staticmethod
    def remove(path: str) -> None:
        if urls.is_url(path):
            fs, root = urls.filesystem(path)
            fs.rm(root, recursive=True)
        else:
            shutil.rmtree(path)

    # ---- primitives ------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = self._group[name]
            except (ValueError, KeyError, TypeError) as exc:  # its zarr.json damaged or gone
                raise StoreCorruptError(
                    f"store {self.path}: the metadata of its {name} array ({name}/zarr.json) "
                    f"is unreadable ({_first(exc)}): delete the store and run precompute again"
                ) from None
            self._arrays[name] = arr
        return arr

    def _write_block(self, view: int, start: int, parts: dict[str, np.ndarray]) -> None:
        lay = self.layout
        for name, block in parts.items():
            stop = start + len(block)
            whole = start % lay.shard_rows == 0 and (
                len(block) == lay.shard_rows or stop == lay.num_samples
            )
            if whole and self._shard_reader(name) is not None:
                # Our own plain shards: write the file directly, as zarr would lay it out, without
                # zarr's per-chunk codec pipeline (a shard is written once, whole).
                write_shard(
                    self.shard_file(name, view, start // lay.shard_rows),
                    block,
                    lay.chunk_rows,
                    lay.chunks_per_shard,
                    self._array(name).fill_value,
                    sync=self.sync_writes,
                )
            else:
                # Every chunk written, even one equal to the fill value (all-zero view_params):
                # a done chunk always has its file.
                arr = self._array(name).with_config({"write_empty_chunks": True})
                arr[view, start:stop] = block

    def _shard_reader(self, name: str) -> ShardReader | None:
        if name not in self._fast:
            arr = self._array(name)
            local = isinstance(arr.store, LocalStore) and Path(self.path).is_dir()
            self._fast[name] = (
                ShardReader(
                    self.path,
                    name,
                    arr.shape,
                    arr.dtype,
                    self.layout.chunk_rows,
                    self.layout.chunks_per_shard,
                    fill_value=arr.fill_value,
                )
                if local and supports_fast_path(arr)
                else None
            )
        return self._fast[name]

    def _read_block(
        self, name: str, view: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        reader = self._shard_reader(name)
        if reader is not None:
            return reader.read(view, start, stop, out=out)
        block = self._array(name)[view, start:stop]
        if out is None:
            return block
        out[...] = block
        return out

    def _read_rows(self, name: str, view: int, rows: np.ndarray) -> np.ndarray:
        reader = self._shard_reader(name)
        if reader is not None:
            return reader.read_rows(view, rows)
        arr = self._array(name)
        sel = (view, rows) if arr.ndim == 2 else (view, rows, slice(None))
        return arr.get_orthogonal_selection(sel)

    def _load_done(self) -> np.ndarray:
        return self._array("done")[:]

    def _store_done(self, view: int, marks: np.ndarray) -> None:
        self._array("done")[view] = marks

    def _read_labels(self) -> np.ndarray:
        return self._array("labels")[:]

    def _write_labels(self, labels: np.ndarray) -> None:
        self._array("labels")[:] = labels

    def shard_key(self, name: str, view: int, shard: int) -> str:
        """The key of one shard inside the store (zarr v3 default chunk key encoding)."""
        extra = ["0"] if self._array(name).ndim == 3 else []
        return "/".join([name, "c", str(view), str(shard), *extra])

    def shard_file(self, name: str, view: int, shard: int) -> Path:
        """The file of one shard of a store on a local path."""
        return Path(self.path, self.shard_key(name, view, shard))

    def _missing_files(self, view: int, chunk: int) -> list[str]:
        shard = chunk // self.layout.chunks_per_shard
        keys = [self.shard_key(n, view, shard) for n in self.layout.arrays()]
        if not urls.is_url(self.path):
            return [k for k in keys if not Path(self.path, k).is_file()]
        fs, root = urls.filesystem(self.path)
        # A shard's key, once there, stays (shards are written whole, never deleted): remember it
        # rather than ask the object store again for each of the shard's chunks.
        missing = []
        for key in keys:
            if key not in self._seen_keys:
                if fs.isfile(urls.join(root, key)):
                    self._seen_keys.add(key)
                else:
                    missing.append(key)
        return missing

    def _chunk_problems(self, view: int, chunk: int, names: list[str]) -> list[str]:
        # Uncompressed local shards: the file's size and index place each chunk (no data read),
        # so a shard cut short is named without reading it (a compressed or remote one is named
        # by its checksums when read).
        problems = []
        for name in names:
            reader = self._shard_reader(name)
            problem = None if reader is None else reader.frame_problem(view, chunk)
            if problem:
                problems.append(f"{name}: {problem}")
        return problems

    def _close(self) -> None:
        for reader in self._fast.values():
            if reader is not None:
                reader.close()
        self._fast.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _remove_partials(path: str) -> None:
    """Remove the ``*.partial`` shard files writers killed mid-write left (SIGKILL runs no
    ``finally``). Only with the writer lock held, before any task of this writer starts."""
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
