"""The store's fast paths give the same answers as the plain ones.

Fast row statistics vs float64 formulas, torch float16 conversion vs numpy, the in-RAM sampler vs
the streamed one, the direct shard reader/writer vs zarr, and the shard reader's open-file cache
across forks, pickling, replaced files and threads.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import StoreCorruptError, create_store, encodings, open_store
from storage.encodings import _row_stats64, convert_into, row_stats, row_stats_reference
from storage.sampler import LogitBatches
from tests.storage.conformance import PER_SHARD, ROWS, C, N, V, teacher_logits

FORK = multiprocessing.get_context("fork")


def make_store(path: Path, encoding: str = "float16", x: np.ndarray | None = None, **kw) -> str:
    x = teacher_logits() if x is None else x
    with create_store(
        path, N, C, V, encoding=encoding, chunk_rows=ROWS, chunks_per_shard=PER_SHARD, **kw
    ) as store:
        for v in range(V):
            params = np.zeros((N, 3), np.int16) + v if kw.get("view_param_width") else None
            store.write(v, 0, x[v], params)
    return str(path)


# ---- row statistics ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "classes", "scale", "shift"),
    [(1, 2, 1.0, 0.0), (300, 37, 3.0, 0.0), (64, 1000, 2.0, -5.0), (5, 70_000, 1.0, 0.0),
     (200, 100, 1e-3, 1e4), (50, 10, 30.0, 0.0)],
)  # fmt: skip
def test_fast_stats_equal_float64_stats(rows, classes, scale, shift):
    rng = np.random.default_rng(rows + classes)
    x = (rng.standard_normal((rows, classes)) * scale + shift).astype(np.float32)
    ref = row_stats_reference(x)
    fast, row_min = _row_stats64(x)
    # Summation order differs (cache-sized blocks), nothing else: float64 rounding only.
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=0)
    np.testing.assert_array_equal(row_min, x.min(axis=1))
    np.testing.assert_allclose(row_stats(x), ref, rtol=1e-6, atol=0)
    assert row_stats(x).dtype == np.float32


def test_stats_refuse_non_finite_rows_by_number():
    x = teacher_logits()[0]
    x[[3, 17]] = [[np.nan], [np.inf]]
    x[20, 5] = -np.inf
    with pytest.raises(Exception, match=r"3 row\(s\) hold NaN or inf logits \(rows 103, 117, 120"):
        encodings.encode("float16", x, first_row=100)
    y = teacher_logits()[0]
    y[7, 1] = -70000.0  # beyond float16's range on the negative side
    with pytest.raises(Exception, match="beyond float16's range .* rows 7"):
        encodings.encode("float16", y)


# ---- float16 conversion ------------------------------------------------------------------------
def special_floats() -> np.ndarray:
    rng = np.random.default_rng(3)
    edge = np.array(
        [0.0, -0.0, 1e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, 65519.0, 1 / 3, 2049.0, 2051.0],
        np.float32,
    )
    ties = (np.arange(1, 2049, dtype=np.float32) + 0.5) / 1024  # halfway cases: round to even
    return np.concatenate([edge, ties, rng.standard_normal(100_003).astype(np.float32) * 50])


@pytest.mark.parametrize("use_torch", [True, False], ids=["torch", "numpy"])
def test_float16_conversion_matches_numpy_bit_for_bit(monkeypatch, use_torch):
    import torch

    monkeypatch.setattr(encodings, "_torch_module", torch if use_torch else False)
    x = special_floats()
    half = convert_into(np.empty(x.shape, np.float16), x)
    np.testing.assert_array_equal(half.view(np.uint16), x.astype(np.float16).view(np.uint16))
    back = convert_into(np.empty(x.shape, np.float32), half)
    np.testing.assert_array_equal(back.view(np.uint32), half.astype(np.float32).view(np.uint32))
    # Read-only or strided arrays take numpy's path, with the same result.
    ro = half[::-1].copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(convert_into(np.empty(x.shape, np.float32), ro), back[::-1])


def test_numpy_converts_until_torch_is_worth_importing(monkeypatch):
    monkeypatch.setattr(encodings, "_torch_module", None)
    monkeypatch.setattr(encodings, "_numpy_converted", 0)
    monkeypatch.setattr(encodings, "NUMPY_CONVERT_BUDGET", 1000)
    monkeypatch.setitem(sys.modules, "torch", None)  # not imported yet (and `import` fails)
    assert encodings._torch(600) is None and encodings._numpy_converted == 600
    assert encodings._torch(600) is None  # over the budget: the import was tried...
    assert encodings._torch_module is False  # ...and, torch missing, numpy stays for good


def _convert_in_child(queue) -> None:
    x = special_floats()
    queue.put(bool((convert_into(np.empty(x.shape, np.float16), x) == x.astype(np.float16)).all()))


def test_torch_conversion_leaves_a_forked_child_working(monkeypatch):
    """torch's OpenMP pool hangs a child forked after it ran: conversions never start it."""
    import torch

    monkeypatch.setattr(encodings, "_torch_module", torch)
    x = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)
    convert_into(np.empty(x.shape, np.float16), x)  # large: would go parallel in one copy_
    queue = FORK.Queue()
    child = FORK.Process(target=_convert_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("a child forked after a torch conversion hung")
    assert queue.get(timeout=5) is True


# ---- the sampler -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["epoch", "block"])
def test_in_ram_batches_equal_streamed_batches(tmp_path, policy):
    path = make_store(tmp_path / "s.zarr")
    with open_store(path) as store:
        chunks = store.layout.num_chunks
    kw = {"seed": 3, "view_policy": policy}
    ram = LogitBatches(path, 96, memory_budget=1 << 30, **kw)
    streamed = LogitBatches(path, 96, memory_budget=0, window=chunks, **kw)  # the same plan
    assert ram.in_ram() and not streamed.in_ram()
    for epoch in range(V + 1):
        ram.set_epoch(epoch)
        streamed.set_epoch(epoch)
        a = [tuple(t.copy() for t in batch) for batch in ram]
        b = [tuple(t.copy() for t in batch) for batch in streamed]
        assert len(a) == len(b) == -(-N // 96)
        for x, y in zip(a, b):
            for p, q in zip(x, y):
                np.testing.assert_array_equal(p, q)
    assert ram._ram.shape == (V, N, C)


def test_in_ram_loads_only_the_views_it_uses(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    batches = LogitBatches(path, 128, epoch=1)
    x = teacher_logits().astype(np.float16).astype(np.float32)
    for idx, views, logits in batches:
        np.testing.assert_array_equal(logits, x[views, idx])
    assert batches._ram_loaded == {1}
    clone = pickle.loads(pickle.dumps(batches))  # RAM copies stay in the process that made them
    assert clone._ram is None and clone._ram_loaded == set()


def _epoch_rows(batches) -> list:
    return [(idx.copy(), logits.copy()) for idx, _, logits in batches]


def test_dataloader_fork_workers_after_the_parent_read(tmp_path):
    import torch

    from tests.storage.producers import torch_batches

    path = make_store(tmp_path / "s.zarr")
    batches = LogitBatches(path, 64, memory_budget=0)
    _epoch_rows(batches)  # the parent holds open shard files now
    x = teacher_logits().astype(np.float16).astype(np.float32)
    loader = torch.utils.data.DataLoader(
        torch_batches(batches), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    seen = []
    for idx, views, logits in loader:
        np.testing.assert_array_equal(logits.numpy(), x[views.numpy(), idx.numpy()])
        seen.append(idx.numpy())
    assert len(np.unique(np.concatenate(seen))) == N
    assert sum(len(i) for i, _ in _epoch_rows(batches)) == N  # the parent still reads


# ---- the shard reader's open files --------------------------------------------------------------
def _read_in_child(store, queue) -> None:
    try:
        queue.put(store.read_block(1, 0, N).tobytes())
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_open_files_are_reused_bounded_and_reopened_after_fork(tmp_path, monkeypatch):
    path = make_store(tmp_path / "s.zarr", "float32")
    x = teacher_logits()
    with open_store(path) as store:
        reader = store._shard_reader("logits")
        monkeypatch.setattr(reader, "max_open", 3)
        opened = []
        real_open = os.open
        monkeypatch.setattr(
            "storage.shard_reader.os.open",
            lambda p, *a: opened.append(p) or real_open(p, *a),
        )
        for _ in range(3):
            np.testing.assert_array_equal(store.read_block(1, 0, 3 * ROWS * PER_SHARD), x[1, :384])
        assert len(opened) == 3 and reader.open_files() == 3  # opened once, then reused
        np.testing.assert_array_equal(store.read_block(1, 0, N), x[1])
        assert reader.open_files() == 3  # an LRU: never more than max_open
        queue = FORK.Queue()
        child = FORK.Process(target=_read_in_child, args=(store, queue))
        child.start()
        assert queue.get(timeout=60) == x[1].tobytes()
        child.join(30)
        np.testing.assert_array_equal(store.read_block(1, 0, N), x[1])  # parent unaffected
        clone = pickle.loads(pickle.dumps(reader))
        assert clone.open_files() == 0
        np.testing.assert_array_equal(clone.read(1, 0, N), x[1])
    assert reader.open_files() == 0  # closing the store closes its files


def test_a_replaced_or_removed_shard_is_not_read_from_a_stale_file(tmp_path):
    path = make_store(tmp_path / "s.zarr", "float32")
    x = teacher_logits()
    shard = Path(path, "logits", "c", "0", "1", "0")
    with open_store(path) as store:
        np.testing.assert_array_equal(store.read_block(0, 0, N), x[0])
        bad = tmp_path / "bad"
        shutil.copy(shard, bad)
        with open(bad, "r+b") as f:  # flip a byte of the shard's first chunk
            f.seek(77)
            byte = f.read(1)
            f.seek(77)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.replace(bad, shard)  # a new file under the old name
        with pytest.raises(StoreCorruptError, match="chunk"):
            store.read_block(0, 0, N)
        os.remove(shard)
        with pytest.raises(StoreCorruptError):
            store.read_block(0, ROWS * PER_SHARD, 2 * ROWS * PER_SHARD)
        np.testing.assert_array_equal(store.read_block(0, 0, ROWS * PER_SHARD), x[0, :128])


def test_threads_share_a_store(tmp_path):
    path = make_store(tmp_path / "s.zarr", "float16")
    x = teacher_logits().astype(np.float16).astype(np.float32)
    errors = []
    with open_store(path) as store:
        store._shard_reader("logits").max_open = 2  # evictions while other threads read

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(40):
                v, a = int(rng.integers(V)), int(rng.integers(N - 1))
                b = int(rng.integers(a + 1, N + 1))
                if not np.array_equal(store.read_block(v, a, b), x[v, a:b]):
                    errors.append((v, a, b))

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


# ---- direct shard reads and writes vs zarr ------------------------------------------------------
@pytest.mark.parametrize("encoding", ["float32", "float16", "bfloat16", "int8", "topk"])
def test_direct_reads_and_writes_equal_zarr(tmp_path, encoding):
    path = make_store(tmp_path / "s.zarr", encoding, view_param_width=3)
    group = zarr.open_group(path, mode="r+")
    rows = np.unique(np.random.default_rng(1).integers(0, N, 300))
    with open_store(path) as store:
        for name in store.layout.arrays():
            assert store._shard_reader(name) is not None
            arr = group[name]
            sel = (2, rows) if arr.ndim == 2 else (2, rows, slice(None))
            np.testing.assert_array_equal(
                store._read_rows(name, 2, rows), arr.get_orthogonal_selection(sel)
            )
        assert store.verify().ok
    # Every shard file is byte for byte what zarr writes for the same rows.
    shard_rows = ROWS * PER_SHARD
    for name in ("logits", "stats"):
        for file in sorted(Path(path, name, "c").rglob("*")):
            if not file.is_file():
                continue
            v, s = (int(p) for p in file.relative_to(Path(path, name, "c")).parts[:2])
            ours = file.read_bytes()
            block = group[name][v, s * shard_rows : (s + 1) * shard_rows]
            group[name][v, s * shard_rows : (s + 1) * shard_rows] = block
            assert file.read_bytes() == ours, f"{file} differs from zarr's"


def test_all_zero_view_params_are_written_and_verify(tmp_path):
    """zarr leaves out chunks equal to the fill value (0 for view_params): we write them."""
    path = make_store(tmp_path / "s.zarr", "float32", view_param_width=3)
    with open_store(path) as store:
        assert store.verify().ok
        np.testing.assert_array_equal(store.read_array("view_params", np.arange(N), 0), 0)
        for c in range(store.layout.num_chunks):
            assert store.check_chunk(0, c) is None


def test_compressed_store_writes_fill_value_chunks(tmp_path):
    path = make_store(tmp_path / "s.zarr", "float32", view_param_width=3, compressor="zstd")
    with open_store(path) as store:
        assert store._shard_reader("view_params") is None
        assert store.verify().ok
