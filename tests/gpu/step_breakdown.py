"""Where a loss step's time goes at a real size, on a GPU: host, GPU, and each kernel.

    python -m tests.gpu.step_breakdown [--out DIR] [--classes 32768]   # on a CUDA machine

For each of eager and fused KD, KD+CE, DKD at C classes and B = 2^24 / C rows (float16 teacher,
as bench_losses), one step = ``student.grad = None; loss(...).backward()`` on rotating input
sets, as ``bench_losses`` times it. Four numbers a step, in one run:

- launched: CUDA events around each step (what bench_losses reports);
- host: wall time of the step's Python call alone, the GPU left to run behind (a loop of steps
  timed without a synchronize: the GPU queue absorbs them while the host is the slower side);
- gpu: the sum of the step's kernel times from torch.profiler;
- the kernels: name, count and time per step (torch.profiler), the top ones.

A launched time near ``host`` means the host bounds the step; near ``gpu``, the kernels do.
Writes ``step_breakdown.json`` and the profiler tables as ``step_breakdown.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tests.gpu.timing import input_sets, launched_ms, rotating_step

ELEMENTS = 2**24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--classes", type=int, nargs="+", default=[32768])
    parser.add_argument("--methods", nargs="+", default=["kd", "kd+ce", "dkd"])
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline import kernels
    from pipeline.kernels import reference as ref

    if not torch.cuda.is_available():
        print("step_breakdown: no CUDA device")
        return 3
    device = torch.device("cuda")

    def dkd(module, s, t, y, **kw):
        tckd, nckd = module.dkd_rows(s, t, y, 4.0, **kw)
        return (tckd + 8.0 * nckd).mean()  # alpha 1, beta 8, as bench_losses

    def decoded(fn):
        return lambda s, t, y: fn(s, ref.decode_teacher(t), y)

    steps = {
        ("eager", "kd"): decoded(lambda s, t, y: ref.kd_rows(s, t, 4.0).mean()),
        ("fused", "kd"): lambda s, t, y: kernels.kd_rows(s, t, 4.0, impl="triton").mean(),
        ("eager", "kd+ce"): decoded(lambda s, t, y: ref.kd_ce(s, t, y, 4.0, 0.1, 0.9)[0]),
        ("fused", "kd+ce"): lambda s, t, y: kernels.kd_ce(s, t, y, 4.0, 0.1, 0.9, impl="triton")[0],
        ("eager", "dkd"): decoded(lambda s, t, y: dkd(ref, s, t, y)),
        ("fused", "dkd"): lambda s, t, y: dkd(kernels, s, t, y, impl="triton"),
    }
    results = []
    tables = []
    for classes in args.classes:
        batch = ELEMENTS // classes
        sets = input_sets(batch, classes, device, 4, seed=classes)
        for method in args.methods:
            for impl in ("eager", "fused"):
                once = rotating_step(steps[(impl, method)], sets)
                for _ in range(5):
                    once()
                torch.cuda.synchronize()
                launched = launched_ms(once, 60)
                host = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(20):
                        once()
                    host.append((time.perf_counter() - t0) / 20 * 1e3)
                    torch.cuda.synchronize()
                # the host's own time: the fastest group (later ones may wait on a full queue)
                host_ms = min(host)
                n = 20
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        once()
                    torch.cuda.synchronize()
                events = prof.key_averages()
                kernels_ = [e for e in events if e.device_time_total > 0 and e.key != "" and not
                            e.key.startswith(("cudaLaunch", "cuLaunch"))]  # fmt: skip
                kernel_rows = sorted(
                    ((e.key, e.count / n, e.device_time_total / n / 1e3) for e in kernels_
                     if getattr(e, "device_type", None) is not None and
                     str(e.device_type).endswith("CUDA")),
                    key=lambda r: -r[2],
                )  # fmt: skip
                gpu_ms = sum(r[2] for r in kernel_rows)
                row = {
                    "method": method, "impl": impl, "classes": classes, "batch": batch,
                    "launched_ms": launched, "host_ms": host_ms, "host_groups_ms": host,
                    "gpu_ms": gpu_ms, "kernels": kernel_rows[:12],
                }  # fmt: skip
                results.append(row)
                print(
                    f"{method:6} {impl:5} C={classes:<6} B={batch:<6} launched {launched:7.3f} ms"
                    f" | host {host_ms:7.3f} ms | gpu (profiler) {gpu_ms:7.3f} ms",
                    flush=True,
                )
                for name, count, ms in kernel_rows[:8]:
                    print(f"      {ms:8.4f} ms  x{count:4.1f}  {name[:90]}")
                tables.append(f"== {method} {impl} C={classes}\n")
                tables.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        payload = {"env": env, "rows": results}
        (out / "step_breakdown.json").write_text(json.dumps(payload, indent=1))
        (out / "step_breakdown.txt").write_text("\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
