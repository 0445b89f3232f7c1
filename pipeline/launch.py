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

#: Exit status when the first failed rank was killed by a signal (it has no status of its own).
KILLED = 1


#: Signals this process passes on to the launcher while it waits for it. Ctrl-C (SIGINT) is not
#: among them: the terminal sends it to the launcher and the ranks already, so it is ignored here.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def torchrun(nproc: int, pipeline_args: list[str]) -> int:
    """Run ``python -m pipeline PIPELINE_ARGS`` on ``nproc`` ranks; its exit status.

    The launcher runs in a child process (a sweep goes on after it); a SIGTERM or SIGHUP sent to
    this process is passed on to it, so that it stops the ranks rather than leave them running.
    """
    command = [sys.executable, "-m", "pipeline.launch", str(nproc), *pipeline_args]
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    before = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    before[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


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
        return codes[0] if codes else KILLED
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
