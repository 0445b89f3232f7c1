"""What every config-driven stage takes on the command line: --config, --set, and its output."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import Config, load_config, save_resolved

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="YAML config (default: stages/configs/default.yaml)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set teacher.epochs=2",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_nproc_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help=f"train {what} on N processes of this machine under torchrun (DDP: one per GPU, "
        "gloo on the CPU)",
    )


def config_from_args(args: argparse.Namespace, stage: str) -> Config:
    """The resolved config; the command line writes it to RUN_DIR/STAGE.config.yaml once the
    stage has run (``save_pending``), so that a refused rerun does not replace the record of
    how the outputs already there were made."""
    config = load_config(args.config, args.set)
    args.resolved_config = (config, config.run_path / f"{stage}.config.yaml")
    return config


def save_pending(args: argparse.Namespace) -> None:
    """Write the config ``config_from_args`` resolved for this command, if any."""
    pending = getattr(args, "resolved_config", None)
    if pending is not None:
        save_resolved(*pending)
