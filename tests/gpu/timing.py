"""Shared by the GPU timing scripts (stdlib imports only at the top: torch is imported inside,
after a script has set ``TRITON_INTERPRET`` or not)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable


def interpreter(on: bool) -> None:
    """Triton's CPU interpreter on (``--interpret``: the code paths, no timing) or off; before
    triton is first imported, which decides when a kernel is decorated."""
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)


def has_cuda(script: str) -> bool:
    """Whether torch sees a CUDA device; else a line saying ``--interpret`` is the CPU run."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"{script}: no CUDA device (use --interpret for the CPU dry run)")
    return False


def input_sets(batch: int, classes: int, device, count: int, seed: int) -> list[tuple]:
    """``count`` independent (student, teacher, target) sets as the loss benchmarks use them:
    student 3·N(0, 1) requiring grad (never zeros), teacher 0.8·student + 1.5·N(0, 1) as stored
    (float16), targets uniform."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        student = 3 * torch.randn(batch, classes, generator=g, device=device)
        noise = torch.randn(batch, classes, generator=g, device=device)
        target = torch.randint(0, classes, (batch,), generator=g, device=device)
        teacher = (0.8 * student + 1.5 * noise).half()
        sets.append((student.requires_grad_(), teacher, target))
    return sets


def rotating_step(fn: Callable, sets: list[tuple]) -> Callable[[], None]:
    """One training step of the loss ``fn(student, teacher, target)``: the next input set in
    turn (so repeated steps do not find their inputs in the L2 cache), the student's gradient
    cleared, the loss backpropagated."""
    calls = 0

    def once() -> None:
        nonlocal calls
        student, teacher, target = sets[calls % len(sets)]
        calls += 1
        student.grad = None
        fn(student, teacher, target).backward()

    return once


def launched_ms(once: Callable[[], object], steps: int) -> float:
    """Median ms of ``once()`` launched from Python ``steps`` times in a row, CUDA events around
    each call and no synchronize between (what a training loop sees: the host's time where it
    is the slower side, the kernels' where they are)."""
    import torch

    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(steps)
    ]
    for start, end in pairs:
        start.record()
        once()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)
