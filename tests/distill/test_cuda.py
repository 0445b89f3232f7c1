"""The distill stage on CUDA: pinned batches copied ahead on a side stream, fused loss kernels.

Skipped without a GPU. The same runs on the CPU are the reference: with TF32 off, the per-step
losses of the first epoch on CUDA must follow the CPU's closely (the data path — pinned memory,
non_blocking copies, stream ordering — delivers the same rows; only the float rounding differs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.distill import train_student
from pipeline.models import read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _losses(tiny_run, *overrides: str) -> tuple[list[float], dict]:
    totals: list[float] = []
    config = tiny_run.config(*overrides)
    path = train_student(config, progress=False, on_step=lambda e, s, t: totals.append(t["total"]))
    return [float(t) for t in totals], read_checkpoint(path).extra


@pytest.mark.parametrize(
    "method", ["kd", "dkd", "ctkd", "ls+dkd", "ats", "pskd", "ce", "kd-online"]
)
def test_cuda_follows_the_cpu(tiny_run, no_tf32, method):
    name, online = method.removesuffix("-online"), method.endswith("-online")
    sets = [f"distill.method={name}", "distill.epochs=2", "distill.milestones=[]"]
    if online:
        sets.append("distill.teacher_source=online")
    cuda, extra = _losses(tiny_run, *sets, "distill.device=cuda", f"distill.name=cuda-{method}")
    cpu, _ = _losses(tiny_run, *sets, f"distill.name=cpu-{method}")
    assert len(cuda) == len(cpu) == 2 * 16 and all(map(math.isfinite, cuda))
    first = cuda[:16], cpu[:16]
    assert max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(*first)) < 1e-3, first
    history = json.loads(extra["history"])
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["rows_per_s"] > 0


def test_fused_kernels_are_used_on_cuda(tiny_run, monkeypatch):
    """``impl="auto"`` sends CUDA tensors to the Triton kernels (when triton imports)."""
    import pipeline.kernels as kernels

    # On a CUDA machine triton ships with torch and is a test dependency: without it the fused
    # path this test is about would be silently replaced by the reference.
    assert kernels.triton_available(), "triton does not import: run `make setup`"
    assert not kernels._interpreted(), "TRITON_INTERPRET=1 is set: the kernels would not compile"
    calls = []
    real = kernels.resolve_impl

    def spy(*args, **kwargs):
        impl = real(*args, **kwargs)
        calls.append(impl)
        return impl

    monkeypatch.setattr(kernels, "resolve_impl", spy)
    _losses(tiny_run, "distill.method=kd", "distill.epochs=1", "distill.device=cuda",
            "distill.name=cuda-fused")  # fmt: skip
    assert calls and set(calls) == {"triton"}, calls
