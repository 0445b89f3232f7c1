"""The dispatcher in ``pipeline.kernels``: who computes a call, for which ``impl`` and env value."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pipeline.kernels as kernels
from pipeline.errors import MethodError
from tests.kernels import oracle, require_interpreter, require_triton


class _FakeCuda:
    """Stands for a CUDA tensor where only ``is_cuda`` is read (no GPU in the tests)."""

    is_cuda = True


def test_import_does_not_import_triton() -> None:
    code = "import sys, pipeline.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve_impl("auto", (torch.zeros(2),), None) == "reference"


def test_auto_picks_triton_on_cuda_unless_told_or_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = (_FakeCuda(),)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve_impl("auto", cuda, None) == "triton"  # type: ignore[arg-type]
    assert kernels.resolve_impl("auto", cuda, "float64") == "reference"  # type: ignore[arg-type]
    assert kernels.resolve_impl("reference", cuda, None) == "reference"  # type: ignore[arg-type]
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.resolve_impl("auto", cuda, None) == "reference"  # type: ignore[arg-type]
    # An explicit impl wins over the environment.
    assert kernels.resolve_impl("triton", cuda, None) == "triton"  # type: ignore[arg-type]


def test_bad_impl_and_env_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MethodError, match="impl"):
        kernels.resolve_impl("fast", (torch.zeros(2),), None)
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(MethodError, match=kernels.ENV_VAR):
        kernels.resolve_impl("auto", (torch.zeros(2),), None)


def test_forced_triton_says_why_not() -> None:
    require_triton()
    with pytest.raises(MethodError, match="float64"):
        kernels.kd_rows(torch.zeros(2, 3).double(), torch.zeros(2, 3), 2.0, impl="triton")
    if not importlib.import_module("pipeline.kernels.triton_common").interpreted():
        with pytest.raises(MethodError, match="TRITON_INTERPRET"):
            kernels.kd_rows(torch.zeros(2, 3), torch.zeros(2, 3), 2.0, impl="triton")


def test_reference_path_decodes_int8_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference path gets decoded float32 logits and the same arguments, via the module."""
    calls: list[tuple] = []

    def decode(teacher, scale=None, offset=None):
        calls.append(("decode", teacher.dtype))
        return oracle.decode(teacher, scale, offset).float()

    fake = SimpleNamespace(
        decode_teacher=decode,
        kd_rows=lambda s, t, temp, zscore=False, eps=1e-7: calls.append(("kd", t.dtype, zscore)),
        dkd_rows=lambda s, t, y, temp, zscore=False, eps=1e-7, checked=False: calls.append(
            ("dkd", t.dtype, checked)
        ),
        ats_rows=lambda s, t, y, t1, t2, st, checked=False: calls.append(
            ("ats", t.dtype, t1, t2, st, checked)
        ),
    )
    monkeypatch.setattr(kernels, "_reference", lambda: fake)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    student = torch.randn(3, 5)
    q, scale, offset = oracle.encode_int8(torch.randn(3, 5))
    target = torch.tensor([0, 4, 2])
    kernels.kd_rows(student, q, 2.0, zscore=True, scale=scale, offset=offset)
    kernels.dkd_rows(student, q, target, 2.0, scale=scale, offset=offset)
    kernels.ats_rows(
        student, q, target, 4.0, 2.0, 1.0, scale=scale, offset=offset, target_checked=True
    )
    assert calls == [
        ("decode", torch.int8),
        ("kd", torch.float32, True),
        ("decode", torch.int8),
        ("dkd", torch.float32, False),
        ("decode", torch.int8),
        ("ats", torch.float32, 4.0, 2.0, 1.0, True),  # the caller's target check passed on
    ]


