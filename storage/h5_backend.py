"""The HDF5 backend (h5py): one file, the same array names and attributes as the zarr store.

Datasets are chunked ``(1, chunk_rows, C)`` with the fletcher32 checksum filter. The writer runs in
SWMR mode (single writer, multiple readers), so readers can open the file while a precompute is
still filling it and see each chunk once it is flushed and marked done. HDF5's single file allows
one writing process: parallel precompute sends rows to the coordinator, which writes them.

A truncated file needs care: HDF5 reads the missing bytes of a chunk past the end of the file as
zeros, and fletcher32 of zeros is zero, so such a chunk would read back as valid zero logits (and
its ``done`` marks as "not done"). Readers therefore compare the end-of-file address in the
superblock with the file's size, and in a truncated file refuse every chunk whose bytes lie past
the end; ``verify`` names those chunks and the file.

Damaged metadata needs care too. A SWMR reader skips HDF5's end-of-file check (which is what lets a
file cut inside its data open, for ``verify`` to name the lost chunks), and it takes a metadata
checksum failure for a writer's half-done update: by default it retries 100 times, doubling a
sleep that starts at 1 ns, so on a file cut inside its metadata or with a flipped bit there it
never returns. Readers therefore check the superblock themselves first, and open with the number
of read attempts capped (``READ_ATTEMPTS``); whatever HDF5 then cannot read makes the store
"damaged", one line, rather than a hang or a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
from h5py._objects import phil

from storage.base import READ_ERRORS, LogitStore, _first, name_final
from storage.errors import StoreCorruptError, StoreError, StoreExistsError
from storage.h5_recover import clear_status_flags, read_superblock
from storage.layout import Layout
from storage.locking import WriterLock, remove_abandoned

COMPRESSORS = {
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "lzf": {"compression": "lzf"},
}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Readers get a chunk cache that holds a training window's worth of chunks.
READ_CACHE_BYTES = 64 << 20
# A SWMR reader's tries at a metadata block whose checksum fails, sleeping 1, 2, 4 ... ns between
# them: about 0.13 s in all. That rides out a writer's update caught half-way (microseconds)
# and fails a damaged file at once (HDF5's default, 100, sleeps for 2**100 ns: for ever).
READ_ATTEMPTS = 27


def _lock_path(path: str) -> Path:
    return Path(f"{path}.lock")


class H5LogitStore(LogitStore):
    backend = "hdf5"
    compressors = tuple(COMPRESSORS)
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
        try:
            try:
                _refuse_data_elsewhere(file, path)
                _refuse_missing(file, path, layout)
            except READ_ERRORS as exc:  # a dataset's object header is unreadable
                raise _damaged(path, exc) from None
        except StoreError:
            file.close()
            if lock is not None:
                lock.release()
            raise
        super().__init__(path, mode, layout, attrs)
        self._file = file
        self._lock = lock
        #: Set when the file is shorter than its superblock says: reads then check each chunk.
        self._truncated = _truncation(path)

    @classmethod
    def create(
        cls,
        path: str,
        layout: Layout,
        attrs: dict,
        compressor: str | None,
        labels: np.ndarray | None,
    ) -> H5LogitStore:
        cls.check_compressor(compressor)
        # The lock file lives beside the store: make its folder first, as the zarr backend does.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lock = WriterLock(_lock_path(path), path)
        lock.acquire()
        if os.path.lexists(path):  # made since create_store looked (creators share this lock)
            lock.release()
            raise StoreExistsError(
                f"a store was created at {path} by another process meanwhile: choose another "
                f"path; nothing was changed"
            )
        # Built under a temporary name and renamed into place when whole: a creation killed
        # half-way leaves no half-made file at `path` for a rerun to trip over.
        remove_abandoned(path, None)  # earlier creations killed half-way (we hold the lock)
        building = f"{path}.creating-{uuid.uuid4().hex[:12]}"
        try:
            f = cls._build(building, layout, attrs, compressor, labels)
            _place(building, path)  # the open file follows it
            f.swmr_mode = True  # from here on, readers may open the file while it is written
        except BaseException as exc:
            lock.release()
            with contextlib.suppress(OSError):
                os.unlink(building)
            name_final(exc, building, path)
            raise
        return cls(path, "w", layout, attrs, f, lock)

    @staticmethod
    def _build(
        building: str,
        layout: Layout,
        attrs: dict,
        compressor: str | None,
        labels: np.ndarray | None,
    ) -> h5py.File:
        """The file at ``building`` with its empty datasets, flushed, open for writing."""
        f = h5py.File(building, "w-", libver="latest")
        try:
            filters = {"fletcher32": True, **(COMPRESSORS[compressor] if compressor else {})}
            for name, (dtype, width) in layout.arrays().items():
                tail = () if width is None else (width,)
                f.create_dataset(
                    name,
                    shape=(layout.num_views, layout.num_samples, *tail),
                    dtype=dtype,
                    # HDF5 refuses a chunk longer than the data (zarr takes it): one chunk.
                    chunks=(1, max(1, min(layout.chunk_rows, layout.num_samples)), *tail),
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
            f.flush()
        except BaseException:
            f.close()
            raise
        return f

    @classmethod
    def open(cls, path: str, mode: str, layout: Layout, attrs: dict) -> H5LogitStore:
        if mode == "r":
            return cls(path, mode, layout, attrs, _open_read(path), None)
        lock = WriterLock(_lock_path(path), path)
        lock.acquire()
        try:
            try:
                f = _while_locked(path, lambda: h5py.File(path, "r+", libver="latest"))
            except OSError as exc:
                if "already open for write" not in str(exc):
                    raise
                # Our lock proves no writer is alive: a killed writer left its SWMR flags set.
                clear_status_flags(path)
                f = _while_locked(path, lambda: h5py.File(path, "r+", libver="latest"))
            f.swmr_mode = True
        except OSError as exc:
            lock.release()
            if "truncated" not in str(exc):
                raise
            raise StoreCorruptError(
                f"store {path} is truncated ({_truncation(path) or exc}): HDF5 cannot write to it; "
                f"delete it and run precompute again"
            ) from None
        except BaseException:
            lock.release()
            raise
        return cls(path, mode, layout, attrs, f, lock)

    @staticmethod
    def read_attrs(path: str) -> dict | None:
        """The file's attributes, or None if ``path`` is no HDF5 file; a damaged one raises
        :class:`StoreCorruptError`."""
        try:
            with open(path, "rb") as fh:
                if fh.read(8) != HDF5_SIGNATURE:
                    return None
            with _open_read(path) as f:
                try:
                    return {k: _from_h5_attr(v) for k, v in f.attrs.items()}
                except READ_ERRORS as exc:
                    raise _damaged(path, exc) from None
        except PermissionError:
            raise  # not "no store": one line from the command line, permission denied (path)
        except OSError:  # gone, or not HDF5 (HDF5's own lock is waited for in _open_read)
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
        if self._truncated:
            self._refuse_past_end(dset, view, start, stop)
        if out is None:
            return dset[view, start:stop]
        dset.read_direct(out, np.s_[view, start:stop])  # straight into the caller's buffer
        return out

    def _read_rows(self, name: str, view: int, rows: np.ndarray) -> np.ndarray:
        dset = self._file[name]
        if self.mode == "r":
            dset.refresh()
        if self._truncated:
            for chunk in np.unique(rows // self.layout.chunk_rows).tolist():
                a = chunk * self.layout.chunk_rows
                self._refuse_past_end(dset, view, a, a + 1)
        # h5py point selection wants increasing indices (they are: sorted and unique).
        return dset[view, rows]

    def _load_done(self) -> np.ndarray:
        dset = self._file["done"]
        if self.mode == "r":
            dset.refresh()
        if self._truncated:
            for view in range(self.layout.num_views):
                self._refuse_past_end(dset, view, 0, 1)
        return dset[:]

    def _store_done(self, view: int, marks: np.ndarray) -> None:
        dset = self._file["done"]
        dset[view] = marks
        dset.flush()

    def _read_labels(self) -> np.ndarray:
        dset = self._file["labels"]
        if self.mode == "r":
            dset.refresh()
        if self._truncated:
            self._refuse_past_end(dset, None, 0, len(dset))
        return dset[:]

    def _write_labels(self, labels: np.ndarray) -> None:
        self._file["labels"][:] = labels
        self._file["labels"].flush()

    def _missing_files(self, view: int, chunk: int) -> list[str]:
        return []  # one file: if it opened, it is there

    # ---- truncation --------------------------------------------------------------------------
    def _past_end(self, dset: h5py.Dataset, view: int | None, start: int, stop: int) -> str | None:
        """What lies past the end of the file among the chunks holding rows [start, stop) of one
        view (``view=None``: a 1-D dataset), or None."""
        size = os.path.getsize(self.path)
        step = dset.chunks[0] if view is None else dset.chunks[1]
        for row in range(start - start % step, stop, step):
            coord = (row,) if view is None else (view, row, *[0] * (dset.ndim - 2))
            info = dset.id.get_chunk_info_by_coord(coord)
            if info.byte_offset is not None and info.byte_offset + info.size > size:
                end = info.byte_offset + info.size
                return (
                    f"{dset.name.lstrip('/')}: bytes {info.byte_offset}..{end} lie past the end "
                    f"of the file ({size} bytes)"
                )
        return None

    def _refuse_past_end(self, dset: h5py.Dataset, view: int | None, start: int, stop: int) -> None:
        problem = self._past_end(dset, view, start, stop)
        if problem:
            if view is None:
                where = ""
            elif dset.name == "/done":
                where = f"view {view}, "
            else:
                where = f"view {view} rows {start}..{stop - 1}, "
            raise StoreCorruptError(
                f"store {self.path} is truncated ({where}{problem}): delete it and run "
                f"precompute again"
            )

    def _file_problems(self) -> list[str]:
        return [f"{self.path}: {self._truncated}"] if self._truncated else []

    def _chunk_problems(self, view: int, chunk: int, names: list[str]) -> list[str]:
        start, stop = self.layout.chunk_range(chunk)
        problems = (self._past_end(self._file[n], view, start, stop) for n in names)
        return [p for p in problems if p]

    def _close(self) -> None:
        try:
            self._file.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def _refuse_missing(f: h5py.File, path: str, layout: Layout) -> None:
    """Every dataset the layout needs is there (a store missing one gave a KeyError traceback
    wherever it was first read; zarr's names the array)."""
    missing = [n for n in (*layout.arrays(), "labels", "done") if n not in f]
    if missing:
        raise StoreCorruptError(
            f"store {path} is damaged: its {', '.join(missing)} dataset(s) are missing; delete "
            f"it and run precompute again"
        )


def _refuse_data_elsewhere(f: h5py.File, path: str) -> None:
    """A store's data lives in its one file: an external link, external raw storage or a virtual
    dataset (metadata naming other files, "../../etc/passwd" or any absolute path) is refused
    before it is read or written through."""
    for name in f:
        link = f.get(name, getlink=True)
        obj = f[name] if isinstance(link, h5py.HardLink) else None
        if obj is None or (isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual)):
            raise StoreCorruptError(
                f"store {path}: {name!r} points to data outside the file (an external link, "
                f"external storage or a virtual dataset); refused unread: precompute it again"
            )


