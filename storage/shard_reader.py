"""A direct reader for the store's own uncompressed zarr shards on a local disk.

Reading a chunk through zarr costs about a millisecond of Python and thread hand-offs before any
byte moves, which caps training reads well below what the disk (or page cache) delivers. The shards
this project writes have a fixed, simple layout when no compressor is configured — each inner chunk
is its raw little-endian bytes followed by a crc32c, and the shard ends with an index of
(offset, nbytes) uint64 pairs plus the index's own crc32c (zarr v3 sharding spec,
``index_location = "end"``). For those, this reader does one ``pread`` per chunk, checks the
checksum, and hands back the rows; every other store (compressed, remote) is read through zarr.

Whole chunks are read straight into the caller's buffer (``preadv``), partial ones through a
per-thread scratch buffer. Shards are written once and never modified, so their indexes are cached,
and a few shard files stay open (an LRU of file descriptors per reader). Both are checked against
``fstat`` on every read: a file removed, replaced or truncated since is reopened and its index read
again. Open files are per process: after a fork they are reopened, and a pickled reader carries
none.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numpy as np

EMPTY = 2**64 - 1
#: Shard files a reader keeps open (per array, per store handle, per process).
MAX_OPEN_SHARDS = 16


def supports_fast_path(array) -> bool:
    """Whether ``array`` (a zarr.Array) is sharded with exactly bytes(little) + crc32c codecs."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    shard = codecs[0]
    inner = shard.codecs
    little = all(
        getattr(c, "endian", None) in (None, "little")
        or str(getattr(c, "endian", "")).endswith("little")
        for c in inner[:1]
    )
    return (
        shard.index_location.value == "end"
        and len(inner) == 2
        and isinstance(inner[0], BytesCodec)
        and little
        and isinstance(inner[1], Crc32cCodec)
    )


