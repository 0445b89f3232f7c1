"""Scaling: precompute rows/s with 1 and 2 dask workers, distill rows/s with 1 and 2 ranks.

In one run, as ratios to the one-process figure:

- precompute: the whole stage (dataset read, view replay, ONNX Runtime, encoding, sharded zarr
  writes) on a fresh store, one process with ONNX Runtime on every core; then a local dask cluster
  of 1 and of 2 worker processes, each worker's session given cores / workers intra-op threads,
  each task owning whole shards. The cluster's start-up is inside the timing, as a user pays it.
- distill: one epoch of KD from the store, one process (``python -m pipeline distill``) with
  torch on every core, then ``torchrun`` with 1 and with 2 ranks (DDP, gloo), each rank with
  cores / ranks threads and the same global batch. rows/s is the training loop's own figure
  (``metrics.jsonl``: all ranks' rows, first batch to last step, evaluation excluded).

What limits scaling on the machine is printed beside each row: the cores busy (from /proc/stat
over the run, all processes) — on a 2-core machine one process already keeps both cores busy, so
a second worker or rank can only add its overhead (pickling, dask scheduling, gradient
all-reduce); the ratios measure that overhead. On a machine with more cores or GPUs than one
process can use, the same command measures the gain.

    python -m tests.benchmarks.bench_scaling [--rows 16384] [--views 2] [--skip-distill]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.__main__ import main as cli
from pipeline.ort import available_cores
from tests.benchmarks.common import cli_args, random_teacher_run

REPO = Path(__file__).resolve().parents[2]


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (zeros where absent)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    values = [float(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


class Busy:
    """Cores busy over a ``with`` block (machine-wide: every process counts)."""

    def __enter__(self) -> Busy:
        self.start = cpu_busy()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        busy, total = (b - a for a, b in zip(self.start, cpu_busy()))
        self.cores = busy / total * (os.cpu_count() or 1) if total else float("nan")


def run_sets(run: Path, args: argparse.Namespace) -> list[str]:
    return [
        *random_teacher_run(run, args.model, args.rows, args.classes, args.views),
        f"precompute.batch_size={args.batch}",
        "precompute.encoding=float16",
        "precompute.chunk_rows=256",
        "precompute.chunks_per_shard=4",
    ]


def precompute_rows_s(sets: list[str], workers: int, rows: int, run: Path) -> tuple[float, float]:
    """(rows/s, cores busy) of a fresh precompute with ``workers`` dask workers (0: none)."""
    # The last case's store deleted (--overwrite keeps a store of the same inputs).
    shutil.rmtree(run / "store.zarr", ignore_errors=True)
    extra: list[str] = []
    if workers:
        extra += ["--workers", str(workers)]
    with Busy() as busy:
        status = cli(["precompute", *cli_args(sets), *extra])
    if status:
        raise SystemExit(f"precompute with {workers} worker(s) failed (exit {status})")
    return rows / busy.seconds, busy.cores


def distill_rows_s(sets: list[str], ranks: int, run: Path) -> tuple[float, float]:
    """(rows/s, cores busy) of one KD epoch from the store with ``ranks`` torchrun ranks
    (0: a plain process)."""
    name = f"scale-{ranks}"
    argv = [
        "distill",
        *cli_args(
            [
                *sets,
                "distill.student=small_cnn",
                "distill.method=kd",
                "distill.epochs=1",
                "distill.milestones=[]",
                f"distill.batch_size={64}",
                "distill.device=cpu",
                f"distill.name={name}",
            ]
        ),
    ]
    threads = max(1, available_cores() // max(1, ranks))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if ranks:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "pipeline",
            *argv,
        ]
    else:
        cmd = [sys.executable, "-m", "pipeline", *argv]
    with Busy() as busy:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"distill with {ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    metrics = run / "distill" / name / "metrics.jsonl"
    record = json.loads(metrics.read_text().splitlines()[-1])
    return float(record["rows_per_s"]), busy.cores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--skip-distill", action="store_true")
    args = parser.parse_args(argv)

    cores = available_cores()
    rows: list[tuple[str, str, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        sets = run_sets(run, args)
        if cli(["export", *cli_args(sets)]):
            raise SystemExit("export failed")
        total = args.rows * args.views
        cases = [("precompute", n) for n in (0, 1, 2)]
        if not args.skip_distill:
            cases += [("distill", n) for n in (0, 1, 2)]
        base: dict[str, float] = {}
        for stage, n in cases:
            if stage == "precompute":
                speed, busy = precompute_rows_s(sets, n, total, run)
                label = f"dask, {n} worker(s)"
            else:
                speed, busy = distill_rows_s(sets, n, run)
                label = f"torchrun, {n} rank(s)"
            base.setdefault(stage, speed)
            rows.append((stage, label if n else "1 process", speed, speed / base[stage], busy))

    print(
        f"\nscaling on {platform.processor() or platform.machine()}, {cores} core(s), "
        f"{datetime.date.today()}: teacher {args.model} 3x32x32 -> {args.classes} classes, "
        f"{args.rows} rows x {args.views} views (precompute), small_cnn KD one epoch of view 0 "
        "(distill)"
    )
    print("| stage | how | rows/s | ratio to 1 process | cores busy |")
    print("| --- | --- | --- | --- | --- |")
    for stage, how, speed, ratio, busy in rows:
        print(f"| {stage} | {how} | {speed:,.0f} | {ratio:.2f} | {busy:.2f} of {cores} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
