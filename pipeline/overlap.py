"""Keeping the runtime busy: input preparation, inference and writing overlap.

Three stages run at once on consecutive batches: a thread prepares batch i + 1 (read, augment,
normalise), the caller's thread runs inference on batch i (ONNX Runtime releases the GIL while it
computes), and a writer thread encodes and writes batch i - 1. Each queue holds one batch, so memory
stays bounded and rows reach the writer in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Job = TypeVar("Job")


def run_overlapped(
    jobs: Iterable[Job],
    prepare: Callable[[Job], Any],
    compute: Callable[[Any], Any],
    write: Callable[[Job, Any, Any], None],
) -> int:
    """For each job: ``inputs = prepare(job)``; ``out = compute(inputs)``; ``write(job, inputs,
    out)``, with the three stages of consecutive jobs overlapping. Returns the jobs done."""
    jobs = list(jobs)
    if not jobs:
        return 0
    with ThreadPoolExecutor(1, "prepare") as prep, ThreadPoolExecutor(1, "write") as writer:
        next_inputs: Future = prep.submit(prepare, jobs[0])
        pending: Future | None = None
        for i, job in enumerate(jobs):
            inputs = next_inputs.result()
            if i + 1 < len(jobs):
                next_inputs = prep.submit(prepare, jobs[i + 1])
            out = compute(inputs)
            if pending is not None:
                pending.result()  # one write in flight: bounded memory, errors surface here
            pending = writer.submit(write, job, inputs, out)
        if pending is not None:
            pending.result()
    return len(jobs)