class ShardReader:
    """Reads rows of one view from the shard files of one array."""

    def __init__(
        self,
        root: str,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunk_rows: int,
        chunks_per_shard: int,
        fill_value=None,
        max_open: int = MAX_OPEN_SHARDS,
    ) -> None:
        self.root = Path(root, name, "c")
        self.ndim = len(shape)
        self.num_rows = int(shape[1])
        self.row_shape = tuple(shape[2:])
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_rows * self.row_bytes
        self.per_shard = chunks_per_shard
        self.fill_value = fill_value
        self.max_open = max(1, max_open)
        # (view, shard) → ((st_ino, st_size, st_mtime_ns) of the file it was read from, index)
        self._index: dict[tuple[int, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    # ---- pickling, fork, closing -------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_pid", "_fds", "_lock", "_local"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def close(self) -> None:
        """Close the shard files this process holds open."""
        with self._lock:
            self._close_fds()

    def _close_fds(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        # In a forked child the descriptors are copies of the parent's: closing them there is
        # harmless, but an fd number may since have been reused by the child, so leave them.
        self._fds.clear()
        self._pid = os.getpid()

    def __del__(self) -> None:
        try:
            if self._fds and self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
        except (AttributeError, OSError, TypeError):  # interpreter shutdown, half-built object
            pass

    def open_files(self) -> int:
        """How many shard files this reader holds open in this process."""
        return len(self._fds) if self._pid == os.getpid() else 0

    # ---- files and indexes -------------------------------------------------------------------
    def _file(self, view: int, shard: int) -> Path:
        return self.root.joinpath(str(view), str(shard), *(["0"] if self.ndim == 3 else []))

    def _open(self, view: int, shard: int) -> tuple[int, np.ndarray]:
        """(fd, index) of one shard file; the caller holds the lock."""
        if self._pid != os.getpid():
            self._close_fds()  # forked: reopen everything in this process
        key = (view, shard)
        fd = self._fds.get(key)
        if fd is not None:
            st = os.fstat(fd)
            if st.st_nlink == 0:  # removed or replaced since it was opened
                os.close(self._fds.pop(key))
                fd = None
            else:
                self._fds.move_to_end(key)
        if fd is None:
            fd = os.open(self._file(view, shard), os.O_RDONLY)  # FileNotFoundError names it
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fds[key] = fd
            while len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._index.get(key)
        if cached is not None and cached[0] == ident:
            return fd, cached[1]
        index = self._read_index(view, shard, fd, st.st_size)
        self._index[key] = (ident, index)
        return fd, index

    def expected_size(self, shard: int) -> int:
        """Bytes of a shard file as :func:`write_shard` lays it out (every chunk present)."""
        chunks = min(self.per_shard, -(-self.num_rows // self.chunk_rows) - shard * self.per_shard)
        return chunks * (self.chunk_bytes + 4) + 16 * self.per_shard + 4

    def frame_problem(self, view: int, chunk: int) -> str | None:
        """What is wrong with where one chunk lies in its shard file, read from the file's size
        and index only (not the chunk's data), or None: a file cut short, an index that fails
        its checksum, or an entry of the chunk that is absent, of the wrong size or past the end.
        """
        shard = chunk // self.per_shard
        with self._lock:
            try:
                fd, index = self._open(view, shard)
                size = os.fstat(fd).st_size
            except (OSError, ValueError) as exc:
                return str(exc)
        offset, nbytes = index[chunk % self.per_shard].tolist()
        if offset == EMPTY:
            return (
                None
                if self.fill_value is not None
                else f"{self._what(view, shard, chunk)} is absent"
            )
        if nbytes != self.chunk_bytes + 4 or offset + nbytes > size:
            return (
                f"{self._what(view, shard, chunk)} lies outside its file (bytes {offset}.."
                f"{offset + nbytes} of {size}, {self.chunk_bytes + 4} expected)"
            )
        return None

    def _read_index(self, view: int, shard: int, fd: int, size: int) -> np.ndarray:
        nbytes = 16 * self.per_shard + 4
        expected = self.expected_size(shard)
        truncated = f"shard file {self._file(view, shard)} is truncated ({size}/{expected} bytes)"
        if size < nbytes:
            raise ValueError(truncated)
        raw = os.pread(fd, nbytes, size - nbytes)
        try:
            _check(raw, f"index of shard file {self._file(view, shard)}")
        except ValueError:
            if size < expected:  # the index is the file's last bytes: a cut file lost them
                raise ValueError(truncated) from None
            raise
        return np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard, 2)

    def _scratch(self) -> np.ndarray:
        buf = getattr(self._local, "chunk", None)
        if buf is None:
            buf = self._local.chunk = np.empty(self.chunk_bytes, np.uint8)
        return buf

    # ---- reading -----------------------------------------------------------------------------
    def _read_chunk(
        self, fd: int, index: np.ndarray, view: int, shard: int, chunk: int, dst: np.ndarray
    ) -> None:
        """One whole chunk's bytes into ``dst`` (uint8, chunk_bytes), checksum verified."""
        offset, nbytes = index[chunk % self.per_shard].tolist()
        if offset == EMPTY:
            if self.fill_value is None:
                raise ValueError(f"{self._what(view, shard, chunk)} is absent")
            # zarr leaves out a chunk that holds only the fill value: read it as zarr does.
            dst.view(self.dtype)[:] = self.fill_value
            return
        if nbytes != self.chunk_bytes + 4:
            raise ValueError(
                f"{self._what(view, shard, chunk)} has {nbytes} bytes, expected "
                f"{self.chunk_bytes + 4}"
            )
        crc = bytearray(4)
        if os.preadv(fd, [dst, crc], offset) != nbytes:
            raise ValueError(f"{self._what(view, shard, chunk)} is truncated")
        if google_crc32c.value(dst) != int.from_bytes(crc, "little"):
            raise ValueError(f"checksum mismatch in {self._what(view, shard, chunk)}")

    def _what(self, view: int, shard: int, chunk: int) -> str:
        return f"chunk {chunk} of view {view} in {self._file(view, shard)}"

    def read(self, view: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of one view, as stored: (stop - start, *row_shape), into ``out``
        (C-contiguous, of the stored dtype) when given."""
        shape = (stop - start, *self.row_shape)
        if out is None:
            out = np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {self.dtype} array of shape {shape}, got "
                f"{out.dtype} {out.shape}"
            )
        flat = out.reshape(-1).view(np.uint8)
        rb, cr = self.row_bytes, self.chunk_rows
        first, last = start // cr, (stop - 1) // cr
        with self._lock:
            for shard in range(first // self.per_shard, last // self.per_shard + 1):
                fd, index = self._open(view, shard)
                for chunk in range(
                    max(first, shard * self.per_shard), min(last + 1, (shard + 1) * self.per_shard)
                ):
                    c0 = chunk * cr
                    a, b = max(start, c0), min(stop, c0 + cr)
                    dst = flat[(a - start) * rb : (b - start) * rb]
                    if a == c0 and b == c0 + cr:  # the whole chunk: straight into the output
                        self._read_chunk(fd, index, view, shard, chunk, dst)
                    else:
                        buf = self._scratch()
                        self._read_chunk(fd, index, view, shard, chunk, buf)
                        dst[:] = buf[(a - c0) * rb : (b - c0) * rb]
        return out

    def read_rows(self, view: int, rows: np.ndarray) -> np.ndarray:
        """Sorted, unique rows of one view, as stored: (len(rows), *row_shape). Each chunk that
        holds any of them is read once (and its checksum verified)."""
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        chunks = rows // self.chunk_rows
        cuts = np.flatnonzero(np.diff(chunks)) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(rows)]])
        with self._lock:
            buf = self._scratch()
            block = buf.view(self.dtype).reshape(self.chunk_rows, *self.row_shape)
            for i, j in zip(starts.tolist(), stops.tolist()):
                chunk = int(chunks[i])
                shard = chunk // self.per_shard
                fd, index = self._open(view, shard)
                self._read_chunk(fd, index, view, shard, chunk, buf)
                out[i:j] = block[rows[i:j] - chunk * self.chunk_rows]
        return out


def _check(raw: bytes, what: str) -> None:
    if len(raw) < 4:
        raise ValueError(f"{what} is truncated")
    stored = int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(np.frombuffer(raw, np.uint8, len(raw) - 4)) != stored:
        raise ValueError(f"checksum mismatch in {what}")


def write_shard(
    path: Path,
    data: np.ndarray,
    chunk_rows: int,
    chunks_per_shard: int,
    fill_value,
    sync: bool = True,
) -> None:
    """Write one whole shard file, as zarr's sharding codec (bytes + crc32c) would, atomically.

    ``data`` holds the shard's rows (all of them; the last shard of an array may be shorter). Each
    inner chunk is its raw little-endian bytes (an edge chunk padded with ``fill_value`` to full
    size) and their crc32c, in order; the index of (offset, nbytes) pairs, chunks past the array's
    end marked empty, and its crc32c close the file. Unlike zarr, a chunk that holds only the fill
    value is written too. The file is written under a temporary name, synced to disk (unless
    not ``sync``: a scratch store's) and renamed into place, so a reader sees the whole shard or
    none of it. (After a power cut the rename itself may be lost while the done marks that
    follow it are not: ``verify`` and precompute's own check then name the shard missing.)
    """
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    rows = len(data)
    row_bytes = data[0].nbytes if rows else 0
    chunk_bytes = chunk_rows * row_bytes
    n_chunks = -(-rows // chunk_rows)
    flat = data.reshape(-1).view(np.uint8)
    index = np.full((chunks_per_shard, 2), EMPTY, "<u8")
    pieces: list = []
    offset = 0
    for c in range(n_chunks):
        body = flat[c * chunk_bytes : (c + 1) * chunk_bytes]
        if len(body) < chunk_bytes:  # the array's last chunk: padded to full chunk shape
            pad = np.full((chunk_rows, *data.shape[1:]), fill_value, data.dtype)
            pad[: rows - c * chunk_rows] = data[c * chunk_rows :]
            body = pad.reshape(-1).view(np.uint8)
        pieces += [body, google_crc32c.value(body).to_bytes(4, "little")]
        index[c] = (offset, chunk_bytes + 4)
        offset += chunk_bytes + 4
    raw_index = index.tobytes()
    pieces += [raw_index, google_crc32c.value(raw_index).to_bytes(4, "little")]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
            done = 0
            while done < total:  # writev may write less than asked: go on from there
                n = os.writev(fd, _skip(pieces, done))
                if n <= 0:
                    raise OSError(f"could not write {tmp}")
                done += n
            # On disk before its name is: the chunks' done marks follow the rename, and a power
            # cut must not leave a complete-looking shard whose bytes never reached the disk.
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _skip(pieces: list, n: int) -> list:
    """``pieces`` (bytes / uint8 arrays) with their first ``n`` bytes dropped, at most IOV_MAX."""
    out = []
    for p in pieces:
        size = len(p)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(p)[n:] if n else p)
        n = 0
    return out[: min(len(out), 1024)]
