"""One writer at a time: an advisory ``flock`` on a lock file beside (or inside) the store.

``flock`` is released by the kernel when the holder dies, SIGKILL included, so a crashed writer
never leaves a stale lock behind; the file's content (pid, host, time) only serves the message.
It needs a file system (local, or NFS, where Linux emulates it with byte-range locks): a store on
object storage has no writer lock, its single writer being the coordinator by contract (see
``storage.zarr_backend``) — a lock object there would outlive a killed writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from storage.errors import WriterLockedError


class WriterLock:
    """An exclusive, non-blocking lock held for the life of a writer."""

    def __init__(
        self,
        lock_path: Path,
        store_path: str,
        busy: Callable[[str], Exception] | None = None,
    ) -> None:
        """``busy(holder)``: the error when another process holds the lock (default: the
        store's ``WriterLockedError``); ``holder`` names it (pid, host, since when)."""
        self.lock_path = lock_path
        self.store_path = store_path
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            if self.busy is not None:
                raise self.busy(holder) from None
            raise WriterLockedError(
                f"store {self.store_path} is being written by another process ({holder}): "
                f"wait for it to finish or stop it; one writer at a time"
            ) from None
        os.ftruncate(fd, 0)
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_abandoned(final: str, lock_name: str | None) -> list[str]:
    """Remove what creations of ``final`` killed half-way left: ``FINAL.creating-*`` siblings.

    ``lock_name``: the writer lock inside each (a zarr directory) — one still held belongs to a
    creation in progress and stays; None when the caller holds the lock that covers them all
    (HDF5's lock file beside the store). Returns the paths removed.
    """
    parent, name = os.path.split(os.path.abspath(final))
    removed = []
    for leftover in sorted(Path(parent).glob(f"{glob.escape(name)}.creating-*")):
        lock = None
        if lock_name is not None and leftover.is_dir():
            lock = WriterLock(leftover / lock_name, str(leftover))
            try:
                lock.acquire()
            except (WriterLockedError, OSError):
                continue  # another process is creating it right now
        try:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(str(leftover))
        finally:
            if lock is not None:
                lock.release()
    return removed


# ---- a store replaced by ``create_store(overwrite=True)`` ----------------------------------------
# The old store is renamed aside to FINAL.replaced-<hex> while the new one is built, and removed
# once the new one is in place. The overwrite holds the aside's guard lock (FINAL.replaced-<hex>
# .lock, taken before the rename) from the rename to the end: an aside whose guard nobody holds
# was left by an overwrite killed half-way. Before its removal an aside is renamed to
# FINAL.removing-<hex>, so an aside under its .replaced- name is always a whole store.
_HEX = r"[0-9a-f]{12}"


def new_aside(final: str) -> tuple[str, WriterLock]:
    """A free FINAL.replaced-<hex> name for the store being replaced, and its guard, held."""
    while True:
        aside = f"{final}.replaced-{uuid.uuid4().hex[:12]}"
        guard = _take_guard(aside, quiet=False)  # a folder we cannot write: its OSError
        if guard is not None and not os.path.lexists(aside):
            return aside, guard
        if guard is not None:
            guard.release()


def _take_guard(aside: str, quiet: bool = True) -> WriterLock | None:
    """The guard lock of ``aside``, taken; None when another process holds it (or, ``quiet``,
    when it cannot be made). A guard file that a sweep unlinked while this process was locking
    it does not count: taken again."""
    path = Path(f"{aside}.lock")
    while True:
        lock = WriterLock(path, aside)
        try:
            lock.acquire()
        except WriterLockedError:
            return None
        except OSError:
            if quiet:
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(lock._fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return lock
        lock.release()


def drop_guard(aside: str, guard: WriterLock) -> None:
    """Release the guard of an aside that is gone (put back or removed), and delete its file."""
    with contextlib.suppress(OSError):
        os.unlink(f"{aside}.lock")
    guard.release()


def discard_aside(aside: str, guard: WriterLock) -> None:
    """Remove a replaced store: first renamed to FINAL.removing-<hex> (a removal cut short is
    then never taken for a whole store), then deleted."""
    final, _, tag = aside.rpartition(".replaced-")
    doomed = f"{final}.removing-{tag}"
    try:
        os.rename(aside, doomed)
    except OSError:
        guard.release()  # left whole, under its name: a later sweep removes it
        return
    drop_guard(aside, guard)
    _delete(doomed)


def put_back(aside: str, final: str) -> bool:
    """Move a replaced store back to ``final`` unless something is there (never replacing it,
    even if it appeared a moment ago); whether it moved."""
    try:
        if os.path.isdir(aside) and not os.path.islink(aside):
            os.rename(aside, final)  # a directory never replaces a non-empty one
            return True
        try:
            os.link(aside, final)  # a file: link + unlink, which never replaces one either
        except OSError as exc:
            if exc.errno == errno.EEXIST or os.path.lexists(final):
                return False
            os.rename(aside, final)  # a file system without hard links
            return True
        os.unlink(aside)
    except OSError:
        return False
    return True


def sweep_replaced(final: str, is_store: Callable[[str], bool]) -> tuple[str | None, list[str]]:
    """Clean up after overwrites of ``final`` that were killed half-way.

    With nothing at ``final`` (killed while the new store was being built), the newest replaced
    store goes back there: what the interrupted command would have replaced is not lost. Once a
    store is at ``final``, the replaced ones left beside it are removed, as well as removals cut
    short. While another process holds an aside's guard (an overwrite in progress) no replaced
    store is touched. Returns (the aside put back or None, the paths removed).
    """
    removed = []
    for doomed in _siblings(final, rf"\.removing-{_HEX}"):
        _delete(doomed)
        removed.append(doomed)
    taken = []
    for aside in replaced_stores(final):
        guard = _take_guard(aside)
        if guard is None:  # an overwrite of final in progress: it cleans up after itself
            for _, held in taken:
                held.release()
            return None, removed
        taken.append((aside, guard))
    restored = None
    pending = list(taken)
    try:
        while pending:
            aside, guard = pending[0]
            if not os.path.lexists(aside):  # another sweep took care of it
                drop_guard(aside, guard)
            elif restored is None and not os.path.lexists(final) and put_back(aside, final):
                restored = aside
                drop_guard(aside, guard)
            elif is_store(final):
                discard_aside(aside, guard)
                removed.append(aside)
            else:
                guard.release()  # something else is at final: left as it is
            pending.pop(0)
    finally:  # is_store raised (a damaged store at final): no guard stays held by us
        for _, guard in pending:
            guard.release()
    for lock in _siblings(final, rf"\.replaced-{_HEX}\.lock"):
        aside = lock[: -len(".lock")]  # a guard whose aside is gone (killed at its end)
        if not os.path.lexists(aside) and (guard := _take_guard(aside)) is not None:
            if os.path.lexists(aside):
                guard.release()
            else:
                drop_guard(aside, guard)
    return restored, removed


def replaced_stores(final: str) -> list[str]:
    """The FINAL.replaced-<hex> stores beside ``final``, the newest first."""

    def changed(path: str) -> float:
        with contextlib.suppress(OSError):
            return os.lstat(path).st_ctime  # set by the rename aside
        return 0.0

    return sorted(_siblings(final, rf"\.replaced-{_HEX}"), key=changed, reverse=True)


def _siblings(final: str, suffix: str) -> list[str]:
    """Paths beside ``final`` named FINAL + a match of the regular expression ``suffix``."""
    parent, name = os.path.split(os.path.abspath(final))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    pattern = re.compile(re.escape(name) + suffix)
    return [os.path.join(parent, e) for e in sorted(entries) if pattern.fullmatch(e)]


def _delete(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
