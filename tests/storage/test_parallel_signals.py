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