def _truncation(path: str) -> str | None:
    """Why the file is shorter than its (version 2/3) superblock says, or None. A file whose
    writer is alive or was killed (write flags set) records a stale end, so is not judged."""
    try:
        with open(path, "rb") as fh:
            sb = read_superblock(fh)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    # A superblock reaching past the file's first 64 bytes (addresses over 12 bytes) is not judged.
    if not sb.signed or sb.version not in (2, 3) or sb.flags or sb.size + 4 > 64:
        return None
    if not sb.intact or size >= sb.eoa:
        return None
    return f"file truncated: {size} bytes of the {sb.eoa} its superblock records"


def _place(building: str, path: str) -> None:
    """``building`` renamed to ``path`` without ever replacing a file there: a store another
    process put at ``path`` since we looked (a cleanup putting a replaced store back, which does
    not take this backend's lock) is refused, not overwritten."""
    exists = StoreExistsError(
        f"a store was created at {path} by another process meanwhile: choose another path; "
        f"nothing was changed"
    )
    try:
        os.link(building, path)
    except FileExistsError:
        raise exists from None
    except OSError:  # a file system without hard links: rename, after a last look
        if os.path.lexists(path):
            raise exists from None
        os.rename(building, path)
    else:
        os.unlink(building)


def _open_read(path: str) -> h5py.File:
    """``path`` open for reading in SWMR mode, its superblock checked first; a file HDF5 cannot
    open raises :class:`StoreCorruptError`, an error of the file system (errno) itself."""
    problem = _superblock_problem(path)
    if problem:
        raise StoreCorruptError(
            f"store {path} is damaged ({problem}): delete it and run precompute again"
        )
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    cache = list(fapl.get_cache())
    cache[2] = READ_CACHE_BYTES
    fapl.set_cache(*cache)
    cap = _read_attempts_setter()
    if cap is not None:
        with phil:  # h5py's lock around HDF5 calls: the library may not be thread-safe
            cap(fapl.id, READ_ATTEMPTS)
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    try:
        return h5py.File(
            _while_locked(path, lambda: h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))
        )
    except READ_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system's (a lock held by a creator, permissions): not damage
        raise _damaged(path, exc) from None


