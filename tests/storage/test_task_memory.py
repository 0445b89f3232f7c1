"""A dask task's memory is bounded by a block of raw rows, not by its shard: shards are sized by
bytes on disk, and with topk at large C a shard of raw float32 logits is hundreds of times that
(13 GiB at ImageNet-21k, about 53 GiB at the task's peak before 2026-12). The stores it writes
stay byte-identical to a serial write."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import storage.layout as layout_module
from storage import create_store, make_layout, open_store
from storage.encodings import encode
from storage.layout import format_plan, plan, task_block_rows
from storage.parallel import produce_and_write, produce_only

C, CHUNK, PER_SHARD = 2000, 256, 8  # a shard: 2048 rows, 16 MiB of raw float32
N = CHUNK * PER_SHARD + 300  # a whole shard and a short one


class Teacher:
    """Rows as a function of their index (any block size gives the same rows); records the
    ranges it was asked for."""

    batch_size = 64

    def __init__(self, classes: int = C) -> None:
        self.table = np.random.default_rng(0).standard_normal((97, classes), dtype=np.float32)
        self.table[::5] = np.round(self.table[::5])  # ties, for topk
        self.calls: list[tuple[int, int]] = []

    def __call__(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((start, stop))
        rows = np.arange(start, stop)
        logits = self.table[rows % 97] + (rows // 97 + view)[:, None].astype(np.float32)
        params = np.stack([rows % 7, rows % 11, np.full_like(rows, view)], axis=1)
        return logits, params.astype(np.int16)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1 MiB of raw float32 (131 rows at C = 2000: 128, whole batches of 64)."""
    monkeypatch.setattr(layout_module, "TASK_BLOCK_BYTES", 1 << 20)


def _serial(path: str, encoding: str, backend: str = "zarr") -> None:
    teacher = Teacher()
    with _create(path, encoding, backend) as store:
        for view in range(2):
            store.write(view, 0, *teacher(view, 0, N))


def _create(path: str, encoding: str, backend: str = "zarr"):
    return create_store(
        path, N, C, 2, encoding=encoding, chunk_rows=CHUNK, chunks_per_shard=PER_SHARD,
        backend=backend, view_param_width=3, topk=16 if encoding == "topk" else None,
    )  # fmt: skip


def _same_stores(a: str, b: str) -> None:
    with open_store(a) as x, open_store(b) as y:
        assert x.complete and y.complete
        for name in x.layout.arrays():
            for view in range(2):
                np.testing.assert_array_equal(
                    x.read_array(name, np.arange(N), view), y.read_array(name, np.arange(N), view)
                )


@pytest.mark.parametrize("encoding", ["topk", "float16", "int8"])
def test_a_task_computes_its_shard_in_blocks_and_writes_the_serial_bytes(
    tmp_path, small_blocks, encoding
):
    serial, tasks = str(tmp_path / "serial.zarr"), str(tmp_path / "tasks.zarr")
    _serial(serial, encoding)
    _create(tasks, encoding).close()
    with open_store(tasks) as store:
        units = store.missing_shards()
    teacher = Teacher()
    shards = []
    for view, start, stop in units:
        shards += produce_and_write(tasks, teacher, view, start, stop)["shards"]
    with open_store(tasks, mode="a") as store:
        store.mark_done(shards)
    _same_stores(serial, tasks)
    sizes = [b - a for a, b in teacher.calls]
    assert max(sizes) == 128  # 1 MiB / (4 * C) = 131 rows: two whole batches of 64
    assert all((a - s) % 64 == 0 for a, _ in teacher.calls for _, s, _ in units[:1])


def test_a_single_writer_task_sends_its_shard_encoded(tmp_path, small_blocks):
    """HDF5: the coordinator gets the shard as stored (topk: 16 values of 2000 a row), and writes
    the same bytes as a serial write."""
    serial, tasks = str(tmp_path / "serial.h5"), str(tmp_path / "tasks.h5")
    _serial(serial, "topk", "hdf5")
    with _create(tasks, "topk", "hdf5") as store:
        teacher = Teacher()
        for view, start, stop in store.missing_shards():
            result = produce_only(store.layout, teacher, view, start, stop)
            sent = sum(p.nbytes for p in result["parts"].values())
            assert sent < (stop - start) * C * 4 / 50  # not raw float32
            store.write_encoded(view, result["start"], result["parts"])
        assert max(b - a for a, b in teacher.calls) == 128
    _same_stores(serial, tasks)


def test_a_task_peaks_at_a_block_not_at_its_shard(tmp_path, small_blocks):
    """A 16 MiB shard of raw float32 (topk): before, the task held it whole, then the encode 3x
    it (about 64 MiB); now one block of 1 MiB at a time and the encoded shard."""
    path = str(tmp_path / "s.zarr")
    _create(path, "topk").close()
    teacher = Teacher()
    tracemalloc.start()
    try:
        produce_and_write(path, teacher, 0, 0, CHUNK * PER_SHARD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_the_topk_encode_takes_big_inputs_a_slice_at_a_time():
    x = np.random.default_rng(1).standard_normal((2048, 16384), dtype=np.float32)  # 128 MiB
    tracemalloc.start()
    try:
        encode("topk", x, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 2, f"peak {peak / 2**20:.0f} MiB"  # 3x its input before


def test_plan_counts_one_block_of_raw_rows_per_writer():
    """ImageNet-21k with topk: 161 MiB, not the 13.4 GiB of a whole shard of raw float32; the
    shipped configs' stores and numbers are unchanged (a shard there is under one block)."""
    big = make_layout(1_281_167, 21843, 10, "topk", view_param_width=3)
    assert (big.chunk_rows, big.chunks_per_shard) == (4096, 39)
    assert task_block_rows(big) * 21843 * 4 <= layout_module.TASK_BLOCK_BYTES
    assert task_block_rows(big, 256) % 256 == 0
    assert "writer buffer: 160.6 MiB per view" in format_plan(plan(big), "zarr")
    for rows, classes, buffer in ((60_000, 10, "656.0 KiB"), (1_281_167, 1000, "94.1 MiB")):
        shipped = make_layout(rows, classes, 1, "float16", view_param_width=3)
        assert task_block_rows(shipped) == shipped.shard_rows
        assert f"writer buffer: {buffer} per view" in format_plan(plan(shipped), "zarr")
