"""A dask worker preload for the local clusters ``storage.parallel`` starts: the worker ignores
Ctrl-C. A terminal's SIGINT reaches its whole process group, and each local worker printed a
KeyboardInterrupt traceback while the process that started it stopped the cluster in order.
Run in every worker process as it starts, restarts by its nanny included."""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():  # where signals are set
        signal.signal(signal.SIGINT, signal.SIG_IGN)
