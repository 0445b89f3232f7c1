"""`teacher`: train a teacher from the zoo (skipped when its checkpoint is finished)."""

from __future__ import annotations

import argparse

from stages.common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.models import read_checkpoint
    from pipeline.teacher import train_teacher

    config = config_from_args(args, "teacher")
    if config.teacher.checkpoint:
        ckpt = read_checkpoint(config.teacher.checkpoint)
        print(f"using the given teacher {config.teacher.checkpoint} ({ckpt.model_name})")
        return 0
    path = train_teacher(config, progress=not args.quiet)
    acc = read_checkpoint(path).extra.get("test_acc")
    print(f"teacher: {path} (test top-1 {acc:.2f}%)")
    return 0
