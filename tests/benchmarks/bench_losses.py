"""Loss forward+backward: PyTorch reference eager vs torch.compile vs the fused Triton kernels.

For each class count C in {10, 100, 1000, 32768, 131072} with B = 2^24 // C rows (a constant
2^24 logits per batch), one training-step's loss work is timed: ``loss = f(student, teacher)``,
``loss.backward()`` (gradient with respect to the student). All three run in the same process on
the same inputs; the teacher is passed in the store's default float16 encoding, which the
reference decodes to float32 first and the fused kernels read as stored. ``kd`` is the KD term
alone; ``kd+ce`` is KD's training loss, 0.1 · CE + 0.9 · KD (``kd_ce``: the cross-entropy inside
the fused kernel, beside PyTorch's ``cross_entropy`` plus the KD reference); ``dkd+ce`` likewise
DKD's, CE + TCKD + 8 · NCKD (``dkd_ce``), and ``ats+ce`` ATS's, 0.5 · CE + 0.5 · ATS (``ats_ce``).

- eager: ``pipeline.kernels.reference`` as written;
- compile: ``torch.compile(dynamic=False)`` of the same reference function, one specialization
  per shape (its compile time is excluded from the step time and reported apart);
- fused: ``pipeline.kernels`` with ``impl="triton"``; needs CUDA (on CPU triton only has its
  interpreter, which is not a performance path, so the row says so instead of a number).

Timing: after warm-up steps, the median of many steps, each timed with CUDA events on GPU (a
host clock and a synchronize on CPU): the step as a training loop launches it from Python, host
time included. On a GPU each step is also captured in a CUDA graph and replayed (``GPU``
columns): the kernels' own time, without the host's launches (one input set). Each step takes
the next of ``--sets`` input sets (distinct student/teacher/target tensors), so repeated steps
do not find their inputs in the L2 cache.
Peak memory: what one step adds over its inputs (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the resident set's high-water mark after resetting it through
/proc/self/clear_refs, or n/a where that is refused). Ratios are to eager.

    python -m tests.benchmarks.bench_losses [--methods kd dkd] [--classes 10 1000]
                                            [--seconds 1] [--no-compile] [--quick] [--out DIR]

``--quick`` (for a short GPU lease): KD and DKD (each alone and with CE) only, 0.2 s of timing
per cell, 2 input sets, and no new torch.compile once 75 s have passed (the eager and fused rows
still run): about 2 minutes on an H100, compile warm-ups included. Cells run C by C (every method
at one C, then the next C), so the compile budget cuts the largest C of every method, not whole
methods; the table is printed method by method. ``--out``'s JSON is rewritten after every cell
(a run killed at its time limit keeps what it measured). Exit status 1 if a fused row failed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from tests.gpu.light_imports import heavy_modules, isolate_storage
from tests.gpu.timing import input_sets, rotating_step

CLASSES = (10, 100, 1000, 32768, 131072)
ELEMENTS = 2**24
METHODS = ("kd", "kd+ce", "dkd", "dkd+ce", "ls", "ats", "ats+ce")
QUICK_METHODS = ("kd", "kd+ce", "dkd", "dkd+ce")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _reference_steps(ref: ModuleType) -> dict[str, Step]:
    """Scalar losses built from the reference module directly (what torch.compile traces)."""
    return {
        "kd": lambda s, t, y: ref.kd_rows(s, ref.decode_teacher(t), 4.0).mean(),
        "kd+ce": lambda s, t, y: ref.kd_ce(s, ref.decode_teacher(t), y, 4.0, 0.1, 0.9)[0],
        "dkd": lambda s, t, y: _dkd_total(*ref.dkd_rows(s, ref.decode_teacher(t), y, 4.0)),
        "dkd+ce": lambda s, t, y: ref.dkd_ce(s, ref.decode_teacher(t), y, 4.0, 1.0, 1.0, 8.0)[0],
        "ls": lambda s, t, y: ref.kd_rows(s, ref.decode_teacher(t), 2.0, zscore=True).mean(),
        "ats": lambda s, t, y: ref.ats_rows(s, ref.decode_teacher(t), y, 4.0, 2.0, 1.0).mean(),
        "ats+ce": lambda s, t, y: ref.ats_ce(s, ref.decode_teacher(t), y, 4.0, 2.0, 1.0, 0.5, 0.5)[
            0
        ],
    }


def _fused_steps(kernels: ModuleType) -> dict[str, Step]:
    return {
        "kd": lambda s, t, y: kernels.kd_rows(s, t, 4.0, impl="triton").mean(),
        "kd+ce": lambda s, t, y: kernels.kd_ce(s, t, y, 4.0, 0.1, 0.9, impl="triton")[0],
        "dkd": lambda s, t, y: _dkd_total(*kernels.dkd_rows(s, t, y, 4.0, impl="triton")),
        "dkd+ce": lambda s, t, y: kernels.dkd_ce(s, t, y, 4.0, 1.0, 1.0, 8.0, impl="triton")[0],
        "ls": lambda s, t, y: kernels.kd_rows(s, t, 2.0, zscore=True, impl="triton").mean(),
        "ats": lambda s, t, y: kernels.ats_rows(s, t, y, 4.0, 2.0, 1.0, impl="triton").mean(),
        "ats+ce": lambda s, t, y: kernels.ats_ce(s, t, y, 4.0, 2.0, 1.0, 0.5, 0.5, impl="triton")[
            0
        ],
    }


def _dkd_total(tckd: torch.Tensor, nckd: torch.Tensor) -> torch.Tensor:
    return (tckd + 8.0 * nckd).mean()  # alpha 1, beta 8


@dataclass
class Result:
    impl: str
    ms: float | None  # median ms per forward+backward; None = not run
    peak_mb: float | None  # peak memory a step adds over its inputs; None = not measurable
    note: str = ""
    warmup_s: float | None = None  # the first call (torch.compile / triton compile included)
    steps: int = 0
    gpu_ms: float | None = None  # the step replayed from a CUDA graph: its kernels alone


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


def _measure(step: Step, sets: list[Inputs], device: torch.device, seconds: float) -> Result:
    """Median ms of step + backward over rotating input sets, peak MB of one step, warm-up s."""
    once = rotating_step(step, sets)
    t0 = time.perf_counter()
    once()  # compiles (torch.compile, triton) and fills caches
    _sync(device)
    warmup = time.perf_counter() - t0
    for _ in range(2):
        once()
    for student, _, _ in sets:
        student.grad = None  # the baseline holds the inputs only; the step's gradient is its own
    _sync(device)
    with PeakMemory(device) as mem:
        once()
    t0 = time.perf_counter()
    once()
    _sync(device)
    estimate = time.perf_counter() - t0  # one step, host clock: sizes the timed run
    steps = int(min(200, max(5, seconds / max(estimate, 1e-6))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for start, end in zip(starts, ends):
            start.record()
            once()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    for student, _, _ in sets:
        student.grad = None
    gpu = _graph_ms(step, sets[0]) if device.type == "cuda" else None
    return Result("", statistics.median(times), mem.peak, warmup_s=warmup, steps=steps, gpu_ms=gpu)


def _graph_ms(step: Step, inputs: Inputs) -> float | None:
    """Median ms of one step (forward + backward) replayed from a CUDA graph
    (``tests.gpu.tile_sweep.graph_ms``), or None when the step cannot be captured."""
    from tests.gpu.tile_sweep import graph_ms  # stdlib imports only at its top

    try:
        return graph_ms(step, *inputs, replays=10)
    except Exception as exc:  # a step that cannot be captured keeps its launched time
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return None


def _inputs(classes: int, device: torch.device, count: int) -> list[Inputs]:
    """``count`` independent input sets (random, never zeros) of B = 2^24 // C rows."""
    return input_sets(ELEMENTS // classes, classes, device, count, seed=classes)


def _compile(fn: Step) -> Step:
    return torch.compile(fn, dynamic=False)


def run(
    methods: tuple[str, ...],
    classes: tuple[int, ...],
    seconds: float,
    compile_: bool,
    sets: int = 3,
    compile_budget: float | None = None,
    on_row: Callable[[list], None] | None = None,
) -> list[tuple[str, int, int, list[Result]]]:
    isolate_storage()  # before anything imports pipeline (pipeline.errors -> storage.errors)
    kernels = importlib.import_module("pipeline.kernels")
    ref = importlib.import_module("pipeline.kernels.reference")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eager, fused = _reference_steps(ref), _fused_steps(kernels)
    fused_ok = device.type == "cuda" and kernels.triton_available()
    started = time.perf_counter()
    rows = []
    for c in classes:
        inputs = _inputs(c, device, sets)  # one set of inputs for every method at this C
        for method in methods:
            results = [_safe("eager", eager[method], inputs, device, seconds)]
            if compile_:
                late = compile_budget is not None and time.perf_counter() - started > compile_budget
                if late:
                    note = f"skipped: past the {compile_budget:g}s compile budget"
                    results.append(Result("compile", None, None, note))
                else:
                    torch._dynamo.reset()  # one specialization per cell, no recompile limits
                    step = _compile(eager[method])
                    results.append(_safe("compile", step, inputs, device, seconds))
            if fused_ok:
                results.append(_safe("fused", fused[method], inputs, device, seconds))
            else:
                why = "needs CUDA (no GPU in this run)" if device.type != "cuda" else "no triton"
                results.append(Result("fused", None, None, why))
            rows.append((method, c, ELEMENTS // c, results))
            print(_format_row(method, c, ELEMENTS // c, results), flush=True)
            if on_row is not None:
                on_row(rows)
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda r: (methods.index(r[0]), r[1]))  # the table: method by method
    return rows


def _safe(impl: str, step: Step, sets: list[Inputs], device: torch.device, seconds: float):
    """``_measure`` that reports an error (a compile failure, say) in the row and goes on."""
    try:
        result = _measure(step, sets, device, seconds)
    except Exception as exc:
        for student, _, _ in sets:
            student.grad = None
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        print(f"{impl} failed: {text}", flush=True)
        return Result(impl, None, None, f"error: {text}")
    result.impl = impl
    return result


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "—"
    return f"{value / base:.2f}x"


def _format_row(method: str, classes: int, batch: int, results: list[Result]) -> str:
    base = results[0]
    out = []
    for r in results:
        head = f"{method:<4} {classes:>6} {batch:>8}  {r.impl:<8}"
        if r.ms is None:
            out.append(f"{head} {r.note}")
            continue
        peak = "n/a" if r.peak_mb is None else f"{r.peak_mb:8.1f}"
        gpu = "" if r.gpu_ms is None else f"  GPU {r.gpu_ms:.3f} {_ratio(r.gpu_ms, base.gpu_ms)}"
        out.append(
            f"{head} {r.ms:9.3f} {_ratio(r.ms, base.ms):>7}  {peak:>8} "
            f"{_ratio(r.peak_mb, base.peak_mb):>7}  {r.warmup_s or 0:7.1f}s {r.steps:>4}{gpu}"
        )
    return "\n".join(out)


def _table(rows: list[tuple[str, int, int, list[Result]]]) -> list[str]:
    """One line per (method, C): ms and peak MB of each impl, ratios to eager; on a GPU also
    each step's kernels alone (replayed from a CUDA graph, ``GPU``)."""
    impls = [r.impl for r in rows[0][3]] if rows else []
    graphs = any(r.gpu_ms is not None for *_, rs in rows for r in rs)
    head = f"{'meth':<4} {'C':>6} {'B':>8} |"
    for impl in impls:
        head += f" {impl + ' ms':>14} {impl + ' MB':>15} |"
        head += f" {impl + ' GPU':>14} |" if graphs else ""
    lines = [head]
    for method, c, b, results in rows:
        base = results[0]
        line = f"{method:<4} {c:>6} {b:>8} |"
        for r in results:
            if r.ms is None:
                line += f" {'—':>14} {'—':>15} |" + (f" {'—':>14} |" if graphs else "")
                continue
            ms = f"{r.ms:.3f}" + ("" if r is base else f" {_ratio(r.ms, base.ms)}")
            mb = "n/a" if r.peak_mb is None else f"{r.peak_mb:.0f}"
            if r is not base and r.peak_mb is not None:
                mb += f" {_ratio(r.peak_mb, base.peak_mb)}"
            line += f" {ms:>14} {mb:>15} |"
            if graphs:
                gpu = "—" if r.gpu_ms is None else f"{r.gpu_ms:.3f}"
                if r is not base and r.gpu_ms is not None:
                    gpu += f" {_ratio(r.gpu_ms, base.gpu_ms)}"
                line += f" {gpu:>14} |"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per cell")
    parser.add_argument("--sets", type=int, default=None, help="input sets rotated per step")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="KD/DKD, short timing (~1-2 min)")
    parser.add_argument("--compile-budget", type=float, default=None, help="s; no compile after")
    parser.add_argument("--out", type=Path, default=None, help="write bench_losses.json here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    # The CPU run is kept to a few minutes: KD and DKD, one second per cell unless asked.
    default_methods = QUICK_METHODS if args.quick or not cuda else METHODS
    methods = tuple(args.methods or default_methods)
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 1.0)
    sets = args.sets if args.sets is not None else (2 if args.quick else 3)
    budget = args.compile_budget
    if budget is None and args.quick:
        budget = 75.0
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'})"
    triton_version = "absent"
    if importlib.util.find_spec("triton") is not None:
        triton_version = importlib.import_module("triton").__version__
    print(f"loss forward+backward, B*C = 2^24, teacher float16, {where}, "
          f"torch {torch.__version__}, triton {triton_version}, "
          f"{torch.get_num_threads()} threads, {sets} input sets rotated")  # fmt: skip
    print(f"{'meth':<4} {'C':>6} {'B':>8}  {'impl':<8} {'ms/step':>9} {'vs eager':>7}"
          f"  {'peak MB':>8} {'vs eager':>7}  {'warm-up':>8} {'steps':>4}")  # fmt: skip
    started = time.perf_counter()

    def write_json(rows: list) -> None:
        if args.out is None:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": where,
            "torch": torch.__version__,
            "triton": triton_version,
            "sets": sets,
            "seconds_per_cell": seconds,
            "rows": [
                {"method": m, "classes": c, "batch": b, "results": [asdict(r) for r in rs]}
                for m, c, b, rs in rows
            ],
        }
        (args.out / "bench_losses.json").write_text(json.dumps(payload, indent=1))

    rows = run(methods, tuple(args.classes), seconds, not args.no_compile, sets, budget, write_json)
    print(f"\nsummary ({where}; median ms per forward+backward, peak MB over the inputs, "
          f"ratios to eager; {time.perf_counter() - started:.0f}s):")  # fmt: skip
    for line in _table(rows):
        print(line)
    if not cuda:
        print("fused: needs CUDA (no GPU in this run); peak MB = resident-set growth on CPU")
    heavy = heavy_modules()
    if heavy:
        print(f"note: heavy modules imported: {heavy}")
    write_json(rows)
    failed = [f"{m} C={c}" for m, c, _, rs in rows for r in rs
              if r.impl == "fused" and r.note.startswith("error")]  # fmt: skip
    if failed:
        print(f"FAILED: the fused kernels raised in {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
