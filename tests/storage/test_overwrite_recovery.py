"""An overwrite (``create_store(overwrite=True)``) killed half-way leaves nothing behind for good:
the old store goes back when no new one was made, and what is left beside a store is removed by
the next writer's open or create. An overwrite in progress is never disturbed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from storage import NotAStoreError, StoreWarning, create_store, open_store
from storage.api import BACKENDS as BACKENDS_BY_NAME

SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
N, C = 8, 3


@pytest.fixture(params=list(SUFFIX))
def backend(request) -> str:
    return request.param


def _filled(path: str, backend: str, value: float) -> None:
    with create_store(path, N, C, chunk_rows=2, backend=backend) as store:
        store.write(0, 0, np.full((N, C), value, np.float32))


def _overwrite_killed(path: str, backend: str, where: str) -> None:
    """Run ``create_store(path, overwrite=True)`` in a child that dies (``os._exit``, no cleanup
    runs, as on SIGKILL) at ``where``: "create" while the new store is built, "remove" when the
    replaced store is about to be deleted."""
    code = textwrap.dedent(f"""
        import os, shutil
        import storage.api as api
        from storage import create_store
        def die(*args, **kwargs):
            os._exit(9)
        if {where!r} == "create":
            api.BACKENDS[{backend!r}].create = classmethod(die)
        else:
            rmtree, unlink, remove = shutil.rmtree, os.unlink, os.remove
            def guarded(real):
                def call(path, *args, **kwargs):
                    name = os.fspath(path)
                    if (".replaced-" in name or ".removing-" in name) and not name.endswith(
                        ".lock"
                    ):
                        die()
                    return real(path, *args, **kwargs)
                return call
            shutil.rmtree, os.unlink, os.remove = guarded(rmtree), guarded(unlink), guarded(remove)
        create_store({path!r}, {N}, {C}, chunk_rows=2, backend={backend!r}, overwrite=True)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr


def _beside(tmp_path) -> list[str]:
    """What is in the folder besides HDF5's writer lock files (which stay, as always)."""
    return sorted(p for p in os.listdir(tmp_path) if not p.endswith(f"{SUFFIX['hdf5']}.lock"))


def _values(path: str) -> float:
    with open_store(path) as store:
        assert store.complete
        values = store.read(np.arange(N))
    assert (values == values[0, 0]).all()
    return float(values[0, 0])


def test_an_overwrite_killed_while_building_puts_the_old_store_back(tmp_path, backend):
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 3.0)
    _overwrite_killed(path, backend, "create")
    assert not os.path.lexists(path)  # the old store waits aside
    with pytest.raises(NotAStoreError, match=r"an overwrite replaces waits at .*replaced-"):
        open_store(path)  # a reader is told, and changes nothing
    with pytest.warns(StoreWarning, match="is back in place"):
        open_store(path, mode="a").close()  # what a precompute rerun does first
    assert _values(path) == 3.0
    assert _beside(tmp_path) == [os.path.basename(path)]


def test_the_rerun_of_a_killed_overwrite_replaces_the_store(tmp_path, backend):
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 3.0)
    _overwrite_killed(path, backend, "create")
    with pytest.warns(StoreWarning, match="is back in place"):
        store = create_store(path, N, C, chunk_rows=2, backend=backend, overwrite=True)
    with store:
        store.write(0, 0, np.full((N, C), 4.0, np.float32))
    assert _values(path) == 4.0
    assert _beside(tmp_path) == [os.path.basename(path)]


def test_a_killed_removal_of_the_replaced_store_is_swept_up(tmp_path, backend):
    """Killed after the new store was in place, while the old one was being removed: the next
    open for writing removes the rest, and never takes it for a whole store."""
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 3.0)
    _overwrite_killed(path, backend, "remove")
    assert len(_beside(tmp_path)) > 1  # the new (empty) store and what the kill left
    with pytest.warns(StoreWarning, match="removed"):
        store = open_store(path, mode="a")
    with store:
        assert not store.done.any()  # the new store, as the overwrite asked
        store.write(0, 0, np.full((N, C), 5.0, np.float32))
    assert _values(path) == 5.0
    assert _beside(tmp_path) == [os.path.basename(path)]


def test_a_replaced_store_left_beside_a_store_is_removed(tmp_path, backend):
    """As an overwrite killed before 2026-12 left it: under its .replaced- name, next to the
    store a rerun made. Removed by the next writer, the store itself untouched."""
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 3.0)
    copy = shutil.copytree if backend == "zarr" else shutil.copyfile
    copy(path, f"{path}.replaced-0123456789ab")
    with create_store(str(tmp_path / f"other{SUFFIX[backend]}"), N, C, backend=backend):
        pass  # another store's creation leaves it alone
    assert os.path.lexists(f"{path}.replaced-0123456789ab")
    with pytest.warns(StoreWarning, match=r"removed s\.(zarr|h5)\.replaced-0123456789ab"):
        open_store(path, mode="a").close()
    assert _values(path) == 3.0
    assert _beside(tmp_path) == sorted([os.path.basename(path), f"other{SUFFIX[backend]}"])


