"""sha256 of a dataset's files, each read once: later runs re-read only the files that changed.

An image-folder dataset's fingerprint hashes every encoded file. For ImageNet that is ~140 GB read
by every precompute (a no-op rerun and every resume too) and by every student's distill run (its
store check): minutes to tens of minutes each, before any work. The digests are kept, per folder,
in a cache file keyed by each file's (size, mtime, ctime, inode); a file whose stat differs is
hashed again. ctime cannot be set back by ``touch``-like tools and changes whenever a file's
bytes are written, so a file rewritten in place is never taken for the old one; a copy of the
dataset elsewhere is hashed once more. The fingerprint itself does not change: the same digests
go into it, cached or not.

The cache lives in ``$LOGITBANK_CACHE_DIR`` (default ``$XDG_CACHE_HOME/logitbank``, else
``~/.cache/logitbank``), one ``digests-<hash of the folder>.npz`` per folder, written whole and
atomically (a rename), read with ``allow_pickle=False``. ``LOGITBANK_CACHE_DIR=off`` turns it off.
A cache that cannot be read (damaged, another format) is ignored and rewritten; one that cannot be
written (a read-only home) leaves every run hashing, as without it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CACHE_ENV = "LOGITBANK_CACHE_DIR"
_FORMAT = 1


def cache_dir() -> Path | None:
    """Where the digest caches live, or None when ``LOGITBANK_CACHE_DIR=off``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no home (a container's user without one): no cache
            return None
    return Path(base) / "logitbank"


def _bytes(name: str) -> bytes:
    """A path's bytes: UTF-8, and the raw bytes of a name that is not UTF-8 (which Python holds
    as surrogates), so such names neither crash nor collide."""
    return name.encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _cache_path(root: Path) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256(_bytes(str(root.resolve()))).hexdigest()[:16]
    return folder / f"digests-{name}.npz"


def _load(path: Path | None) -> dict[str, tuple[tuple[int, int, int, int], bytes]]:
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt, raw = z["format"], z["names"]
            if fmt.shape != () or int(fmt) != _FORMAT or raw.dtype != np.uint8:
                return {}
            names = _text(bytes(raw)).split("\n") if raw.size else []
            stats, digests = z["stats"], z["digests"]
            if stats.shape != (len(names), 4) or digests.shape != (len(names), 32):
                return {}
            if stats.dtype != np.int64 or digests.dtype != np.uint8:
                return {}
            return {
                n: (tuple(int(v) for v in s), d.tobytes()) for n, s, d in zip(names, stats, digests)
            }
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return {}  # damaged or foreign: hashed again and rewritten


def _save(path: Path, entries: dict[str, tuple[tuple[int, int, int, int], bytes]]) -> None:
    names = list(entries)
    if any("\n" in n for n in names):
        return  # a file name with a newline: not cacheable in this format (hashed every time)
    stats = np.array([entries[n][0] for n in names], dtype=np.int64).reshape(-1, 4)
    digests = np.frombuffer(b"".join(entries[n][1] for n in names), np.uint8).reshape(-1, 32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.int64(_FORMAT),
                    names=np.frombuffer(_bytes("\n".join(names)), np.uint8),
                    stats=stats,
                    digests=digests,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only or full cache folder: the next run hashes again, nothing else


def file_digests(root: Path, files: list[Path]) -> list[bytes]:
    """The sha256 digest (32 bytes) of each file under ``root``, in order; files whose stat
    matches the cache are not read."""
    cache_file = _cache_path(root)
    cached = _load(cache_file)
    fresh: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
    out = []
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        key = _stat_key(path)
        hit = cached.get(name)
        if hit is not None and hit[0] == key:
            digest = hit[1]
        else:
            digest = hashlib.sha256(path.read_bytes()).digest()
            # A file written during its hashing (its stat moved): not cached, read next time.
            if _stat_key(path) != key:
                out.append(digest)
                continue
        fresh[name] = (key, digest)
        out.append(digest)
    if cache_file is not None and fresh != cached:  # new, changed or removed files
        _save(cache_file, fresh)
    return out
