from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import StoreCorruptError, open_store
from storage.base import labels_problem
from tests.storage.conformance import PER_SHARD, ROWS, LogitStoreTests, N, V, teacher_logits


class TestZarrLogitStore(LogitStoreTests):
    backend = "zarr"
    suffix = ".zarr"

    @pytest.mark.parametrize("encoding", ["int8", "topk"])
    def test_direct_shard_reader_equals_zarr(self, tmp_path, encoding):
        path = self.path(tmp_path)
        with self.make(path, encoding, view_param_width=3) as store:
            x = teacher_logits()
            for v in range(V):
                store.write(v, 0, x[v], np.zeros((N, 3), np.int16) + v)
        group = zarr.open_group(path, mode="r")
        with open_store(path) as store:
            for name in store.layout.arrays():
                assert store._shard_reader(name) is not None
                for a, b in [(0, N), (ROWS * PER_SHARD - 3, N - 1), (N - 1, N), (5, 6)]:
                    np.testing.assert_array_equal(
                        store._read_block(name, 2, a, b), group[name][2, a:b]
                    )

    def test_compressed_store_reads_through_zarr(self, tmp_path):
        path = self.path(tmp_path)
        x = teacher_logits()
        with self.make(path, "float32", compressor="zstd") as store:
            self.fill(store, x)
        with open_store(path) as store:
            assert store._shard_reader("logits") is None
            np.testing.assert_array_equal(store.read_block(1, 0, N), x[1])
            assert store.verify().ok

    def test_truncated_and_deleted_shards_are_named(self, tmp_path):
        path = self.path(tmp_path)
        with self.make(path, "float32") as store:
            self.fill(store, teacher_logits())
        shard = Path(path, "logits", "c", "0", "1", "0")
        os.truncate(shard, shard.stat().st_size // 2)
        os.remove(Path(path, "stats", "c", "2", "3", "0"))
        with open_store(path) as store:
            report = store.verify()
            damaged = {(v, c): what for v, c, what in report.damaged}
            assert set(damaged) == {(0, 2), (0, 3), (2, 6), (2, 7)}
            assert "file missing: stats/c/2/3/0" in damaged[(2, 6)]
            assert "logits" in damaged[(0, 2)]
            with pytest.raises(StoreCorruptError, match="run `python -m pipeline verify"):
                store.read_block(0, 0, N)
            # Without reading data too (what precompute and a large distill check): the cut
            # shard by its size and index (its chunks passed before), the deleted one by name.
            cheap = {(v, c): what for v, c, what in store.verify(data=False).damaged}
            assert set(cheap) == set(damaged)
            assert "truncated" in cheap[(0, 2)] and "logits/c/0/1/0" in cheap[(0, 2)]
            with pytest.raises(StoreCorruptError, match=r"view 0 chunks 2\.\.3: logits: shard"):
                store.require_intact(data_bytes=0)


def test_labels_problem_tells_lost_labels_from_none_given():
    assert labels_problem(np.array([0, 3, 1]), 4) is None
    assert labels_problem(np.full(3, -1), 4) is None  # a store made without labels
    assert labels_problem(np.full(3, -1), 4, required=True) == "labels missing at all 3 row(s)"
    lost = labels_problem(np.array([0, -1, -1, 2]), 4)
    assert lost.startswith("labels missing at 2 row(s) (first: row 1, -1; classes are 0..3")
    assert "out of range at 1 row(s) (first: row 2, 4;" in labels_problem(np.array([0, 1, 4]), 4)


def test_shards_are_synced_before_they_are_named_unless_scratch(tmp_path, monkeypatch):
    """Each whole shard file is fsynced before its rename (its done marks follow); a scratch
    store (PS-KD's per-epoch self-teacher, ``sync_writes = False``) skips it: one fsync a block
    cost a small student's epoch about a fifth."""
    import storage.shard_reader as shard_reader
    from storage import create_store

    synced = []
    real = os.fsync
    monkeypatch.setattr(shard_reader.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    x = teacher_logits()[0]
    with create_store(tmp_path / "a.zarr", N, x.shape[1], 1, chunk_rows=ROWS) as store:
        store.write(0, 0, x)
        counted = len(synced)
        assert counted >= store.layout.num_shards  # the logits' shards, at least
    with create_store(tmp_path / "b.zarr", N, x.shape[1], 1, chunk_rows=ROWS) as store:
        store.sync_writes = False
        before = len(synced)
        store.write(0, 0, x)
        assert len(synced) == before
