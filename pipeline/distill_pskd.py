"""PS-KD's self-teacher on disk: the student's own logits of the last epoch, in a logit store.

PS-KD (Kim et al., ICCV 2021) mixes the one-hot target with the student's softmax from the
previous epoch, P_prev (N × C). The official code keeps P_prev as a float32 matrix in RAM and
copies it into every checkpoint (5 GB for ImageNet). Here each epoch e writes the raw logits of
its training forward passes into its own store, ``OUT/pskd/epoch{e}.zarr`` (the same format and
code as the teacher's store; the softmax is taken when the rows are read back), and epoch e + 1
reads it block by block with the same geometry as the teacher's store. Only two stores exist at
a time: the one being read and the one being written. A resumed run finds the last finished one
on disk, so nothing N × C is ever held in RAM or put into a state file.

Raw logits rather than probabilities, because that is what a store holds: the softmax at read
time gives P_prev exactly (in float32 encoding), and the store stays a normal logit store that
``verify`` and ``audit`` understand.

Under torchrun every rank writes the blocks it trains on (one block = one chunk = one shard, so
ranks never write the same file): rank 0 creates the store, the others open it in ``"task"``
mode once it exists, and at the end of the epoch rank 0 marks every rank's shards done and
closes it before any rank reads it. This needs the zarr backend (parallel writes of whole
shards); an HDF5 file has one writer, so PS-KD under torchrun refuses it rather than send every
rank's rows to rank 0.
"""

from __future__ import annotations

import re
import shutil
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.distill_data import StoreRows
from pipeline.errors import UserError
from storage import LogitStore, StoreError, create_store, open_store

if TYPE_CHECKING:
    from pipeline.distill_ddp import World

FINGERPRINT_KIND = "pskd-self-teacher"


class HostCopies:
    """Hands each step's ``(indices, logits)`` to ``sink`` on the host without stalling the step.

    On CUDA, step k's logits are copied with ``non_blocking`` on the compute stream into one of
    ``ring`` pinned buffers, and an event marks the copy. Each later ``add`` hands over, oldest
    first, the rows whose copies have finished; it waits only when every buffer still holds rows
    not handed over (the GPU then runs ``ring`` steps behind the host), so the host can queue
    several steps ahead rather than wait for the previous one each time. On the CPU the rows go
    to ``sink`` at once. ``flush`` hands over everything left. ``sink`` must copy what it keeps:
    the buffer is reused.
    """

    RING = 4

    def __init__(self, sink, device: torch.device, ring: int = RING) -> None:
        self.sink = sink
        self.cuda = device.type == "cuda"
        self.ring = ring
        self._buffers: list[torch.Tensor] = []
        self._turn = 0
        self._pending: deque[tuple[np.ndarray, torch.Tensor, Any]] = deque()

    def add(self, indices: np.ndarray, logits: torch.Tensor) -> None:
        """Rows ``indices`` (B,) of ``logits`` (B, C) on the device (detached)."""
        if not self.cuda:
            self.sink(indices, logits.float().numpy())
            return
        self._hand_over(wait=len(self._pending) >= self.ring)  # frees the next buffer
        rows, cols = logits.shape
        if (
            not self._buffers
            or self._buffers[0].shape[0] < rows
            or self._buffers[0].shape[1] != cols
        ):
            self.flush()  # pending rows live in the old buffers
            rows_max = max(rows, self._buffers[0].shape[0] if self._buffers else 0)
            self._buffers = [self._buffer(rows_max, cols) for _ in range(self.ring)]
            self._turn = 0
        host = self._buffers[self._turn][:rows]
        self._turn = (self._turn + 1) % self.ring
        host.copy_(logits, non_blocking=True)
        self._pending.append((indices, host, self._record(logits)))

    def flush(self) -> None:
        """Hand over every row still pending (waiting for their copies)."""
        while self._pending:
            indices, host, event = self._pending.popleft()
            event.synchronize()
            self.sink(indices, host.numpy())

    def _hand_over(self, wait: bool) -> None:
        """Hand over the oldest pending rows whose copies are done; with ``wait``, at least the
        oldest, waiting for it if need be."""
        while self._pending:
            indices, host, event = self._pending[0]
            if not event.query():
                if not wait:
                    return
                event.synchronize()
            wait = False
            self._pending.popleft()
            self.sink(indices, host.numpy())

    def _buffer(self, rows: int, cols: int) -> torch.Tensor:
        return torch.empty((rows, cols), dtype=torch.float32, pin_memory=True)

    def _record(self, logits: torch.Tensor) -> Any:
        """An event after the copy just queued on the logits' stream (it yields the CPU while
        waited for, rather than spin on a core the data thread needs)."""
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(logits.device))
        return event


