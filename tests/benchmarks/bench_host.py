"""Host cost of each method's loss per training step, beside plain cross-entropy, same run.

A small student on a GPU (resnet8x4 at batch 64) is host-bound: the GPU waits for Python and for
kernel launches, so what a method adds to a step is its host work, not its FLOPs. This measures
that work on the CPU, device-independently: each method's loss forward + backward on a (64, 100)
batch through the path CUDA takes (the fused kernels' dispatch, ``impl="triton"``), with the
Triton launches themselves replaced by no-ops, so what is timed is the Python, the autograd
machinery and the PyTorch ops around the kernels. Per method:

- ``ops``: PyTorch operator calls a step (TorchDispatchMode), ``kernels``: those that launch a
  kernel on a GPU (views, ``empty`` and ``detach`` do not) plus the Triton launches;
- ``host us``: microseconds a step with the launches stubbed (best of the repeats; methods
  interleaved within each repeat), and its ratio to ``ce``.

``kd, CE apart`` is KD's training loss as it was computed before ``kd_ce`` (the fused KD rows,
then PyTorch's cross-entropy and the weighted sum), for the comparison in the same run.

    python -m tests.benchmarks.bench_host [--repeats 5] [--steps 300]

Runs itself in a child process with TRITON_INTERPRET=1 (CPU tensors through the Triton path).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BATCH, CLASSES = 64, 100
METHODS = ("ce", "kd", "kd, CE apart", "ls", "ctkd", "dkd", "ats", "pskd")
#: Operators that launch nothing on a GPU (metadata, allocation, aliasing).
NO_KERNEL = {
    "detach", "select", "view", "expand", "empty", "empty_like", "alias", "as_strided",
    "unsqueeze", "squeeze", "_reshape_alias", "reshape", "t", "transpose", "slice", "unbind",
    "_local_scalar_dense",  # CPU only: the CUDA path checks targets with _assert_async
}  # fmt: skip
FUSED_MODULES = ("kd", "dkd", "ats", "decode")


class Counter(TorchDispatchMode):
    """Operator calls outside the (stubbed) Triton launches, and the launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL) + self.launches


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](...)`` counts a launch and runs nothing."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            self.counts[0] += 1

        return launch


@contextmanager
def stubbed_launches() -> Iterator[list[int]]:
    """Every fused kernel's launch replaced by a counting no-op; yields [launches so far]."""
    counts = [0]
    saved = []
    for name in FUSED_MODULES:
        module = importlib.import_module(f"pipeline.kernels.triton_{name}")
        for attr, obj in vars(module).copy().items():
            if hasattr(obj, "arg_names") and attr.startswith("_"):  # a @triton.jit kernel
                saved.append((module, attr, obj))
                setattr(module, attr, _NoLaunch(counts))
    try:
        yield counts
    finally:
        for module, attr, obj in saved:
            setattr(module, attr, obj)


def step_fn(name: str) -> Callable[[], None]:
    """One loss forward + backward of ``name`` on fixed (64, 100) inputs, CPU tensors."""
    import torch.nn.functional as F

    from pipeline.distill_inputs import build_student_method
    from pipeline.kernels import kd_rows
    from pipeline.methods import MethodContext

    g = torch.Generator().manual_seed(0)
    student = torch.randn(BATCH, CLASSES, generator=g).requires_grad_()
    teacher = torch.randn(BATCH, CLASSES, generator=g).half()  # as stored
    target = torch.randint(0, CLASSES, (BATCH,), generator=g)
    ctx = MethodContext(epoch=1, num_epochs=240)
    if name == "kd, CE apart":

        def loss() -> torch.Tensor:
            kd = kd_rows(student, teacher, 4.0).mean()
            return 0.1 * F.cross_entropy(student, target) + 0.9 * kd

    else:
        method = build_student_method(name, {}, CLASSES)
        if method.teacher_input == "probabilities":
            teacher = torch.softmax(teacher.float(), dim=1)

        def loss() -> torch.Tensor:
            return method(student, teacher, target, ctx)["total"]

    def step() -> None:
        student.grad = None
        loss().backward()

    return step


def measure(names: tuple[str, ...], repeats: int, steps: int) -> dict[str, dict]:
    """Per method: ops, kernels and best host us a step, launches stubbed (fused path)."""
    from pipeline import kernels

    os.environ[kernels.ENV_VAR] = "triton"
    results: dict[str, dict] = {}
    with stubbed_launches() as launches:
        fns = {name: step_fn(name) for name in names}
        for name, fn in fns.items():
            for _ in range(20):  # warm-up: caches, autograd graph buffers
                fn()
            counter = Counter()
            before = launches[0]
            with counter:
                fn()
            counter.launches = launches[0] - before
            results[name] = {"ops": sum(counter.ops.values()), "kernels": counter.kernels}
            results[name]["us"] = []
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(steps):
                    fn()
                results[name]["us"].append((time.perf_counter() - start) / steps * 1e6)
    return results


def child(repeats: int, steps: int) -> int:
    torch.set_num_threads(1)
    results = measure(METHODS, repeats, steps)
    base = min(results["ce"]["us"])
    print(f"loss forward + backward, ({BATCH}, {CLASSES}), Triton launches stubbed, host only")
    print(f"{'method':<14} {'ops':>4} {'kernels':>8} {'host us':>8} {'x ce':>6}")
    for name, r in results.items():
        best = min(r["us"])
        print(f"{name:<14} {r['ops']:>4} {r['kernels']:>8} {best:>8.1f} {best / base:>6.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.repeats, args.steps)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_host", "--child"]
    cmd += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
