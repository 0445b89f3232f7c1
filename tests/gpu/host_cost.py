"""Where the host time of a fused loss step goes, on a GPU: launch by launch, and in Python.

    python -m tests.gpu.host_cost [--out DIR]      # on a CUDA machine (STEPS=host)
    python -m tests.gpu.host_cost --interpret      # the code paths on CPU, timings meaningless

tile_sweep (H200, 2026-11-27) found the fused KD and DKD kernels 5-20x faster than eager when
replayed from a CUDA graph, yet a forward + backward launched from Python took 0.45-0.93 ms
whatever C: host time, not kernel time, is what bench_losses times, and it is several times what
the wrapper's own Python costs on a CPU with the launches stubbed out (~0.1 ms). This script
splits it up on tiny inputs (B = 64, C = 100: the GPU work is microseconds, so a loop's wall
time per call is the host's), each timed as the median of groups of calls with one synchronize
per group:

- floors: a torch elementwise launch, and a triton kernel of three arguments;
- ``_kd_rows_fwd`` launched alone with the arguments ``kd_rows`` gives it (triton's own launch
  path for a kernel of this many arguments);
- ``kd_rows`` forward, forward + backward (``torch.autograd.grad``), ``kd_ce`` forward +
  backward, DKD's, and eager PyTorch's forward + backward for comparison;
- a cProfile of 300 fused KD forward + backward calls: the top functions by own time.

Writes ``host_cost.json`` (and the profile as ``host_cost_profile.txt``) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

from tests.gpu.timing import has_cuda, interpreter


def _time_us(fn, sync, calls: int = 200, groups: int = 7) -> float:
    """Median µs per call over ``groups`` loops of ``calls`` calls, one sync after each loop."""
    for _ in range(min(20, calls)):
        fn()
    sync()
    per = []
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--interpret", action="store_true", help="CPU dry run (no real timing)")
    args = parser.parse_args(argv)
    interpreter(args.interpret)
    import torch
    import triton
    import triton.language as tl

    from pipeline.kernels import reference, triton_dkd, triton_kd
    from pipeline.kernels.triton_common import affine, launch_config

    if args.interpret:
        device, calls, groups = "cpu", 1, 1
    elif has_cuda("host_cost"):
        device, calls, groups = "cuda", 200, 7
    else:
        return 3

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    batch, classes = 64, 100
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(batch, classes, device=device, generator=gen).requires_grad_()
    teacher = torch.randn(batch, classes, device=device, generator=gen).half()
    target = torch.randint(0, classes, (batch,), device=device, generator=gen)
    x = torch.randn(batch, device=device)
    y = torch.empty_like(x)
    temp = torch.full((batch,), 4.0, device=device)
    loss = torch.empty(batch, device=device)
    stats = torch.empty((triton_kd.N_STATS, batch), device=device)
    launch = launch_config(batch, classes)
    s_det = student.detach()

    def fwd_kernel():
        return triton_kd._kd_rows_fwd[launch.grid(batch)](
            s_det, teacher, *affine(None, None, loss), temp, loss, stats, loss, loss, batch,
            classes, classes, classes, 1e-7, 0.0, 0.0, 1.0 / batch, HAS_SCALE=False, ZSCORE=False,
            NEED_T_STATS=False, WITH_CE=False, **launch.meta(),
        )  # fmt: skip

    def kd_fb():
        torch.autograd.grad(triton_kd.kd_rows(student, teacher, 4.0).sum(), student)

    def kd_ce_fb():
        total = triton_kd.kd_ce(student, teacher, target, 4.0, 1.0, 1.0, target_checked=True)[0]
        torch.autograd.grad(total, student)

    def dkd_fb():
        tckd, nckd = triton_dkd.dkd_rows(student, teacher, target, 4.0, target_checked=True)
        torch.autograd.grad((tckd + 8.0 * nckd).sum(), student)

    def eager_fb():
        torch.autograd.grad(reference.kd_rows(student, teacher.float(), 4.0).sum(), student)

    # The same launch without triton's per-call work: the kernel compiled by the call above,
    # launched through CompiledKernel[grid] with the argument list triton's binder makes.
    compiled = fwd_kernel()
    fwd_fn = triton_kd._kd_rows_fwd
    binder_args = (s_det, teacher, *affine(None, None, loss), temp, loss, stats, loss, loss,
                   batch, classes, classes, classes, 1e-7, 0.0, 0.0, 1.0 / batch)  # fmt: skip
    binder_kw = dict(HAS_SCALE=False, ZSCORE=False, NEED_T_STATS=False, WITH_CE=False)
    binder_kw |= launch.meta()
    direct = bind_only = None
    try:  # triton internals (3.6 - 3.9): another triton loses these two rows, not the run
        if device == "cuda" and compiled is not None:
            binder = fwd_fn.device_caches[torch.cuda.current_device()][4]
            params = list(binder(*binder_args, **binder_kw)[0].values())
            stream = torch.cuda.current_stream().cuda_stream
            runner = compiled[(*launch.grid(batch), 1, 1)]

            def direct():
                runner(*params, stream=stream)

            def bind_only():
                binder(*binder_args, **binder_kw)
    except Exception as exc:
        print(f"direct launch rows skipped: {type(exc).__name__}: {exc}")
        direct = bind_only = None

    def device_ctx():
        with torch.cuda.device(student.device) if device == "cuda" else contextlib.nullcontext():
            pass

    def autograd_floor():
        (student * 1.0).mean().backward()

    def kd_bench_step():  # what bench_losses times for "kd"
        student.grad = None
        triton_kd.kd_rows(student, teacher, 4.0).mean().backward()

    def eager_bench_step():
        student.grad = None
        reference.kd_rows(student, reference.decode_teacher(teacher), 4.0).mean().backward()

    rows: list[tuple[str, object]] = [
        ("torch.add (one launch)", lambda: torch.add(x, 1.0, out=y)),
        ("torch.empty (B,)", lambda: torch.empty(batch, device=device)),
        ("torch.cuda.device context", device_ctx),
        ("autograd floor: (s*1).mean().backward()", autograd_floor),
        ("triton copy, 3 args (one launch)", lambda: _copy[(1,)](x, y, batch, BLOCK=64)),
        ("_kd_rows_fwd launched alone (JIT run)", fwd_kernel),
        *(
            [("  its binder alone", bind_only), ("  CompiledKernel[grid] launch", direct)]
            if direct is not None
            else []
        ),
        ("kd_rows forward", lambda: triton_kd.kd_rows(s_det, teacher, 4.0)),
        ("kd_rows forward + backward", kd_fb),
        ("kd_ce forward + backward", kd_ce_fb),
        ("dkd_rows forward + backward", dkd_fb),
        ("eager KD forward + backward", eager_fb),
        ("bench step: kd_rows.mean().backward()", kd_bench_step),
        ("bench step: eager KD .mean().backward()", eager_bench_step),
    ]
    results = {}
    for name, fn in rows:
        try:
            us = _time_us(fn, sync, calls, groups)
        except Exception as exc:  # a prototype row must not cost the others
            print(f"{name:<40} failed: {type(exc).__name__}: {exc}")
            continue
        results[name] = us
        print(f"{name:<40} {us:9.1f} us a call")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(300 if device == "cuda" else 1):
        kd_fb()
    profile.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        env |= {"torch": torch.__version__, "triton": triton.__version__}
        payload = {"environment": env, "batch": batch, "classes": classes, "us": results}
        (out / "host_cost.json").write_text(json.dumps(payload, indent=1))
        (out / "host_cost_profile.txt").write_text(text.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
