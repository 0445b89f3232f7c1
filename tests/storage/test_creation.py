"""Creating a store is all or nothing, on both backends.

A store is built under ``PATH.creating-<hex>`` and renamed into place when whole; a creation that
fails removes its temporary build and its error names ``PATH``; what a creation killed half-way
left is removed by the next creation of the same path, unless a live process still holds it.
"""

from __future__ import annotations

import errno
import multiprocessing
import os

import numpy as np
import pytest

from storage import create_store, get_backend, open_store
from storage.locking import WriterLock

EXT = {"zarr": ".zarr", "hdf5": ".h5"}


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_failed_creation_leaves_nothing_and_names_the_path(tmp_path, monkeypatch, backend):
    path = tmp_path / f"s{EXT[backend]}"
    cls = get_backend(backend)
    real_build = cls._build

    def build_then_fail(building, *args):
        built = real_build(building, *args)
        if backend == "hdf5":
            built.close()
        # The disk fills up just after the empty arrays were made (the build is on disk).
        assert os.path.exists(building)
        name = os.path.join(building, "done") if backend == "zarr" else building
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    monkeypatch.setattr(cls, "_build", staticmethod(build_then_fail))
    with pytest.raises(OSError) as info:
        create_store(path, 64, 5, 1, chunk_rows=16, backend=backend)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename.startswith(str(path))
    assert ".creating-" not in info.value.filename
    assert not any(".creating-" in p.name for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    assert not path.exists()
    with create_store(path, 64, 5, 1, chunk_rows=16, backend=backend) as store:  # a rerun works
        store.write(0, 0, np.ones((64, 5), np.float32))
    with open_store(path) as store:
        assert store.complete


def _hold(lock_path, ready, release):
    lock = WriterLock(lock_path, str(lock_path.parent))
    lock.acquire()
    ready.set()
    release.wait(30)
    lock.release()


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_leftovers_of_a_killed_creation_go_but_a_live_one_stays(tmp_path, backend):
    path = tmp_path / f"s{EXT[backend]}"
    dead = tmp_path / f"{path.name}.creating-0123456789ab"
    if backend == "zarr":
        (dead / "logits").mkdir(parents=True)
        (dead / ".writer.lock").write_text("pid 1")  # nobody holds it: its creator died
    else:
        dead.write_bytes(b"half an HDF5 file")
    with create_store(path, 32, 4, 1, chunk_rows=16, backend=backend):
        pass
    assert not dead.exists()
    if backend == "hdf5":
        return  # HDF5 creations all take the lock beside the store: none can be live here
    live = tmp_path / f"{path.name}.creating-fedcba987654"
    live.mkdir()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(live / ".writer.lock", ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with create_store(path, 32, 4, 1, chunk_rows=16, backend=backend, overwrite=True):
            pass
        assert live.exists()  # another process is creating it right now
    finally:
        release.set()
        holder.join(30)


def test_a_path_the_os_refuses_is_not_called_missing_or_not_a_store(tmp_path, monkeypatch):
    """A symlink loop said "does not exist", an unreadable store "is not a logit store": the
    user then looks for the wrong fault. (Root reads any file, so the denial is injected.)"""
    from storage import NotAStoreError

    loop = tmp_path / "loop.zarr"
    loop.symlink_to(loop)
    with pytest.raises(NotAStoreError, match=r"loop.zarr cannot be opened \(Too many levels"):
        open_store(loop)
    path = tmp_path / "s.zarr"
    create_store(path, 8, 3).close()
    stat = os.stat

    def denied(p, *args, **kwargs):
        if str(p).endswith("zarr.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        open_store(path)
