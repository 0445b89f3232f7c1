"""The store's geometry: how N rows of V views are cut into chunks and shards, and what it costs.

A *chunk* holds whole rows of one view, all classes: ``(1, chunk_rows, C)``. It is the unit of
checksums, of completion marks (``done``) and of training reads. A *shard* (zarr v3 sharding)
groups ``chunks_per_shard`` consecutive chunks of one view into one file, so an ImageNet-size store
(1.28 M rows x 10 views) is a few thousand files rather than hundreds of thousands. The writer
buffers rows to shard boundaries: writing part of a shard is a read-modify-write of the whole file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from storage.encodings import row_arrays
from storage.errors import StoreError

SCHEMA_VERSION = 1

#: Bytes one logit takes on disk, per encoding (topk is computed from k).
LOGIT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}

# Target sizes. A ~1 MiB chunk reads at disk speed while staying small enough to shuffle well;
# a ~32 MiB shard keeps file counts low and the writer's buffer modest.
TARGET_CHUNK_BYTES = 1 << 20
TARGET_SHARD_BYTES = 32 << 20
MIN_SHARDS = 8  # per view, when it has that many chunks
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 8192
DEFAULT_TOPK = 32
#: Raw float32 logits a dask task computes and encodes at once. Shards are sized by their bytes
#: on disk, and raw rows can be far bigger (topk at C = 21843: 455x, a 13 GiB shard of raw
#: logits), so a task fills its shard a block of rows at a time and holds only the encoded shard.
TASK_BLOCK_BYTES = 128 << 20
LABEL_CHUNK_ROWS = 1 << 20  # rows a chunk of ``labels`` (zarr)


@dataclass(frozen=True)
class Layout:
    """The shape of a store and how it is chunked."""

    num_samples: int
    """N, rows per view."""
    num_classes: int
    """C, logits per row."""
    num_views: int
    """V, augmentation views per sample."""
    encoding: str
    """How logits are stored: float32, float16, bfloat16, int8 or topk."""
    chunk_rows: int
    """Rows per chunk (one view, all classes)."""
    chunks_per_shard: int
    """Chunks grouped into one shard file (zarr); HDF5 ignores it except as the write unit."""
    topk: int = 0
    """k for the topk encoding, else 0."""
    view_param_width: int = 0
    """P, augmentation parameters stored per (view, sample)."""

    def __post_init__(self) -> None:
        # A store's attributes come from a file: whatever they hold, only integers size arrays
        # and name shard files (never a string such as "../../etc/passwd").
        for name in ("num_samples", "num_classes", "num_views", "chunk_rows", "chunks_per_shard",
                     "topk", "view_param_width"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        if self.num_samples <= 0:
            raise StoreError(
                f"num_samples must be > 0, got {self.num_samples}: give the dataset's row count"
            )
        if self.num_classes < 2:
            raise StoreError(
                f"num_classes must be >= 2, got {self.num_classes}: a logit store needs a "
                "class axis"
            )
        if self.num_views < 1:
            raise StoreError(f"num_views must be >= 1, got {self.num_views}")
        if self.chunk_rows < 1:
            raise StoreError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.chunks_per_shard < 1:
            raise StoreError(f"chunks_per_shard must be >= 1, got {self.chunks_per_shard}")
        if self.encoding == "topk" and not 1 <= self.topk < self.num_classes:
            raise StoreError(
                f"topk k must be in [1, {self.num_classes - 1}] for {self.num_classes} classes, "
                f"got {self.topk}: keep fewer values than classes, or use float16"
            )
        if self.view_param_width < 0:
            raise StoreError(f"view_param_width must be >= 0, got {self.view_param_width}")

    # -- chunks -------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        """Chunks per view (the last one may be partial)."""
        return -(-self.num_samples // self.chunk_rows)

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * self.chunks_per_shard

    @property
    def num_shards(self) -> int:
        """Shards per view."""
        return -(-self.num_samples // self.shard_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) of a chunk."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of a shard: the writer's unit."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_samples)

    def shard_chunks(self, shard: int) -> range:
        """Chunk numbers inside a shard."""
        first = shard * self.chunks_per_shard
        return range(first, min(first + self.chunks_per_shard, self.num_chunks))

    def arrays(self) -> dict[str, tuple[str, int | None]]:
        """Every per-row array the store holds: name → (stored dtype, last axis or None)."""
        out = row_arrays(self.encoding, self.num_classes, self.topk)
        if self.view_param_width:
            out["view_params"] = ("int16", self.view_param_width)
        return out

    def to_attrs(self) -> dict:
        return asdict(self)


def auto_chunk_rows(num_samples: int, num_classes: int, encoding: str, topk: int = 0) -> int:
    """Rows per chunk so that a chunk is about 1 MiB (clipped to [64, 8192] and to N)."""
    rows = TARGET_CHUNK_BYTES // max(1, row_bytes(num_classes, encoding, topk))
    rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))
    # A power of two keeps chunk boundaries aligned with common batch sizes.
    rows = 1 << int(math.log2(rows))
    return max(1, min(rows, num_samples))


def auto_chunks_per_shard(
    chunk_rows: int, num_samples: int, num_classes: int, encoding: str, topk: int = 0
) -> int:
    """Chunks per shard so that a shard is about 32 MiB, and a view at least ``MIN_SHARDS``
    shards when it has that many chunks: the shard is the unit of writing, resume and dask tasks,
    so a killed precompute loses at most 1/MIN_SHARDS of a view, and a small store still gives a
    dask cluster MIN_SHARDS tasks a view (rounding down: 9 chunks are 9 shards of one, where
    rounding up made 5 of two, each 2/9 of the view)."""
    chunk_bytes = chunk_rows * max(1, row_bytes(num_classes, encoding, topk))
    per_shard = max(1, TARGET_SHARD_BYTES // chunk_bytes)
    chunks = -(-num_samples // chunk_rows)  # a view's
    return max(1, min(per_shard, chunks // MIN_SHARDS))


def task_block_rows(layout: Layout, multiple: int = 1) -> int:
    """Rows a dask task computes and encodes at once: about ``TASK_BLOCK_BYTES`` of raw float32,
    a multiple of ``multiple`` (the producer's batch size, so that its batches start where a serial
    precompute's do: at the shard's start, every batch_size rows), and at most a shard."""
    multiple = max(1, int(multiple))
    rows = TASK_BLOCK_BYTES // (4 * layout.num_classes)
    return min(max(multiple, rows // multiple * multiple), layout.shard_rows)


def row_bytes(num_classes: int, encoding: str, topk: int = 0) -> int:
    """Bytes of one stored row of logits (without ``stats``)."""
    if encoding == "topk":
        return topk * (2 + 4)  # float16 values + int32 indices
    if encoding == "int8":
        return num_classes + 8  # + float32 scale and offset
    return num_classes * LOGIT_BYTES[encoding]


def plan(layout: Layout, backend: str = "zarr") -> dict:
    """What a store of this layout costs: bytes on disk, files, and the memory its users need.

    Bytes are exact for uncompressed zarr arrays (a view's last chunk padded to whole rows, as
    zarr stores it, checksums and shard indexes included), but for the few KB of JSON metadata;
    HDF5 is one file of about the same bytes. Files: the zarr backend's, its lock included.
    """
    n, c, v = layout.num_samples, layout.num_classes, layout.num_views
    per_row = row_bytes(c, layout.encoding, layout.topk) + 16  # + stats (4 x float32)
    per_row += 2 * layout.view_param_width
    chunks = v * layout.num_chunks
    arrays = layout.arrays()
    stored_rows = layout.num_chunks * layout.chunk_rows  # a view's, its last chunk padded
    row_array_bytes = sum(
        np.dtype(dtype).itemsize * (width or 1) for dtype, width in arrays.values()
    )
    # Each chunk carries a 4-byte crc32c; each shard an index of 16 bytes a chunk + its crc.
    shard_index = 16 * layout.chunks_per_shard + 4
    rows_bytes = v * stored_rows * row_array_bytes + len(arrays) * (
        chunks * 4 + v * layout.num_shards * shard_index
    )
    label_chunks = -(-n // LABEL_CHUNK_ROWS)
    label_bytes = label_chunks * (min(n, LABEL_CHUNK_ROWS) * 8 + 4)
    done_bytes = v * (layout.num_chunks + 4)
    if backend == "zarr":
        # shard files + one done chunk a view + label chunks + a zarr.json an array and the
        # group's + the writer lock
        files = v * layout.num_shards * len(arrays) + v + label_chunks + len(arrays) + 2 + 2
    else:
        files = 1
    return {
        "num_samples": n,
        "num_classes": c,
        "num_views": v,
        "encoding": layout.encoding,
        "chunk_rows": layout.chunk_rows,
        "chunks_per_shard": layout.chunks_per_shard,
        "bytes_per_row": per_row,
        "disk_bytes": rows_bytes + label_bytes + done_bytes,
        "files": files,
        "chunks": chunks,
        "shards": v * layout.num_shards,
        # One shard encoded (rows are buffered to shard boundaries) + one block of raw float32
        # rows being encoded (a dask task's; a serial writer's batch is smaller).
        "writer_buffer_bytes": layout.shard_rows * per_row + task_block_rows(layout) * 4 * c,
        "ram_bytes_per_view_decoded": n * c * 4,
        "float32_disk_bytes": v * n * c * 4,
    }


def format_plan(p: dict, backend: str) -> str:
    """The plan as a few readable lines (printed by `plan` and before a precompute)."""
    ratio = p["disk_bytes"] / p["float32_disk_bytes"]
    return "\n".join(
        [
            f"store: {p['num_views']} view(s) x {p['num_samples']:,} rows x {p['num_classes']:,} "
            f"classes, {p['encoding']} ({backend})",
            f"  chunks: {p['chunk_rows']} rows each, {p['chunks']:,} in all; shards: "
            f"{p['chunks_per_shard']} chunks each, {p['shards']:,} in all",
            f"  disk: {format_bytes(p['disk_bytes'])} ({p['bytes_per_row']} bytes/row with stats "
            f"and view params; {ratio:.0%} of raw float32), {p['files']:,} file(s)",
            f"  writer buffer: {format_bytes(p['writer_buffer_bytes'])} per view being written; "
            f"one view decoded in RAM: {format_bytes(p['ram_bytes_per_view_decoded'])}",
        ]
    )


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")
