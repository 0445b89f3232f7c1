"""Which structure of a fused KD step costs the host least: variants side by side, one run.

    python -m tests.gpu.host_variants [--out DIR]       # on a CUDA machine (STEPS=variants)
    python -m tests.gpu.host_variants --interpret       # the code paths on CPU, timings meaningless

A fused KD step launched from Python is host-bound (its kernels take ~0.1 ms of a ~0.5 ms step,
``step_breakdown``). The variants, each ``student.grad = None; step(...).backward()`` as
``bench_losses`` times it, at B·C = 2^24 (float16 teacher, T = 4) and at B = 64, C = 100:

- ``eager``: the PyTorch reference, ``kd_rows(...).mean()``;
- ``fused``: ``kernels.kd_rows(..., impl="triton").mean()`` as shipped: since 2026-11-27 its
  forward launches the forward kernel and the gradient kernel (each row's gradient, go = 1),
  and backward scales that gradient by the rows' (one elementwise op);
- ``fused, bwd kernel``: the same call with ``triton_kd.GRADIENT_IN_FORWARD = False``, the
  structure before (the gradient kernel launched from backward, from the statistics forward
  saved);
- ``kernel-in-bwd``: that structure rebuilt here from the same kernels, without the API's checks;
- ``grad-in-fwd``: one ``autograd.Function`` returning the mean itself (gradient of the mean,
  go = 1/B at stride 0, no mean node) and skipping the input checks: what is left to gain;
- ``native-bwd``: the same kernels run outside autograd, the mean's gradient given to autograd
  as ``dot(s, G) - dot(s, G).detach()`` (exactly 0, gradient G): the backward runs in C++ only;
- ``floor``: ``(s * 1).mean().backward()``, what any loss's step costs at least;
- the same with the cross-entropy (``+ce``: 0.1 · CE + 0.9 · KD): ``eager+ce``, ``fused+ce``
  (``kernels.kd_ce``, its targets checked in the kernel), ``fused+ce checked`` (told the
  targets are checked, as the methods were before 2026-11-27), ``kernel-in-bwd+ce``,
  ``fused+ce, bwd kernel``, ``grad-in-fwd+ce``.

The first run (2026-11-27, H200, before the change) measured the prototypes: ``grad-in-fwd``
1.42-1.47x eager where ``fused`` (then the kernel-in-backward structure) was 1.00-1.04x.

Each variant is timed in rounds (the variants in turn every round, so the host's drift is
shared): CUDA events around each step, median over rounds of the round's median. The variants'
gradients are checked against ``fused``'s first. Writes ``host_variants.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tests.gpu.timing import has_cuda, input_sets, interpreter, launched_ms, rotating_step

ELEMENTS = 2**24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--interpret", action="store_true", help="CPU dry run (no real timing)")
    parser.add_argument("--classes", type=int, nargs="+", default=[32768, 131072, 100])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    interpreter(args.interpret)
    import torch

    from pipeline import kernels
    from pipeline.kernels import reference as ref
    from pipeline.kernels import triton_kd
    from pipeline.kernels.triton_common import launch_config

    if args.interpret:
        device, rounds, steps = torch.device("cpu"), 1, 1
    elif has_cuda("host_variants"):
        device, rounds, steps = torch.device("cuda"), args.rounds, args.steps
    else:
        return 3

    def kernels_outside_autograd(s, t, temp_rows, go):
        """(rows (B,), G (B, C)): the forward and gradient kernels on detached tensors."""
        batch, classes = s.shape
        launch = launch_config(batch, classes)
        loss = torch.empty(batch, dtype=torch.float32, device=s.device)
        stats = torch.empty((triton_kd.N_STATS, batch), dtype=torch.float32, device=s.device)
        inputs = (s, t, temp_rows, None, None)
        triton_kd._launch_fwd(inputs, loss, stats, None, False, 1e-7, False, launch)
        grad, _ = triton_kd._launch_bwd(
            inputs, stats, go, None, False, 1e-7, launch, True, False, (1, classes)
        )
        return loss, grad

    consts: dict = {}

    def constants(batch: int):
        if batch not in consts:
            temp = torch.full((batch,), 4.0, device=device)
            go = torch.full((1,), 1.0 / batch, device=device).expand(batch)
            consts[batch] = (temp, go)
        return consts[batch]

    class MeanGradInForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t):
            temp, go = constants(s.shape[0])
            rows, grad = kernels_outside_autograd(s, t, temp, go)
            ctx.save_for_backward(grad)
            return rows.sum() / s.shape[0]

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g, None

    def grad_in_fwd(s, t, y):
        return MeanGradInForward.apply(s, t)

    class CEGradInForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t, y):
            batch, classes = s.shape
            temp, _ = constants(batch)
            launch = launch_config(batch, classes)
            parts = torch.empty((3, batch), dtype=torch.float32, device=s.device)
            stats = torch.empty((triton_kd.N_STATS, batch), dtype=torch.float32, device=s.device)
            inputs = (s, t, temp, None, None)
            ce = (y, (0.1, 0.9))
            ok = triton_kd._target_flags(s.device)[1]
            triton_kd._launch_fwd(inputs, parts, stats, ce, False, 1e-7, False, launch, ok)
            grad, _ = triton_kd._launch_bwd(
                inputs, stats, ones(), ce, False, 1e-7, launch, True, False, (1, classes)
            )
            ctx.save_for_backward(grad)
            return parts[0].sum()

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g, None, None

    def ones():
        if "one" not in consts:
            consts["one"] = torch.ones(1, device=device)
        return consts["one"]

    class KernelInBackward(torch.autograd.Function):
        """The structure shipped until 2026-11-27: the gradient kernel launched from backward."""

        @staticmethod
        def forward(ctx, s, t, y, with_ce):
            batch, classes = s.shape
            temp, _ = constants(batch)
            launch = launch_config(batch, classes)
            out = torch.empty((3 if with_ce else 1, batch), dtype=torch.float32, device=s.device)
            stats = torch.empty((triton_kd.N_STATS, batch), dtype=torch.float32, device=s.device)
            inputs = (s, t, temp, None, None)
            ce = (y, (0.1, 0.9)) if with_ce else None
            ok = triton_kd._target_flags(s.device)[1]
            triton_kd._launch_fwd(inputs, out, stats, ce, False, 1e-7, False, launch, ok)
            ctx.save_for_backward(s, t, temp, y, stats)
            ctx.with_ce, ctx.launch = with_ce, launch
            return out[0].sum() if with_ce else out[0]

        @staticmethod
        def backward(ctx, g):
            s, t, temp, y, stats = ctx.saved_tensors
            ce = (y, (0.1, 0.9)) if ctx.with_ce else None
            go = g.reshape(1) if ctx.with_ce else g
            grad, _ = triton_kd._launch_bwd(
                (s, t, temp, None, None), stats, go, ce, False, 1e-7, ctx.launch, True, False,
                (1, s.shape[1]),
            )  # fmt: skip
            return grad, None, None, None

    def native_bwd(s, t, y):
        temp, go = constants(s.shape[0])
        with torch.no_grad():
            rows, grad = kernels_outside_autograd(s.detach(), t, temp, go)
        d = torch.dot(s.view(-1), grad.view(-1))
        return rows.sum() / s.shape[0] + (d - d.detach())

    def in_backward(fn):
        """``fn`` with the shipped Functions' gradient kernel launched from backward."""

        def step(s, t, y):
            triton_kd.GRADIENT_IN_FORWARD = False
            try:
                return fn(s, t, y)
            finally:
                triton_kd.GRADIENT_IN_FORWARD = True

        return step

    fused = lambda s, t, y: kernels.kd_rows(s, t, 4.0, impl="triton").mean()
    fused_ce = lambda s, t, y: kernels.kd_ce(s, t, y, 4.0, 0.1, 0.9, impl="triton")[0]
    variants = {
        "eager": lambda s, t, y: ref.kd_rows(s, ref.decode_teacher(t), 4.0).mean(),
        "fused": fused,
        "fused, bwd kernel": in_backward(fused),
        "kernel-in-bwd": lambda s, t, y: KernelInBackward.apply(s, t, y, False).mean(),
        "grad-in-fwd": grad_in_fwd,
        "native-bwd": native_bwd,
        "floor": lambda s, t, y: (s * 1.0).mean(),
        "eager+ce": lambda s, t, y: ref.kd_ce(s, ref.decode_teacher(t), y, 4.0, 0.1, 0.9)[0],
        "fused+ce": fused_ce,
        "fused+ce, bwd kernel": in_backward(fused_ce),
        "fused+ce checked": lambda s, t, y: kernels.kd_ce(
            s, t, y, 4.0, 0.1, 0.9, impl="triton", target_checked=True
        )[0],
        "kernel-in-bwd+ce": lambda s, t, y: KernelInBackward.apply(s, t, y, True),
        "grad-in-fwd+ce": lambda s, t, y: CEGradInForward.apply(s, t, y),
    }
    results = []
    for classes in args.classes:
        batch = 64 if classes <= 100 else ELEMENTS // classes
        if args.interpret:
            batch = min(batch, 4)
        sets = input_sets(batch, classes, device, 3, seed=classes)
        s0, t0, y0 = sets[0]
        want = torch.autograd.grad(variants["fused"](s0, t0, y0), s0)[0]
        want_loss = variants["fused"](s0, t0, y0).item()
        want_ce = torch.autograd.grad(variants["fused+ce"](s0, t0, y0), s0)[0]
        want_ce_loss = variants["fused+ce"](s0, t0, y0).item()
        for name in ("fused, bwd kernel", "kernel-in-bwd", "grad-in-fwd", "native-bwd",
                     "fused+ce, bwd kernel", "kernel-in-bwd+ce", "grad-in-fwd+ce"):  # fmt: skip
            if "+ce" in name:
                want, want_loss = want_ce, want_ce_loss
            loss = variants[name](s0, t0, y0)
            got = torch.autograd.grad(loss, s0)[0]
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(f"C={classes} {name}: loss {loss.item():.6f} vs {want_loss:.6f}, grad {err:.1e}")
            assert abs(loss.item() - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), name
            assert err < 1e-5, (name, err)
        per: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                once = rotating_step(fn, sets)
                for _ in range(3):
                    once()
                if device.type != "cuda":
                    continue
                torch.cuda.synchronize()
                per[name].append(launched_ms(once, steps))
        if device.type != "cuda":
            print(f"C={classes}: code paths ran (no timing on CPU)")
            continue
        print(f"C={classes} B={batch}: ms a step, median of {rounds} rounds (round medians)")
        for name, times in per.items():
            eager = statistics.median(per["eager+ce" if "+ce" in name else "eager"])
            ms = statistics.median(times)
            spread = f"{min(times):.3f}-{max(times):.3f}"
            base = "eager+ce" if "+ce" in name else "eager"
            print(f"  {name:<16} {ms:7.3f} ms  ({spread})  {eager / ms:5.2f}x faster than {base}")
            results.append({"classes": classes, "batch": batch, "variant": name, "ms": ms,
                            "rounds": times})  # fmt: skip
    if args.out and results:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_variants.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
