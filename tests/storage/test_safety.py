"""What a store never loses, and inputs refused before anything changes: creation races, a refused
overwrite, values an encoding cannot hold, and argument checks that name the problem."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from storage import (
    BadWriteError,
    NotAStoreError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    create_store,
    make_layout,
    open_store,
)
from storage.api import BACKENDS as BACKENDS_BY_NAME
from storage.layout import MIN_SHARDS, auto_chunks_per_shard
from storage.parallel import produce_and_write

BACKENDS = {"zarr": ".zarr", "hdf5": ".h5"}
N, C = 8, 3


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


def _path(tmp_path, backend: str, name: str = "s") -> str:
    return str(tmp_path / f"{name}{BACKENDS[backend]}")


def _filled(path: str, backend: str, value: float = 1.0) -> None:
    with create_store(path, N, C, chunk_rows=2, backend=backend) as store:
        store.write(0, 0, np.full((N, C), value, np.float32))


def test_a_creation_that_loses_a_race_leaves_the_winners_store(tmp_path, backend, monkeypatch):
    """Another process creates the store after this call looked: refused, the other kept."""
    path = _path(tmp_path, backend)
    cls = BACKENDS_BY_NAME[backend]
    original = cls.create.__func__

    def create_late(klass, *args, **kwargs):  # the other process wins in between
        monkeypatch.setattr(cls, "create", classmethod(original))
        _filled(path, backend, 5.0)
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "create", classmethod(create_late))
    with pytest.raises(StoreExistsError, match="by another process meanwhile") as err:
        create_store(path, N, C, chunk_rows=2, backend=backend)
    assert "\n" not in str(err.value)
    with open_store(path) as store:
        assert store.complete
        np.testing.assert_array_equal(store.read(np.arange(N)), 5.0)
    assert not [p for p in os.listdir(tmp_path) if ".creating-" in p]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"compressor": "lz4"}, r"unknown compressor 'lz4'"),
        ({"labels": np.arange(3)}, r"labels must be integers of shape \(8,\)"),
        ({"labels": np.full(N, 7)}, r"labels must lie in \[0, 2\]"),
        ({"fingerprint": {"seed": object()}}, r"fingerprint values must be strings, numbers"),
    ],
)
def test_a_refused_overwrite_keeps_the_old_store(tmp_path, backend, bad, message):
    path = _path(tmp_path, backend)
    _filled(path, backend, 3.0)
    with pytest.raises(StoreError, match=message):
        create_store(path, N, C, chunk_rows=2, backend=backend, overwrite=True, **bad)
    with open_store(path) as store:
        assert store.complete
        np.testing.assert_array_equal(store.read(np.arange(N)), 3.0)
    assert not [p for p in os.listdir(tmp_path) if ".replaced-" in p]


def test_an_overwrite_replaces_the_store_whole(tmp_path, backend):
    path = _path(tmp_path, backend)
    _filled(path, backend, 3.0)
    with create_store(path, N, C, chunk_rows=2, backend=backend, overwrite=True) as store:
        assert not store.done.any()
        store.write(0, 0, np.full((N, C), 4.0, np.float32))
    with open_store(path) as store:
        np.testing.assert_array_equal(store.read(np.arange(N)), 4.0)
    assert not [p for p in os.listdir(tmp_path) if ".replaced-" in p]


@pytest.mark.parametrize(
    "encoding, value, message",
    [
        ("topk", 7e4, r"beyond float16's range .* rows 9 \(topk keeps its values in float16\)"),
        ("topk", -7e4, r"beyond float16's range"),
        ("bfloat16", 3.4e38, r"beyond bfloat16's range \(\|x\| > 3.39e38\) in rows 9: use "),
        ("bfloat16", -3.4e38, r"beyond bfloat16's range"),
    ],
)
def test_values_an_encoding_cannot_hold_are_refused(tmp_path, encoding, value, message):
    """Not stored as inf (which verify would flag, and a repair would only write again)."""
    x = np.zeros((N, 40), np.float32)
    x[1] = value  # the whole row: the top-k keep it too
    with create_store(str(tmp_path / "s.zarr"), 16, 40, encoding=encoding, topk=4) as store:
        with pytest.raises(BadWriteError, match=message):
            store.write(0, 8, x)
        assert not store.done.any()
        x[1] = 3.38e38 if encoding == "bfloat16" else 6.5e4  # the largest it holds
        store.write(0, 8, x)
        store.write(0, 0, np.zeros((8, 40), np.float32))
    with open_store(str(tmp_path / "s.zarr")) as store:
        assert np.isfinite(store.read(np.arange(16))).all()


def test_write_arguments_are_checked(tmp_path, backend):
    path = _path(tmp_path, backend)
    with create_store(path, N, C, chunk_rows=4, backend=backend) as store:
        x = np.ones((4, C), np.float32)
        for view, start, name in ((0, 2.0, "start"), (0.5, 0, "view"), ("1", 0, "view")):
            with pytest.raises(BadWriteError, match=f"{name} must be an integer, got"):
                store.write(view, start, x)
        store.write(np.int64(0), np.int64(0), x)  # numpy integers are integers
        store.write(0, 2, x[:0])  # empty: nothing to write, wherever it starts
        store.write(0, 4, x)
        assert store.complete
        with pytest.raises(StoreError, match=r"has no row array 'scale': it holds logits, stats"):
            store.read_array("scale", [0])
        assert store.read_array("stats", [0]).shape == (1, 4)
    with open_store(path) as store, pytest.raises(StoreError, match="open it with mode='a'"):
        store.write_labels(np.zeros(N, np.int64))


def test_fingerprints_round_trip_as_json(tmp_path, backend):
    """A tuple comes back a list, a numpy integer a number: the store still matches its own."""
    path = _path(tmp_path, backend)
    fingerprint = {"seed": np.int64(3), "spec": ("crop", 4), "mean": np.float32(0.5)}
    create_store(path, N, C, backend=backend, fingerprint=fingerprint).close()
    with open_store(path, fingerprint=fingerprint) as store:
        assert store.fingerprint == {"seed": 3, "spec": ["crop", 4], "mean": 0.5}


def test_a_trailing_slash_names_the_store(tmp_path):
    path = str(tmp_path / "s.zarr")
    create_store(path + "/", N, C).close()
    with pytest.raises(StoreExistsError, match="--overwrite"):
        create_store(path + "/", N, C)
    assert os.listdir(tmp_path) == ["s.zarr"]


@pytest.mark.parametrize("drop, message", [
    ("schema_version", r"has no valid schema_version \(got None\): its metadata is damaged"),
    ("chunk_rows", r"lacks the attribute\(s\) chunk_rows: its metadata is damaged"),
])  # fmt: skip
def test_damaged_metadata_is_named(tmp_path, drop, message):
    path = str(tmp_path / "s.zarr")
    create_store(path, N, C, chunk_rows=2).close()
    meta_file = os.path.join(path, "zarr.json")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["attributes"][drop]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(NotAStoreError, match=message):
        open_store(path)


@pytest.mark.parametrize("array", ["logits", "view_params", "labels"])
@pytest.mark.parametrize("damage", ["cut", "removed"])
def test_damaged_array_metadata_is_named(tmp_path, array, damage):
    """An array's own zarr.json cut short or gone: a StoreCorruptError naming the file on first
    use (a JSONDecodeError traceback from zarr before 2026-11-27), not a crash."""
    path = str(tmp_path / "s.zarr")
    with create_store(path, N, C, chunk_rows=2, view_param_width=2) as store:
        store.write(0, 0, np.ones((N, C), np.float32), np.zeros((N, 2), np.int16))
    meta = os.path.join(path, array, "zarr.json")
    if damage == "cut":
        with open(meta, "rb") as f:
            data = f.read()
        with open(meta, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        os.remove(meta)
    use = {
        "logits": lambda s: s.read(np.arange(N)),
        "view_params": lambda s: s.read_array("view_params", np.arange(N)),
        "labels": lambda s: s.labels,
    }[array]
    named = f"the metadata of its {array} array \\({array}/zarr.json\\)"
    with open_store(path) as store, pytest.raises(StoreCorruptError, match=named) as caught:
        use(store)  # the first use of the damaged array names it
    assert len(str(caught.value).splitlines()) == 1


def test_a_producer_giving_the_wrong_row_count_fails_its_task(tmp_path):
    """A short block would wait for rows that never come and be dropped at close."""
    path = str(tmp_path / "s.zarr")
    create_store(path, N, C, chunk_rows=4, chunks_per_shard=2).close()
    with pytest.raises(StoreError, match=r"returned 3 row\(s\) for view 0 rows 0..7 \(8 expected"):
        produce_and_write(path, lambda v, a, b: np.ones((3, C), np.float32), 0, 0, N)
    with open_store(path) as store:
        assert not store.done.any()


@pytest.mark.parametrize("rows, classes", [(50_000, 100), (60_000, 10), (1_281_167, 1000)])
def test_a_view_has_several_shards(rows, classes):
    """The shard is the unit of writing, resume and dask tasks: a CIFAR-size view is not one."""
    layout = make_layout(rows, classes, 1, "float16")
    assert layout.num_shards >= min(MIN_SHARDS, layout.num_chunks)
    assert layout.num_shards <= layout.num_chunks
    assert layout.shard_rows * (classes * 2) <= 32 << 20


def test_a_shard_is_at_most_an_eighth_of_a_view():
    """As the README says; rounding up gave 9 chunks 5 shards of 2/9 (50,000 x 100 float16:
    7 shards; README audit, 2026-11-27)."""
    for chunks in range(1, 300):
        per_shard = auto_chunks_per_shard(64, 64 * chunks, 10, "float16")
        shards = -(-chunks // per_shard)
        assert shards >= min(MIN_SHARDS, chunks), chunks
        assert chunks < MIN_SHARDS or per_shard / chunks <= 1 / MIN_SHARDS, chunks
