"""Precompute end to end against ONNX Runtime alone: does the pipeline starve the runtime?

The same teacher (a zoo model with random weights: speed does not depend on them), the same batch
size and the same rows, in one run:

- ORT alone: ``Runner.run`` over input batches prepared in memory beforehand (untimed) — the
  ceiling;
- precompute: the whole stage on a fresh store — reading the dataset, replaying each view's crop
  and flip, normalising, inference, encoding (float16 + row stats) and writing the sharded zarr
  store, with input preparation, inference and writing overlapped.

Target: precompute ≥ 0.9× ORT alone. The figures are rows (images) per second; only the ratio is
a result on a shared machine.

    python -m tests.benchmarks.bench_precompute [--model resnet20] [--rows 8192] [--views 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from pipeline.__main__ import main as cli
from pipeline.config import load_config
from pipeline.data import splits
from pipeline.ort import Runner, available_cores, make_session
from pipeline.precompute import TeacherLogits, precompute
from tests.benchmarks.common import TINY, cli_args, random_teacher_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--encoding", default="float16")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        sets = [
            *random_teacher_run(run, args.model, args.rows, args.classes, args.views),
            f"precompute.batch_size={args.batch}",
            f"precompute.encoding={args.encoding}",
            "precompute.chunk_rows=null",
        ]
        assert cli(["export", *cli_args(sets)]) == 0
        config = load_config(TINY, sets)
        train, _ = splits(config)
        produce = TeacherLogits(str(config.onnx_path), train, args.batch)
        jobs = [
            (v, a, min(a + args.batch, len(train)))
            for v in range(args.views)
            for a in range(0, len(train), args.batch)
        ]
        inputs = [produce.inputs(*job)[0] for job in jobs]  # prepared ahead, not timed
        runner = Runner(make_session(config.onnx_path, "cpu"), args.classes)
        runner.run(inputs[0])  # warm-up

        start = time.perf_counter()
        for x in inputs:
            runner.run(x)
        ort_s = time.perf_counter() - start

        start = time.perf_counter()
        precompute(config, progress=False)
        pipe_s = time.perf_counter() - start

    rows = args.rows * args.views
    print(
        f"\nprecompute vs ONNX Runtime alone: {args.model}, {args.rows} rows x {args.views} "
        f"views, 3x32x32 -> {args.classes} classes, batch {args.batch}, {args.encoding} store"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {available_cores()} core(s)")
    print("| path | rows/s | ratio to ORT alone |")
    print("| --- | --- | --- |")
    print(f"| ORT alone (inputs in RAM) | {rows / ort_s:,.0f} | 1.00 |")
    print(f"| precompute end to end | {rows / pipe_s:,.0f} | {ort_s / pipe_s:.2f} |")
    ratio = ort_s / pipe_s
    print(f"target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
