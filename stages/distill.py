"""`distill`: train a student from the teacher's logit store with one method (or `ce`).

Under torchrun every rank runs this; rank 0 prints the result, and an error is printed once (see
``pipeline.distill_ddp``): the other ranks end with exit status 2 and nothing on stderr, after
giving the reporting rank time to print and exit first (torchrun stops the others the moment one
rank fails: had a silent rank gone first, it could stop rank 0 before or while it printed).
``--nproc N`` starts those N ranks itself (:mod:`pipeline.launch`).
"""

from __future__ import annotations

import argparse
import os

from stages.common import (
    add_config_arguments,
    add_nproc_argument,
    quiet_rank,
    stopped_rank_exit,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_nproc_argument(parser, "the student")
    # Where the run's keys are set, named in refusals and divergence: a sweep's student runs as
    # this command under torchrun, with its sweep.runs[i] (which does not read distill.name).
    parser.add_argument("--section", default="distill", help=argparse.SUPPRESS)


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command on N ranks under torchrun's launcher (the config is
    already checked here, so a typo is one line before any process starts)."""
    from pipeline.errors import UserError
    from pipeline.launch import torchrun

    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        if quiet_rank():  # every rank of the node would say the same
            return stopped_rank_exit()
        raise UserError("--nproc starts torchrun itself: run it without torchrun, or drop --nproc")
    argv = ["distill", "--config", args.config, *(a for s in args.set for a in ("--set", s))]
    argv += ["--section", args.section]
    try:
        return torchrun(args.nproc, [*argv, "--quiet"] if args.quiet else argv)
    except KeyboardInterrupt:  # Ctrl-C: rank 0 has said so already
        return 130


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import EXPECTED_ERRORS

    # The resolved config goes next to this student's outputs (train_student writes it), not to
    # RUN_DIR/distill.config.yaml: many students share one run folder.
    try:
        config = load_config(args.config, args.set)  # before torch is imported: typos fail fast
    except EXPECTED_ERRORS:
        if quiet_rank():
            return stopped_rank_exit()
        raise

    if args.nproc is not None:
        return _launch(args)

    from pipeline.distill import train_student
    from pipeline.distill_ddp import RankStopped, World
    from pipeline.models import read_checkpoint

    try:
        path = train_student(config, progress=not args.quiet, section=args.section)
    except RankStopped:  # another rank failed and rank 0 reports it
        return stopped_rank_exit()
    if not World.from_env().main:
        return 0
    acc = read_checkpoint(path).extra.get("test_acc")
    print(f"distill: {path} (test top-1 {acc:.2f}%)")
    return 0
