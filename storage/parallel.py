"""Filling a store in parallel with dask: each task owns whole shards, so writes never collide.

The coordinator holds the writer lock and is the only one to touch ``done``: a task writes its
shards' data (zarr: straight into the shard files) and reports back; the coordinator marks them
done as they complete. A crash anywhere therefore loses at most the shards in flight, which a
rerun computes again. HDF5 has one file and one writer, so its tasks send their rows back to the
coordinator, encoded, and it writes them. Either way the result is byte-identical to a serial
write: the encoding of a row depends on that row alone. A task computes its shard a block of rows
at a time (``storage.layout.TASK_BLOCK_BYTES`` of raw float32): shards are sized by their bytes on
disk, and with topk at large C a shard's raw logits would be hundreds of times that.

On a dask.distributed cluster the workers are other processes, usually on other machines: the
store's path is made absolute (it must be the same path on every worker: shared storage, or an
fsspec URL), workers that offer a ``GPU`` resource (``dask worker --resources GPU=1``) get one task
per GPU at a time, and an exception in a task comes back as one line naming the task, the worker
and the cause (:class:`WorkerTaskError`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from storage import urls
from storage.api import open_store
from storage.base import StoreWarning, encode_rows
from storage.errors import StoreError
from storage.layout import Layout, task_block_rows

#: ``produce(view, start, stop)`` → float logits (stop - start, C), or (logits, view_params). It may
#: have a ``describe()`` method naming the device it runs on (reported per task).
Producer = Callable[[int, int, int], Any]
#: Packages whose exceptions are one line naming the problem and the fix already (shown as they
#: are; any other exception is shown with its type).
OWN_PACKAGES = ("storage", "pipeline", "stages")
#: How long a run on an existing cluster waits for its first worker.
WORKER_WAIT_S = 120.0


def _split(result: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(result, tuple):
        return result[0], result[1]
    return result, None


def _produced(produce: Producer, view: int, start: int, stop: int) -> tuple[Any, Any]:
    """(logits, view_params) of ``produce(view, start, stop)``, refused unless it gave exactly
    the task's rows (a short block would be dropped at close, and the task reported done)."""
    logits, params = _split(produce(view, start, stop))
    if len(logits) != stop - start:
        raise StoreError(
            f"the producer returned {len(logits)} row(s) for view {view} rows {start}..{stop - 1}"
            f" ({stop - start} expected): it must return exactly the rows it is asked for"
        )
    return logits, params


class WorkerTaskError(StoreError):
    """A task failed on a dask worker (or the workers died running it): one line that names the
    task's rows, the worker and the cause."""


def _worker_name() -> str:
    """Where this runs: "dask worker tcp://… (host, pid n)" in a dask task, else "(host, pid n)"."""
    where = f"{socket.gethostname()}, pid {os.getpid()}"
    try:
        from distributed import get_worker

        return f"dask worker {get_worker().address} ({where})"
    except (ImportError, ValueError):  # not inside a dask worker
        return f"({where})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [""])[0][:300]


def _task_name(view: int, start: int, stop: int) -> str:
    return f"the task for view {view} rows {start}..{stop - 1}"


def _run_task(produce: Producer, view: int, start: int, stop: int, body: Callable) -> dict:
    """Run a task body on a worker; any exception becomes a :class:`WorkerTaskError` (a plain,
    picklable message: the worker's own exception types need not exist on the coordinator)."""
    try:
        out = body()
    except Exception as exc:
        cause = _first_line(exc)
        if type(exc).__module__.split(".")[0] not in OWN_PACKAGES or not cause:
            cause = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
        raise WorkerTaskError(
            f"{_task_name(view, start, stop)} failed on {_worker_name()}: {cause}"
        ) from exc
    describe = getattr(produce, "describe", None)
    return {
        **out,
        "view": view,
        "rows": stop - start,
        "worker": _worker_name(),
        "device": describe() if callable(describe) else None,
    }


