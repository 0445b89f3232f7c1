"""The command line: ``python -m pipeline STAGE [options]`` (also installed as ``logitbank``).

The only place that parses argv. Each stage module in ``stages/`` provides ``add_arguments`` and
``run``; this dispatches to it. Bad input — a project error, a missing dependency, a full disk, a
read-only directory, an object store's refusal — ends in one line on stderr and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import NoReturn

from pipeline.errors import EXPECTED_ERRORS, UserError, os_error_message

#: stage name → (module, one-line help). Modules are imported only when their stage runs.
STAGES: dict[str, tuple[str, str]] = {
    "teacher": ("stages.teacher", "train a teacher from the zoo (or use a given checkpoint)"),
    "export": ("stages.export", "export the teacher to ONNX, parity-checked against PyTorch"),
    "precompute": ("stages.precompute", "the teacher's logits for V views into the store"),
    "distill": ("stages.distill", "train a student from the store with a distillation method"),
    "verify": ("stages.verify", "check a store's checksums and completeness"),
    "audit": ("stages.audit", "bytes per row and KD-loss error of every encoding on a store"),
    "plan": ("stages.plan", "disk bytes, files and memory of a store before a run"),
    "sweep": ("stages.sweep", "train many students (runs × seeds) from one store, one by one"),
    "report": ("stages.report", "results table (Markdown, JSON) and plots of the distill runs"),
}


def _first_rank() -> bool:
    """Not a torchrun rank other than rank 0 (those stay quiet where every rank would say the
    same)."""
    return os.environ.get("RANK", "0") in ("", "0")


class UsageError(UserError):
    """A command line argparse refuses (unknown stage, missing or malformed argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``error: ...``) and exit status 2 from ``main``
    rather than a usage block and ``SystemExit`` from inside the parser."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    module = importlib.import_module(STAGES[args.stage][0])
    try:
        status = int(module.run(args) or 0)
    except EXPECTED_ERRORS as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(
            f"a dependency is missing ({exc}): run `make setup` to install logitbank's requirements"
        )
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # `plan | head`: the reader has gone, nothing is wrong
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if (remote := _remote_error(exc)) is not None:  # before errno: S3's 403 is not a folder's
            return _fail(remote)
        if (message := os_error_message(exc)) is not None:
            return _fail(message)
        raise
    except Exception as exc:  # e.g. botocore's EndpointConnectionError
        if (remote := _remote_error(exc)) is not None:
            return _fail(remote)
        raise
    except KeyboardInterrupt:
        if output_made_with_it(args):  # the record beside an output describes that output
            write_resolved_config(args)
        if _first_rank():  # Ctrl-C reaches every torchrun rank: one line is enough
            print(
                "interrupted: finished work is kept; rerun the same command to resume",
                file=sys.stderr,
            )
        return 130
    # Only a stage that ran writes RUN_DIR/STAGE.config.yaml: a refused one (exit 2) leaves the
    # record of how the outputs already there were made as it was.
    try:
        write_resolved_config(args)
    except OSError as exc:  # a full disk at the very end: the stage's outputs are complete
        if (message := os_error_message(exc)) is not None:
            return _fail(message)
        raise
    return status


#: stage → (module, function(config) -> bool): whether the output the stage has on disk was made
#: with the config it resolved, asked when Ctrl-C stopped it (possibly before its own checks
#: refused a folder of another config's output). A stage not named here records its config on
#: Ctrl-C: the work it did so far (a partial store, a sweep's students) was made with it.
OUTPUT_MADE_WITH: dict[str, tuple[str, str]] = {
    "teacher": ("pipeline.teacher", "made_with"),
    "export": ("stages.export", "made_with"),
    "precompute": ("pipeline.precompute", "made_with"),
}


def output_made_with_it(args: argparse.Namespace) -> bool:
    """Whether an interrupted stage's output corresponds to its resolved config (then the
    config is written beside it); True where the stage has no such check."""
    pending = getattr(args, "resolved_config", None)
    check = OUTPUT_MADE_WITH.get(args.stage)
    if pending is None or check is None:
        return True
    try:
        return bool(getattr(importlib.import_module(check[0]), check[1])(pending[0]))
    except (Exception, KeyboardInterrupt):  # an unreadable output, a second Ctrl-C: not known
        return False


def write_resolved_config(args: argparse.Namespace) -> None:
    """Write the config a stage resolved (``stages.common.config_from_args``), if it did."""
    from stages.common import save_pending

    save_pending(args)


def _remote_error(exc: BaseException) -> str | None:
    from storage.urls import remote_error

    return remote_error(exc)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run() -> None:
    """``python -m pipeline`` / ``logitbank``: :func:`main`, then exit with its status.

    A torchrun rank (WORLD_SIZE > 1) leaves with ``os._exit`` once its output is flushed: every
    file it wrote is closed by then, and the C++ teardown of torch.distributed at interpreter
    exit sometimes aborts ("terminate called without an active exception", seen about one
    exit in six here), which would turn a finished rank into a crashed one.
    """
    status = main()
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
