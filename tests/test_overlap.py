from __future__ import annotations

import threading
import time

import pytest

from pipeline.overlap import run_overlapped


def test_stages_overlap_and_keep_order():
    log, written = [], []

    def prepare(job):
        log.append(("prepare", job, threading.current_thread().name))
        time.sleep(0.05)
        return job * 10

    def compute(x):
        time.sleep(0.05)
        return x + 1

    def write(job, inputs, out):
        time.sleep(0.05)
        written.append((job, inputs, out))

    start = time.perf_counter()
    assert run_overlapped(range(8), prepare, compute, write) == 8
    elapsed = time.perf_counter() - start
    assert written == [(j, j * 10, j * 10 + 1) for j in range(8)]
    assert all(name.startswith("prepare") for _, _, name in log)
    assert elapsed < 8 * 0.15 * 0.75, f"no overlap: {elapsed:.2f}s"  # serial would take 1.2 s


def test_errors_surface():
    def write(job, inputs, out):
        if job == 2:
            raise ValueError("disk said no")

    with pytest.raises(ValueError, match="disk said no"):
        run_overlapped(range(5), lambda j: j, lambda x: x, write)
    assert run_overlapped([], lambda j: j, lambda x: x, write) == 0
