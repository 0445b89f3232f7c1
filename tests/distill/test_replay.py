"""The student's input is the teacher's, byte for byte; each epoch visits every row once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import splits
from pipeline.distill_data import (
    Batch,
    EpochBatches,
    StoreRows,
    ToDevice,
    ViewParams,
    prefetch,
    replay,
)
from pipeline.distill_inputs import DistillError, open_teacher_store
from pipeline.views import view_params
from storage import open_store
from storage.sampler import BlockSampler


def _batches(tiny_run, *, in_ram: bool, policy: str = "epoch"):
    config = tiny_run.config(f"distill.view_policy={policy}")
    train, _ = splits(config)
    store, views, table = open_teacher_store(config, train)
    chunks = -(-store.num_samples // store.layout.chunk_rows)
    sampler = BlockSampler(
        num_samples=store.num_samples,
        block_rows=store.layout.chunk_rows,
        num_views=views,
        window=chunks if in_ram else 2,
        seed=0,
        view_policy=policy,
    )
    rows = StoreRows(store, in_ram=in_ram)
    return store, train, EpochBatches(sampler, 24, train, ViewParams(train, table), rows)


@pytest.mark.parametrize(
    ("in_ram", "policy"),
    [(False, "epoch"), (True, "epoch"), (False, "block"), (False, "sample"), (True, "sample")],
)
def test_batches_replay_the_teachers_inputs_and_logits(tiny_run, in_ram, policy):
    store, train, batches = _batches(tiny_run, in_ram=in_ram, policy=policy)
    for epoch in (0, 1):
        seen = []
        for batch in batches(epoch):
            seen.append(batch.indices)
            assert len(batch.indices) <= 24 and batch.x.dtype == torch.float32
            for v in np.unique(batch.views):
                rows = batch.views == v
                idx = batch.indices[rows]
                # What precompute fed the teacher for these rows: Split.batch(idx, view=v).
                x, y, _ = train.batch(idx, view=int(v))
                assert torch.equal(batch.x[rows], x)  # byte-identical
                assert torch.equal(batch.y[rows], y)
                assert torch.equal(batch.teacher[rows], torch.from_numpy(store.read(idx, int(v))))
            if policy == "epoch":
                assert set(batch.views.tolist()) == {epoch % 2}
            if policy == "sample":  # rows of one block (and so of one batch) mix the views
                assert set(batch.views.tolist()) == {0, 1}
        order = np.concatenate(seen)
        assert np.array_equal(np.sort(order), np.arange(len(train)))  # every row once
        assert not np.array_equal(order, np.arange(len(train)))  # shuffled
    store.close()


def test_stored_view_params_are_the_generators(tiny_run):
    config = tiny_run.config()
    train, _ = splits(config)
    store, views, table = open_teacher_store(config, train)
    rows = np.arange(len(train))
    assert views == 2 and table.shape == (2, len(train), 3)
    for v in range(views):
        assert np.array_equal(table[v], view_params(0, v, rows, train.spec))
        assert np.array_equal(table[v], store.read_array("view_params", rows, view=v))
    x, _ = replay(train, rows[:8], table[1, :8])
    assert torch.equal(x, train.batch(rows[:8], view=1)[0])
    store.close()


def test_a_store_with_other_view_params_is_refused(tiny_run, tmp_path):
    """Same dataset, labels and fingerprint, but parameters that are not the generator's."""
    config = tiny_run.config(f"distill.store={tmp_path / 's.zarr'}", "distill.views=1")
    train, _ = splits(config)
    with open_store(tiny_run.run_dir / "store.zarr") as src:
        fingerprint, labels = src.fingerprint, src.labels
    from storage import create_store

    n = len(train)
    with create_store(
        tmp_path / "s.zarr", n, 10, 1, chunk_rows=32, fingerprint=fingerprint,
        labels=labels, view_param_width=3,
    ) as store:  # fmt: skip
        params = view_params(0, 0, np.arange(n), train.spec)
        params[7, 2] = 1  # row 7 flipped
        store.write(0, 0, np.zeros((n, 10), np.float32), params)
    with pytest.raises(DistillError, match=r"view 0 row 7 .* \[2, 2, 1\], the generator gives"):
        open_teacher_store(config, train)


