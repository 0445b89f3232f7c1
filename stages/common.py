"""What every config-driven stage takes on the command line: --config, --set, and its output."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pipeline.config import Config, load_config, save_resolved
from pipeline.errors import ConfigError

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
    record = config.run_path / f"{stage}.config.yaml"
    if record.is_dir():  # refused now: the stage's work would be done before its record failed
        raise ConfigError(
            f"{record} is a folder where the {stage} stage records its config: move it away or "
            f"set another run_dir"
        )
    args.resolved_config = (config, record)
    return config


def save_pending(args: argparse.Namespace) -> None:
    """Write the config ``config_from_args`` resolved for this command, if any."""
    pending = getattr(args, "resolved_config", None)
    if pending is not None:
        save_resolved(*pending)


#: How long a rank that stops without printing waits for the rank that prints to exit first.
#: torchrun ends it as soon as that one has failed, so the wait is normally milliseconds.
STOPPED_RANK_GRACE_S = 10.0


def quiet_rank() -> bool:
    """A torchrun rank other than its node's first: before the ranks meet, every rank of a node
    sees the same config and fails the same way, and local rank 0 says so."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ["LOCAL_RANK"]) > 0
    except (KeyError, ValueError):
        return False


def stopped_rank_exit() -> int:
    """Exit status 2 for a rank that stops without printing, once the reporting rank had time
    to print and exit (torchrun stops the others the moment one rank fails: had a silent rank
    gone first, it could stop that rank before or while it printed)."""
    time.sleep(STOPPED_RANK_GRACE_S)
    return 2
