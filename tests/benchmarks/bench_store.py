"""Logit store throughput vs ``np.memmap`` of the same bytes, read the same way, in the same run.

Two stores (V = 1, default chunking from ``create_store``): 200,000 x 1000 float16 (ImageNet-ish
classes) and 50,000 x 100 float32 (CIFAR-100-ish). Next to each, a raw ``.npy`` of the same logits
in the stored dtype. Every read is timed against memmap doing the same pattern:

- write: ``store.write`` in large batches vs assigning the same batches into an ``open_memmap``;
- sequential: ``store.iter_blocks`` vs memmap slices of the same block sizes, converted to float32;
- naive random-256: ``store.read(256 random rows)`` vs memmap fancy indexing + conversion;
- training sampler: ``LogitBatches(path, 256, memory_budget=0)`` (streamed) for one epoch vs the
  exact same plan on memmap (the ``BlockSampler``'s chunk-aligned blocks in its shuffled order, a
  window of blocks copied + converted into a float32 pool, rows gathered in the same permutation
  into 256-row float32 batches); for the small store also the in-RAM path (default budget).

Data is warm: each reader runs once untimed (page cache), then store and memmap repeats alternate
so machine noise hits both; medians are reported. Target: streamed sampler >= 0.9x memmap.

    python -m tests.benchmarks.bench_store [--rows-scale 0.1] [--repeats 5] [--dir DIR] [--keep]
                                           [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import math
import os
import platform
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from storage import create_store, open_store
from storage.audit import audit_logits, format_audit, sample_rows
from storage.base import LogitStore
from storage.sampler import BlockSampler, LogitBatches

BATCH = 256
TARGET_SAMPLER_RATIO = 0.9


@dataclass(frozen=True)
class Case:
    """One store to benchmark."""

    rows: int
    classes: int
    encoding: str

    def title(self, rows: int) -> str:
        return f"{rows:,} x {self.classes} {self.encoding}"


CASES = (Case(200_000, 1000, "float16"), Case(50_000, 100, "float32"))


@dataclass
class Result:
    """One line of a table: the same rows moved by the store and by memmap."""

    operation: str
    rows: int
    store_s: float
    memmap_s: float

    @property
    def ratio(self) -> float:
        return self.memmap_s / self.store_s


# ---- data -----------------------------------------------------------------------------------
def teacher_logits(rng: np.random.Generator, labels: np.ndarray, classes: int) -> np.ndarray:
    """Logits shaped like a trained teacher's: float32 (n, C), small enough for float16.

    Gaussian noise around a per-row offset, the label class boosted by 5-10 and two confusable
    classes by a fraction of that ("dark knowledge"), so softmax is peaked but not one-hot.
    """
    n = len(labels)
    rows = np.arange(n)
    x = rng.standard_normal((n, classes), dtype=np.float32)  # (n, C)
    x *= 1.5
    x += rng.normal(0.0, 2.0, (n, 1)).astype(np.float32)
    boost = rng.uniform(5.0, 10.0, n).astype(np.float32)
    x[rows, labels] += boost
    for _ in range(2):
        other = (labels + rng.integers(1, classes, n)) % classes
        x[rows, other] += boost * rng.uniform(0.2, 0.7, n).astype(np.float32)
    return x


def write_both(
    case: Case, rows: int, root: Path, batch: int, seed: int = 0
) -> tuple[Path, Path, Result]:
    """Write the store and the raw .npy from the same batches; time only the writes."""
    labels = np.random.default_rng(seed).integers(0, case.classes, rows)
    store_path = root / f"{case.encoding}_{case.classes}.zarr"
    raw_path = root / f"{case.encoding}_{case.classes}.npy"
    store = create_store(
        store_path, num_samples=rows, num_classes=case.classes, encoding=case.encoding,
        labels=labels,
    )  # fmt: skip
    raw = np.lib.format.open_memmap(raw_path, "w+", np.dtype(case.encoding), (rows, case.classes))
    store_s = raw_s = 0.0
    for start in range(0, rows, batch):
        stop = min(start + batch, rows)
        x = teacher_logits(np.random.default_rng([seed, start]), labels[start:stop], case.classes)
        # Alternate the two writers batch by batch, so noise on the machine hits both.
        t0 = time.perf_counter()
        store.write(0, start, x)
        t1 = time.perf_counter()
        raw[start:stop] = x  # converts to the stored dtype, as the store's encoder does
        raw_s += time.perf_counter() - t1
        store_s += t1 - t0
    t0 = time.perf_counter()
    store.close()
    t1 = time.perf_counter()
    raw.flush()
    del raw
    raw_s += time.perf_counter() - t1
    store_s += t1 - t0
    op = f"write (`store.write`, {batch}-row batches)"
    return store_path, raw_path, Result(op, rows, store_s, raw_s)


# ---- readers: each returns the rows it moved ------------------------------------------------
def store_sequential(store: LogitStore) -> int:
    n = 0
    for _, block in store.iter_blocks(0):
        n += len(block)
    return n


def memmap_sequential(mm: np.ndarray, block_rows: int) -> int:
    n = 0
    for start in range(0, len(mm), block_rows):
        block = mm[start : start + block_rows].astype(np.float32)  # a copy, as the store's is
        n += len(block)
    return n


def store_random(store: LogitStore, batches: list[np.ndarray]) -> int:
    return sum(len(store.read(idx)) for idx in batches)


def memmap_random(mm: np.ndarray, batches: list[np.ndarray]) -> int:
    return sum(len(mm[idx].astype(np.float32, copy=False)) for idx in batches)


def store_sampler(loader: LogitBatches) -> int:
    return sum(len(logits) for _, _, logits in loader)


def memmap_block_shuffle(mm: np.ndarray, sampler: BlockSampler, epoch: int, batch: int) -> int:
    """The plan ``LogitBatches`` follows, on memmap: same blocks, order, windows, permutation.

    Like ``LogitBatches`` it also yields each batch's global row indices (a training loop needs
    them to find the inputs); the views are left out (V = 1).
    """
    cap = min(sampler.window * sampler.block_rows, len(mm))
    pool = np.empty((cap, mm.shape[1]), np.float32)  # (window rows, C)
    pool_idx = np.empty(cap, np.int64)
    ring = [(np.empty(batch, np.int64), np.empty((batch, mm.shape[1]), np.float32)) for _ in "ab"]
    n = k = filled = 0
    for group, perm in sampler.windows(epoch):
        at = 0
        for start, stop, _ in group:
            pool[at : at + stop - start] = mm[start:stop]  # copy + convert to float32
            pool_idx[at : at + stop - start] = np.arange(start, stop)
            at += int(stop - start)
        pos = 0
        while pos < len(perm):
            idx, out = ring[k % 2]
            take = min(batch - filled, len(perm) - pos)
            sel = perm[pos : pos + take]
            np.take(pool, sel, axis=0, out=out[filled : filled + take])
            idx[filled : filled + take] = pool_idx[sel]
            filled += take
            pos += take
            if filled == batch:
                n, k, filled = n + batch, k + 1, 0
    return n + filled


# ---- timing ---------------------------------------------------------------------------------
def alternate(
    operation: str,
    store_fn: Callable[[], int],
    memmap_fn: Callable[[], int],
    repeats: int,
    min_s: float,
) -> Result:
    """Warm both once (untimed), then alternate timed repeats; medians of each, per call.

    A repeat calls its reader ``k`` times in a row (``k`` chosen so a repeat lasts >= ``min_s``)
    so that fast readers are not timed at the clock's and the scheduler's granularity.
    """
    rows = store_fn()
    if memmap_fn() != rows:
        raise AssertionError(f"{operation}: store and memmap moved different row counts")
    sides = []
    for fn in (store_fn, memmap_fn):
        t0 = time.perf_counter()
        fn()
        sides.append((fn, max(1, math.ceil(min_s / (time.perf_counter() - t0))), []))
    for _ in range(repeats):
        for fn, k, times in sides:
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times.append((time.perf_counter() - t0) / k)
    store_s, memmap_s = (statistics.median(times) for _, _, times in sides)
    return Result(operation, rows, store_s, memmap_s)


def profile_sampler(loader: LogitBatches, top: int = 12) -> str:
    """cProfile of one (warm) streamed epoch, by own time."""
    prof = cProfile.Profile()
    prof.enable()
    store_sampler(loader)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    lines = out.getvalue().strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "function calls" in line)
    return "\n".join(line.rstrip() for line in lines[start:] if line.strip())


# ---- one store ------------------------------------------------------------------------------
def bench_case(case: Case, args: argparse.Namespace, root: Path) -> tuple[str, list[Result]]:
    rows = max(BATCH * 4, int(case.rows * args.rows_scale))
    title = case.title(rows)
    t0 = time.perf_counter()
    store_path, raw_path, wrote = write_both(case, rows, root, args.write_batch)
    print(f"[{title}] written in {time.perf_counter() - t0:.1f} s (incl. generating logits)")
    results = [wrote]
    store = open_store(store_path)
    mm = np.load(raw_path, mmap_mode="r")  # (N, C) in the stored dtype
    lay = store.layout

    results.append(
        alternate(
            f"sequential (`iter_blocks`, {lay.shard_rows}-row blocks)",
            lambda: store_sequential(store),
            lambda: memmap_sequential(mm, lay.shard_rows),
            args.repeats,
            args.min_seconds,
        )
    )
    rng = np.random.default_rng(1)
    batches = [rng.choice(rows, BATCH, replace=False) for _ in range(args.random_batches)]
    results.append(
        alternate(
            f"naive random-256 (`store.read`, {args.random_batches} batches)",
            lambda: store_random(store, batches),
            lambda: memmap_random(mm, batches),
            args.repeats,
            args.min_seconds,
        )
    )
    streamed = LogitBatches(str(store_path), BATCH, memory_budget=0)
    plan = streamed.sampler()
    results.append(
        alternate(
            f"training sampler, streamed (`LogitBatches` budget 0; window {plan.window} x "
            f"{plan.block_rows} rows) vs memmap block-shuffle",
            lambda: store_sampler(streamed),
            lambda: memmap_block_shuffle(mm, plan, streamed.epoch, BATCH),
            args.repeats,
            args.min_seconds,
        )
    )
    notes = []
    if case.encoding == "float32" or args.in_ram_all:
        in_ram = LogitBatches(str(store_path), BATCH)
        if in_ram.in_ram():
            ram_plan = in_ram.sampler()
            t0 = time.perf_counter()
            store_sampler(in_ram)  # the first epoch loads the view (load_view)
            notes.append(
                f"in-RAM sampler, first epoch (incl. `load_view`): "
                f"{rows / (time.perf_counter() - t0):,.0f} rows/s"
            )
            results.append(
                alternate(
                    f"training sampler, in RAM (default budget; window = all "
                    f"{ram_plan.window} blocks) vs memmap block-shuffle, same plan",
                    lambda: store_sampler(in_ram),
                    lambda: memmap_block_shuffle(mm, ram_plan, in_ram.epoch, BATCH),
                    args.repeats,
                    args.min_seconds,
                )
            )
        else:
            notes.append("in-RAM sampler: the view does not fit the default budget; skipped")

    head = (
        f"### {title} (V=1; chunk {lay.chunk_rows} rows, {lay.chunks_per_shard} chunks/shard, "
        f"{lay.num_shards} shard(s)); warm data, median of {args.repeats} alternating repeats "
        f"(each >= {args.min_seconds:g} s); write: one pass, batches alternating"
    )
    lines = [
        head,
        "",
        "| operation | store rows/s | memmap rows/s | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.operation} | {r.rows / r.store_s:,.0f} | {r.rows / r.memmap_s:,.0f} "
            f"| {r.ratio:.2f}x |"
        )
    sampler_ratio = results[3].ratio
    verdict = "met" if sampler_ratio >= TARGET_SAMPLER_RATIO else "NOT met"
    lines += [
        "",
        f"target (streamed sampler >= {TARGET_SAMPLER_RATIO}x memmap block-shuffle): {verdict} "
        f"({sampler_ratio:.2f}x)",
        *notes,
        "",
        format_audit(audit_logits(sample_rows(store, 4096)), min(4096, rows), case.encoding),
    ]
    if args.profile:
        lines += ["", f"cProfile, one warm streamed sampler epoch ({title}):", "```"]
        lines += [profile_sampler(streamed), "```"]
    store.close()
    return "\n".join(lines), results


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}; "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows-scale", type=float, default=1.0, help="scale the stores' rows (0.1: quick run)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per reader")
    parser.add_argument(
        "--min-seconds", type=float, default=0.1, help="shortest timed repeat (fast readers loop)"
    )
    parser.add_argument("--random-batches", type=int, default=16, help="random-256 batches")
    parser.add_argument("--write-batch", type=int, default=8192, help="rows per store.write")
    parser.add_argument("--dir", default=None, help="where to put the stores (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    parser.add_argument("--profile", action="store_true", help="cProfile one sampler epoch")
    parser.add_argument(
        "--in-ram-all", action="store_true", help="also time the in-RAM sampler on the big store"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    print(machine())
    t0 = time.perf_counter()
    tables = []
    try:
        for case in CASES:
            table, _ = bench_case(case, args, root)
            tables.append(table)
    finally:
        if args.keep:
            print(f"stores kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("\n\n".join(tables))
    print()
    print(machine())
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
