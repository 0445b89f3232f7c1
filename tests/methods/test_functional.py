"""The functional forms against numpy float64 goldens, pinned numbers, and the transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.kernels import reference
from pipeline.methods import ats, dkd, kd, ls, pskd
from pipeline.transforms import asymmetric_temperature, standardize
from tests.methods import golden
from tests.methods.conftest import batch


def _np(*tensors: torch.Tensor) -> list[np.ndarray]:
    return [t.detach().double().numpy() for t in tensors]


PER_SAMPLE = torch.tensor([0.5, 1.0, 2.0, 4.0, 7.0], dtype=torch.float64)


@pytest.mark.parametrize("temp", [1.0, 4.0, PER_SAMPLE], ids=["T1", "T4", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_losses_match_golden(temp, dtype: torch.dtype) -> None:
    student, teacher, target = batch(dtype=dtype)
    if isinstance(temp, torch.Tensor):
        temp = temp.to(dtype)
    s, t, y = _np(student, teacher, target)
    tol = {"rel": 1e-9, "abs": 1e-12} if dtype == torch.float64 else {"rel": 1e-4, "abs": 1e-6}
    temp_np = temp.double().numpy() if isinstance(temp, torch.Tensor) else temp
    got = kd.kd_loss(student, teacher, temp).item()
    assert got == pytest.approx(golden.kd_rows(s, t, temp_np).mean(), **tol)
    tckd, nckd = golden.dkd_rows(s, t, y.astype(int), temp_np)
    got = dkd.dkd_loss(student, teacher, target, 1.5, 6.0, temp).item()
    assert got == pytest.approx((1.5 * tckd + 6.0 * nckd).mean(), **tol)
    got = ls.ls_kd_loss(student, teacher, temp).item()
    assert got == pytest.approx(golden.kd_rows(s, t, temp_np, zs=True).mean(), **tol)
    for form in ("ce", "kl"):
        got = ats.ats_loss(student, teacher, target, 5.0, 2.5, 1.5, form=form).item()
        want = golden.ats_rows(s, t, y.astype(int), 5.0, 2.5, 1.5, form).mean()
        assert got == pytest.approx(want, **tol)


def test_float32_tckd_is_accurate_when_the_target_is_unlikely() -> None:
    """TCKD's log(1 - p_y) from log-odds, not lse(rest) - lse(all): small p_y cancels there.

    At C = 1000, T = 15.6 (a CTKD temperature) the float32 reference's TCKD batch mean was 9e-4
    off the float64 golden and its temperature gradient 1.4 % off (audit, 2026-11-27).
    """
    student, teacher, target = batch(rows=64, classes=1000, seed=3, dtype=torch.float32)
    student, teacher = student * 2 / 3, teacher * 4 / 3  # N(0, 2²), N(0, 4²)
    s, t, y = _np(student, teacher, target)
    y = y.astype(int)
    temp = torch.full((64,), 15.6, requires_grad=True)
    tckd, _ = reference.dkd_rows(student, teacher, target, temp)
    tckd.mean().backward()
    want = golden.dkd_rows(s, t, y, 15.6)[0].mean()
    assert tckd.mean().item() == pytest.approx(want, rel=1e-5)
    h = 1e-4
    up, down = golden.dkd_rows(s, t, y, 15.6 + h)[0], golden.dkd_rows(s, t, y, 15.6 - h)[0]
    assert temp.grad.sum().item() == pytest.approx((up - down).mean() / (2 * h), rel=1e-3)


def test_defaults_match_golden() -> None:
    student, teacher, target = batch()
    s, t, y = _np(student, teacher, target)
    y = y.astype(int)
    assert kd.kd_loss(student, teacher).item() == pytest.approx(golden.kd_rows(s, t, 4.0).mean())
    tckd, nckd = golden.dkd_rows(s, t, y, 4.0)
    assert dkd.dkd_loss(student, teacher, target).item() == pytest.approx((tckd + 8 * nckd).mean())
    want = golden.kd_rows(s, t, 2.0, zs=True).mean()
    assert ls.ls_kd_loss(student, teacher).item() == pytest.approx(want)
    want = golden.ats_rows(s, t, y, 4.0, 2.0, 1.0).mean()
    assert ats.ats_loss(student, teacher, target).item() == pytest.approx(want)


def test_pinned_numbers() -> None:
    """Closed forms and stored values (computed once from the numpy goldens)."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    # p = [3/4, 1/4], q = [1/2, 1/2] at T = 1.
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd.kd_loss(s, t, 1.0).item() == pytest.approx(want, rel=1e-12)
    # At T = 2: p = softmax([ln3/2, 0]) = [√3, 1] / (√3 + 1), and T² = 4.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    want = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kd.kd_loss(s, t, 2.0).item() == pytest.approx(want, rel=1e-12)
    student = torch.tensor([[1.0, 2.0, 3.0, 0.5], [-1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 4.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    pinned = {
        "kd": (kd.kd_loss(student, teacher).item(), 2.1231503804400407),
        "dkd": (dkd.dkd_loss(student, teacher, target).item(), 4.821817408702222),
        "ls": (ls.ls_kd_loss(student, teacher).item(), 0.8453537072412448),
        "ats": (ats.ats_loss(student, teacher, target).item(), 1.8317833597801685),
    }
    for name, (got, want) in pinned.items():
        assert got == pytest.approx(want, rel=1e-12), name


def test_decode_teacher() -> None:
    q = torch.tensor([[-127, 0, 127], [5, -5, 0]], dtype=torch.int8)
    scale, offset = torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])
    want = torch.tensor([[-62.5, 1.0, 64.5], [9.0, -11.0, -1.0]])
    out = reference.decode_teacher(q, scale, offset)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    half = torch.randn(2, 3).half()
    assert torch.equal(reference.decode_teacher(half), half.float())
    assert reference.decode_teacher(half.bfloat16()).dtype == torch.float32
    x64 = torch.randn(2, 3, dtype=torch.float64)
    assert reference.decode_teacher(x64) is x64


def test_standardize() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 4.0, 4.0, 4.0]], dtype=torch.float64)
    x.requires_grad_(True)
    z = standardize(x)
    row = x[0].detach().numpy()
    want = (row - row.mean()) / (row.std(ddof=1) + 1e-7)
    np.testing.assert_allclose(z[0].detach().numpy(), want, rtol=1e-12)
    assert torch.equal(z[1], torch.zeros(4, dtype=torch.float64))  # constant row: zeros
    z.sum().backward()
    assert torch.isfinite(x.grad).all()
    paper = standardize(x.detach(), eps=0.0, unbiased=False)
    np.testing.assert_allclose(paper[0].numpy(), (row - row.mean()) / row.std(), rtol=1e-12)
    assert torch.equal(paper[1], torch.zeros(4, dtype=torch.float64))  # no 0 / 0 with eps 0
    # The naive paper formula (population std, no eps) gives 0 / 0 = NaN on a constant row.
    c = torch.full((1, 4), 4.0, dtype=torch.float64)
    assert torch.isnan((c - c.mean()) / c.std(dim=1, keepdim=True, unbiased=False)).all()
    c.requires_grad_(True)
    (standardize(c, eps=0.0, unbiased=False) * torch.arange(4.0)).sum().backward()
    assert torch.equal(c.grad, torch.zeros_like(c))  # 0 where the z-score is undefined
    c.grad = None  # with eps, the official code's gradient: the centered upstream over eps
    (standardize(c) * torch.arange(4.0)).sum().backward()
    want = (torch.arange(4.0, dtype=torch.float64) - 1.5) / 1e-7
    torch.testing.assert_close(c.grad[0], want, rtol=1e-12, atol=0)
    assert ls.standardize is standardize


