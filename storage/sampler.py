"""Reading a store for training, fast: chunk-aligned blocks, never per-sample reads.

Random 256-row reads from a chunked store run at a few thousand rows per second: every row costs a
chunk decode. Training does not need uniformly random rows, only well-mixed batches, so
:class:`BlockSampler` shuffles the *order of blocks* (one chunk each), reads ``window`` blocks
contiguously, and shuffles the rows within that window. Each block is read from one view.
:class:`LogitBatches` turns that plan into ``(indices, views, logits)`` batches through
preallocated buffers; when the views fit ``memory_budget`` it loads them whole (once per process)
and shuffles over all rows instead, gathering each batch straight from the views in RAM.

Both are plain picklable objects that open the store lazily, so they work in DataLoader worker
processes: each worker (and each DDP rank) takes a disjoint share of the blocks.

Several readers that step together (DDP ranks) also need the same number of batches per epoch.
:meth:`BlockSampler.step_rows` keeps one reader's step count, S = ceil(N / batch), and spreads each
shard's rows evenly over those S steps: shard k trains on ⌊n_k / S⌋ or ⌈n_k / S⌉ rows per step,
so every rank makes S steps, every row is used once per epoch, and the shards' batches of a step
add up to about ``batch`` rows (exactly the one-reader batches when there is one shard).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from storage.errors import StoreError

VIEW_POLICIES = ("epoch", "block", "sample")
PER_ROW = -1
"""The view column of a block under the "sample" policy: each of its rows has its own view."""


@dataclass
class BlockSampler:
    """The read plan of one epoch: which blocks, in which order, from which view."""

    num_samples: int
    block_rows: int
    """Rows per block: the store's chunk rows (a block is one chunk)."""
    num_views: int = 1
    window: int = 8
    """Blocks read together and shuffled as one pool of rows."""
    seed: int = 0
    view_policy: str = "epoch"
    """"epoch": every block of epoch e uses view e mod V; "block": a random view per block;
    "sample": a random view per row (read from the views in RAM, or each block read once per
    view its rows use)."""
    shard: int = 0
    num_shards: int = 1
    """This reader takes blocks shard, shard + num_shards, ... of the shuffled order."""
    _views: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.view_policy not in VIEW_POLICIES:
            raise StoreError(
                f"unknown view policy {self.view_policy!r}: choose one of "
                f"{', '.join(VIEW_POLICIES)}"
            )
        if self.window < 1 or self.block_rows < 1:
            raise StoreError("window and block_rows must be >= 1")
        if not 0 <= self.shard < self.num_shards:
            raise StoreError(f"shard {self.shard} out of range for {self.num_shards} shard(s)")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block_rows)

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        # Keyed by (seed, epoch, stream) only: every worker and rank draws the same plan.
        return np.random.default_rng([self.seed, epoch, stream])

    def blocks(self, epoch: int) -> np.ndarray:
        """This shard's blocks for ``epoch`` in read order: int64 (n, 3) (start, stop, view)."""
        order = self._rng(epoch, 0).permutation(self.num_blocks)
        if self.view_policy == "epoch":
            views = np.full(self.num_blocks, epoch % self.num_views)
        elif self.view_policy == "block":
            views = self._rng(epoch, 1).integers(0, self.num_views, self.num_blocks)
        else:
            views = np.full(self.num_blocks, PER_ROW)
        mine = order[self.shard :: self.num_shards]
        starts = mine * self.block_rows
        stops = np.minimum(starts + self.block_rows, self.num_samples)
        return np.stack([starts, stops, views[mine]], axis=1).astype(np.int64)

    def _sizes(self, order: np.ndarray) -> np.ndarray:
        """Rows of each block of ``order``."""
        starts = order * self.block_rows
        return np.minimum(starts + self.block_rows, self.num_samples) - starts

    def shard_rows(self, epoch: int) -> np.ndarray:
        """Rows every shard reads in ``epoch``: int64 (num_shards,), summing to N."""
        sizes = self._sizes(self._rng(epoch, 0).permutation(self.num_blocks))
        return np.array([sizes[k :: self.num_shards].sum() for k in range(self.num_shards)])

    def steps(self, batch_size: int) -> int:
        """Optimizer steps per epoch with a global batch of ``batch_size`` rows, the same for
        every shard; refused when a shard could have fewer rows than steps in some epoch."""
        if batch_size < 1:
            raise StoreError(f"batch size must be >= 1, got {batch_size}")
        steps = -(-self.num_samples // batch_size)
        fewest = self._fewest_rows(self.num_shards)
        if fewest < steps:
            most = max(w for w in range(1, self.num_shards + 1) if self._fewest_rows(w) >= steps)
            bigger = (
                f"a batch size of at least {-(-self.num_samples // fewest)}, " if fewest > 0 else ""
            )
            raise StoreError(
                f"{self.num_shards} readers of {self.num_samples} rows in blocks of "
                f"{self.block_rows} cannot all train on each of the {steps} steps of batch "
                f"{batch_size} (one may get only {max(fewest, 0)} rows): use {bigger}at most "
                f"{most} processes, or a store with smaller chunks"
            )
        return steps

    def _fewest_rows(self, shards: int) -> int:
        """Fewest rows one of ``shards`` readers can get in an epoch: the fewest blocks, one of
        them the short last block."""
        if shards == 1:
            return self.num_samples
        last = self.num_samples - (self.num_blocks - 1) * self.block_rows
        return (self.num_blocks // shards) * self.block_rows - (self.block_rows - last)

    def step_rows(self, epoch: int, batch_size: int) -> np.ndarray:
        """Rows each shard trains on at each step of ``epoch``: int64 (num_shards, steps).

        One shard: full batches, the last one short. Several: each shard's rows spread evenly
        over the same steps (the larger batches first), each at least one row.
        """
        steps = self.steps(batch_size)
        if self.num_shards == 1:
            out = np.full((1, steps), batch_size, np.int64)
            out[0, -1] = self.num_samples - batch_size * (steps - 1)
            return out
        rows = self.shard_rows(epoch)[:, None]  # (num_shards, 1)
        return (rows // steps + (np.arange(steps) < rows % steps)).astype(np.int64)

    def row_views(self, epoch: int, group: np.ndarray) -> np.ndarray:
        """The view of each row of the window ``group`` (k, 3), in the window's row order:
        int64 (n,). Under "sample" drawn per row from (seed, epoch) alone, so a row's view does
        not depend on the reader, the window or the world size."""
        counts = group[:, 1] - group[:, 0]
        if self.view_policy != "sample":
            return np.repeat(group[:, 2], counts)
        if self._views is None or self._views[0] != epoch:
            every = self._rng(epoch, 1).integers(0, self.num_views, self.num_samples)
            self._views = (epoch, every)  # (N,): one draw per epoch, not per window
        return self._views[1][np.concatenate([np.arange(a, z) for a, z, _ in group])]

    def windows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(blocks of the window (k, 3), permutation of the window's rows)."""
        blocks = self.blocks(epoch)
        rng = self._rng(epoch, 2 + self.shard)
        for w in range(0, len(blocks), self.window):
            group = blocks[w : w + self.window]
            rows = int((group[:, 1] - group[:, 0]).sum())
            yield group, rng.permutation(rows)


def read_window(store, group: np.ndarray, views: np.ndarray, out: np.ndarray) -> None:
    """Decode the rows of the window ``group`` (k, 3) into ``out`` (n, C) float32, in order.

    A block is read from its view; a block of the "sample" policy (view ``PER_ROW``) once per
    view its rows use (``views``, (n,)), each row taken from its own.
    """
    at, scratch = 0, None
    for start, stop, view in group.tolist():
        n = stop - start
        part = out[at : at + n]
        mine = views[at : at + n]
        used = [view] if view != PER_ROW else np.unique(mine).tolist()
        if len(used) == 1:
            store.read_block(used[0], start, stop, out=part)
        else:
            if scratch is None or len(scratch) < n:
                scratch = np.empty((n, out.shape[1]), np.float32)
            for v in used:
                store.read_block(v, start, stop, out=scratch[:n])
                rows = mine == v
                part[rows] = scratch[:n][rows]
        at += n


class LogitBatches:
    """Batches ``(indices (B,), views (B,), logits float32 (B, C))`` of one epoch from a store.

    The arrays yielded live in a ring of ``num_buffers`` preallocated buffers: a batch stays valid
    until ``num_buffers`` more have been drawn (copy it, or move it to the device, before then).
    """

    def __init__(
        self,
        path: str,
        batch_size: int,
        *,
        epoch: int = 0,
        window: int = 8,
        seed: int = 0,
        view_policy: str = "epoch",
        views: int | None = None,
        drop_last: bool = False,
        memory_budget: int = 1 << 30,
        num_buffers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        fingerprint: dict | None = None,
    ) -> None:
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        self.path = str(path)
        self.batch_size = batch_size
        self.epoch = epoch
        self.window = window
        self.seed = seed
        self.view_policy = view_policy
        self.views = views
        self.drop_last = drop_last
        self.memory_budget = memory_budget
        self.num_buffers = max(2, num_buffers)
        self.rank, self.world_size = rank, world_size
        self.fingerprint = fingerprint
        self._store = None
        self._pid = None
        self._ram: np.ndarray | None = None  # (views, N, C) float32, filled view by view
        self._ram_loaded: set[int] = set()

    def __getstate__(self) -> dict:
        # Handles and RAM copies stay in the process that made them; each worker opens its own.
        return {**self.__dict__, "_store": None, "_pid": None, "_ram": None, "_ram_loaded": set()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self):
        if self._store is None or self._pid != os.getpid():
            from storage.api import open_store

            self._store = open_store(self.path, fingerprint=self.fingerprint)
            self._pid = os.getpid()
            if self.views is not None and self.views > self._store.num_views:
                raise StoreError(
                    f"asked for {self.views} views but store {self.path} holds "
                    f"{self._store.num_views}: precompute more views or ask for fewer"
                )
        return self._store

    def in_ram(self) -> bool:
        """Whether the views this loader uses fit ``memory_budget`` decoded (float32)."""
        s = self.store
        return self.num_views * s.num_samples * s.num_classes * 4 <= self.memory_budget

    @property
    def num_views(self) -> int:
        return self.views or self.store.num_views

    def sampler(self) -> BlockSampler:
        s = self.store
        worker, workers = _worker_share()
        # In RAM the whole shard is one window: a full shuffle costs nothing more.
        window = s.layout.num_chunks if self.in_ram() else self.window
        return BlockSampler(
            s.num_samples,
            s.layout.chunk_rows,
            self.num_views,
            window,
            self.seed,
            self.view_policy,
            self.rank * workers + worker,
            self.world_size * workers,
        )

    def __len__(self) -> int:
        """Batches this reader yields per epoch (its share of the blocks)."""
        rows = int(sum(b - a for a, b, _ in self.sampler().blocks(self.epoch)))
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _ram_views(self, views: np.ndarray) -> np.ndarray:
        """The views in RAM as one (V * N, C) array, loading those of ``views`` not loaded yet."""
        s = self.store
        if self._ram is None:
            # Pages of views never loaded are never touched, so they take no memory.
            self._ram = np.empty((self.num_views, s.num_samples, s.num_classes), np.float32)
        for v in map(int, views):
            if v not in self._ram_loaded:
                step = s.layout.shard_rows
                for start in range(0, s.num_samples, step):
                    stop = min(start + step, s.num_samples)
                    s.read_block(v, start, stop, out=self._ram[v, start:stop])
                self._ram_loaded.add(v)
        return self._ram.reshape(-1, s.num_classes)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        s, b = self.store, self.batch_size
        sampler = self.sampler()
        in_ram = self.in_ram()
        if not in_ram:
            # Streamed: each window of blocks is read (decoded) into one pool, rows drawn from it.
            cap = sampler.window * sampler.block_rows
            pool = np.empty((min(cap, s.num_samples), s.num_classes), np.float32)
        ring = [
            (np.empty(b, np.int64), np.empty(b, np.int64), np.empty((b, s.num_classes), np.float32))
            for _ in range(self.num_buffers)
        ]
        k, filled = 0, 0
        for group, perm in sampler.windows(self.epoch):
            rows = np.concatenate([np.arange(a, z) for a, z, _ in group])  # the window's rows
            views = sampler.row_views(self.epoch, group)  # (n,)
            one_view = bool((views == views[0]).all())
            if in_ram:  # gather straight from the views in RAM: no copy of the window
                src = self._ram_views(np.unique(views))
                where = views[perm] * s.num_samples + rows[perm]
            else:
                read_window(s, group, views, pool[: len(rows)])
                src, where = pool, perm
            if one_view:
                views = int(views[0])
            rows = rows[perm]
            if not one_view:
                views = views[perm]
            pos, total = 0, len(perm)
            while pos < total:
                idx, vws, logits = ring[k % self.num_buffers]
                take = min(b - filled, total - pos)
                end = filled + take
                # mode="clip": indices are in range by construction, and numpy buffers `out`
                # with the default mode="raise".
                src.take(where[pos : pos + take], 0, logits[filled:end], "clip")
                idx[filled:end] = rows[pos : pos + take]
                vws[filled:end] = views if one_view else views[pos : pos + take]
                filled = end
                pos += take
                if filled == b:
                    yield idx, vws, logits
                    k, filled = k + 1, 0
        if filled and not self.drop_last:
            idx, vws, logits = ring[k % self.num_buffers]
            yield idx[:filled], vws[:filled], logits[:filled]


def _worker_share() -> tuple[int, int]:
    """(worker id, workers) inside a torch DataLoader worker, else (0, 1)."""
    torch = sys.modules.get("torch")
    info = torch.utils.data.get_worker_info() if torch is not None else None
    return (info.id, info.num_workers) if info is not None else (0, 1)
