"""`distill`: train a student from the teacher's logit store with one method (or `ce`)."""

from __future__ import annotations

import argparse

from stages.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    # The resolved config goes next to this student's outputs (train_student writes it), not to
    # RUN_DIR/distill.config.yaml: many students share one run folder.
    config = load_config(args.config, args.set)  # before torch is imported: typos fail fast

    from pipeline.distill import train_student
    from pipeline.models import read_checkpoint

    path = train_student(config, progress=not args.quiet)
    acc = read_checkpoint(path).extra.get("test_acc")
    print(f"distill: {path} (test top-1 {acc:.2f}%)")
    return 0