class BlockWriter:
    """Collects a store's rows block by block and writes each block once all its rows arrived.

    Rows come in window-shuffled order, so a block completes when its window has been trained on:
    at most about two windows of rows are buffered, never the whole epoch.
    """

    def __init__(self, store: LogitStore, block_rows: int, world: World | None = None) -> None:
        self.store = store
        self.block_rows = block_rows
        self.world = world
        """Under DDP: the ranks that write the other blocks of this store."""
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block -> (rows, filled)

    def add(self, indices: np.ndarray, logits: np.ndarray) -> None:
        """Rows ``indices`` (B,) of float32 ``logits`` (B, C)."""
        n, classes = self.store.num_samples, self.store.num_classes
        blocks = indices // self.block_rows
        for block in np.unique(blocks):
            start = int(block) * self.block_rows
            stop = min(start + self.block_rows, n)
            rows, filled = self._pending.get(int(block)) or (
                np.empty((stop - start, classes), np.float32),
                np.zeros(stop - start, bool),
            )
            mine = blocks == block
            rows[indices[mine] - start] = logits[mine]
            filled[indices[mine] - start] = True
            if filled.all():
                self.store.write(0, start, rows)
                self._pending.pop(int(block), None)
            else:
                self._pending[int(block)] = (rows, filled)

    def close(self) -> None:
        """Close the store; every row must have been written (each epoch sees every row).

        Under DDP every rank calls this: rank 0 marks the others' shards done, then closes."""
        left = sorted(self._pending)
        self._pending.clear()
        if self.world is not None and self.world.distributed:
            shares = self.world.gather((self.store.written_shards, left))
            if self.world.main:
                self.store.mark_done([s for shards, _ in shares[1:] for s in shards])
            self.store.close()
            self.world.barrier()  # the next epoch reads it: complete on every rank
            left = sorted(b for _, blocks in shares for b in blocks)
        else:
            self.store.close()
        if left:
            raise UserError(
                f"PS-KD self-teacher store {self.store.path}: block(s) {left[:5]} incomplete at "
                f"the end of the epoch (the sampler must visit every row once per epoch)"
            )


