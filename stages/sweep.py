"""`sweep`: train every (run, seed) of the config's sweep section from the same store."""

from __future__ import annotations

import argparse
import sys

from stages.common import (
    add_config_arguments,
    add_nproc_argument,
    config_from_args,
    quiet_rank,
    stopped_rank_exit,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_nproc_argument(parser, "each student")


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import EXPECTED_ERRORS

    try:  # started under torchrun by mistake, every rank gets here: one of them says why
        config = config_from_args(args, "sweep")  # before torch is imported: typos fail fast
        from pipeline.sweep import done_path, run_sweep

        def show(outcome, position: int, total: int) -> None:
            print(outcome.line(total, position), flush=True)

        outcomes = run_sweep(config, progress=not args.quiet, on_run=show, nproc=args.nproc)
    except EXPECTED_ERRORS:
        if quiet_rank():
            args.resolved_config = None  # refused: RUN_DIR/sweep.config.yaml stays as it was
            return stopped_rank_exit()
        raise
    failed = [o.run.folder.name for o in outcomes if o.status == "failed"]
    if failed:
        # Not exit 2: the sweep's input was fine, some students failed while training.
        print(
            f"error: {len(failed)} of {len(outcomes)} sweep runs failed ({', '.join(failed)}); "
            f"the others are kept, rerun to retry only the failed ones",
            file=sys.stderr,
        )
        return 1
    trained = sum(o.status == "trained" for o in outcomes)
    gone = sum(o.status == "diverged" for o in outcomes)
    print(
        f"sweep: {len(outcomes)} runs done ({trained} trained, "
        f"{len(outcomes) - trained - gone} already finished"
        + (f", {gone} diverged: no student, see the report" if gone else "")
        + f"): {done_path(config)}"
    )
    return 0
