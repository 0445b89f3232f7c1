"""Stores addressed by fsspec URLs: shared or object storage (DESIGN.md, "Scale").

    s3://bucket/run/store.zarr      needs s3fs (gs://: gcsfs, az://: adlfs)
    file:///shared/run/store.zarr   a (mounted) file system, through fsspec
    memory://store.zarr             one process's memory (tests)

Only the zarr backend takes URLs; they go through zarr's ``FsspecStore``, never the direct local
shard reader/writer (a mounted file system is faster as a plain path). Every write of a store is
one whole object (a shard, the ``done`` marks of a view, metadata): atomic on object storage, and
made atomic for ``file://`` URLs too (:class:`AtomicLocalFileSystem`). Credentials and other
options come from the filesystem's own configuration (environment variables such as
``AWS_PROFILE``, ``~/.aws``, or fsspec's ``FSSPEC_S3_*`` variables and config files), so that dask
workers pick them up the same way the coordinator does.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from storage.errors import StoreError

# "s3://…", "file://…", chained "simplecache::s3://…"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(?:::[A-Za-z][A-Za-z0-9+.\-]*)*://")
#: Protocols whose paths are files of this machine: a writer lock (flock) works there.
LOCAL_PROTOCOLS = ("file", "local")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def protocol(url: str) -> str:
    """The URL's outermost protocol ("s3" for "s3://b/x", "simplecache" for chained ones)."""
    return url.split("://", 1)[0].split("::", 1)[0].lower()


def is_local_url(url: str) -> bool:
    """A ``file://`` URL: a path on this machine's (possibly network-mounted) file system."""
    return protocol(url) in LOCAL_PROTOCOLS


class AtomicLocalFileSystem(LocalFileSystem):
    """fsspec's local file system, with each whole-file write made atomic (a temporary file
    renamed into place) as an object store's PUT is: a reader, or a writer killed half-way, never
    leaves half a ``done`` array or half a shard behind (fsspec's own writes in place, and a
    dask task reading ``done`` while the coordinator rewrote it saw an empty file)."""

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if mode == "create" and os.path.exists(path):
            raise FileExistsError(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def filesystem(url: str) -> tuple[Any, str]:
    """(synchronous fsspec filesystem, path inside it without a trailing '/') of a URL."""
    if is_local_url(url):
        fs = AtomicLocalFileSystem(auto_mkdir=True)
        return fs, fs._strip_protocol(url).rstrip("/") or "/"
    try:
        fs, root = url_to_fs(url)
    except ImportError as exc:  # fsspec names the package: "Install s3fs to access S3"
        raise StoreError(
            f"cannot open {url}: {_first_line(exc)}: pip install the filesystem package of "
            f"{protocol(url)}:// URLs (s3fs, gcsfs, adlfs, …) here and on every dask worker"
        ) from None
    except ValueError as exc:  # "Protocol not known: …"
        raise StoreError(
            f"cannot open {url}: {_first_line(exc)}; use a protocol fsspec knows "
            f"(file, s3, gs, az, memory, …) or a local path"
        ) from None
    return fs, root.rstrip("/") or root


#: Exception types of object stores' client libraries: the service's answer (refused
#: credentials, an endpoint that cannot be reached, a request it rejected), not a bug here.
_REMOTE_TYPES = (
    ("botocore.exceptions", "BotoCoreError"),
    ("botocore.exceptions", "ClientError"),
    ("aiohttp", "ClientError"),
    ("google.api_core.exceptions", "GoogleAPICallError"),
    ("google.auth.exceptions", "GoogleAuthError"),
    ("azure.core.exceptions", "AzureError"),
    ("gcsfs.retry", "HttpError"),  # gcsfs's own, for 4xx/5xx answers (not an OSError)
)
#: Filesystem packages that turn a service's answer into an OSError (s3fs: NoSuchBucket is a
#: FileNotFoundError, AccessDenied a PermissionError, a timeout a TimeoutError), raised in or
#: passing through their own code.
_REMOTE_FILESYSTEMS = frozenset(("s3fs", "gcsfs", "adlfs"))


def _remote_types() -> tuple[type, ...]:
    """Those of ``_REMOTE_TYPES`` whose module is already imported (an error of a library that
    was never imported cannot be in flight)."""
    found = []
    for module, name in _REMOTE_TYPES:
        loaded = sys.modules.get(module)
        kind = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


def remote_error(exc: BaseException) -> str | None:
    """One line for an error that an object store answered with, else None (then it is not
    this module's to explain): an exception of a storage client library's own error types, or
    an OSError raised in or passing through s3fs, gcsfs or adlfs."""
    remote = isinstance(exc, _remote_types())
    tb = exc.__traceback__
    while not remote and isinstance(exc, OSError) and tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        remote = module.split(".")[0] in _REMOTE_FILESYSTEMS
        tb = tb.tb_next
    if not remote:
        return None
    text = _first_line(exc)
    said = text if text == type(exc).__name__ else f"{text} ({type(exc).__name__})"
    return (
        f"object storage said: {said}: check the store's URL (does the bucket exist?), the "
        f"endpoint (AWS_ENDPOINT_URL for an S3-compatible service), the credentials and the "
        f"network; finished work is kept and a rerun resumes"
    )


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]
