"""``python -m pipeline STAGE`` on n processes of this machine, started by torchrun's launcher.

    python -m pipeline distill --nproc 2 ...      (make distill NPROC=2)
    python -m pipeline sweep --nproc 2 ...        (each student: the same, one after another)

What ``torchrun --standalone --nproc_per_node=n -m pipeline ...`` does, run by
:func:`torch.distributed.run.run` in a process of its own, with one difference: when a rank fails,
its own one-line error (the ranks print ``error: ...`` as one process does) is all the user sees.
torchrun adds its log lines and a ``ChildFailedError`` traceback naming every rank; here the
launcher's logging is quiet and the failure becomes the exit status of rank 0 (the rank that
reports), or else of the first rank that exited by itself rather than by a signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

#: Exit status when the first failed rank was killed by a signal (it has no status of its own).
KILLED = 1


#: Signals this process passes on to the launcher while it waits for it. Ctrl-C (SIGINT) from a
#: terminal reaches this process and the launcher together (one process group; the launcher then
#: stops the ranks, which run in sessions of their own), so SIGINT is only noted here.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def torchrun(
    nproc: int, pipeline_args: list[str], *, cleanup: Callable[[], None] | None = None
) -> int:
    """Run ``python -m pipeline PIPELINE_ARGS`` on ``nproc`` ranks; its exit status.

    The launcher runs in a child process (a sweep goes on after it). A SIGTERM or SIGHUP sent to
    this process is passed on to it, so that it stops the ranks rather than leave them running,
    and once it has ended this process takes the signal too (a sweep stops instead of starting
    its next student); a Ctrl-C becomes KeyboardInterrupt here the same way. A launcher killed
    by a signal returns 128 + its number, as a shell reports it.

    ``cleanup`` runs before this process takes a SIGTERM or SIGHUP itself (whose default action
    ends it at once, running no ``finally``): the caller's temporary files go with it.
    """
    command = [sys.executable, "-m", "pipeline.launch", str(nproc), *pipeline_args]
    received: list[int] = []
    child: subprocess.Popen | None = None

    def note(signum: int, _frame: object) -> None:
        received.append(signum)
        if signum != signal.SIGINT and child is not None and child.poll() is None:
            child.send_signal(signum)

    before = {sig: signal.signal(sig, note) for sig in (*FORWARDED, signal.SIGINT)}
    try:
        child = subprocess.Popen(command)
        if received and received[0] != signal.SIGINT:  # signalled before the child existed
            child.send_signal(received[0])
        status = child.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        if cleanup is not None:
            cleanup()
        signal.raise_signal(received[0])  # with this process's own handler back in place
    return 128 - status if status < 0 else status


def _quiet_launcher() -> None:
    """The launcher's own loggers (torch.distributed.elastic.*) say nothing below CRITICAL: they
    read LOGLEVEL when their modules are imported, and the ranks must not inherit it."""
    before = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"
    try:
        import torch.distributed.run  # noqa: F401  (its modules' loggers are made now)
    finally:
        if before is None:
            del os.environ["LOGLEVEL"]
        else:
            os.environ["LOGLEVEL"] = before
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    nproc, *pipeline_args = argv
    _quiet_launcher()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={int(nproc)}", "-m", "pipeline", *pipeline_args]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        # Rank 0 is the one that reports; otherwise the first rank that exited on its own.
        failures = sorted(exc.failures.items(), key=lambda kv: (kv[0] != 0, kv[1].timestamp))
        codes = [f.exitcode for _, f in failures if f.exitcode > 0]
        # A rank killed by a signal printed nothing, and the others only say that a rank
        # stopped. SIGTERM is torchrun's own, to the ranks left when one fails: not a cause.
        killed = sorted(
            ((r, f) for r, f in exc.failures.items()
             if f.exitcode < 0 and (not codes or f.exitcode != -signal.SIGTERM)),
            key=lambda kv: kv[1].timestamp,
        )  # fmt: skip
        if killed:
            rank, failure = killed[0]
            print(
                f"error: rank {rank} of {int(nproc)} was killed by {failure.signal_name()} (out "
                "of memory, or killed from outside); finished work is kept: rerun the same "
                "command to resume",
                file=sys.stderr,
            )
        return codes[0] if codes else KILLED
    except KeyboardInterrupt:  # Ctrl-C before torchrun's own handlers were in place
        return 128 + signal.SIGINT
    except SignalException as exc:  # the launcher was signalled and stopped the ranks
        if exc.sigval != signal.SIGINT:  # Ctrl-C also reached rank 0, which said so
            print(
                f"stopped by {exc.sigval.name}: finished work is kept; rerun the same command "
                "to resume",
                file=sys.stderr,
            )
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