def test_prefetch_passes_batches_and_errors_through():
    assert list(prefetch(iter(range(5)), 2)) == [0, 1, 2, 3, 4]
    assert list(prefetch(iter(range(5)), 0)) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise OSError("disk gone")

    it = prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    early = prefetch(iter(range(100)), 1)
    assert next(early) == 0
    early.close()  # the consumer stops: the worker thread ends too


def test_to_device_on_the_cpu_passes_batches_through():
    batch = Batch(np.arange(2), np.zeros(2, np.int64), torch.ones(2, 1, 2, 2), torch.zeros(2))
    (out,) = ToDevice(torch.device("cpu"))(iter([batch]))
    assert out is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_copies_pinned_batches_to_cuda():
    device = torch.device("cuda")
    batches = [
        Batch(
            np.arange(4), np.zeros(4, np.int64), torch.full((4, 1, 2, 2), float(i)).pin_memory(),
            torch.arange(4).pin_memory(), torch.randn(4, 3).pin_memory(),
        )
        for i in range(3)
    ]  # fmt: skip
    moved = list(ToDevice(device)(iter(batches)))
    for before, after in zip(batches, moved):
        assert after.x.is_cuda and after.teacher.is_cuda and after.previous is None
        assert torch.equal(after.x.cpu(), before.x) and torch.equal(
            after.teacher.cpu(), before.teacher
        )


def test_sample_policy_draws_a_view_per_row_whoever_reads_it():
    """Under "sample" a row's view depends on (seed, epoch, row) only: not on the reader's shard,
    the window, or which other rows are read with it; it changes with the epoch."""

    def views(shard: int, shards: int, window: int, epoch: int) -> dict[int, int]:
        s = BlockSampler(1000, 32, 3, window, seed=7, view_policy="sample", shard=shard,
                         num_shards=shards)  # fmt: skip
        out = {}
        for group, _ in s.windows(epoch):
            rows = np.concatenate([np.arange(a, b) for a, b, _ in group])
            out.update(zip(rows.tolist(), s.row_views(epoch, group).tolist()))
        return out

    one = views(0, 1, 4, epoch=2)
    two = {**views(0, 2, 1, epoch=2), **views(1, 2, 5, epoch=2)}
    assert len(one) == 1000 and one == two
    counts = np.bincount(list(one.values()), minlength=3)
    assert counts.min() > 250  # about a third each
    assert one != views(0, 1, 4, epoch=3)


@pytest.mark.parametrize(("method", "reads_disk"), [("kd", False), ("pskd", True), ("ce", False)])
def test_prefetch_auto_only_where_it_can_hide_something(tiny_run, tmp_path, method, reads_disk):
    """prefetch None: 2 on CUDA or when batches read the disk during the epoch (PS-KD's previous
    epoch; views over the memory budget), else 0; a number given is kept."""
    from dataclasses import replace

    from pipeline.distill_inputs import build_sources

    config = tiny_run.config(f"distill.method={method}")
    train, _ = splits(config)
    needs = {"kd": "logits", "pskd": "probabilities", "ce": None}[method]
    src = build_sources(config, train, needs, torch.device("cpu"), tmp_path, "key")
    try:
        assert src.reads_disk is reads_disk
        assert src.prefetch_depth(None, torch.device("cpu")) == (2 if reads_disk else 0)
        assert src.prefetch_depth(None, torch.device("cuda")) == 2
        assert src.prefetch_depth(5, torch.device("cpu")) == 5
        assert replace(src, reads_disk=True).prefetch_depth(None, torch.device("cpu")) == 2
    finally:
        if src.store is not None:
            src.store.close()