def test_constant_rows_give_finite_ls_losses_and_gradients() -> None:
    student = torch.full((2, 5), 3.0, requires_grad=True)
    teacher = torch.tensor([[1.0] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]])
    loss = ls.ls_kd_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    tckd, nckd = reference.dkd_rows(student, teacher, torch.tensor([0, 4]), 2.0, zscore=True)
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()


def test_asymmetric_temperature() -> None:
    logits = torch.tensor([[4.0, 8.0, 2.0]])
    out = asymmetric_temperature(logits, torch.tensor([1]), 4.0, 2.0)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 1.0]]))


def test_pskd_soft_targets() -> None:
    prev = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64)
    target = torch.tensor([1, 2])
    onehot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(pskd.soft_targets(prev, target, 0.8, 0, 300), onehot)
    assert torch.equal(pskd.soft_targets(None, target, 0.8, 0, 300, num_classes=3), onehot.float())
    q = pskd.soft_targets(prev, target, 0.8, 149, 300)  # alpha_t = 0.8 · 150 / 300 = 0.4
    torch.testing.assert_close(q, 0.6 * onehot + 0.4 * prev, rtol=0, atol=1e-15)
    q = pskd.soft_targets(prev, target, 0.8, 299, 300)  # the last epoch reaches alpha_T
    torch.testing.assert_close(q, 0.2 * onehot + 0.8 * prev, rtol=0, atol=1e-15)
    student = torch.randn(2, 3, dtype=torch.float64)
    got = pskd.pskd_loss(student, prev, target, 0.8, 10, 40).item()
    want = golden.pskd(student.numpy(), prev.numpy(), target.numpy(), 0.8, 10, 40)
    assert got == pytest.approx(want, rel=1e-12)
