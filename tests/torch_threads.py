"""One intra-op torch thread for a block of test code (a context manager), restored after.

With tiny batches on a busy 2-core machine, two OpenMP threads spin against each other and run
several times slower; and runs compared bit for bit must use the same thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
