"""Hypothesis properties of the losses: identities, invariances, schedules, extreme logits."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.kernels import reference
from pipeline.methods import ats, dkd, kd, ls, pskd
from tests.methods import golden
from tests.methods.conftest import batch

FAST = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)
temperatures = st.floats(0.25, 20.0)


def _logits(seed: int, rows: int, classes: int, scale: float, dtype=torch.float64):
    return batch(rows, classes, seed, dtype, scale)


@FAST
@given(seed=seeds, classes=st.integers(2, 40), temp=temperatures, scale=st.floats(0.1, 10.0))
def test_kd_is_tckd_plus_weighted_nckd(seed: int, classes: int, temp: float, scale: float) -> None:
    """KD/T² = TCKD/T² + (1 - p_y) · NCKD/T² per sample (Zhao et al., eq. 1)."""
    student, teacher, target = _logits(seed, 6, classes, scale)
    kd_rows = reference.kd_rows(student, teacher, temp)
    tckd, nckd = reference.dkd_rows(student, teacher, target, temp)
    p_y = torch.softmax(teacher / temp, dim=1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(kd_rows, tckd + (1 - p_y) * nckd, rtol=1e-9, atol=1e-12)


@FAST
@given(seed=seeds, classes=st.integers(1, 30), temp=temperatures, scale=st.floats(0.1, 10.0))
def test_ats_kl_with_equal_temperatures_is_kd(
    seed: int, classes: int, temp: float, scale: float
) -> None:
    student, teacher, target = _logits(seed, 5, classes, scale)
    got = ats.ats_loss(student, teacher, target, temp, temp, temp, form="kl")
    torch.testing.assert_close(got, kd.kd_loss(student, teacher, temp), rtol=1e-9, atol=1e-12)
    # The CE form differs from it by exactly T² · H(p), which is > 0 unless p is one-hot.
    ce = ats.ats_loss(student, teacher, target, temp, temp, temp)
    assert classes == 1 or ce > got


@FAST
@given(
    seed=seeds,
    classes=st.integers(2, 30),
    temp=temperatures,
    a=st.floats(0.05, 50.0),
    b=st.floats(-100.0, 100.0),
)
def test_zscore_kd_ignores_teacher_shift_and_scale(
    seed: int, classes: int, temp: float, a: float, b: float
) -> None:
    student, teacher, _ = _logits(seed, 5, classes, 2.0)
    moved = a * teacher + b
    # Exact with the paper's z-score (no eps) ...
    exact = [
        reference.kd_rows(student, ls.standardize(x, 0.0, unbiased=False), temp)
        for x in (teacher, moved)
    ]
    torch.testing.assert_close(exact[0], exact[1], rtol=1e-8, atol=1e-10)
    # ... and up to eps / std with the official one (eps = 1e-7): a row whose logits are close
    # together (small std, e.g. C = 2 scaled down) moves by more, so the bound follows its std.
    smallest_std = min(teacher.std(dim=1).min().item(), moved.std(dim=1).min().item())
    torch.testing.assert_close(
        ls.ls_kd_loss(student, moved, temp),
        ls.ls_kd_loss(student, teacher, temp),
        rtol=max(1e-5, 10 * 1e-7 / smallest_std),
        atol=1e-7,
    )
    # Plain KD is not invariant (so the check above can fail).
    if abs(a - 1) > 0.1 and teacher.std() > 0.5:
        assert not torch.allclose(
            kd.kd_loss(student, moved, temp), kd.kd_loss(student, teacher, temp)
        )


@FAST
@given(
    seed=seeds,
    classes=st.integers(2, 20),
    alpha_T=st.floats(0.0, 1.0),
    num_epochs=st.integers(1, 400),
    data=st.data(),
)
def test_pskd_schedule(seed: int, classes: int, alpha_T: float, num_epochs: int, data) -> None:
    epoch = data.draw(st.integers(0, num_epochs - 1))
    _, logits, target = _logits(seed, 4, classes, 2.0)
    prev = torch.softmax(logits, dim=1)
    q = pskd.soft_targets(prev, target, alpha_T, epoch, num_epochs)
    onehot = torch.nn.functional.one_hot(target, classes).double()
    alpha_t = 0.0 if epoch == 0 else alpha_T * (epoch + 1) / num_epochs
    torch.testing.assert_close(q, (1 - alpha_t) * onehot + alpha_t * prev, rtol=0, atol=1e-14)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert (q >= 0).all()
    if epoch > 0:  # alpha_t grows linearly in the epoch; the last epoch reaches alpha_T
        later = pskd.soft_targets(prev, target, alpha_T, num_epochs - 1, num_epochs)
        torch.testing.assert_close(later, (1 - alpha_T) * onehot + alpha_T * prev)


def _naive_tckd(student, teacher, target, temp):
    """The official DKD's TCKD: log of summed probabilities (overflows in float32)."""
    mask = torch.nn.functional.one_hot(target, student.shape[1]).bool()

    def binary(x):
        p = torch.softmax(x / temp, dim=1)
        return torch.stack([(p * mask).sum(1), (p * ~mask).sum(1)], dim=1)

    p_t, p_s = binary(teacher), binary(student)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(1) * temp**2