def test_temperature_must_be_finite_and_positive() -> None:
    s, t, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2).long()
    with pytest.raises(MethodError, match="temperature must be a finite number > 0, got 0.0"):
        kernels.kd_rows(s, t, 0.0)
    with pytest.raises(MethodError, match="temperature must be a finite number > 0, got inf"):
        kernels.dkd_ce(s, t, y, float("inf"), 1.0, 1.0, 8.0)
    with pytest.raises(MethodError, match="tau2 must be a finite number > 0, got -1"):
        kernels.ats_rows(s, t, y, 4.0, -1, 1.0)
    with pytest.raises(MethodError, match="student_temperature must be a finite number > 0"):
        kernels.ats_ce(s, t, y, 4.0, 2.0, float("nan"), 0.5, 0.5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_both_impls_refuse_the_same_bad_values(impl: str) -> None:
    """The fused path refused none of these (a -1 in a per-sample temperature gave a finite,
    wrong loss; eps -1 and NaN weights went through; audit, 2026-11-27); the reference took
    integer students. Both now refuse each, word for word alike."""
    if impl == "triton":
        require_interpreter()
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    calls = {
        "temperature must be finite and > 0, got -1": lambda: kernels.kd_rows(
            s, t, torch.tensor([4.0, -1.0, 4.0, 4.0]), impl=impl
        ),
        "tau1 must be finite and > 0, got nan": lambda: kernels.ats_rows(
            s, t, y, torch.tensor([4.0, float("nan"), 4.0, 4.0]), 2.0, 1.0, impl=impl
        ),
        "temperature must be a floating-point tensor, got torch.int64": lambda: kernels.kd_ce(
            s, t, y, torch.full((4,), 4), 0.1, 0.9, impl=impl
        ),
        "eps must be a finite number >= 0, got -1.0": lambda: kernels.kd_rows(
            s, t, 4.0, True, -1.0, impl=impl
        ),
        "ce_weight must be a finite number >= 0, got nan": lambda: kernels.kd_ce(
            s, t, y, 4.0, float("nan"), 0.9, impl=impl
        ),
        "nckd_weight must be a finite number >= 0, got -8": lambda: kernels.dkd_ce(
            s, t, y, 4.0, 1.0, 1.0, -8, impl=impl
        ),
        "ats_weight must be a finite number >= 0, got None": lambda: kernels.ats_ce(
            s, t, y, 4.0, 2.0, 1.0, 0.5, None, impl=impl
        ),
        "student logits must be floating point (float32 or float64; the fused kernels also take "
        "float16/bfloat16), got torch.int64": lambda: kernels.kd_rows(
            torch.randint(0, 5, (4, 5)), t, 4.0, impl=impl
        ),
    }
    for message, call in calls.items():
        with pytest.raises(MethodError) as caught:
            call()
        assert str(caught.value) == message


def _inputs(teacher_dtype: torch.dtype):
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(6, 37, generator=g) * 3).requires_grad_()
    teacher = torch.randn(6, 37, generator=g) * 3
    target = torch.randint(0, 37, (6,), generator=g)
    scale = offset = None
    if teacher_dtype == torch.int8:
        teacher, scale, offset = oracle.encode_int8(teacher)
    return student, teacher.to(teacher_dtype), target, scale, offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_forced_triton_on_cpu_matches_oracle(dtype: torch.dtype) -> None:
    """impl='triton' on CPU tensors runs the fused kernels in triton's interpreter."""
    require_interpreter()
    student, teacher, target, scale, offset = _inputs(dtype)
    kw = {"scale": scale, "offset": offset, "impl": "triton"}
    exact = oracle.decode(teacher, scale, offset)
    torch.testing.assert_close(
        kernels.decode_teacher(teacher, scale, offset, impl="triton"), exact.float()
    )
    out = kernels.kd_rows(student, teacher, 2.0, zscore=True, **kw)
    ref = oracle.kd_rows(student.double(), exact, 2.0, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    tckd, nckd = kernels.dkd_rows(student, teacher, target, 2.0, **kw)
    ref_t, ref_n = oracle.dkd_rows(student.double(), exact, target, 2.0, False)
    torch.testing.assert_close(tckd.double(), ref_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nckd.double(), ref_n, rtol=1e-5, atol=1e-6)
    out = kernels.ats_rows(student, teacher, target, 4.0, 2.0, 1.0, **kw)
    ref = oracle.ats_rows(student.double(), exact, target, 4.0, 2.0, 1.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
def test_reference_matches_oracle(dtype: torch.dtype) -> None:
    """The reference, reached through the dispatcher, agrees with the same float64 oracle."""
    student, teacher, target, scale, offset = _inputs(dtype)
    exact = oracle.decode(teacher, scale, offset)
    kw = {"scale": scale, "offset": offset, "impl": "reference"}
    temp = torch.linspace(1.0, 6.0, 6)
    s64 = student.detach().double()
    checks = [
        (kernels.kd_rows(student, teacher, temp, **kw), oracle.kd_rows(s64, exact, temp, False)),
        (
            kernels.kd_rows(student, teacher, 2.0, zscore=True, **kw),
            oracle.kd_rows(s64, exact, 2.0, True),
        ),
        (
            sum(kernels.dkd_rows(student, teacher, target, 4.0, zscore=True, **kw)),
            sum(oracle.dkd_rows(s64, exact, target, 4.0, True)),
        ),
        (
            kernels.ats_rows(student, teacher, target, 4.0, 2.0, 1.0, **kw),
            oracle.ats_rows(s64, exact, target, 4.0, 2.0, 1.0),
        ),
        (
            torch.stack(kernels.kd_ce(student, teacher, target, temp, 0.1, 0.9, True, **kw)),
            torch.stack(
                [
                    0.1 * F.cross_entropy(s64, target)
                    + 0.9 * oracle.kd_rows(s64, exact, temp, True).mean(),
                    F.cross_entropy(s64, target),
                    oracle.kd_rows(s64, exact, temp, True).mean(),
                ]
            ),
        ),
    ]
    for out, ref in checks:  # a float32 PyTorch reference: 1e-4, not the fused kernels' 1e-5
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zs", [False, True])
def test_triton_matches_reference_with_grads(zs: bool) -> None:
    """Same call through both implementations: losses and student/temperature gradients."""
    require_interpreter()
    results = {}
    for impl in ("reference", "triton"):
        student, teacher, target, _, _ = _inputs(torch.float32)
        temp = torch.linspace(1.0, 6.0, 6).requires_grad_()
        kd = kernels.kd_rows(student, teacher, temp, zscore=zs, impl=impl)
        tckd, nckd = kernels.dkd_rows(student, teacher, target, temp, zscore=zs, impl=impl)
        ats = kernels.ats_rows(student, teacher, target, 4.0, 2.0, 1.0, impl=impl)
        with_ce = kernels.kd_ce(student, teacher, target, temp, 0.1, 0.9, zs, impl=impl)
        dkd_ce = kernels.dkd_ce(student, teacher, target, temp, 1.0, 0.5, 4.0, zs, impl=impl)
        ats_ce = kernels.ats_ce(student, teacher, target, 4.0, 2.0, 1.0, 0.5, 0.5, impl=impl)
        total = kd.sum() + tckd.sum() + 8 * nckd.sum() + ats.sum() + 3 * with_ce[0] + dkd_ce[0]
        grads = torch.autograd.grad(total + ats_ce[0], [student, temp])
        results[impl] = (kd, tckd, nckd, ats, *with_ce, *dkd_ce, *ats_ce, *grads)
    # Both are float32; dL/dT is a difference of O(1) terms, so its error is absolute.
    for ref, out in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-4, atol=1e-4)
