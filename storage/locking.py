"""One writer at a time: an advisory ``flock`` on a lock file beside (or inside) the store.

``flock`` is released by the kernel when the holder dies, SIGKILL included, so a crashed writer
never leaves a stale lock behind; the file's content (pid, host, time) only serves the message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from storage.errors import WriterLockedError


class WriterLock:
    """An exclusive, non-blocking lock held for the life of a writer."""

    def __init__(self, lock_path: Path, store_path: str) -> None:
        self.lock_path = lock_path
        self.store_path = store_path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
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
