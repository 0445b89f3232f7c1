"""Precompute end to end against ONNX Runtime alone: does the pipeline starve the runtime?

The same teacher (a zoo model with random weights: speed does not depend on them), the same batch
size and the same rows, in one run:

- ORT alone: ``Runner.run`` over input batches prepared in memory beforehand (untimed) — the
  ceiling;
- precompute: the whole stage on a fresh store — reading the dataset, replaying each view's crop
  and flip, normalising, inference, encoding (float16 + row stats) and writing the sharded zarr
  store, with input preparation, inference and writing overlapped.

Target: precompute ≥ 0.9× ORT alone. The figures are rows (images) per second; only the ratio is
a result on a shared machine. Two ratios: the whole stage (loading and hashing the dataset —
here generating the synthetic one, which grows with the rows —, hashing the ONNX file, creating
the store, checking it at the end), and its loop alone (the ONNX Runtime session created, then
input preparation, inference, encoding and writing, overlapped): the part that must not starve
the runtime. ``--repeats`` interleaves ORT alone and the stage; the medians are the result.

    python -m tests.benchmarks.bench_precompute [--model resnet20] [--rows 8192] [--views 2]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import pipeline.precompute as stage
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
    parser.add_argument("--repeats", type=int, default=3, help="interleaved ORT / stage pairs")
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
        ort, whole, loop = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for x in inputs:
                runner.run(x)
            ort.append(time.perf_counter() - start)

            shutil.rmtree(config.store_path, ignore_errors=True)  # a fresh store each time
            start = time.perf_counter()
            with mock.patch.object(stage, "run_overlapped", _timed(stage.run_overlapped, loop)):
                precompute(config, progress=False)
            whole.append(time.perf_counter() - start)

    rows = args.rows * args.views
    print(
        f"\nprecompute vs ONNX Runtime alone: {args.model}, {args.rows} rows x {args.views} "
        f"views, 3x32x32 -> {args.classes} classes, batch {args.batch}, {args.encoding} store, "
        f"{args.repeats} interleaved repeat(s), medians"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {available_cores()} core(s)")
    print("| path | rows/s | ratio to ORT alone | per repeat |")
    print("| --- | --- | --- | --- |")
    t_ort = statistics.median(ort)
    print(f"| ORT alone (inputs in RAM) | {rows / t_ort:,.0f} | 1.00 | |")
    ratios = {}
    for name, times in (("precompute, its loop", loop), ("precompute, whole stage", whole)):
        each = [o / t for o, t in zip(ort, times)]
        ratios[name] = statistics.median(each)
        print(
            f"| {name} | {rows / statistics.median(times):,.0f} | {ratios[name]:.2f} | "
            f"{' / '.join(f'{r:.2f}' for r in each)} |"
        )
    fixed = statistics.median(w - lp for w, lp in zip(whole, loop))
    print(f"fixed costs of the stage: {fixed:.1f} s (the whole stage minus its loop)")
    ratio = ratios["precompute, its loop"]
    print(f"target >= 0.90 (the loop): {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f})")
    return 0


def _timed(fn, times: list[float]):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    return timed


if __name__ == "__main__":
    raise SystemExit(main())
