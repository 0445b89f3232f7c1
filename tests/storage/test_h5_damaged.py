"""A damaged .h5 store is refused at once with one line; it never hangs ``open_store``.

HDF5's SWMR readers retry a metadata block whose checksum fails with doubling sleeps, for ever in
practice, and skip the end-of-file check: before the fix, a store cut inside its metadata or with a
bit flipped in it made ``open_store`` (so verify, audit, distill and precompute's resume) hang.
Every open of a damaged file therefore runs in a child process that SIGALRM kills (its default
action works even inside HDF5's C code), so a regression fails these tests instead of hanging them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from storage import StoreCorruptError, create_store, open_store
from tests.storage.conformance import run_python

N, C, ROWS = 1000, 10, 64
HANG_S = 10  # the child dies after this long; a damaged file must be refused far sooner
PROMPT_S = 3.0
FIX = "delete it and run precompute again"

# Opens sys.argv[1], then runs sys.argv[3] on `store`; prints "opened", or the StoreError.
CHILD = """
import signal, sys, time
import numpy as np
from storage import StoreError, open_store
signal.alarm(int(sys.argv[2]))
t0 = time.monotonic()
try:
    with open_store(sys.argv[1]) as store:
        exec(sys.argv[3])
    print("opened")
except StoreError as exc:
    print(f"{type(exc).__name__}|{time.monotonic() - t0:.3f}|{exc}")
