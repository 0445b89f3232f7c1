"""Teacher inference throughput: ONNX Runtime vs PyTorch eager vs torch.compile, same run.

The precompute stage runs the teacher once over every view of the dataset, so its images/s is
the stage's speed. This measures the same model and batch through the three engines, on the same
threads, and prints images/s and the ratio to eager (target: ONNX Runtime ≥ 1.25× eager on CPU).

    python -m tests.benchmarks.bench_inference [--model resnet56] [--batch 64 256] [--seconds 4]

The model's BN statistics are calibrated on random data first, so its activations (and the work
the kernels do) look like a trained teacher's rather than an untrained net's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.models import build_model
from pipeline.onnx_export import export_onnx
from pipeline.ort import Runner, available_cores, make_session


def _images_per_s(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Median images/s over repeated calls after two warm-up calls, within ~``seconds``."""
    fn()
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def _calibrated(name: str, channels: int, size: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, classes, channels, size)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, channels, size, size))
    return model.eval()


def run(
    model_name: str,
    batches: list[int],
    seconds: float,
    threads: int,
    compile_model: bool,
    channels: int = 1,
    size: int = 28,
    classes: int = 10,
) -> list[dict[str, float | int | str]]:
    torch.set_num_threads(threads)
    model = _calibrated(model_name, channels, size, classes)
    rows: list[dict[str, float | int | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "teacher.onnx"
        t0 = time.perf_counter()
        export_onnx(model, torch.randn(2, channels, size, size), onnx_path)
        export_s = time.perf_counter() - t0
        runner = Runner(make_session(onnx_path, provider="cpu", threads=threads), classes)
        compiled = None
        compile_s = float("nan")
        if compile_model:
            compiled = torch.compile(model, dynamic=False)
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, channels, size, size))
            x = x.astype(np.float32)
            xt = torch.from_numpy(x)

            def eager(xt: torch.Tensor = xt) -> object:
                with torch.inference_mode():
                    return model(xt).numpy()

            row: dict[str, float | int | str] = {"model": model_name, "batch": batch}
            row["eager"] = _images_per_s(eager, batch, seconds)
            row["ort"] = _images_per_s(lambda x=x: runner.run(x), batch, seconds)
            if compiled is not None:

                def comp(xt: torch.Tensor = xt) -> object:
                    with torch.inference_mode():
                        return compiled(xt).numpy()

                t0 = time.perf_counter()
                comp()  # the first call compiles for this batch size
                compile_s = time.perf_counter() - t0
                row["compile"] = _images_per_s(comp, batch, seconds)
                row["compile_s"] = compile_s
            rows.append(row)
        print(f"# export (dynamo + onnx.checker + parity) {export_s:.1f} s", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, float | int | str]], threads: int) -> str:
    lines = [
        f"teacher inference, CPU, {threads} threads (images/s; × = ratio to torch eager)",
        "| model | batch | eager | ONNX Runtime | torch.compile |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eager = float(r["eager"])
        ort_s = f"{float(r['ort']):.0f} ({float(r['ort']) / eager:.2f}×)"
        comp = "skipped"
        if "compile" in r:
            compiled = float(r["compile"])
            comp = f"{compiled:.0f} ({compiled / eager:.2f}×; compiled in {r['compile_s']:.0f} s)"
        lines.append(f"| {r['model']} | {r['batch']} | {eager:.0f} | {ort_s} | {comp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per engine and batch")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    rows = run(args.model, args.batch, args.seconds, args.threads, not args.no_compile)
    print(_table(rows, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