#: Seconds an open waits, retrying, while HDF5's own file lock is held by another process's open.
LOCK_WAIT_S = 5.0


def _while_locked(path: str, open_file):
    """``open_file()``, retried while HDF5's file lock (a flock taken for the length of an open
    call, and by a writer until it switches to SWMR) is held by another process: a reader opening
    as precompute starts or resumes, or a writer while a reader opens, met BlockingIOError
    (a traceback) a few times in thousands of opens. Past ``LOCK_WAIT_S``, one line."""
    delay, waited = 0.002, 0.0
    while True:
        try:
            return open_file()
        except BlockingIOError:
            if waited >= LOCK_WAIT_S:
                raise StoreError(
                    f"store {path} stayed locked by another process's HDF5 open for "
                    f"{LOCK_WAIT_S:g} s: wait for its writer to start or finish, then rerun"
                ) from None
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.25)


def _superblock_problem(path: str) -> str | None:
    """What is wrong with the superblock of an HDF5 file, or None. Only version 2/3 superblocks
    (this backend writes version 3) carry a checksum; HDF5 checks older ones itself. A checksum
    that fails is read again a few times: a writer opening or closing the file may be rewriting
    the superblock just now."""
    for wait in (0.0, 0.01, 0.04):
        time.sleep(wait)
        try:
            with open(path, "rb") as fh:
                sb = read_superblock(fh)
        except OSError:
            return None  # the open that follows names it
        if sb.version is None:
            return f"cut short: {len(sb.raw)} bytes, less than its superblock"
        if sb.version not in (2, 3):
            return None
        if sb.stored is None:
            return f"cut short: {len(sb.raw)} bytes, less than its {sb.size + 4}-byte superblock"
        if sb.intact:
            return None
    return "its superblock fails its checksum"


def _damaged(path: str, exc: BaseException) -> StoreCorruptError:
    cut = _truncation(path)
    return StoreCorruptError(
        f"store {path} is damaged ({f'{cut}; ' if cut else ''}HDF5 cannot read its metadata: "
        f"{_first(exc)}): delete it and run precompute again"
    )


@functools.cache
def _read_attempts_setter():
    """HDF5's ``H5Pset_metadata_read_attempts`` (h5py does not wrap it), found through an h5py
    extension's own link to the library; None where it is not found."""
    try:
        setter = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts
    except (OSError, AttributeError):
        return None
    setter.argtypes = [ctypes.c_int64, ctypes.c_uint]  # (hid_t plist, unsigned attempts)
    setter.restype = ctypes.c_int
    return setter


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
