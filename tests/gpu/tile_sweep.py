"""Time the fused loss kernels alone, tile by tile, on a GPU: which tile each C should get.

    python -m tests.gpu.tile_sweep [--methods kd dkd] [--classes 10 1000] [--out DIR] [--jobs 8]
    python -m tests.gpu.tile_sweep --interpret     # a dry run on CPU: tiny sizes, no timing

bench_losses times a whole training step's loss (launches from Python included) and found the
fused KD kernel at 0.5-1.1 ms for B*C = 2^24 whatever C: about 10x the time its bytes take at an
H100's bandwidth. Whether that is the kernels or the host's launching, and which tile is best
for each C, this script answers in one run:

- kernel time: forward + backward (``torch.autograd.grad`` of the summed per-row loss) captured
  in a CUDA graph and replayed, so no host work is timed; median over groups of replays, CUDA
  events around each group;
- for every C, the default tile (``launch_config``) and candidates around it: (rows, block,
  num_warps) with 1-32 elements a thread, rows * block from 256 to 4096 elements for C <= 2048,
  one row and blocks of 1024-8192 above, and for KD from C = 8192 up 1, 2, 4, 8 or 16
  segments a row (``segments_for``: the split kernels);
- beside them, in the same run: eager PyTorch (``pipeline.kernels.reference``) in a CUDA graph
  too (its kernels alone), and the default tile and eager launched from Python as a training
  step does (the difference is host time);
- the bandwidth floor: the bytes one forward + backward must move (student and teacher read
  twice, the gradient written once) at the device's measured copy bandwidth.

The candidates' kernels are compiled first by ``--jobs`` worker processes (into triton's cache,
which the timing process then reads), since compiling dominates the run; a chunk whose worker
fails is reported and its tiles are compiled by the timing process instead. Prints a table per
(method, C), the best tile for each, and rewrites ``tile_sweep.json`` in ``--out`` after each
(method, C), so a run killed at its time limit keeps what it measured. ``--budget SECONDS``: no
new (method, C) is timed past it (the JSON says which were left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ELEMENTS = 1 << 24
CLASSES = (10, 100, 1000, 32768, 131072)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def candidates(classes: int, method: str = "kd") -> list[tuple[int, ...]]:
    """(rows, block, num_warps[, segments]) tiles to try for C = ``classes``.

    KD's rows of 8192 classes or more also try 1-16 column segments a row (the split kernels).
    """
    whole = _next_power_of_2(classes)
    out: set[tuple[int, int, int]] = set()
    if whole <= 2048:
        for elements in (256, 512, 1024, 2048, 4096):
            block = min(whole, elements)
            rows = max(1, elements // block)
            for warps in (1, 2, 4, 8, 16):
                per_thread = rows * block // (32 * warps)
                if 1 <= per_thread <= 32:
                    out.add((rows, block, warps))
    else:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                if 2 <= block // (32 * warps) <= 32:
                    out.add((1, block, warps))
    if method == "kd" and classes >= 8192:
        out = {(*tile, segments) for tile in out for segments in (1, 2, 4, 8, 16)}
    return sorted(out)


def default_tile(batch: int, classes: int, method: str = "kd", device: str = "cuda") -> tuple:
    """The tile ``pipeline.kernels`` launches by default (with KD's segments where it splits)."""
    import torch

    from pipeline.kernels.triton_common import launch_config, segments_for

    launch = launch_config(batch, classes)
    tile = (launch.rows, launch.block, launch.num_warps)
    if method == "kd" and classes >= 8192:
        return (*tile, segments_for(batch, classes, launch, torch.device(device))[0])
    return tile


def _inputs(method: str, batch: int, classes: int, device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(classes)
    student = torch.randn(batch, classes, device=device, generator=gen).mul_(3).requires_grad_()
    teacher = torch.randn(batch, classes, device=device, generator=gen).mul_(3).half()
    target = torch.randint(0, classes, (batch,), device=device, generator=gen)
    return student, teacher, target


def _loss_fn(method: str, tile, impl: str):
    """(student, teacher, target) -> scalar loss of ``method`` with this tile (None: default)."""
    from pipeline.kernels import reference

    def kd(student, teacher, target):
        if impl == "reference":
            return reference.kd_rows(student, teacher.float(), 4.0).sum()
        from pipeline.kernels.triton_kd import kd_rows

        return kd_rows(student, teacher, 4.0, config=tile).sum()

    def dkd(student, teacher, target):
        if impl == "reference":
            tckd, nckd = reference.dkd_rows(student, teacher.float(), target, 4.0)
        else:
            from pipeline.kernels.triton_dkd import dkd_rows

            tckd, nckd = dkd_rows(student, teacher, target, 4.0, config=tile)
        return (tckd + 8.0 * nckd).sum()

    return {"kd": kd, "dkd": dkd}[method]


def _compile(job: tuple[str, int, int, list]) -> str:
    """Worker: run each tile once (compiles it into triton's on-disk cache)."""
    import torch

    method, batch, classes, tiles = job
    student, teacher, target = _inputs(method, batch, classes, "cuda")
    failed = []
    for tile in tiles:
        try:
            loss = _loss_fn(method, tuple(tile), "triton")(student, teacher, target)
            torch.autograd.grad(loss, student)
        except Exception as e:  # one tile that does not compile must not stop the chunk
            failed.append(f"\n  tile {tuple(tile)}: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    done = len(tiles) - len(failed)
    return f"{method} C={classes}: {done} tile(s) compiled" + "".join(failed)


def graph_ms(fn, student, teacher, target, replays: int = 20, groups: int = 5) -> float:
    """Median ms of one fn (forward + backward) replayed from a CUDA graph: the GPU's time
    without the host's launches between kernels (also bench_losses' "GPU" columns)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy inits)
            torch.autograd.grad(fn(student, teacher, target), student)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.autograd.grad(fn(student, teacher, target), student)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return statistics.median(times)


def _launched_ms(fn, student, teacher, target, steps: int = 50) -> float:
    """Median ms of fn launched from Python each step (events around each step, no sync)."""
    import torch

    from tests.gpu.timing import launched_ms

    def once() -> None:
        torch.autograd.grad(fn(student, teacher, target), student)

    for _ in range(3):
        once()
    return launched_ms(once, steps)


def timed(what: str, measure, fn, inputs) -> float:
    """``measure(fn, *inputs)``, or NaN with a line saying why: one measurement that fails
    (a graph capture, a launch) must not lose the others."""
    try:
        return measure(fn, *inputs)
    except Exception as e:
        print(f"  {what}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("nan")


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the floor's bandwidth)."""
    import torch

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


def _dry_run() -> int:
    """The code paths on CPU under triton's interpreter: tiny sizes, every candidate of C = 37."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    batch, classes = 8, 37

    def grad(method: str, tile, impl: str, inputs) -> torch.Tensor:
        student = inputs[0]
        return torch.autograd.grad(_loss_fn(method, tile, impl)(*inputs), student)[0]

    for method in ("kd", "dkd"):
        inputs = _inputs(method, batch, classes, "cpu")
        want = grad(method, None, "reference", inputs)
        tiles = candidates(classes, method)
        if method == "kd":  # the split kernels, as the sweep runs them at C >= 8192
            tiles += [(1, 16, 4, 2), (2, 16, 4, 3)]
        for tile in tiles:
            torch.testing.assert_close(grad(method, tile, "triton", inputs), want)
        print(f"{method}: {len(tiles)} tiles of C={classes} agree with the reference")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["kd", "dkd"], choices=["kd", "dkd"])
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--jobs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--out", default=None)
    parser.add_argument("--interpret", action="store_true", help="CPU dry run (no timing)")
    parser.add_argument("--budget", type=float, default=None, help="s; no new (method, C) after")
    args = parser.parse_args(argv)
    if args.interpret:
        return _dry_run()
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not torch.cuda.is_available():
        print("tile_sweep: no CUDA device (use --interpret for the CPU dry run)")
        return 3
    started = time.perf_counter()
    jobs = []
    for method in args.methods:
        for classes in args.classes:
            batch = ELEMENTS // classes
            tiles = sorted({*candidates(classes, method), default_tile(batch, classes, method)})
            jobs.append((method, batch, classes, tiles))
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA in the workers: no fork
    chunks = [
        (m, b, c, tiles[i : i + 4]) for m, b, c, tiles in jobs for i in range(0, len(tiles), 4)
    ]
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for chunk, future in [(c, pool.submit(_compile, c)) for c in chunks]:
            try:
                print(future.result(), flush=True)
            except Exception as e:  # a broken worker: the timing process compiles these
                what = f"{chunk[0]} C={chunk[2]} tiles {chunk[3]}"
                print(f"compile worker failed ({what}): {type(e).__name__}: {e}", flush=True)
    print(f"compiled in {time.perf_counter() - started:.0f}s", flush=True)

    bandwidth = _copy_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"{name}: device copy {bandwidth / 1e12:.2f} TB/s (read + written)")
    results: list[dict] = []
    left_out: list[str] = []

    def write_json() -> None:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            payload = {"device": name, "bandwidth": bandwidth, "results": results}
            payload["left_out"] = left_out
            (Path(args.out) / "tile_sweep.json").write_text(json.dumps(payload, indent=1))

    for method, batch, classes, tiles in jobs:
        if args.budget is not None and time.perf_counter() - started > args.budget:
            left_out.append(f"{method} C={classes}")
            print(f"\n{method} C={classes}: left out, past the {args.budget:g}s budget")
            continue
        student, teacher, target = _inputs(method, batch, classes, "cuda")
        floor_ms = (2 * (4 + 2) + 4) * batch * classes / bandwidth * 1e3
        inputs = (student, teacher, target)
        eager = _loss_fn(method, None, "reference")
        eager_graph = timed("eager, graph", graph_ms, eager, inputs)
        eager_launched = timed("eager, launched", _launched_ms, eager, inputs)
        default = default_tile(batch, classes, method)
        fused = _loss_fn(method, default, "triton")
        fused_launched = timed("fused default, launched", _launched_ms, fused, inputs)
        rows = []
        for tile in tiles:
            ms = timed(f"tile {tile}", graph_ms, _loss_fn(method, tile, "triton"), inputs)
            if ms == ms:  # not NaN
                rows.append({"tile": list(tile), "ms": ms, "default": tile == default})
        if not rows:
            continue
        rows.sort(key=lambda r: r["ms"])
        best = rows[0]
        default_ms = next((r["ms"] for r in rows if r["default"]), float("nan"))
        print(
            f"\n{method} C={classes} B={batch}: floor {floor_ms:.3f} ms | eager graph "
            f"{eager_graph:.3f} ms, launched {eager_launched:.3f} | fused default {default} "
            f"graph {default_ms:.3f} ms ({default_ms / eager_graph:.2f}x eager), launched "
            f"{fused_launched:.3f} | best {tuple(best['tile'])} {best['ms']:.3f} ms "
            f"({best['ms'] / eager_graph:.2f}x eager, {best['ms'] / floor_ms:.1f}x floor)",
            flush=True,
        )
        for r in rows:
            mark = " <- default" if r["default"] else ""
            tile = r["tile"]
            segments = f" segments {tile[3]:2d}" if len(tile) > 3 else ""
            ratio = r["ms"] / eager_graph
            print(f"  rows {tile[0]:4d} block {tile[1]:5d} warps {tile[2]:2d}{segments}  "
                  f"{r['ms']:8.3f} ms  {ratio:5.2f}x eager{mark}")  # fmt: skip
        results.append(
            {
                "method": method,
                "classes": classes,
                "batch": batch,
                "floor_ms": floor_ms,
                "eager_graph_ms": eager_graph,
                "eager_launched_ms": eager_launched,
                "fused_default_launched_ms": fused_launched,
                "tiles": rows,
            }
        )
        del student, teacher, target, inputs
        torch.cuda.empty_cache()
        write_json()
    print(f"\ntile_sweep: {time.perf_counter() - started:.0f}s on {name}")
    write_json()
    return 0


if __name__ == "__main__":
    sys.exit(main())