"""


def open_in_child(path: Path, then: str = "") -> tuple[str, float, str]:
    """``open_store(path)`` in a child: ("opened", 0, "") or (error class, seconds, message)."""
    child = run_python(CHILD, str(path), str(HANG_S), then, timeout=120)
    if child.returncode == -signal.SIGALRM:
        pytest.fail(f"open_store({path.name}) hung: killed after {HANG_S} s")
    assert child.returncode == 0 and not child.stderr, child.stderr  # no traceback
    out = child.stdout.strip()
    assert "\n" not in out, out
    if out == "opened":
        return out, 0.0, ""
    kind, seconds, message = out.split("|", 2)
    return kind, float(seconds), message


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    """The bytes of a whole, finished store (written by a writer that closed it)."""
    path = tmp_path_factory.mktemp("good") / "s.h5"
    x = np.random.default_rng(0).normal(size=(N, C)).astype(np.float32)
    with create_store(path, N, C, backend="hdf5", chunk_rows=ROWS) as store:
        store.write(0, 0, x)
    return path.read_bytes()


def _cut(at):
    return lambda data: data[: at(data) if callable(at) else at]


def _flip(at):
    def flip(data: bytes) -> bytes:
        out = bytearray(data)
        out[at(data) if callable(at) else at] ^= 1
        return bytes(out)

    return flip


def _header(k: int):
    """The offset of a byte inside the k-th object header (0: the root group's)."""

    def at(data: bytes) -> int:
        found = -1
        for _ in range(k + 1):
            found = data.index(b"OHDR", found + 1)
        return found + 10

    return at


DAMAGE = {
    "the signature alone": _cut(8),
    "cut to 40 bytes (inside the superblock)": _cut(40),
    "cut just after the superblock": _cut(100),
    "cut inside the metadata (4000 bytes)": _cut(4000),
    "cut inside the root group's object header": _cut(_header(0)),
    "a bit flipped in the superblock's end-of-file address": _flip(30),
    "a bit flipped in the superblock's flags": _flip(11),
    "a bit flipped in the root group's object header": _flip(_header(0)),
    "a bit flipped in a dataset's object header": _flip(_header(1)),
    "zeros after the signature": lambda data: data[:8] + bytes(100),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_file_is_refused_at_once_with_one_line(tmp_path, good, damage):
    path = tmp_path / "s.h5"
    path.write_bytes(DAMAGE[damage](good))
    kind, seconds, message = open_in_child(path)
    assert kind == StoreCorruptError.__name__, (kind, message)
    assert seconds < PROMPT_S, f"refused only after {seconds} s: {message}"
    assert f"store {path} is damaged" in message and message.endswith(FIX), message


def test_a_file_cut_inside_its_data_still_opens_and_names_the_lost_rows(tmp_path, good):
    """SWMR's skipped end-of-file check is what lets it open: verify then names the chunks."""
    path = tmp_path / "s.h5"
    path.write_bytes(good)
    with h5py.File(path, "r") as f:
        info = f["logits"].id.get_chunk_info_by_coord((0, N - 1, 0))
    os.truncate(path, info.byte_offset + info.size // 2)  # inside the last logits chunk
    then = f"""
store.read(np.arange({ROWS}))
try:
    store.read([{N - 1}])
except StoreError as exc:
    print("refused:", exc)
"""
    child = run_python(CHILD, str(path), str(HANG_S), then, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "is truncated" in child.stdout and child.stdout.strip().endswith("opened"), child.stdout


def test_a_store_being_written_opens_for_reading(tmp_path):
    """A live SWMR writer (its write flags set, its end-of-file address stale) is no damage."""
    path = tmp_path / "s.h5"
    x = np.random.default_rng(1).normal(size=(N, C)).astype(np.float32)
    with create_store(path, N, C, backend="hdf5", chunk_rows=ROWS, chunks_per_shard=1) as store:
        store.write(0, 0, x[: 4 * ROWS])
        then = f"print(int(store.done.sum()), float(store.read(np.arange({4 * ROWS}))[-1, 0]))"
        child = run_python(CHILD, str(path), str(HANG_S), then, timeout=120)
        assert child.returncode == 0, child.stderr
        done, last = child.stdout.split()[:2]
        assert int(done) == 4 and float(last) == pytest.approx(x[4 * ROWS - 1, 0], rel=1e-2)


def test_a_store_whose_writer_was_killed_opens_for_reading(tmp_path):
    path = tmp_path / "s.h5"
    child = run_python(f"""
        import os, signal, numpy as np
        from storage import create_store
        s = create_store({str(path)!r}, {N}, {C}, backend="hdf5", chunk_rows={ROWS},
                         chunks_per_shard=1)
        s.write(0, 0, np.ones(({2 * ROWS}, {C}), np.float32))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert open_in_child(path, "assert store.done.sum() == 2") == ("opened", 0.0, "")


def test_swmr_read_attempts_are_capped():
    """The cap is what turns metadata damage anywhere in the file into an error, not a hang."""
    from storage.h5_backend import READ_ATTEMPTS, _read_attempts_setter

    assert _read_attempts_setter() is not None, "H5Pset_metadata_read_attempts not found"
    assert 2**READ_ATTEMPTS * 1e-9 < 1.0  # the retries' sleeps add up to under a second


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_store_is_created_in_a_folder_that_does_not_exist_yet(tmp_path, backend):
    path = tmp_path / "new" / "folder" / ("s.zarr" if backend == "zarr" else "s.h5")
    with create_store(path, 64, 5, backend=backend, chunk_rows=16) as store:
        store.write(0, 0, np.ones((64, 5), np.float32))
    with open_store(path) as store:
        assert store.complete


def test_hdf5s_own_file_lock_is_waited_for_then_named(monkeypatch):
    """HDF5 flocks a file for the length of an open (and a writer until it switches to SWMR):
    a reader opening just then met a raw BlockingIOError. Opens now retry while the lock is held,
    and a lock that stays is one line."""
    from storage import StoreError, h5_backend

    tries = []

    def busy_then_open():
        tries.append(1)
        if len(tries) < 4:
            raise BlockingIOError(11, "unable to lock file")
        return "opened"

    assert h5_backend._while_locked("s.h5", busy_then_open) == "opened" and len(tries) == 4

    def always_busy():
        raise BlockingIOError(11, "unable to lock file")

    monkeypatch.setattr(h5_backend, "LOCK_WAIT_S", 0.05)
    with pytest.raises(
        StoreError, match=r"store s.h5 stayed locked by another process's HDF5 open"
    ):
        h5_backend._while_locked("s.h5", always_busy)