def produce_and_write(path: str, produce: Producer, view: int, start: int, stop: int) -> dict:
    """Task body for backends that take parallel writes: compute one shard and write it, a block
    of rows at a time (:func:`task_blocks`), so that the task holds the shard encoded and one
    block raw, never the whole shard as raw float32."""

    def body() -> dict:
        store = open_store(path, mode="task")
        try:
            for a, b in task_blocks(store.layout, produce, start, stop):
                logits, params = _produced(produce, view, a, b)
                store.write(view, a, logits, params)
                del logits, params  # before the next block is computed
        except BaseException:
            with warnings.catch_warnings():  # the task failed: its part-filled shard goes
                warnings.simplefilter("ignore", StoreWarning)
                store.close()
            raise
        store.close()
        return {"shards": store.written_shards}

    return _run_task(produce, view, start, stop, body)


def produce_only(layout: Layout, produce: Producer, view: int, start: int, stop: int) -> dict:
    """Task body for single-writer backends: compute one shard, a block of rows at a time, and
    hand it to the coordinator encoded (as it will be stored: with topk hundreds of times smaller
    than raw float32), for :meth:`LogitStore.write_encoded`."""

    def body() -> dict:
        parts: dict[str, np.ndarray] = {}
        for a, b in task_blocks(layout, produce, start, stop):
            logits, params = _produced(produce, view, a, b)
            block = encode_rows(layout, a, logits, params)
            del logits, params
            for name, part in block.items():
                if name not in parts:
                    parts[name] = np.empty((stop - start, *part.shape[1:]), part.dtype)
                parts[name][a - start : b - start] = part
        return {"start": start, "parts": parts}

    return _run_task(produce, view, start, stop, body)


def task_blocks(layout: Layout, produce: Producer, start: int, stop: int) -> list[tuple[int, int]]:
    """The row blocks [a, b) a task computes its rows [start, stop) in: about
    ``TASK_BLOCK_BYTES`` of raw float32 each, whole batches of the producer's ``batch_size``
    (when it has one) counted from ``start``, as a serial precompute batches a shard."""
    batch = getattr(produce, "batch_size", None)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        batch = 1
    step = task_block_rows(layout, batch)
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def task_resources(workers: dict[str, dict]) -> dict[str, float] | None:
    """``{"GPU": 1}`` when any worker offers a GPU resource (``dask worker --resources GPU=1``):
    tasks then run only on those workers, one per GPU at a time; None (no constraint) otherwise.

    Args:
        workers: the scheduler's worker table (``client.scheduler_info()["workers"]``).
    """
    if any((info.get("resources") or {}).get("GPU") for info in workers.values()):
        return {"GPU": 1}
    return None


def _client_side_error(view: int, start: int, stop: int, exc: Exception) -> StoreError:
    """One line for a task that failed outside its body (workers died, arguments that could not
    be unpickled on the worker, a lost scheduler)."""
    from distributed import KilledWorker

    task = _task_name(view, start, stop)
    if isinstance(exc, KilledWorker):
        return WorkerTaskError(
            f"dask workers died running {task} ({exc.allowed_failures + 1} tries; last on "
            f"{exc.last_worker.address}): see the workers' logs (out of memory? killed?); "
            f"finished shards are kept and a rerun resumes"
        )
    cause = f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, ImportError):
        return WorkerTaskError(
            f"{task} could not start on the dask workers ({cause}): install logitbank and its "
            f"dependencies in the workers' environment (the same version as here)"
        )
    return WorkerTaskError(
        f"{task} failed ({cause}): check the dask scheduler and workers; finished shards are "
        f"kept and a rerun resumes"
    )


