"""One writer at a time: an advisory ``flock`` on a lock file beside (or inside) the store.

``flock`` is released by the kernel when the holder dies, SIGKILL included, so a crashed writer
never leaves a stale lock behind; the file's content (pid, host, time) only serves the message.
It needs a file system (local, or NFS, where Linux emulates it with byte-range locks): a store on
object storage has no writer lock, its single writer being the coordinator by contract (see
``storage.zarr_backend``) — a lock object there would outlive a killed writer.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
import time
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
