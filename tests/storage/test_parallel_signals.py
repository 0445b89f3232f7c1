"""Local dask workers ignore Ctrl-C, also once their nanny restarts them, while the process
that started them keeps its own handler (the Ctrl-C of a dask precompute is one line:
tests/stages/test_teacher_side.py::test_ctrl_c_of_a_dask_precompute_is_one_line)."""

from __future__ import annotations

import signal

from storage.parallel import dask_client


def _sigint() -> str:
    return str(signal.getsignal(signal.SIGINT))


def test_local_workers_ignore_ctrl_c_and_this_process_does_not() -> None:
    ignored = str(signal.SIG_IGN)
    with dask_client(2) as client:
        assert set(client.run(_sigint).values()) == {ignored}
        client.restart()  # a worker out of memory is restarted so
        assert set(client.run(_sigint).values()) == {ignored}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_sync_cancel_race_of_distributed_logs_nothing(caplog) -> None:
    """A Ctrl-C landing as distributed's ``sync`` starts a call made tornado log its cancel
    callback's NameError with a traceback beside the one `interrupted:` line (seen once in a
    CI run); that record, and only it, is dropped."""
    import logging
    import sys

    from storage.parallel import _drop_sync_cancel_race

    _drop_sync_cancel_race()
    logger = logging.getLogger("tornado.application")
    with caplog.at_level(logging.ERROR, logger="tornado.application"):
        try:
            raise NameError("cannot access free variable 'future'")
        except NameError:
            logger.error("Exception in callback partial(<function sync.<locals>.cancel>)",
                         exc_info=sys.exc_info())  # fmt: skip
        logger.error("Exception in callback partial(<function other>)")
    assert [r.getMessage() for r in caplog.records] == [
        "Exception in callback partial(<function other>)"
    ]