class SelfTeacher:
    """The per-epoch self-teacher stores of one run, in ``folder``."""

    def __init__(
        self,
        folder: Path,
        *,
        num_samples: int,
        num_classes: int,
        block_rows: int,
        labels: np.ndarray,
        encoding: str,
        backend: str,
        fingerprint: dict,
        world: World | None = None,
        accepted: tuple[str, ...] = (),
    ) -> None:
        self.folder = folder
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.block_rows = block_rows
        self.labels = labels
        self.encoding = encoding
        self.backend = backend
        self.fingerprint = dict(fingerprint)
        """Provenance of the run (config hash, dataset); each store adds ``epoch``."""
        self.world = world
        """Under DDP: every rank writes its own blocks (rank 0 creates and finishes the store)."""
        self.accepted = accepted or (self.fingerprint.get("config_hash"),)
        """Config hashes a store to resume from may record: this run's, in each spelling."""

    def path(self, epoch: int) -> Path:
        suffix = ".zarr" if self.backend == "zarr" else ".h5"
        return self.folder / f"epoch{epoch:04d}{suffix}"

    def writer(self, epoch: int) -> BlockWriter:
        """A fresh store for ``epoch`` (a half-written one from a killed run is replaced)."""
        path = self.path(epoch)
        world = self.world
        if world is not None and world.distributed and not world.main:
            world.barrier()  # rank 0 creates it
            store = open_store(path, mode="task")
            store.sync_writes = False  # a scratch store: a lost one retrains the run, not more
            return BlockWriter(store, self.block_rows, world)
        _remove(path)
        self.folder.mkdir(parents=True, exist_ok=True)
        store = create_store(
            path,
            self.num_samples,
            self.num_classes,
            1,
            encoding=self.encoding,
            # One chunk per block and one chunk per shard: a finished block is written at once.
            chunk_rows=self.block_rows,
            chunks_per_shard=1,
            backend=self.backend,
            fingerprint={**self.fingerprint, "kind": FINGERPRINT_KIND, "epoch": epoch},
            labels=self.labels,
        )
        store.sync_writes = False  # as above: one epoch's scratch, one fsync a block saved
        if world is not None and world.distributed:
            world.barrier()  # the others open it now
        return BlockWriter(store, self.block_rows, world)

    def reader(self, epoch: int) -> LogitStore | None:
        """The store written in ``epoch - 1``, open for reading; None in epoch 0 (one-hot)."""
        if epoch == 0:
            return None
        path = self.path(epoch - 1)
        if not path.exists():
            raise UserError(
                f"PS-KD self-teacher store {path} of epoch {epoch} is missing, so the run cannot "
                f"resume: delete {self.folder.parent} to train this student afresh"
            )
        # The run's config hash is checked against every key it is accepted under (its state
        # was, by distill); the rest of the fingerprint by open_store, exactly.
        expected = {k: v for k, v in self.fingerprint.items() if k != "config_hash"}
        try:
            store = open_store(path, fingerprint={**expected, "epoch": epoch - 1})
            made_by = store.fingerprint.get("config_hash")
            if made_by not in self.accepted:
                store.close()
                raise StoreError(
                    f"was made from other inputs (config_hash: store {made_by!r} vs expected "
                    f"{self.accepted[0]!r})"
                )
        except StoreError as exc:  # its metadata damaged: the run's own file, not precompute's
            raise UserError(
                f"PS-KD self-teacher store {path} cannot be opened ({_cause(exc, path)}): "
                f"delete {self.folder.parent} to train this student afresh"
            ) from None
        if not store.complete:
            store.close()
            raise UserError(
                f"PS-KD self-teacher store {path} is incomplete: delete {self.folder.parent} to "
                f"train this student afresh"
            )
        return store

    def rows(self, epoch: int) -> SelfTeacherRows | None:
        """The previous epoch's predictions to read in ``epoch`` (None in epoch 0), opened by
        ``reader``."""
        store = self.reader(epoch)
        return None if store is None else SelfTeacherRows(store, self.folder.parent)

    def keep_only(self, epoch: int) -> None:
        """Remove every epoch's store except ``epoch``'s (the one the next epoch reads)."""
        if not self.folder.is_dir():
            return
        keep = self.path(epoch).name
        for path in self.folder.glob("epoch*"):
            if path.name != keep:
                _remove(path)


class SelfTeacherRows(StoreRows):
    """``StoreRows`` of a self-teacher store: a chunk found damaged is the run's own file, which
    precompute never writes, so the error says to train the student afresh, not the teacher
    store's fix (``verify --repair`` and precompute)."""

    def __init__(self, store: LogitStore, run_folder: Path):
        super().__init__(store, view=0)
        self.run_folder = run_folder

    def window(self, group: np.ndarray, rows: np.ndarray, views: np.ndarray):
        try:
            return super().window(group, rows, views)
        except StoreError as exc:
            raise UserError(
                f"PS-KD self-teacher store {self.store.path} is damaged "
                f"({_cause(exc, self.store.path)}): delete {self.run_folder} to train this "
                f"student afresh"
            ) from None


#: How the store's messages begin their fix, which is a teacher store's (precompute's) fix: a
#: colon or semicolon, then a verb.
_FIX = re.compile(r"[:;] (?:give|run|rerun|delete|pass|use|choose|wait) ")


def _cause(exc: StoreError, path: Path | str) -> str:
    """What a store error says went wrong, without the path it names or its fix."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for prefix in (f"store {path}: ", f"store {path} ", f"{path}: ", f"{path} "):
        text = text.removeprefix(prefix)
    found = _FIX.search(text)
    return (text[: found.start()] if found else text) or type(exc).__name__


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