@FAST
@given(seed=seeds, classes=st.integers(2, 50), flip=st.booleans())
def test_extreme_logits_stay_finite_in_float32_and_match_float64(
    seed: int, classes: int, flip: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (2, 6, classes), generator=g) * 2 - 1
    student, teacher = (signs * 100.0).double()  # ±100 logits, T = 1
    target = torch.randint(0, classes, (6,), generator=g)
    if flip:  # the hardest case: teacher sure of the target, student sure against it
        teacher.scatter_(1, target[:, None], 100.0)
        student.scatter_(1, target[:, None], -100.0)
    s32 = student.float().requires_grad_(True)
    t32 = teacher.float()
    tau = torch.ones(6, requires_grad=True)
    tckd, nckd = reference.dkd_rows(s32, t32, target, tau)
    kd_rows = reference.kd_rows(s32, t32, tau)
    (tckd + 8 * nckd + kd_rows).sum().backward()
    for value in (tckd, nckd, kd_rows, s32.grad, tau.grad):
        assert torch.isfinite(value).all()
    t64, n64 = reference.dkd_rows(student, teacher, target, 1.0)
    torch.testing.assert_close(tckd.double(), t64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(nckd.double(), n64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        kd_rows.double(), reference.kd_rows(student, teacher, 1.0), rtol=1e-5, atol=1e-3
    )
    loss = dkd.dkd_loss(s32.detach(), t32, target, temperature=1.0)
    assert torch.isfinite(loss)
    if flip:  # the official formula breaks on exactly these inputs
        assert not torch.isfinite(_naive_tckd(s32.detach(), t32, target, 1.0)).all()


def test_dkd_needs_no_mask_value() -> None:
    """NCKD drops the target column exactly: the target logit has no influence on NCKD."""
    student, teacher, target = batch(4, 9, seed=3)
    _, nckd = reference.dkd_rows(student, teacher, target, 4.0)
    moved_s, moved_t = student.clone(), teacher.clone()
    moved_s.scatter_(1, target[:, None], 1e4)
    moved_t.scatter_(1, target[:, None], -1e4)
    _, again = reference.dkd_rows(moved_s, moved_t, target, 4.0)
    torch.testing.assert_close(nckd, again, rtol=1e-12, atol=0)


def test_empty_batch_gives_empty_rows() -> None:
    student, teacher, _ = batch(0, 5)
    assert reference.kd_rows(student, teacher, 2.0).shape == (0,)


def test_teacher_minus_inf_logits_give_finite_losses_and_gradients() -> None:
    """A class the teacher rules out (-inf logit: p = 0) contributes 0, never 0 · inf = NaN.

    (Values and student gradients only: d/dT of -inf / T is not finite, so a learned temperature
    needs finite teacher logits, which the store guarantees.)"""
    student, teacher, target = batch(4, 6, seed=11)
    teacher[:, 5] = -torch.inf
    target = torch.tensor([0, 1, 2, 3])
    s = student.clone().requires_grad_(True)
    kd_rows = reference.kd_rows(s, teacher, 3.0)
    tckd, nckd = reference.dkd_rows(s, teacher, target, 3.0)
    (kd_rows + tckd + nckd).sum().backward()
    for value in (kd_rows, tckd, nckd, s.grad):
        assert torch.isfinite(value).all()
    want = golden.kd_rows(student.numpy(), teacher.numpy(), 3.0)
    np.testing.assert_allclose(kd_rows.detach().numpy(), want, rtol=1e-12)
