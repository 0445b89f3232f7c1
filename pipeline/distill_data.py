"""The distill stage's input side: block-ordered batches, replayed images, logits on the device.

One epoch's order comes from :class:`storage.sampler.BlockSampler` (blocks = the store's chunks,
shuffled; rows shuffled within a window of blocks; view = epoch mod V by default). For each window
the teacher's raw logits are read chunk-aligned (or from RAM when the views fit the budget) and,
for PS-KD, the student's own logits of the previous epoch from its self-teacher store, with the
same block geometry. The student's image for row n of view v is rebuilt from the augmentation
parameters stored with the teacher's logits, so it is byte for byte the tensor the teacher saw.

The plan never depends on where the logits come from: the store, the teacher run online, or none
(``ce``) give the same batches for the same seed, which is what makes offline and online KD
comparable step by step.

A background thread prepares batches ahead (store reads, image replay, pinned host memory) and
:class:`ToDevice` copies the next batch on a side CUDA stream while the current step runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from pipeline.data import Split
from pipeline.views import NUM_VIEW_PARAMS, apply_view, normalize, view_params
from storage import LogitStore
from storage.sampler import BlockSampler, read_window


@dataclass
class Batch:
    """One training batch. Tensors are on the host (pinned under CUDA) until :class:`ToDevice`."""

    indices: np.ndarray
    """(B,) int64 sample rows."""
    views: np.ndarray
    """(B,) int64 view of each row."""
    x: torch.Tensor
    """(B, C, H, W) float32 student input, the teacher's input byte for byte."""
    y: torch.Tensor
    """(B,) int64 labels."""
    teacher: torch.Tensor | None = None
    """(B, K) float32 raw teacher logits from the store."""
    previous: torch.Tensor | None = None
    """(B, K) float32 the student's own logits for these rows in the previous epoch (PS-KD)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


class StoreRows:
    """The rows of one store for a window of blocks: read chunk-aligned into a pool, or gathered
    straight from whole views kept in RAM.

    ``in_ram`` loads each view once (V × N × C float32, allowed by the memory budget) and keeps
    it for the run: re-reading it every epoch would cost a full decode for nothing, and copying it
    into a window pool would cost memory for nothing.
    """

    def __init__(self, store: LogitStore, *, in_ram: bool = False, view: int | None = None):
        self.store = store
        self.in_ram = in_ram
        self.view = view
        """When set, every block is read from this view (the self-teacher store has one)."""
        self._ram: dict[int, np.ndarray] = {}  # view -> (N, K)

    def window(
        self, group: np.ndarray, rows: np.ndarray, views: np.ndarray
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``take(sel) -> float32 (len(sel), K)``: rows at positions ``sel`` of this window.

        Args:
            group: the window's blocks (k, 3): start, stop, view.
            rows, views: (n,) sample row and view of each position of the window.
        """
        if self.view is not None:
            group = group.copy()
            group[:, 2] = self.view
            views = np.full_like(views, self.view)
        if self.in_ram:
            for v in np.unique(views).tolist():
                if v not in self._ram:
                    self._ram[v] = self.store.load_view(v)
            return lambda sel: self._gather(rows[sel], views[sel])
        pool = np.empty((len(rows), self.store.num_classes), np.float32)  # (n, K)
        read_window(self.store, group, views, pool)
        return lambda sel: pool[sel]  # fancy indexing copies: the batch outlives the pool

    def _gather(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        first = int(views[0]) if len(views) else 0
        if (views == first).all():
            return self._ram[first][rows]
        out = np.empty((len(rows), self.store.num_classes), np.float32)
        for v in np.unique(views).tolist():
            mine = views == v
            out[mine] = self._ram[v][rows[mine]]
        return out


class ViewParams:
    """Augmentation parameters (B, P) int16 of (view, row) pairs.

    ``table`` (V, N, P) holds the ones read back from the teacher's store (checked against the
    generator when the run starts); without a store they come from the generator itself.
    """

    def __init__(self, split: Split, table: np.ndarray | None = None) -> None:
        self.split = split
        self.table = table

    def __call__(self, views: np.ndarray, indices: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[views, indices]
        out = np.empty((len(indices), NUM_VIEW_PARAMS), np.int16)
        for v in np.unique(views):
            rows = views == v
            out[rows] = view_params(self.split.augment.seed, int(v), indices[rows], self.split.spec)
        return out


def replay(split: Split, indices: np.ndarray, params: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Student input float32 (B, C, H, W) and labels (B,) of rows made with ``params``.

    The same three calls as ``Split.batch`` (and so as precompute), with the stored parameters
    instead of freshly generated ones.
    """
    images, labels = split.dataset.get_batch(indices)  # uint8 (B, C, H, W)
    return normalize(apply_view(images, params, split.spec), split.preprocess), labels


class EpochBatches:
    """The batches of one epoch, in the sampler's order, with whatever logits the method needs."""

    def __init__(
        self,
        sampler: BlockSampler,
        batch_size: int,
        split: Split,
        params: ViewParams,
        teacher: StoreRows | None = None,
        *,
        pin: bool = False,
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.split = split
        self.params = params
        self.teacher = teacher
        self.pin = pin

    def step_rows(self, epoch: int) -> np.ndarray:
        """Rows every shard (DDP rank) trains on at each step of ``epoch``: (shards, steps)."""
        return self.sampler.step_rows(epoch, self.batch_size)

    def __call__(self, epoch: int, previous: StoreRows | None = None) -> Iterator[Batch]:
        """Yield the batches of ``epoch``; ``previous`` reads PS-KD's last-epoch logits.

        Batch sizes follow :meth:`step_rows`: ``batch_size`` rows and a short last batch in one
        process, this rank's even share of each step under DDP.
        """
        sizes = iter(self.step_rows(epoch)[self.sampler.shard].tolist())
        want = next(sizes)
        pieces: list[tuple[np.ndarray | None, ...]] = []
        have = 0
        for group, perm in self.sampler.windows(epoch):  # group: (k, 3) start, stop, view
            idx = np.concatenate([np.arange(a, b) for a, b, _ in group])  # (n,)
            views = self.sampler.row_views(epoch, group)  # (n,)
            takes = [
                None if source is None else source.window(group, idx, views)
                for source in (self.teacher, previous)
            ]
            pos = 0
            while pos < len(perm):
                if want == 0:  # the plan's sizes add up to this shard's rows: never reached
                    raise RuntimeError(f"epoch {epoch}: more rows than the batch plan holds")
                take = min(want - have, len(perm) - pos)
                sel = perm[pos : pos + take]
                pieces.append(
                    (idx[sel], views[sel], *(None if t is None else t(sel) for t in takes))
                )
                have += take
                pos += take
                if have == want:
                    yield self._batch(pieces)
                    pieces, have, want = [], 0, next(sizes, 0)

    def _batch(self, pieces: list[tuple[np.ndarray, ...]]) -> Batch:
        idx, views, teacher, previous = (
            None if part[0] is None else np.concatenate(part) for part in zip(*pieces)
        )
        x, y = replay(self.split, idx, self.params(views, idx))
        batch = Batch(
            idx,
            views,
            x,
            y,
            None if teacher is None else torch.from_numpy(teacher),
            None if previous is None else torch.from_numpy(previous),
        )
        if self.pin:  # page-locked host memory: the copy to the GPU can run asynchronously
            batch = replace(batch, **{k: t.pin_memory() for k, t in batch.tensors().items()})
        return batch


def prefetch(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """``batches`` produced ``depth`` ahead by a background thread (0: in the caller's thread).

    Store reads, decoding and image replay then overlap the training step; an exception in the
    thread (a damaged chunk, say) is re-raised here, in the training loop.
    """
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)

    thread = threading.Thread(target=work, name="distill-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (or failed): let the worker end
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class ToDevice:
    """Moves batches to the device one ahead: batch k+1 is copied while step k runs.

    On CUDA the copy of pinned host tensors runs with ``non_blocking`` on a side stream; before a
    batch is used the compute stream waits for that copy (an event recorded after it), and
    ``record_stream`` keeps the caching allocator from reusing its memory while the compute
    stream still reads it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _send(self, batch: Batch | None) -> tuple[Batch | None, torch.cuda.Event | None]:
        """The batch's tensors on the device, copying; the event that marks the copies done."""
        if batch is None or self.stream is None:
            return batch, None
        with torch.cuda.stream(self.stream):
            moved = {k: t.to(self.device, non_blocking=True) for k, t in batch.tensors().items()}
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return replace(batch, **moved), copied

    def _ready(self, batch: Batch, copied: torch.cuda.Event | None) -> Batch:
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            # This batch's copies only: wait_stream would also wait for the next batch's, queued
            # on the side stream since, and take away the overlap.
            current.wait_event(copied)
            for t in batch.tensors().values():
                t.record_stream(current)
        return batch

    def __call__(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        it = iter(batches)
        ahead, copied = self._send(next(it, None))
        while ahead is not None:
            current, current_copied = ahead, copied
            ahead, copied = self._send(next(it, None))
            yield self._ready(current, current_copied)