def test_an_overwrite_in_progress_is_left_alone(tmp_path, backend, monkeypatch):
    """While the new store is built, the old one is aside with nothing at the path: another
    writer's open then must neither put it back nor remove it."""
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 3.0)
    cls = BACKENDS_BY_NAME[backend]
    original = cls.create.__func__
    seen = []

    def create_watched(klass, *args, **kwargs):
        asides = [p for p in os.listdir(tmp_path) if ".replaced-" in p and p[-5:] != ".lock"]
        with pytest.raises(NotAStoreError, match="does not exist"):
            open_store(path, mode="a")  # in this process: its own guard is taken all the same
        seen.extend(p for p in asides if os.path.lexists(tmp_path / p))
        assert not os.path.lexists(path)
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "create", classmethod(create_watched))
    with create_store(path, N, C, chunk_rows=2, backend=backend, overwrite=True) as store:
        store.write(0, 0, np.full((N, C), 6.0, np.float32))
    assert len(seen) == 1
    assert _values(path) == 6.0
    assert _beside(tmp_path) == [os.path.basename(path)]


def test_a_failed_overwrite_never_puts_the_old_store_over_a_new_one(tmp_path, backend):
    """The overwrite's new store cannot be made because another process made one at the path
    meanwhile: the old store waits aside (a later sweep removes it), and the other process's
    store stays; it was replaced by the rename back (a file rename replaces a file)."""
    path = str(tmp_path / f"s{SUFFIX[backend]}")
    _filled(path, backend, 1.0)
    cls = BACKENDS_BY_NAME[backend]
    real = cls.create.__func__

    def create(klass, where, *args, **kwargs):  # process B finishes its store first
        other = real(klass, where, *args, **kwargs)
        other.write(0, 0, np.full((N, C), 2.0, np.float32))
        other.close()
        return real(klass, where, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "create", classmethod(create))
        with pytest.raises(Exception, match="created at .* by another process meanwhile"):
            create_store(path, N, C, chunk_rows=2, backend=backend, overwrite=True)
    with open_store(path) as store:
        assert store.read(np.arange(N))[0, 0] == 2.0  # B's store, not the old one


def test_a_damaged_store_at_the_path_leaves_no_guard_held(tmp_path):
    """A sweep whose look at the path fails (a damaged .h5 there) releases the guards it took:
    other processes would otherwise take the replaced stores for an overwrite in progress."""
    import fcntl

    from storage import StoreError

    path = str(tmp_path / "s.h5")
    _filled(path, "hdf5", 1.0)
    shutil.copyfile(path, path + ".replaced-0123456789ab")  # left by an overwrite killed long ago
    data = bytearray(Path(path).read_bytes())
    data[30] ^= 1  # a flipped bit in the superblock
    Path(path).write_bytes(bytes(data))
    with pytest.raises(StoreError):
        open_store(path, mode="a")
    fd = os.open(path + ".replaced-0123456789ab.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held
    finally:
        os.close(fd)


def test_an_hdf5_create_never_renames_over_a_store_put_back_meanwhile(tmp_path):
    """A cleanup puts a replaced store back while a creator, which saw nothing at the path, is
    building its file: the creator is refused; it replaced the store put back (a rename)."""
    from storage import StoreExistsError, h5_backend, locking, make_layout
    from storage.api import _read_attrs_any

    path = str(tmp_path / "s.h5")
    _filled(path, "hdf5", 1.0)
    os.rename(path, path + ".replaced-0123456789ab")  # an overwrite killed while building
    real_build = h5_backend.H5LogitStore._build

    def build(*args, **kwargs):
        f = real_build(*args, **kwargs)
        locking.sweep_replaced(path, lambda p: _read_attrs_any(p) is not None)  # put back
        return f

    layout = make_layout(N, C, chunk_rows=2)
    attrs = {"format": "logitbank", "schema_version": 1, **layout.to_attrs(), "fingerprint": {}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h5_backend.H5LogitStore, "_build", staticmethod(build))
        with pytest.raises(StoreExistsError, match="by another process meanwhile"):
            h5_backend.H5LogitStore.create(path, layout, attrs, None, None)
    with open_store(path) as store:
        assert store.read(np.arange(N))[0, 0] == 1.0  # the store put back, untouched
