"""The HDF5 backend (h5py): one file, the same array names and attributes as the zarr store.

Datasets are chunked ``(1, chunk_rows, C)`` with the fletcher32 checksum filter. The writer runs in
SWMR mode (single writer, multiple readers), so readers can open the file while a precompute is
still filling it and see each chunk once it is flushed and marked done. HDF5's single file allows
one writing process: parallel precompute sends rows to the coordinator, which writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from storage.base import LogitStore
from storage.errors import StoreError
from storage.h5_recover import clear_status_flags
from storage.layout import Layout
from storage.locking import WriterLock

COMPRESSORS = {
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "lzf": {"compression": "lzf"},
}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Readers get a chunk cache that holds a training window's worth of chunks.
READ_CACHE_BYTES = 64 << 20


def _lock_path(path: str) -> Path:
    return Path(f"{path}.lock")


class H5LogitStore(LogitStore):
    backend = "hdf5"
    supports_parallel_write = False

    def __init__(
        self,
        path: str,
        mode: str,
        layout: Layout,
        attrs: dict,
        file: h5py.File,
        lock: WriterLock | None,
    ) -> None:
        super().__init__(path, mode, layout, attrs)
        self._file = file
        self._lock = lock

    @classmethod
    def create(
        cls,
        path: str,
        layout: Layout,
        attrs: dict,
        compressor: str | None,
        labels: np.ndarray | None,
    ) -> H5LogitStore:
        if compressor is not None and compressor not in COMPRESSORS:
            raise StoreError(
                f"unknown compressor {compressor!r} for hdf5: choose one of "
                f"{', '.join(COMPRESSORS)} or none"
            )
        lock = WriterLock(_lock_path(path), path)
        lock.acquire()
        try:
            f = h5py.File(path, "w-", libver="latest")
        except BaseException:
            lock.release()
            raise
        filters = {"fletcher32": True, **(COMPRESSORS[compressor] if compressor else {})}
        for name, (dtype, width) in layout.arrays().items():
            tail = () if width is None else (width,)
            f.create_dataset(
                name,
                shape=(layout.num_views, layout.num_samples, *tail),
                dtype=dtype,
                chunks=(1, layout.chunk_rows, *tail),
                fillvalue=np.nan if np.dtype(dtype).kind == "f" else 0,
                **filters,
            )
        f.create_dataset(
            "labels",
            data=labels if labels is not None else np.full(layout.num_samples, -1, np.int64),
            dtype="int64",
            chunks=(min(layout.num_samples, 1 << 20),),
            fletcher32=True,
        )
        f.create_dataset(
            "done",
            shape=(layout.num_views, layout.num_chunks),
            dtype="uint8",
            chunks=(1, layout.num_chunks),
            fletcher32=True,
            fillvalue=0,
        )
        for key, value in attrs.items():
            f.attrs[key] = _to_h5_attr(value)
        f.swmr_mode = True  # from here on, readers may open the file while it is written
        return cls(path, "w", layout, attrs, f, lock)

    @classmethod
    def open(cls, path: str, mode: str, layout: Layout, attrs: dict) -> H5LogitStore:
        if mode == "r":
            return cls(path, mode, layout, attrs, _open_read(path), None)
        lock = WriterLock(_lock_path(path), path)
        lock.acquire()
        try:
            try:
                f = h5py.File(path, "r+", libver="latest")
            except OSError as exc:
                if "already open for write" not in str(exc):
                    raise
                # Our lock proves no writer is alive: a killed writer left its SWMR flags set.
                clear_status_flags(path)
                f = h5py.File(path, "r+", libver="latest")
            f.swmr_mode = True
        except BaseException:
            lock.release()
            raise
        return cls(path, mode, layout, attrs, f, lock)

    @staticmethod
    def read_attrs(path: str) -> dict | None:
        """The file's attributes, or None if ``path`` is no HDF5 file."""
        try:
            with open(path, "rb") as fh:
                if fh.read(8) != HDF5_SIGNATURE:
                    return None
            with _open_read(path) as f:
                return {k: _from_h5_attr(v) for k, v in f.attrs.items()}
        except (OSError, IsADirectoryError):
            return None

    @staticmethod
    def remove(path: str) -> None:
        os.remove(path)

    # ---- primitives ------------------------------------------------------------------------
    def _write_block(self, view: int, start: int, parts: dict[str, np.ndarray]) -> None:
        for name, block in parts.items():
            dset = self._file[name]
            dset[view, start : start + len(block)] = block
            dset.flush()  # SWMR: make the rows visible before `done` says they are there

    def _read_block(
        self, name: str, view: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        dset = self._file[name]
        if self.mode == "r":
            dset.refresh()
        if out is None:
            return dset[view, start:stop]
        dset.read_direct(out, np.s_[view, start:stop])  # straight into the caller's buffer
        return out

    def _read_rows(self, name: str, view: int, rows: np.ndarray) -> np.ndarray:
        dset = self._file[name]
        if self.mode == "r":
            dset.refresh()
        # h5py point selection wants increasing indices (they are: sorted and unique).
        return dset[view, rows]

    def _load_done(self) -> np.ndarray:
        dset = self._file["done"]
        if self.mode == "r":
            dset.refresh()
        return dset[:]

    def _store_done(self, view: int, marks: np.ndarray) -> None:
        dset = self._file["done"]
        dset[view] = marks
        dset.flush()

    def _read_labels(self) -> np.ndarray:
        dset = self._file["labels"]
        if self.mode == "r":
            dset.refresh()
        return dset[:]

    def _write_labels(self, labels: np.ndarray) -> None:
        self._file["labels"][:] = labels
        self._file["labels"].flush()

    def _missing_files(self, view: int, chunk: int) -> list[str]:
        return []  # one file: if it opened, it is there

    def _close(self) -> None:
        try:
            self._file.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def _open_read(path: str) -> h5py.File:
    return h5py.File(path, "r", swmr=True, rdcc_nbytes=READ_CACHE_BYTES)


def _to_h5_attr(value):
    """HDF5 attributes hold scalars and strings: nested dicts go in as JSON."""
    if isinstance(value, (dict, list)) or value is None:
        return "json:" + json.dumps(value, sort_keys=True)
    return value


def _from_h5_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    if isinstance(value, np.generic):
        return value.item()
    return value
