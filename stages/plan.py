"""`plan`: what a store will cost before a run: bytes on disk, files, memory."""

from __future__ import annotations

import argparse

from storage import make_layout
from storage.layout import format_plan, plan


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
