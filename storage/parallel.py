"""Filling a store in parallel with dask: each task owns whole shards, so writes never collide.

The coordinator holds the writer lock and is the only one to touch ``done``: a task writes its
shards' data (zarr: straight into the shard files) and reports back; the coordinator marks them
done as they complete. A crash anywhere therefore loses at most the shards in flight, which a
rerun computes again. HDF5 has one file and one writer, so its tasks send rows back to the
coordinator, which writes them. Either way the result is byte-identical to a serial write: the
encoding of a row depends on that row alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from storage.api import open_store
from storage.errors import StoreError

#: ``produce(view, start, stop)`` → float logits (stop - start, C), or (logits, view_params).
Producer = Callable[[int, int, int], Any]


def _split(result: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(result, tuple):
        return result[0], result[1]
    return result, None


def produce_and_write(path: str, produce: Producer, view: int, start: int, stop: int) -> tuple:
    """Task body for backends that take parallel writes: compute one shard and write it."""
    logits, params = _split(produce(view, start, stop))
    with open_store(path, mode="task") as store:
        store.write(view, start, logits, params)
        return view, store.written_shards


def produce_only(produce: Producer, view: int, start: int, stop: int) -> tuple:
    """Task body for single-writer backends: compute one shard, hand it to the coordinator."""
    logits, params = _split(produce(view, start, stop))
    return view, start, np.asarray(logits, np.float32), params


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed client: on an existing cluster (``scheduler`` address) or a local one."""
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
            yield client
        return
    cluster = LocalCluster(
        n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, Client(cluster) as client:
        yield client


def write_parallel(
    path: str,
    produce: Producer,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Compute and write every missing shard of an existing store with dask tasks.

    Args:
        produce: picklable; ``produce(view, start, stop)`` returns that row range's raw logits
            (and optionally its view parameters).
        workers: processes of a local cluster (ignored with ``scheduler``).
        scheduler: address of a running dask.distributed scheduler.
        progress: called with the rows finished after each shard.

    Returns:
        The number of shards written.
    """
    from distributed import as_completed

    with open_store(path, mode="a") as store:
        units = store.missing_shards()
        if not units:
            return 0
        parallel = store.supports_parallel_write
        with dask_client(workers, scheduler) as client:
            if parallel:
                futures = [
                    client.submit(produce_and_write, str(path), produce, v, a, b, pure=False)
                    for v, a, b in units
                ]
            else:
                futures = [
                    client.submit(produce_only, produce, v, a, b, pure=False) for v, a, b in units
                ]
            for fut in as_completed(futures):
                result = fut.result()
                if parallel:
                    view, shards = result
                    store.mark_done(shards)
                    rows = sum(np.subtract(*store.layout.shard_range(s)[::-1]) for _, s in shards)
                else:
                    view, start, logits, params = result
                    store.write(view, start, logits, params)
                    rows = len(logits)
                if progress is not None:
                    progress(int(rows))
        return len(units)
