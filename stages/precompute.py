"""`precompute`: the teacher's raw logits for V views of the training set, into the store."""

from __future__ import annotations

import argparse
import os

from stages.common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing store made from other inputs"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="run on a local dask cluster of N worker processes",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask.distributed scheduler (tcp://host:8786); one worker per "
        "GPU: README, 'Running on a cluster'",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.precompute import DONE_FILE, precompute
    from storage.urls import is_url

    if args.workers is not None:
        args.set.append(f"precompute.workers={args.workers}")
    if args.scheduler is not None:
        args.set.append(f"precompute.scheduler={args.scheduler}")
    config = config_from_args(args, "precompute")
    path = precompute(config, overwrite=args.overwrite, progress=not args.quiet)
    # the absolute path: `verify --repair` run from another folder finds the stamp names it
    named = str(path) if is_url(str(path)) else os.path.abspath(path)
    (config.run_path / DONE_FILE).write_text(named + "\n")
    print(f"precompute: {path} complete")
    return 0
