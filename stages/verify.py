"""`verify`: checksums and completeness of a store; names each damaged or missing chunk.

With ``--repair`` the shards that hold damaged chunks are marked not done again (all of them when
the completion marks themselves are unreadable), so that a rerun of precompute recomputes exactly
those and nothing else. A truncated HDF5 file or unreadable labels cannot be repaired that way: the
store has to be deleted and precomputed again.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from storage import open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="path of the store (.zarr directory or .h5 file)")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="mark the shards holding damaged chunks not done, for precompute to recompute",
    )


def run(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        report = store.verify()
        lay = store.layout
    for view, chunk in _ranges(report.missing):
        print(f"missing: view {view} chunks {chunk} (not marked done: resume the precompute)")
    for view, chunk, what in report.damaged:
        a, b = lay.chunk_range(chunk)
        print(f"damaged: view {view} chunk {chunk} (rows {a}..{b - 1}): {what}")
    for what in report.other:
        print(f"damaged: {what}")
    total = lay.num_views * lay.num_chunks
    status = "OK" if report.ok else "FAILED"
    print(
        f"{status}: {report.chunks_checked}/{total} chunks checked, {len(report.missing)} "
        f"missing, {len(report.damaged) + len(report.other)} damaged ({args.store})"
    )
    if report.damaged or report.other:
        if not args.repair or not report.repairable:
            print(f"fix: {report.fix()}")
            return 1
        with open_store(args.store, mode="a") as store:
            units = store.repair(report)
        for view, shards in _ranges(units):
            print(f"repaired: view {view} shard(s) {shards} marked not done")
        stamp = _stamp_of(args.store)
        if stamp is not None:  # make's record of a finished precompute: no longer so
            stamp.unlink()
            print(f"removed {stamp} (make's record that the store was finished)")
        else:
            print(
                "(make: delete RUN_DIR/precompute.done of the run that made it, or make skips it)"
            )
        print(f"fix: rerun precompute to recompute the {len(units)} shard(s) marked not done")
    return 0 if report.ok else 1


def _stamp_of(store: str) -> Path | None:
    """The ``precompute.done`` beside ``store`` that names it (a run's own store, RUN_DIR/
    store.zarr or store.h5), or None."""
    from pipeline.precompute import DONE_FILE
    from storage.urls import filesystem, is_local_url, is_url

    def local(path: str) -> str | None:  # a file:// URL as its path; None for a remote one
        if not is_url(path):
            return path
        return filesystem(path)[1] if is_local_url(path) else None

    if (here := local(store)) is None:
        return None
    stamp = Path(here).parent / DONE_FILE
    try:
        named = local(stamp.read_text().strip())
        return stamp if named and os.path.samefile(named, here) else None
    except (OSError, UnicodeDecodeError):  # no stamp, or one naming a store not here
        return None


def _ranges(pairs: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Collapse (view, index) pairs into (view, "a..b") runs for a short listing."""
    out: list[tuple[int, int, int]] = []
    for view, index in pairs:
        if out and out[-1][0] == view and out[-1][2] == index - 1:
            out[-1] = (view, out[-1][1], index)
        else:
            out.append((view, index, index))
    return [(v, f"{a}" if a == b else f"{a}..{b}") for v, a, b in out]
