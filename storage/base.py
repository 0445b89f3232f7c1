"""``LogitStore``: the abstract base of the store backends, with the logic they share.

A backend implements a handful of primitives (create, open, write one shard-aligned block, read a
contiguous block or sorted rows, load and store the ``done`` marks, check one chunk); everything a
user relies on — validation, encoding, buffering writes to shard boundaries, completion marks,
refusing unfinished chunks, verification — lives here once.
"""

from __future__ import annotations

import abc
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from storage.encodings import check_float32_range, decode, decode_into, encode, row_arrays
from storage.errors import (
    BadWriteError,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
)
from storage.layout import Layout

#: Errors the backends' libraries raise on damaged data (bad checksum, truncated file).
READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError)


class StoreWarning(UserWarning):
    """Something was not written (an unfinished shard at close), or was cleaned up after an
    interrupted overwrite (the old store put back, or removed)."""


@dataclass
class VerifyReport:
    """What ``verify`` found: each problem names its view, chunk and rows."""

    path: str
    chunks_checked: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)
    """(view, chunk) not marked done."""
    damaged: list[tuple[int, int, str]] = field(default_factory=list)
    """(view, chunk, what is wrong) among chunks marked done."""
    other: list[str] = field(default_factory=list)
    """Problems of the store as a whole (its marks, labels or file), none of them a chunk's."""
    repairable: bool = True
    """Whether re-marking damaged chunks and rerunning precompute can fix everything found (a
    truncated HDF5 file or unreadable labels cannot be fixed that way)."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.damaged or self.other)

    def fix(self) -> str:
        """What to do about the damage found."""
        if not self.repairable:
            return f"delete {self.path} and run precompute again"
        return (
            f"run `python -m pipeline verify --repair {self.path}` (it marks the damaged chunks "
            f"for recomputing) and rerun precompute, or delete the store"
        )

    def summary(self) -> str:
        """One line: the first damaged chunks or store problems, and the fix."""
        runs: list[list] = []  # [view, first, last, what]: a shard's chunks share its damage
        for v, c, what in self.damaged:
            if runs and runs[-1][0] == v and runs[-1][2] == c - 1 and runs[-1][3] == what:
                runs[-1][2] = c
            else:
                runs.append([v, c, c, what])
        items = [
            f"view {v} chunk {a}: {what}" if a == b else f"view {v} chunks {a}..{b}: {what}"
            for v, a, b, what in runs
        ] + self.other
        shown = "; ".join(items[:3]) + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")
        return f"store {self.path} is damaged: {shown}: {self.fix()}"


@dataclass
class _Pending:
    """Rows of one unfinished shard, buffered until the shard is whole."""

    parts: dict[str, np.ndarray]
    filled: np.ndarray  # (rows,) bool


class LogitStore(abc.ABC):
    """A (V, N, C) store of raw teacher logits; see DESIGN.md for the on-disk format.

    Open one with :func:`storage.open_store` or create one with :func:`storage.create_store`.
    """

    backend: ClassVar[str]
    #: Whether worker processes may write whole shards of one store at once (zarr: yes, each shard
    #: is its own file; HDF5: no, its single file has one writer).
    supports_parallel_write: ClassVar[bool] = False
    #: Whether a finished shard is synced to disk before it is named (zarr's own shard files):
    #: a scratch store recomputed by its run (PS-KD's per-epoch self-teacher) turns it off.
    sync_writes: bool = True
    #: Compressor names this backend takes (``create_store(compressor=...)``).
    compressors: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_compressor(cls, compressor: str | None) -> None:
        if compressor is not None and compressor not in cls.compressors:
            raise StoreError(
                f"unknown compressor {compressor!r} for {cls.backend}: choose one of "
                f"{', '.join(cls.compressors)} or none"
            )

    def __init__(self, path: str, mode: str, layout: Layout, attrs: dict) -> None:
        self.path = str(path)
        self.mode = mode
        self.layout = layout
        self.attrs = attrs
        self._done: np.ndarray | None = None  # (V, n_chunks) uint8, cached
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._spare: dict[str, np.ndarray] | None = None  # a flushed shard's buffers, for reuse
        self._labels: np.ndarray | None = None
        self._closed = False
        self._scratch = threading.local()  # per-thread buffers for decoding stored logits
        #: (view, shard) written by this handle in "task" mode; the coordinator marks them done.
        self.written_shards: list[tuple[int, int]] = []

    def _require_open(self) -> None:
        """A StoreError for any read or write through a closed handle (on HDF5 its file is
        closed: the read would otherwise fail as if the store were damaged)."""
        if self._closed:
            raise StoreError(
                f"store {self.path} is closed: open it again with open_store() to use it"
            )

    # ---- what users read -------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return self.layout.num_views

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def encoding(self) -> str:
        return self.layout.encoding

    @property
    def fingerprint(self) -> dict:
        return dict(self.attrs.get("fingerprint", {}))

    @property
    def row_arrays(self) -> dict[str, tuple[str, int | None]]:
        return row_arrays(self.encoding, self.num_classes, self.layout.topk)

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"{type(self).__name__}({self.path!r}, mode={self.mode!r}, V={lay.num_views}, "
            f"N={lay.num_samples}, C={lay.num_classes}, encoding={lay.encoding!r})"
        )

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- backend primitives ----------------------------------------------------------------
    @abc.abstractmethod
    def _write_block(self, view: int, start: int, parts: dict[str, np.ndarray]) -> None:
        """Write whole shard-aligned rows [start, start + len) of every array in ``parts``."""

    @abc.abstractmethod
    def _read_block(
        self, name: str, view: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows [start, stop) of one row array, as stored; into ``out`` (C-contiguous, the stored
        dtype) when given, and returned."""

    @abc.abstractmethod
    def _read_rows(self, name: str, view: int, rows: np.ndarray) -> np.ndarray:
        """Sorted, unique rows of one row array, as stored."""

    @abc.abstractmethod
    def _load_done(self) -> np.ndarray:
        """The ``done`` array (V, n_chunks) as it is on disk now."""

    @abc.abstractmethod
    def _store_done(self, view: int, marks: np.ndarray) -> None:
        """Persist the done marks of one view (n_chunks,)."""

    @abc.abstractmethod
    def _read_labels(self) -> np.ndarray: ...

    @abc.abstractmethod
    def _write_labels(self, labels: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _missing_files(self, view: int, chunk: int) -> list[str]:
        """Files a done chunk needs that are not there (empty for single-file backends)."""

    @abc.abstractmethod
    def _close(self) -> None: ...

    # ---- completion ------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        """Completion marks (V, n_chunks), as last read."""
        if self._done is None:
            self.refresh()
        return self._done

    def refresh(self) -> None:
        """Re-read the completion marks (a writer may have finished more chunks)."""
        self._require_open()
        try:
            done = self._load_done()
        except READ_ERRORS as exc:
            raise StoreCorruptError(
                f"store {self.path}: its completion marks (done) are unreadable ({_first(exc)}): "
                f"run `python -m pipeline verify --repair {self.path}` (it clears them, and "
                f"precompute then recomputes every chunk), or delete the store"
            ) from None
        self._done = np.asarray(done).astype(np.uint8)

    def missing_chunks(self) -> list[tuple[int, int]]:
        """(view, chunk) pairs not marked done."""
        return [(int(v), int(c)) for v, c in zip(*np.nonzero(self.done == 0))]

    def missing_shards(self) -> list[tuple[int, int, int]]:
        """The write units still to do: (view, start row, stop row), shard-aligned."""
        lay = self.layout
        out = []
        for v in range(lay.num_views):
            for s in range(lay.num_shards):
                if not self.done[v, list(lay.shard_chunks(s))].all():
                    out.append((v, *lay.shard_range(s)))
        return out

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def _require_done(self, view: int, chunks: np.ndarray) -> None:
        if self.done[view, chunks].all():
            return
        self._refuse_missing(view, chunks)

    def _require_done_range(self, view: int, first: int, stop: int) -> None:
        """Chunks first..stop-1 of one view must be done (the block-read fast path)."""
        if not self.done[view, first:stop].all():
            self._refuse_missing(view, np.arange(first, stop))

    def _refuse_missing(self, view: int, chunks: np.ndarray) -> None:
        self.refresh()  # a concurrent writer may have finished them since
        missing = chunks[self.done[view, chunks] == 0]
        if len(missing):
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise StoreIncompleteError(
                f"store {self.path}: view {view} chunk(s) {shown} are not written yet: finish the "
                f"precompute (it resumes where it stopped) before reading them"
            )

    # ---- writing ---------------------------------------------------------------------------
    def write(self, view: int, start: int, logits: Any, view_params: Any = None) -> None:
        """Write raw float logits for rows ``start .. start + len(logits)`` of one view.

        Rows are encoded now and buffered until their shard is whole, then written and marked done;
        rows may arrive in any order and any batch size.
        """
        self._require_open()
        if self.mode == "r":
            raise StoreError(f"store {self.path} is open read-only: open it with mode='a' to write")
        logits = checked_logits(logits, self.layout)
        view, start, stop = self._check_rows(view, start, len(logits))
        if len(logits) == 0:
            if view_params is not None and self.layout.view_param_width:
                self._check_view_params(view_params, 0)
            return  # nothing to write (wherever it starts)
        self._buffer_rows(view, start, stop, encode_rows(self.layout, start, logits, view_params))

    def write_encoded(self, view: int, start: int, parts: dict[str, np.ndarray]) -> None:
        """Write rows that :func:`encode_rows` encoded elsewhere (a dask task, which sends the
        coordinator its shard encoded, not as raw float32 hundreds of times bigger with topk)."""
        self._require_open()
        if self.mode == "r":
            raise StoreError(f"store {self.path} is open read-only: open it with mode='a' to write")
        arrays = self.layout.arrays()
        parts = {k: np.asarray(p) for k, p in parts.items()}
        rows = len(next(iter(parts.values()), ()))
        for name, (dtype, width) in arrays.items():
            part = parts.get(name)
            want = (rows,) if width is None else (rows, width)
            if part is None or part.shape != want or part.dtype != np.dtype(dtype):
                got = "missing" if part is None else f"{part.dtype} {part.shape}"
                raise BadWriteError(f"encoded {name} must be {dtype} {want}, got {got}")
        if parts.keys() != arrays.keys():
            raise BadWriteError(
                f"encoded rows hold {', '.join(parts)}; the store's row arrays are "
                f"{', '.join(arrays)}"
            )
        view, start, stop = self._check_rows(view, start, rows)
        if rows:
            self._buffer_rows(view, start, stop, parts)

    def _check_rows(self, view: Any, start: Any, rows: int) -> tuple[int, int, int]:
        """(view, start, stop) as integers, refused unless inside the store."""
        lay = self.layout
        for name, value in (("view", view), ("start", start)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise BadWriteError(f"{name} must be an integer, got {value!r}")
        view, start = int(view), int(start)
        if not 0 <= view < lay.num_views:
            raise BadWriteError(
                f"view {view} out of range: the store has views 0..{lay.num_views - 1}"
            )
        stop = start + rows
        if start < 0 or stop > lay.num_samples:
            raise BadWriteError(
                f"rows {start}..{stop - 1} out of range: the store has rows "
                f"0..{lay.num_samples - 1}"
            )
        return view, start, stop

    def _buffer_rows(self, view: int, start: int, stop: int, parts: dict[str, np.ndarray]) -> None:
        """Encoded rows [start, stop) of one view into their shards' buffers; whole shards are
        written and marked done."""
        lay = self.layout
        shards = range(start // lay.shard_rows, -(-stop // lay.shard_rows))
        for s in shards:  # check everything before writing anything
            if self.done[view, list(lay.shard_chunks(s))].any():
                a, b = lay.shard_range(s)
                raise BadWriteError(
                    f"view {view} rows {max(a, start)}..{min(b, stop) - 1} are already written "
                    f"(chunks marked done): resume writes only the missing chunks "
                    f"(store.missing_shards()); nothing was overwritten"
                )
        for s in shards:
            a, b = lay.shard_range(s)
            lo, hi = max(a, start), min(b, stop)
            piece = {k: p[lo - start : hi - start] for k, p in parts.items()}
            if lo == a and hi == b and (view, s) not in self._pending:
                self._flush(view, s, piece)
                continue
            pend = self._pending.get((view, s))
            if pend is None:
                pend = _Pending(self._shard_buffers(piece, b - a), np.zeros(b - a, bool))
                self._pending[(view, s)] = pend
            for k, p in piece.items():
                pend.parts[k][lo - a : hi - a] = p
            pend.filled[lo - a : hi - a] = True
            if pend.filled.all():
                del self._pending[(view, s)]
                self._flush(view, s, pend.parts)
                self._spare = pend.parts  # written (copied out) by now: reuse for the next shard

    def _shard_buffers(self, piece: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Buffers for one shard's rows: the last flushed shard's when they fit (fresh ones of
        tens of MB cost their page faults again on every shard)."""
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and spare.keys() == piece.keys()
            and all(
                spare[k].shape == (rows, *p.shape[1:]) and spare[k].dtype == p.dtype
                for k, p in piece.items()
            )
        ):
            return spare
        return {k: np.empty((rows, *p.shape[1:]), p.dtype) for k, p in piece.items()}

    def _check_view_params(self, view_params: Any, rows: int) -> np.ndarray:
        return checked_view_params(view_params, rows, self.layout.view_param_width)

    def _flush(self, view: int, shard: int, parts: dict[str, np.ndarray]) -> None:
        start, _ = self.layout.shard_range(shard)
        self._write_block(view, start, parts)
        if self.mode == "task":
            self.written_shards.append((view, shard))
        else:
            self.mark_done([(view, shard)])

    def mark_done(self, shards: list[tuple[int, int]]) -> None:
        """Mark every chunk of these (view, shard) units done (after their data is written)."""
        self._require_open()
        views = set()
        for view, shard in shards:
            self.done[view, list(self.layout.shard_chunks(shard))] = 1
            views.add(view)
        for view in sorted(views):
            self._store_done(view, self.done[view])

    def write_labels(self, labels: Any) -> None:
        self._require_open()
        if self.mode == "r":
            raise StoreError(f"store {self.path} is open read-only: open it with mode='a' to write")
        self._write_labels(checked_labels(labels, self.layout))
        self._labels = None

    def close(self) -> None:
        """Release the writer lock and close. Every whole shard is written and marked done as
        soon as its last row arrives; rows of a shard left unfinished are dropped, with a
        :class:`StoreWarning` that counts them (their chunks are not marked done, so a resumed
        run computes them again). A shard is the unit of writing and of ``done`` marks, even
        for its complete chunks: written now, a shard file would have to be rewritten to add
        the rest, and a shard is written once, whole (``storage.zarr_backend``)."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            cr, rows, chunks, shown = self.layout.chunk_rows, 0, 0, []
            for (v, s), pend in sorted(self._pending.items()):
                filled = int(pend.filled.sum())
                whole = sum(
                    bool(pend.filled[a : a + cr].all()) for a in range(0, len(pend.filled), cr)
                )
                rows, chunks = rows + filled, chunks + whole
                shown.append(f"view {v} shard {s}: {filled} of {len(pend.filled)} rows")
            warnings.warn(
                f"store {self.path}: {rows} row(s) written to unfinished shards not kept at close "
                f"({'; '.join(shown[:4])}{' ...' if len(shown) > 4 else ''}; {chunks} whole "
                f"chunk(s) among them): a shard is written and marked done only once all its "
                f"rows are there; a resumed run computes them again",
                StoreWarning,
                stacklevel=2,
            )
            self._pending.clear()
        self._close()

    # ---- reading ---------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        self._require_open()
        if self._labels is None:
            try:
                labels = self._read_labels()
            except READ_ERRORS as exc:
                raise StoreCorruptError(
                    f"store {self.path}: its labels are unreadable ({_first(exc)}): delete the "
                    f"store and run precompute again"
                ) from None
            self._labels = np.asarray(labels, dtype=np.int64)
        return self._labels

    def _decode_parts(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return decode(self.encoding, parts, self.num_classes)

    def _decoding_arrays(self) -> list[str]:
        names = [n for n in self.row_arrays if n != "stats"]
        return [*names, "stats"] if self.encoding == "topk" else names

    def read(self, indices: Any, view: int = 0) -> np.ndarray:
        """Raw float32 logits (len(indices), C) of rows of one view, in the order given."""
        idx = self._check_indices(indices, view)
        if len(idx) == 0:
            return np.empty((0, self.num_classes), np.float32)
        self._require_done(view, np.unique(idx // self.layout.chunk_rows))
        uniq, inverse = np.unique(idx, return_inverse=True)
        parts = self._guarded(
            view, uniq, lambda n: self._read_rows(n, view, uniq), self._decoding_arrays()
        )
        return self._decode_parts(parts)[inverse]

    def read_block(
        self, view: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw float32 logits of contiguous rows [start, stop) of one view (the fast path),
        decoded into ``out`` (float32 (stop - start, C)) when given."""
        self._require_open()
        lay = self.layout
        for name, value in (("view", view), ("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        if not (0 <= view < lay.num_views and 0 <= start <= stop <= lay.num_samples):
            self._check_indices(np.array([start, stop - 1]), view)  # raises, naming the problem
            raise StoreError(
                f"rows [{start}, {stop}) are no block of the store's rows 0..{lay.num_samples - 1}"
            )
        view, start, stop = int(view), int(start), int(stop)
        shape = (stop - start, lay.num_classes)
        if out is not None and (out.shape != shape or out.dtype != np.float32):
            raise StoreError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
        if start == stop:
            return np.empty(shape, np.float32) if out is None else out
        cr = lay.chunk_rows
        self._require_done_range(view, start // cr, -(-stop // cr))
        enc = self.encoding
        if enc not in ("float32", "float16", "bfloat16"):
            parts = self._guarded(
                view,
                np.array([start, stop - 1]),
                lambda n: self._read_block(n, view, start, stop),
                self._decoding_arrays(),
            )
            if out is None:
                return self._decode_parts(parts)
            out[...] = self._decode_parts(parts)
            return out
        if out is None:
            out = np.empty(shape, np.float32)
        try:
            if enc == "float32" and out.flags.c_contiguous:
                self._read_block("logits", view, start, stop, out=out)  # no copy at all
            else:
                raw = self._read_block("logits", view, start, stop, out=self._buffer(shape))
                decode_into(enc, raw, out)
        except READ_ERRORS as exc:
            raise self._corrupt(view, start, stop - 1, exc) from None
        return out

    def _buffer(self, shape: tuple[int, int]) -> np.ndarray:
        """A per-thread C-contiguous buffer of the stored logits' dtype, reused across reads."""
        dtype = np.dtype(self.row_arrays["logits"][0])
        size = shape[0] * shape[1]
        buf = getattr(self._scratch, "logits", None)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._scratch.logits = np.empty(size, dtype)
        return buf[:size].reshape(shape)

    def read_array(self, name: str, indices: Any, view: int = 0) -> np.ndarray:
        """Rows of any row array as stored (``stats``, ``view_params``, ``scale`` ...)."""
        held = dict(self.layout.arrays())
        if name not in held:
            raise StoreError(
                f"store {self.path} has no row array {name!r}: it holds {', '.join(held)}"
            )
        idx = self._check_indices(indices, view)
        uniq, inverse = np.unique(idx, return_inverse=True)
        self._require_done(view, np.unique(idx // self.layout.chunk_rows))
        return self._guarded(view, uniq, lambda n: self._read_rows(n, view, uniq), [name])[name][
            inverse
        ]

    def _guarded(self, view: int, rows: np.ndarray, read, names: list[str]) -> dict:
        try:
            return {n: read(n) for n in names}
        except READ_ERRORS as exc:
            raise self._corrupt(view, int(rows.min()), int(rows.max()), exc) from None

    def _corrupt(self, view: int, first: int, last: int, exc: BaseException) -> StoreCorruptError:
        cr = self.layout.chunk_rows
        a, b = first // cr, last // cr
        return StoreCorruptError(
            f"store {self.path}: reading view {view} chunk(s) {a if a == b else f'{a}..{b}'} "
            f"failed ({_first(exc, 160)}): run `python -m pipeline verify --repair {self.path}` "
            f"(it names the damaged chunks and marks them for recomputing) and rerun precompute, "
            f"or delete the store"
        )

    def _check_indices(self, indices: Any, view: Any) -> np.ndarray:
        self._require_open()
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)):
            raise StoreError(f"view must be an integer, got {view!r}")
        if not 0 <= view < self.num_views:
            raise StoreError(
                f"view {view} out of range: the store has views 0..{self.num_views - 1}"
            )
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise StoreError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][:5]
            raise StoreError(
                f"indices out of range ({', '.join(map(str, bad))}): the store has rows "
                f"0..{self.num_samples - 1}"
            )
        return idx

    def iter_blocks(
        self, view: int, block_rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 logits) over a whole view in order, ``block_rows`` at a time."""
        step = block_rows or self.layout.shard_rows
        for start in range(0, self.num_samples, step):
            yield start, self.read_block(view, start, min(start + step, self.num_samples))

    def load_view(self, view: int) -> np.ndarray:
        """One whole view decoded into RAM: float32 (N, C)."""
        out = np.empty((self.num_samples, self.num_classes), np.float32)
        step = self.layout.shard_rows
        for start in range(0, self.num_samples, step):
            stop = min(start + step, self.num_samples)
            self.read_block(view, start, stop, out=out[start:stop])
        return out

    # ---- verification ----------------------------------------------------------------------
    def _file_problems(self) -> list[str]:
        """Damage to the store as a whole that no chunk read would name (a truncated file)."""
        return []

    def _chunk_problems(self, view: int, chunk: int, names: list[str]) -> list[str]:
        """Cheap checks of one chunk without reading its data (its bytes lie inside the file)."""
        return []

    def verify(self, views: Any = None, *, data: bool = True) -> VerifyReport:
        """Check every chunk of ``views`` (default all): marked done, its files present, and with
        ``data`` its checksums right and its logits finite. Without ``data`` only what costs no
        read of the chunks themselves (files there, bytes inside the file)."""
        self._require_open()
        report = VerifyReport(self.path)
        lay = self.layout
        views = range(lay.num_views) if views is None else views
        report.other += self._file_problems()
        report.repairable = not report.other  # a damaged file is beyond re-marking chunks
        try:
            self._done = done = np.asarray(self._load_done()).astype(np.uint8)
        except (*READ_ERRORS, StoreCorruptError) as exc:
            # Marks unknown: check every chunk, so that at least the damaged ones are named.
            report.other.append(f"done (completion marks) unreadable: {_first(exc, 200)}")
            done = np.ones((lay.num_views, lay.num_chunks), np.uint8)
            if isinstance(exc, StoreCorruptError):  # the array itself is gone, not its bytes:
                report.repairable = False  # repair rewrites marks, it cannot re-create it
        try:
            labels = np.asarray(self._read_labels())
            if labels.shape != (lay.num_samples,):
                report.other.append(
                    f"labels has shape {labels.shape}, expected ({lay.num_samples},)"
                )
                report.repairable = False
            # a store whose fingerprint names its dataset was made with that dataset's labels
            elif problem := labels_problem(labels, lay.num_classes, "dataset" in self.fingerprint):
                report.other.append(problem)
                report.repairable = False
        except (*READ_ERRORS, StoreCorruptError) as exc:
            report.other.append(f"labels unreadable: {_first(exc, 200)}")
            report.repairable = False
        names = list(lay.arrays())
        for v in views:
            for c in range(lay.num_chunks):
                if not done[v, c]:
                    report.missing.append((v, c))
                    continue
                report.chunks_checked += 1
                problem = self.check_chunk(v, c, names, data=data)
                if problem:
                    report.damaged.append((v, c, problem))
        return report

    def require_intact(self, views: Any = None, data_bytes: int = 0) -> None:
        """Refuse (one line, naming the damage and the fix) a store whose chunks of ``views`` a
        run is about to read are damaged. Every read checks checksums anyway; this finds the
        damage before the run starts: fully when the views hold at most ``data_bytes`` (reading
        them costs little), else without reading the data (files there, bytes inside the file).
        """
        lay = self.layout
        views = range(lay.num_views) if views is None else views
        stored = len(views) * lay.num_samples * self.row_bytes()
        report = self.verify(views, data=stored <= data_bytes)
        report.missing.clear()  # not damage: the caller refuses unfinished stores in its own words
        if not report.ok:
            raise StoreCorruptError(report.summary())

    def row_bytes(self) -> int:
        """Bytes one row of one view takes on disk, over every row array."""
        total = 0
        for dtype, width in self.layout.arrays().values():
            total += np.dtype(dtype).itemsize * (width or 1)
        return total

    def check_chunk(
        self, view: int, chunk: int, names: list[str] | None = None, *, data: bool = True
    ) -> str | None:
        """None if one chunk reads back with good checksums and finite logits, else what's wrong
        (with ``data=False``: only whether its files are there and its bytes inside them)."""
        names = names or list(self.row_arrays)
        missing = self._missing_files(view, chunk)
        if missing:
            return f"file missing: {', '.join(missing)}"
        problems = self._chunk_problems(view, chunk, names)
        if problems:
            return "; ".join(problems)
        if not data:
            return None
        start, stop = self.layout.chunk_range(chunk)
        parts = {}
        for name in names:
            try:
                parts[name] = self._read_block(name, view, start, stop)
            except READ_ERRORS as exc:
                return f"{name}: {_first(exc, 200)}"
        logits = self._decode_parts({k: parts[k] for k in self._decoding_arrays()})
        if not np.isfinite(logits).all():
            return "logits hold NaN/inf (never written, or filled)"
        return None

    def repair(self, report: VerifyReport) -> list[tuple[int, int]]:
        """Un-mark every shard that holds a chunk ``report`` found damaged (and, when the marks
        were unreadable, every shard), so that precompute recomputes exactly those; return the
        (view, shard) units un-marked. Needs the store open for writing (``mode="a"``)."""
        if self.mode == "r":
            raise StoreError(f"store {self.path} is open read-only: open it with mode='a'")
        if not report.repairable:
            raise StoreError(f"store {self.path} cannot be repaired: {report.fix()}")
        lay = self.layout
        try:
            self.refresh()
        except StoreCorruptError:
            # Marks unreadable: rewrite them all as "not done", which recomputes everything.
            self._done = np.zeros((lay.num_views, lay.num_chunks), np.uint8)
            for v in range(lay.num_views):
                self._store_done(v, self._done[v])
            return [(v, s) for v in range(lay.num_views) for s in range(lay.num_shards)]
        units = sorted({(v, c // lay.chunks_per_shard) for v, c, _ in report.damaged})
        for v, s in units:
            self.done[v, list(lay.shard_chunks(s))] = 0
        for v in sorted({v for v, _ in units}):
            self._store_done(v, self.done[v])
        return units


def _first(exc: BaseException, limit: int = 120) -> str:
    """An exception as ``Type: first line``, cut to ``limit`` characters."""
    text = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def checked_logits(logits: Any, layout: Layout) -> np.ndarray:
    """``logits`` as an array of shape (rows, C) and a float dtype, or a BadWriteError."""
    if type(logits).__module__.startswith("torch"):  # a tensor: any device, grad or bfloat16
        logits = logits.detach().cpu()
        if str(logits.dtype) == "torch.bfloat16":  # numpy has none; float32 holds it exactly
            logits = logits.float()
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != layout.num_classes:
        raise BadWriteError(
            f"logits must have shape (rows, {layout.num_classes}), got {tuple(logits.shape)}"
        )
    if logits.dtype.kind != "f":
        raise BadWriteError(f"logits must be floating point, got dtype {logits.dtype}")
    return logits


def checked_view_params(view_params: Any, rows: int, width: int) -> np.ndarray:
    """View parameters (rows, width) as int16, or a BadWriteError naming the problem."""
    if view_params is None:
        raise BadWriteError(f"this store keeps view_params ({width} per row): pass them to write()")
    vp = np.asarray(view_params)
    if vp.shape != (rows, width):
        raise BadWriteError(f"view_params must have shape ({rows}, {width}), got {vp.shape}")
    if vp.dtype.kind not in "iu" or np.abs(vp.astype(np.int64)).max(initial=0) > 32767:
        raise BadWriteError("view_params must be integers within int16's range")
    return vp.astype(np.int16)


def encode_rows(
    layout: Layout, start: int, logits: Any, view_params: Any = None
) -> dict[str, np.ndarray]:
    """Raw float logits of rows ``start ..`` encoded as a store of ``layout`` keeps them: every
    row array, ``view_params`` included. Refused (a BadWriteError naming the rows) when a value
    cannot be stored; a row's encoding depends on that row alone."""
    logits = checked_logits(logits, layout)
    check_float32_range(logits, start)  # a float64 value past float32's would be cast to inf
    parts = encode(layout.encoding, logits.astype(np.float32, copy=False), layout.topk, start)
    if layout.view_param_width:
        parts["view_params"] = checked_view_params(
            view_params, len(logits), layout.view_param_width
        )
    elif view_params is not None:
        raise BadWriteError(
            "view_params given, but the store was created without them (view_param_width=0)"
        )
    return parts


def labels_problem(labels: np.ndarray, num_classes: int, required: bool = False) -> str | None:
    """What is wrong with a store's labels, or None. -1 is a row without a label (the arrays'
    fill value): a store made without labels has -1 everywhere, which is not damage unless
    ``required``; -1 at some rows only is a labels chunk lost, anything else outside
    [0, C) damage."""
    unlabeled = labels == -1
    if unlabeled.all() and labels.size:
        return f"labels missing at all {labels.size} row(s)" if required else None
    bad = np.flatnonzero(unlabeled | (labels < 0) | (labels >= num_classes))
    if not len(bad):
        return None
    what = "missing" if unlabeled[bad].all() else "missing or out of range"
    return (
        f"labels {what} at {len(bad)} row(s) (first: row {bad[0]}, {labels[bad[0]]}; "
        f"classes are 0..{num_classes - 1}, -1 is no label)"
    )


def checked_labels(labels: Any, layout: Layout) -> np.ndarray:
    """Labels (N,) as int64, each a class of the store, or a BadWriteError naming the problem."""
    labels = np.asarray(labels)
    if labels.shape != (layout.num_samples,) or labels.dtype.kind not in "iu":
        raise BadWriteError(
            f"labels must be integers of shape ({layout.num_samples},), got "
            f"{labels.dtype} {labels.shape}"
        )
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= layout.num_classes:
        raise BadWriteError(f"labels must lie in [0, {layout.num_classes - 1}]")
    return labels.astype(np.int64)


def name_final(exc: BaseException, building: str, final: str) -> None:
    """Make an OS error raised while a store was built under the temporary name ``building``
    name the path the user asked for, ``final``: the temporary name means nothing to them."""
    name = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and isinstance(name, str) and name.startswith(building):
        exc.filename = final + exc.filename[len(building) :]