class _SyncCancelRace(logging.Filter):
    """Drops one record: distributed's ``utils.sync`` (2026.7), on a Ctrl-C, cancels a future it
    may not have made yet, and tornado logs the NameError of that callback with its traceback.
    The interrupt itself is handled (the one ``interrupted:`` line of the command line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "sync.<locals>.cancel" in record.getMessage())


@functools.cache
def _drop_sync_cancel_race() -> None:
    logging.getLogger("tornado.application").addFilter(_SyncCancelRace())


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed client: on an existing cluster (``scheduler`` address) or a local one."""
    _drop_sync_cancel_race()
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise StoreError(
            "dask.distributed is not installed: pip install 'dask[distributed]'"
        ) from exc
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise StoreError(
                f"cannot reach the dask scheduler at {scheduler} ({type(exc).__name__}): start it "
                f"with `dask scheduler` and workers with `dask worker {scheduler}`, or fix the "
                "address"
            ) from None
        with client:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise StoreError(
                    f"no dask worker joined the scheduler at {scheduler} within "
                    f"{WORKER_WAIT_S:.0f} s: start workers with `dask worker {scheduler}`"
                ) from None
            yield client
        return
    # dashboard on a free port: the default 8787 collides with any other cluster on the machine
    # The workers ignore Ctrl-C (storage.dask_worker_setup) and log errors only (a task a
    # Ctrl-C cancelled logged a warning); this process, whose nannies say why a worker
    # restarts (out of memory), keeps its warnings.
    cluster = LocalCluster(
        n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR, preload=[WORKER_SETUP],
    )  # fmt: skip
    for handler in logging.getLogger("distributed").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    with cluster, Client(cluster) as client:
        yield client


#: The module every local worker runs as it starts (dask's preload).
WORKER_SETUP = "storage.dask_worker_setup"


def write_parallel(
    path: str,
    produce: Producer,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_task: Callable[[dict], None] | None = None,
) -> int:
    """Compute and write every missing shard of an existing store with dask tasks.

    Args:
        path: the store: a path (made absolute here; it must reach the same store on every
            worker) or an fsspec URL.
        produce: picklable; ``produce(view, start, stop)`` returns that row range's raw logits
            (and optionally its view parameters).
        workers: processes of a local cluster (ignored with ``scheduler``).
        scheduler: address of a running dask.distributed scheduler.
        progress: called with the rows finished after each shard.
        on_task: called with each finished task's record: view, rows, worker (address, host,
            pid) and device (``produce.describe()``, if it has one).

    A ``produce.release()`` method, if there is one, is run on every worker at the end (to free
    what the producer keeps loaded between tasks, such as an ONNX Runtime session).

    Returns:
        The number of shards written.

    Raises:
        WorkerTaskError: a task failed; the message names its rows, the worker and the cause.
            Shards finished before are kept (marked done), so a rerun resumes.
    """
    from distributed import as_completed

    path = os.fspath(path)
    if urls.is_url(path) and urls.protocol(path) == "memory":
        raise StoreError(
            f"{path} lives in this process's memory, which dask workers cannot reach: use a "
            f"path or a shared URL (file://, s3://), or write it serially"
        )
    if not urls.is_url(path):
        path = os.path.abspath(path)
    with open_store(path, mode="a") as store:
        units = store.missing_shards()
        if not units:
            return 0
        parallel = store.supports_parallel_write

        def finish(result: dict) -> None:
            """A finished task: mark its shards done (or write its rows), then report it."""
            if parallel:
                store.mark_done(result["shards"])
            else:
                store.write_encoded(result["view"], result["start"], result["parts"])
                del result["parts"]
            if progress is not None:
                progress(int(result["rows"]))
            if on_task is not None:
                on_task(result)

        with dask_client(workers, scheduler) as client:
            resources = task_resources(client.scheduler_info()["workers"])
            first = (path,) if parallel else (store.layout,)
            body = produce_and_write if parallel else produce_only
            futures = {}
            for v, a, b in units:
                fut = client.submit(body, *first, produce, v, a, b, pure=False, resources=resources)
                futures[fut] = (v, a, b)
            pending = set(futures)
            try:
                for fut in as_completed(futures):
                    pending.discard(fut)
                    try:
                        result = fut.result()
                    except WorkerTaskError:
                        raise
                    except Exception as exc:
                        raise _client_side_error(*futures[fut], exc) from None
                    finish(result)
            except BaseException:
                # Keep what other tasks finished meanwhile (a rerun then does less), stop the rest.
                client.cancel([f for f in pending if f.status != "finished"])
                for fut in pending:
                    if fut.status == "finished":
                        with contextlib.suppress(Exception):  # never hide the first error
                            finish(fut.result())
                raise
            finally:
                release = getattr(produce, "release", None)
                if callable(release):  # the workers' sessions (GPU memory) are not kept idle
                    with contextlib.suppress(Exception):
                        client.run(release)
        return len(units)
