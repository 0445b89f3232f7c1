"""`plan`: what a store will cost before a run: bytes on disk, files, memory."""

from __future__ import annotations

import argparse

from storage import make_layout
from storage.layout import format_bytes, plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", "-N", type=int, required=True)
    parser.add_argument("--num-classes", "-C", type=int, required=True)
    parser.add_argument("--views", "-V", type=int, default=1)
    parser.add_argument("--encoding", default="float16")
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--topk", type=int, default=None)
    parser.add_argument("--backend", default="zarr", choices=["zarr", "hdf5"])


def run(args: argparse.Namespace) -> int:
    layout = make_layout(
        args.num_samples,
        args.num_classes,
        args.views,
        args.encoding,
        args.chunk_rows,
        topk=args.topk,
        view_param_width=3,
    )
    print(format_plan(plan(layout, args.backend), args.backend))
    return 0


def format_plan(p: dict, backend: str) -> str:
    """The plan as a few readable lines (printed by `plan` and before a precompute)."""
    ratio = p["disk_bytes"] / p["float32_disk_bytes"]
    return "\n".join(
        [
            f"store: {p['num_views']} view(s) x {p['num_samples']:,} rows x {p['num_classes']:,} "
            f"classes, {p['encoding']} ({backend})",
            f"  chunks: {p['chunk_rows']} rows each, {p['chunks']:,} in all; shards: "
            f"{p['chunks_per_shard']} chunks each, {p['shards']:,} in all",
            f"  disk: {format_bytes(p['disk_bytes'])} ({p['bytes_per_row']} bytes/row with stats "
            f"and view params; {ratio:.0%} of raw float32), {p['files']:,} file(s)",
            f"  writer buffer: {format_bytes(p['writer_buffer_bytes'])} per view being written; "
            f"one view decoded in RAM: {format_bytes(p['ram_bytes_per_view_decoded'])}",
        ]
    )
