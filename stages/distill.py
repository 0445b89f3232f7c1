"""`distill`: train a student from the teacher's logit store with one method (or `ce`).

Under torchrun every rank runs this; rank 0 prints the result, and an error is printed once (see
``pipeline.distill_ddp``): the other ranks end with exit status 2 and nothing on stderr.
"""

from __future__ import annotations

import argparse
import os

from stages.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _quiet_rank() -> bool:
    """A torchrun rank other than its node's first: before the ranks meet, every rank of a node
    sees the same config and fails the same way, and local rank 0 says so."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ["LOCAL_RANK"]) > 0
    except (KeyError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import EXPECTED_ERRORS

    # The resolved config goes next to this student's outputs (train_student writes it), not to
    # RUN_DIR/distill.config.yaml: many students share one run folder.
    try:
        config = load_config(args.config, args.set)  # before torch is imported: typos fail fast
    except EXPECTED_ERRORS:
        if _quiet_rank():
            return 2
        raise

    from pipeline.distill import train_student
    from pipeline.distill_ddp import RankStopped, World
    from pipeline.models import read_checkpoint

    try:
        path = train_student(config, progress=not args.quiet)
    except RankStopped:  # another rank failed and rank 0 reports it
        return 2
    if not World.from_env().main:
        return 0
    acc = read_checkpoint(path).extra.get("test_acc")
    print(f"distill: {path} (test top-1 {acc:.2f}%)")
    return 0
