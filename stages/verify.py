"""`verify`: checksums and completeness of a store; names each damaged or missing chunk."""

from __future__ import annotations

import argparse

from storage import open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="path of the store (.zarr directory or .h5 file)")


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
    return 0 if report.ok else 1


def _ranges(pairs: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Collapse (view, chunk) pairs into (view, "a..b") runs for a short listing."""
    out: list[tuple[int, str]] = []
    for view, chunk in pairs:
        if out and out[-1][0] == view and out[-1][2] == chunk - 1:
            out[-1] = (view, out[-1][1], chunk)
        else:
            out.append((view, chunk, chunk))
    return [(v, f"{a}" if a == b else f"{a}..{b}") for v, a, b in out]
