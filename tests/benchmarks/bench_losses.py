"""Loss forward+backward: PyTorch reference eager vs torch.compile vs the fused Triton kernels.

For each class count C in {10, 100, 1000, 32768, 131072} with B = 2^24 // C rows (a constant
2^24 logits per batch), one training-step's loss work is timed: ``loss = f(student, teacher)``,
``loss.backward()`` (gradient with respect to the student). All three run in the same process on
the same inputs; the teacher is passed in the store's default float16 encoding, which the
reference decodes to float32 first and the fused kernels read as stored.

- eager: ``pipeline.kernels.reference`` as written;
- compile: ``torch.compile`` of the same reference function (compile time excluded: it is warmed
  up first);
- fused: ``pipeline.kernels`` with ``impl="triton"``; needs CUDA (on CPU triton only has its
  interpreter, which is not a performance path, so the row says so instead of a number).

Reported: median time per step, and the peak memory a step adds over its inputs
(``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident-set growth, from the
kernel's VmHWM after resetting it through /proc/self/clear_refs, or n/a where that is refused),
each with its ratio to eager.

    python -m tests.benchmarks.bench_losses [--methods kd dkd] [--classes 10 1000]
                                            [--seconds 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import pipeline.kernels as kernels

CLASSES = (10, 100, 1000, 32768, 131072)
ELEMENTS = 2**24
METHODS = ("kd", "dkd", "ls", "ats")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _reference_steps(ref) -> dict[str, Step]:
    """Scalar losses built from the reference module directly (what torch.compile traces)."""
    return {
        "kd": lambda s, t, y: ref.kd_rows(s, ref.decode_teacher(t), 4.0).mean(),
        "dkd": lambda s, t, y: _dkd_total(*ref.dkd_rows(s, ref.decode_teacher(t), y, 4.0)),
        "ls": lambda s, t, y: ref.kd_rows(s, ref.decode_teacher(t), 2.0, zscore=True).mean(),
        "ats": lambda s, t, y: ref.ats_rows(s, ref.decode_teacher(t), y, 4.0, 2.0, 1.0).mean(),
    }


def _fused_steps() -> dict[str, Step]:
    def tri(name: str) -> Callable:
        return getattr(kernels, name)

    return {
        "kd": lambda s, t, y: tri("kd_rows")(s, t, 4.0, impl="triton").mean(),
        "dkd": lambda s, t, y: _dkd_total(*tri("dkd_rows")(s, t, y, 4.0, impl="triton")),
        "ls": lambda s, t, y: tri("kd_rows")(s, t, 2.0, zscore=True, impl="triton").mean(),
        "ats": lambda s, t, y: tri("ats_rows")(s, t, y, 4.0, 2.0, 1.0, impl="triton").mean(),
    }


def _dkd_total(tckd: torch.Tensor, nckd: torch.Tensor) -> torch.Tensor:
    return (tckd + 8.0 * nckd).mean()  # alpha 1, beta 8


@dataclass
class Result:
    impl: str
    ms: float | None  # median ms per forward+backward; None = not run
    peak_mb: float | None  # peak memory a step adds over its inputs; None = not measurable
    note: str = ""


class PeakMemory:
    """Peak memory of a block: CUDA allocator stats, or on CPU the resident set's high mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear_refs = Path("/proc/self/clear_refs")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.peak: float | None = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                self.clear_refs.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                self.base = None
                return self
            self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.peak = (_status_kb("VmHWM") - self.base) / 2**10


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(step: Step, inputs, device: torch.device, seconds: float) -> tuple[float, float]:
    """(median ms, peak MB) of step + backward, after one warm-up (and compile) call."""
    student, teacher, target = inputs

    def once() -> None:
        student.grad = None
        step(student, teacher, target).backward()

    once()  # warm-up: compiles (torch.compile, triton) and fills caches
    student.grad = None  # the baseline holds the inputs only; the step's gradient is its own
    _sync(device)
    with PeakMemory(device) as mem:
        once()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 50):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    student.grad = None
    return statistics.median(times) * 1e3, mem.peak


def _inputs(classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = ELEMENTS // classes
    g = torch.Generator(device=device).manual_seed(classes)
    student = (3 * torch.randn(batch, classes, generator=g, device=device)).requires_grad_()
    teacher = (3 * torch.randn(batch, classes, generator=g, device=device)).half()  # stored
    target = torch.randint(0, classes, (batch,), generator=g, device=device)
    return student, teacher, target


def run(
    methods: tuple[str, ...], classes: tuple[int, ...], seconds: float, compile_: bool
) -> list[tuple[str, int, int, list[Result]]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = importlib.import_module("pipeline.kernels.reference")
    eager, fused = _reference_steps(ref), _fused_steps()
    fused_ok = device.type == "cuda" and kernels.triton_available()
    rows = []
    for method in methods:
        compiled = torch.compile(eager[method]) if compile_ else None
        for c in classes:
            inputs = _inputs(c, device)
            results = [Result("eager", *_measure(eager[method], inputs, device, seconds))]
            if compiled is not None:
                results.append(Result("compile", *_measure(compiled, inputs, device, seconds)))
            if fused_ok:
                results.append(Result("fused", *_measure(fused[method], inputs, device, seconds)))
            else:
                why = "needs CUDA (no GPU in this run)" if device.type != "cuda" else "no triton"
                results.append(Result("fused", None, None, why))
            rows.append((method, c, ELEMENTS // c, results))
            print(_format_row(method, c, ELEMENTS // c, results), flush=True)
            del inputs
    return rows


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "—"
    return f"{value / base:.2f}x"


def _format_row(method: str, classes: int, batch: int, results: list[Result]) -> str:
    base = results[0]
    out = []
    for r in results:
        if r.ms is None:
            out.append(f"{method:<4} {classes:>6} {batch:>8}  {r.impl:<8} {r.note}")
            continue
        peak = "n/a" if r.peak_mb is None else f"{r.peak_mb:8.1f}"
        head = f"{method:<4} {classes:>6} {batch:>8}  {r.impl:<8}"
        out.append(
            f"{head} {r.ms:9.2f} {_ratio(r.ms, base.ms):>7}  {peak:>8} "
            f"{_ratio(r.peak_mb, base.peak_mb):>7}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per cell")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("pipeline.kernels.reference") is None:
        raise SystemExit("bench_losses needs the PyTorch reference, pipeline/kernels/reference.py")
    cuda = torch.cuda.is_available()
    # The CPU run is kept to a few minutes: KD and DKD, one second per cell unless asked.
    methods = tuple(args.methods or (METHODS if cuda else ("kd", "dkd")))
    seconds = args.seconds if args.seconds is not None else (2.0 if cuda else 1.0)
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'})"
    print(f"loss forward+backward, B*C = 2^24, teacher float16, {where}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'meth':<4} {'C':>6} {'B':>8}  {'impl':<8} {'ms/step':>9} {'vs eager':>7}"
          f"  {'peak MB':>8} {'vs eager':>7}")  # fmt: skip
    run(methods, tuple(args.classes), seconds, not args.no_compile)
    if not cuda:
        print("fused: needs CUDA (no GPU in this run); peak MB = resident-set growth on CPU")


if __name__ == "__main__":
    main()
