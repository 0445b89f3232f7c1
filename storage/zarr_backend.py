"""The zarr v3 backend (the default): a directory, one sharded array per row quantity.

Chunks ``(1, chunk_rows, C)`` sit inside shards ``(1, shard_rows, C)``: one file per shard, a
crc32c checksum per chunk (and on each shard's index), no general-purpose compressor unless asked
for — on logits it gains < 10 % and costs 2-3x on reads. Shards are written whole, so no write is
ever a read-modify-write; each file is written to a temporary name and renamed, so a reader sees a
shard entirely or not at all. Uncompressed shards on a local disk are written and read directly
(``storage.shard_reader``), byte for byte as zarr lays them out; the rest goes through zarr.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

from storage.base import LogitStore
from storage.errors import StoreError
from storage.layout import Layout
from storage.locking import WriterLock
from storage.shard_reader import ShardReader, supports_fast_path, write_shard

COMPRESSORS = {"zstd": lambda: ZstdCodec(level=3), "gzip": lambda: GzipCodec(level=5)}
LOCK_NAME = ".writer.lock"


class ZarrLogitStore(LogitStore):
    backend = "zarr"
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
        if compressor is not None and compressor not in COMPRESSORS:
            raise StoreError(
                f"unknown compressor {compressor!r} for zarr: choose one of "
                f"{', '.join(COMPRESSORS)} or none"
            )
        os.makedirs(path, exist_ok=False)
        lock = WriterLock(Path(path) / LOCK_NAME, path)
        lock.acquire()
        codecs = ([COMPRESSORS[compressor]()] if compressor else []) + [Crc32cCodec()]
        group = zarr.create_group(store=path, zarr_format=3, attributes=attrs)
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
            chunks=(min(layout.num_samples, 1 << 20),),
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
        return cls(path, "w", layout, attrs, group, lock)

    @classmethod
    def open(cls, path: str, mode: str, layout: Layout, attrs: dict) -> ZarrLogitStore:
        lock = None
        if mode in ("a", "w"):
            lock = WriterLock(Path(path) / LOCK_NAME, path)
            lock.acquire()
        group = zarr.open_group(path, mode="r" if mode == "r" else "r+", zarr_format=3)
        return cls(path, mode, layout, attrs, group, lock)

    @staticmethod
    def read_attrs(path: str) -> dict | None:
        """The group attributes, or None if ``path`` is no zarr v3 group."""
        if not (Path(path) / "zarr.json").is_file():
            return None
        try:
            return dict(zarr.open_group(path, mode="r", zarr_format=3).attrs)
        except (ValueError, OSError, KeyError, TypeError):
            return None

    @staticmethod
    def remove(path: str) -> None:
        shutil.rmtree(path)

    # ---- primitives ------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self._group[name]
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

    def shard_file(self, name: str, view: int, shard: int) -> Path:
        """The file of one shard (zarr v3 default chunk key encoding, '/' separated)."""
        extra = ["0"] if self._array(name).ndim == 3 else []
        return Path(self.path, name, "c", str(view), str(shard), *extra)

    def _missing_files(self, view: int, chunk: int) -> list[str]:
        shard = chunk // self.layout.chunks_per_shard
        names = list(self.layout.arrays())
        files = [self.shard_file(n, view, shard) for n in names]
        return [str(f.relative_to(self.path)) for f in files if not f.is_file()]

    def _close(self) -> None:
        for reader in self._fast.values():
            if reader is not None:
                reader.close()
        self._fast.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
