"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

``tempfile.mkstemp`` creates its file with mode 0600; a published result should get the usual
permissions (0666 less the umask), like any file ``open`` creates, so the other users of a shared
run directory can read a teacher or a checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give ``tmp`` the default file permissions and rename it over ``path`` (atomic)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def temp_beside(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder (same file system, so renaming is atomic),
    removed afterwards unless it was published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file, flushed to disk before it replaces the old one."""
    with temp_beside(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        publish(tmp, path)


def remove_stale_temps(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Remove the temporary files ``temp_beside`` left for ``names`` in ``folder`` when a process
    was killed mid-write (SIGKILL runs no ``finally``). Call it only where no other process may
    be writing those files (a run folder its one writer is resuming). Returns what was removed."""
    removed = []
    for name in names:
        for stale in Path(folder).glob(f".{glob.escape(name)}.*.tmp*"):  # .tmp.onnx(.data)
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def write_text_over_leftovers(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text record (a stage's resolved config, precompute's parity record)
    atomically, first removing the temporary files a kill mid-write (in its fsync, the long
    part) left beside it for good. Two commands writing it together may each take the other's
    temporary file for a leftover: a write whose own was removed writes again (a record that
    two runs of one folder write is the same record either way)."""
    path = Path(path)
    remove_stale_temps(path.parent, (path.name,))
    for attempt in range(3):
        try:
            with atomic_write(path, "w") as f:  # a kill leaves the old file or this one
                f.write(text)
            return
        except FileNotFoundError:  # our temporary file was removed as another's leftover
            if attempt == 2:
                raise
