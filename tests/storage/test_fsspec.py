"""Stores at fsspec URLs (shared or object storage): the zarr backend through zarr's FsspecStore.

``file://`` URLs run the whole shared suite (round trips, crash and resume, readers following a
writer, verify, parallel dask writes) through fsspec; ``memory://`` stands in for an object store
that only this process sees. HDF5 refuses URLs with one line.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from storage import (
    NotAStoreError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreWarning,
    create_store,
    open_store,
)
from storage.parallel import WorkerTaskError, write_parallel
from storage.urls import is_url
from tests.storage.conformance import (
    PER_SHARD,
    ROWS,
    C,
    LogitStoreTests,
    N,
    V,
    teacher_logits,
)
from tests.storage.producers import SeededLogits


def _local(url: str) -> str:
    return url.removeprefix("file://")


class FailsOnOneShard(SeededLogits):
    """A producer whose task for view 2, rows 0.. raises (as a broken worker would)."""

    def __call__(self, view: int, start: int, stop: int):
        if (view, start) == (2, 0):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return super().__call__(view, start, stop)


class TestZarrFileURL(LogitStoreTests):
    """The shared suite, every store addressed as ``file:///abs/path.zarr``."""

    backend = "zarr"
    suffix = ".zarr"

    def path(self, tmp_path: Path, name: str = "store") -> str:
        return f"file://{tmp_path}/{name}{self.suffix}"

    def chunk_byte(self, path: str, view: int, chunk: int) -> tuple[tuple[str, int], int]:
        (file, offset), chunk = super().chunk_byte(_local(path), view, chunk)
        return (file, offset), chunk

    def test_url_goes_through_fsspec_not_the_local_fast_path(self, tmp_path):
        path = self.path(tmp_path)
        with self.make(path, "float32") as store:
            self.fill(store, teacher_logits())
            assert store._shard_reader("logits") is None
            assert type(store._array("logits").store).__name__ == "FsspecStore"

    def test_same_bytes_as_a_store_on_a_local_path(self, tmp_path):
        """zarr through fsspec and the direct shard writer lay out the very same files."""
        url, local = self.path(tmp_path, "url"), str(tmp_path / "local.zarr")
        x = teacher_logits()
        for where in (url, local):
            with self.make(where, "bfloat16", view_param_width=3) as store:
                for v in range(V):
                    store.write(v, 0, x[v], np.full((N, 3), v, np.int16))
        names = ["logits", "stats", "view_params", "done", "labels"]
        files = sorted(
            str(p.relative_to(local))
            for name in names
            for p in Path(local, name).rglob("*")
            if p.is_file()
        )
        assert len(files) > V * 3
        for rel in files:
            assert Path(_local(url), rel).read_bytes() == Path(local, rel).read_bytes(), rel

    def test_leftover_partial_files_are_cleared_when_a_writer_opens(self, tmp_path):
        """A writer killed mid-write leaves ``NAME.HEX.partial`` (the atomic write's temporary
        file); the next writer of a file:// store removes it, as on a local path."""
        path = self.path(tmp_path)
        self.make(path, "float32").close()
        shard_dir = Path(_local(path), "logits", "c")
        shard_dir.mkdir(parents=True, exist_ok=True)
        left = shard_dir / f"0.{uuid.uuid4().hex}.partial"
        left.write_bytes(b"half a shard")
        with open_store(path, mode="r") as store:  # a reader leaves it alone
            assert store.layout.num_views == V
        assert left.exists()
        with open_store(path, mode="a") as store:
            self.fill(store, teacher_logits())
        assert not left.exists()
        assert not list(Path(_local(path)).rglob("*.partial"))

    def test_parallel_write_to_url_equals_serial_local(self, tmp_path):
        url, local = self.path(tmp_path, "par"), str(tmp_path / "serial.zarr")
        self.make(url, "float16", view_param_width=3).close()
        assert write_parallel(url, SeededLogits(C), workers=2) == V * -(-N // (ROWS * PER_SHARD))
        self.fill_serially(local, "float16")
        for name in ["logits", "stats", "view_params", "done", "labels"]:
            np.testing.assert_array_equal(self.raw(url, name), self.raw(local, name), name)
        with open_store(url) as store:
            assert store.complete and store.verify().ok

    def test_a_failing_task_is_one_line_and_a_rerun_finishes(self, tmp_path):
        url, local = self.path(tmp_path, "par"), str(tmp_path / "serial.zarr")
        self.make(url, "float16", view_param_width=3).close()
        with pytest.raises(WorkerTaskError) as info:
            write_parallel(url, FailsOnOneShard(C), workers=2)
        message = str(info.value)
        assert "\n" not in message, message
        assert message.startswith("the task for view 2 rows 0..127 failed on dask worker tcp://")
        cause = "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert message.endswith(cause), message
        with open_store(url) as store:
            assert not store.done[2, :PER_SHARD].any()  # the failed shard is not marked done
        assert write_parallel(url, SeededLogits(C), workers=2) >= 1  # the rerun resumes
        self.fill_serially(local, "float16")
        for name in ["logits", "stats", "view_params", "done"]:
            np.testing.assert_array_equal(self.raw(url, name), self.raw(local, name), name)


# ---- memory:// : an object store seen by this process only ---------------------------------------
@pytest.fixture
def memory_url():
    root = f"memory://logitbank-test-{uuid.uuid4().hex}"
    yield f"{root}/store.zarr"
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _make(path: str, encoding: str = "float32", **kw):
    kw = {"chunk_rows": ROWS, "chunks_per_shard": PER_SHARD, "labels": np.arange(N) % C, **kw}
    return create_store(path, N, C, V, encoding=encoding, **kw)


def test_memory_round_trip_resume_and_verify(memory_url):
    x = teacher_logits()
    with pytest.warns(StoreWarning), _make(memory_url, view_param_width=3) as store:
        store.write(0, 0, x[0], np.zeros((N, 3), np.int16))
        store.write(1, 0, x[1, :300], np.ones((300, 3), np.int16))  # 2 shards + a partial one
    with open_store(memory_url, mode="a") as store:  # resume
        missing = store.missing_shards()
        shards = store.layout.num_shards
        assert missing[0] == (1, 256, 384) and len(missing) == (shards - 2) + shards
        for v, a, b in missing:
            store.write(v, a, x[v, a:b], np.full((b - a, 3), v, np.int16))
        assert store.complete
    with open_store(memory_url) as store:
        assert is_url(store.path) and store.path == memory_url
        for v in range(V):
            np.testing.assert_array_equal(store.read(np.arange(N), view=v), x[v])
        np.testing.assert_array_equal(store.labels, np.arange(N) % C)
        assert store.verify().ok
    # Plain zarr opens it too (the store's format is public).
    group = zarr.open_group(memory_url, mode="r")
    np.testing.assert_array_equal(group["logits"][2], x[2])


def test_memory_verify_names_a_missing_or_damaged_shard(memory_url):
    with _make(memory_url) as store:
        for v in range(V):
            store.write(v, 0, teacher_logits()[v])
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.rm(f"{root}/stats/c/2/3/0")
    shard = f"{root}/logits/c/0/1/0"
    raw = bytearray(fs.cat_file(shard))
    raw[200] ^= 0xFF
    fs.pipe_file(shard, bytes(raw))
    with open_store(memory_url) as store:
        damaged = {(v, c): what for v, c, what in store.verify().damaged}
        assert set(damaged) == {(0, 2), (2, 6), (2, 7)}, damaged
        assert "file missing: stats/c/2/3/0" in damaged[(2, 6)]
        with pytest.raises(StoreCorruptError, match="run `python -m pipeline verify"):
            store.read(np.arange(ROWS * 2, ROWS * 3), view=0)


def test_memory_existing_store_and_overwrite(memory_url):
    _make(memory_url, fingerprint={"model": "a"}).close()
    with pytest.raises(StoreExistsError, match="pass --overwrite"):
        _make(memory_url)
    with _make(memory_url, overwrite=True, fingerprint={"model": "b"}) as store:
        assert store.fingerprint == {"model": "b"} and not store.done.any()
    other = memory_url.replace("store.zarr", "other")
    fsspec.filesystem("memory").pipe_file(other.removeprefix("memory://") + "/x.txt", b"hello")
    with pytest.raises(NotAStoreError, match="is not a logit store"):
        open_store(other)
    with pytest.raises(StoreExistsError, match="not a logit store"):
        _make(other, overwrite=True)
    with pytest.raises(NotAStoreError, match="does not exist"):
        open_store(memory_url + "-nothing")


def test_object_storage_has_no_writer_lock(memory_url):
    """No flock on object storage: the coordinator is the single writer by contract, so a
    second writer is not refused there (it is on paths and file:// URLs)."""
    first = _make(memory_url)
    second = open_store(memory_url, mode="a")
    second.close()
    first.close()


def test_dask_workers_cannot_reach_memory(memory_url):
    _make(memory_url).close()
    with pytest.raises(StoreError, match="dask workers cannot reach") as info:
        write_parallel(memory_url, SeededLogits(C), workers=2)
    assert "\n" not in str(info.value)


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///tmp/x/store.h5", "s3://bucket/store.h5"])
def test_hdf5_needs_a_local_path(url):
    for call in (
        lambda: create_store(url, N, C, backend="hdf5"),
        lambda: open_store(url),
    ):
        with pytest.raises(StoreError, match="hdf5 backend needs a local path") as info:
            call()
        assert "\n" not in str(info.value)


def test_unknown_protocol_or_missing_package_is_one_line():
    with pytest.raises(StoreError, match="Protocol not known: nosuchfs") as info:
        open_store("nosuchfs://bucket/store.zarr")
    assert "\n" not in str(info.value)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match="s3fs") as info:
            create_store("s3://bucket/store.zarr", N, C)
        assert "\n" not in str(info.value)


def test_only_an_object_stores_answer_is_explained_as_one():
    """remote_error: the storage client libraries' own error types (and OSErrors raised inside
    s3fs & co., tests/stages/test_s3.py), not any error of a library with a similar name."""
    import botocore.exceptions as botocore  # with s3fs, a test dependency
    import onnx  # a dependency of logitbank

    from storage.urls import remote_error

    refused = botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/x")
    message = remote_error(refused)
    assert message is not None and message.startswith(
        'object storage said: Could not connect to the endpoint URL: "http://127.0.0.1:9/b/x" '
        "(EndpointConnectionError): check the store's URL"
    )
    assert remote_error(TimeoutError()) is None  # raised here, not inside a storage client
    with pytest.raises(FileNotFoundError) as missing:
        Path("/nonexistent/logitbank/x").read_bytes()
    assert remote_error(missing.value) is None
    try:
        onnx.load_model_from_string(b"\x0a\xff\xff\xff")  # protobuf (google.*) refuses it
    except Exception as exc:
        assert remote_error(exc) is None
    else:
        pytest.fail("protobuf accepted a broken message")
