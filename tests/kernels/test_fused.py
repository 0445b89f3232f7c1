"""Fused Triton loss kernels against the float64 oracle, on CPU through triton's interpreter.

Tolerances: float32 kernels vs the float64 oracle computed on the same (exactly representable)
inputs, ``|err| <= 1e-5 * max(max|expected|, floor)`` per tensor. The floor is the size of the
quantity the result is a difference of, so a value that is tiny because of cancellation is
judged against the terms that cancelled:

- losses: no floor (1e-5 relative to the largest row);
- grad_student: go·T per row, / (std + eps) under z-score (the scale of dL/ds);
- grad_temperature: 2·go·loss/T, the first of the two terms of dL/dT = 2T·KL - T·(...), which
  nearly cancel near the loss's stationary temperature.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from pipeline.errors import MethodError
from pipeline.transforms import standardize
from tests.kernels import oracle, require_interpreter

require_interpreter()
KD_MODULE = "pipeline.kernels.triton_kd"
fused_kd = importlib.import_module(KD_MODULE).kd_rows
fused_kd_ce = importlib.import_module("pipeline.kernels.triton_kd").kd_ce
fused_dkd_ce = importlib.import_module("pipeline.kernels.triton_dkd").dkd_ce
fused_ats_ce = importlib.import_module("pipeline.kernels.triton_ats").ats_ce
fused_dkd = importlib.import_module("pipeline.kernels.triton_dkd").dkd_rows
fused_ats = importlib.import_module("pipeline.kernels.triton_ats").ats_rows

B = 5
# (classes, (rows per program, block) or None = the default tile); the overrides make the kernels
# walk several column blocks (the last one partial) and leave masked rows in the last program.
SHAPES = [(2, None), (3, None), (10, None), (37, (2, 16)), (130, (4, 32, 2)), (130, None)]
TEACHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _case(classes: int, teacher_dtype: torch.dtype = torch.float32, seed: int = 0, spread=3.0):
    g = torch.Generator().manual_seed(seed + 1000 * classes)
    student = torch.randn(B, classes, generator=g) * spread
    teacher = torch.randn(B, classes, generator=g) * spread + 0.5
    target = torch.randint(0, classes, (B,), generator=g)
    scale = offset = None
    if teacher_dtype == torch.int8:
        teacher, scale, offset = oracle.encode_int8(teacher)
    else:
        teacher = teacher.to(teacher_dtype)
    return student, teacher, target, scale, offset


def _temperature(per_sample: bool, seed: int = 0) -> float | torch.Tensor:
    if not per_sample:
        return 4.0
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 4.0 * torch.rand(B, generator=g)).requires_grad_()


def _check(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0, rtol=1e-5) -> None:
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.detach()).abs().max().item()
    bound = rtol * max(expected.detach().abs().max().item(), floor)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _grad_floor(student: torch.Tensor, go: torch.Tensor, temp, zs: bool) -> float:
    t = torch.as_tensor(temp, dtype=torch.float64).detach().expand(B)
    scale = go.double() * t
    if zs:
        scale = scale / (student.double().std(dim=1) + 1e-7)
    return scale.max().item()


def _leaf64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().requires_grad_()


@pytest.mark.parametrize("per_sample", [False, True], ids=["T", "T_b"])
@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
@pytest.mark.parametrize(("classes", "config"), SHAPES)
def test_kd(classes: int, config, zs: bool, per_sample: bool) -> None:
    student, teacher, _, _, _ = _case(classes)
    student.requires_grad_()
    temp = _temperature(per_sample)
    loss = fused_kd(student, teacher, temp, zs, config=config)
    go = torch.rand(B, generator=torch.Generator().manual_seed(1))
    leaves = [student, temp] if per_sample else [student]
    grads = torch.autograd.grad(loss, leaves, go)

    leaves64 = [_leaf64(x) for x in leaves]
    temp64 = leaves64[1] if per_sample else temp
    ref = oracle.kd_rows(leaves64[0], teacher.double(), temp64, zs)
    refs = torch.autograd.grad(ref, leaves64, go.double())
    _check(loss, ref)
    _check(grads[0], refs[0], _grad_floor(student, go, temp, zs))
    if per_sample:
        _check(grads[1], refs[1], (2 * go * ref / temp64).abs().max().item())


@pytest.mark.parametrize("per_sample", [False, True], ids=["T", "T_b"])
@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
@pytest.mark.parametrize(("classes", "config"), SHAPES)
def test_dkd(classes: int, config, zs: bool, per_sample: bool) -> None:
    student, teacher, target, _, _ = _case(classes)
    student.requires_grad_()
    temp = _temperature(per_sample)
    tckd, nckd = fused_dkd(student, teacher, target, temp, zs, config=config)
    g = torch.Generator().manual_seed(2)
    go_t, go_n = torch.rand(B, generator=g), torch.rand(B, generator=g)
    leaves = [student, temp] if per_sample else [student]
    grads = torch.autograd.grad((tckd, nckd), leaves, (go_t, go_n))

    leaves64 = [_leaf64(x) for x in leaves]
    temp64 = leaves64[1] if per_sample else temp
    ref_t, ref_n = oracle.dkd_rows(leaves64[0], teacher.double(), target, temp64, zs)
    refs = torch.autograd.grad((ref_t, ref_n), leaves64, (go_t.double(), go_n.double()))
    _check(tckd, ref_t)
    _check(nckd, ref_n)
    _check(grads[0], refs[0], _grad_floor(student, go_t + go_n, temp, zs))
    if per_sample:
        floor = (2 * (go_t * ref_t + go_n * ref_n) / temp64).abs().max().item()
        _check(grads[1], refs[1], floor)


@pytest.mark.parametrize(("classes", "config"), SHAPES)
def test_ats(classes: int, config) -> None:
    student, teacher, target, _, _ = _case(classes)
    student.requires_grad_()
    loss = fused_ats(student, teacher, target, 4.0, 2.0, 1.5, config=config)
    go = torch.rand(B, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(loss, [student], go)
    s64 = _leaf64(student)
    ref = oracle.ats_rows(s64, teacher.double(), target, 4.0, 2.0, 1.5)
    (ref_grad,) = torch.autograd.grad(ref, [s64], go.double())
    _check(loss, ref)
    _check(grad, ref_grad, (go * 1.5).max().item())


@pytest.mark.parametrize("method", ["kd", "kd_zscore", "dkd", "dkd_zscore", "ats"])
@pytest.mark.parametrize("dtype", TEACHER_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_teacher_dtypes(dtype: torch.dtype, method: str) -> None:
    """Stored dtypes are read as stored (int8 decoded in registers) and match the exact values."""
    student, teacher, target, scale, offset = _case(37, dtype, seed=7)
    student.requires_grad_()
    exact = oracle.decode(teacher, scale, offset)  # (B, C) float64
    s64 = _leaf64(student)
    zs = method.endswith("zscore")
    kw = {"scale": scale, "offset": offset, "config": (2, 16)}
    if method.startswith("kd"):
        out = fused_kd(student, teacher, 3.0, zs, **kw)
        ref = oracle.kd_rows(s64, exact, 3.0, zs)
    elif method.startswith("dkd"):
        out = sum(fused_dkd(student, teacher, target, 3.0, zs, **kw))
        ref = sum(oracle.dkd_rows(s64, exact, target, 3.0, zs))
    else:
        out = fused_ats(student, teacher, target, 4.0, 2.0, 1.0, **kw)
        ref = oracle.ats_rows(s64, exact, target, 4.0, 2.0, 1.0)
    (grad,) = torch.autograd.grad(out.sum(), [student])
    (ref_grad,) = torch.autograd.grad(ref.sum(), [s64])
    _check(out, ref)
    _check(grad, ref_grad, _grad_floor(student, torch.ones(B), 3.0, zs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("method", ["kd", "dkd", "ats"])
def test_half_students(method: str, dtype: torch.dtype) -> None:
    """Half-precision students: float32 loss, gradient in the student's dtype (rounded once)."""
    student, teacher, target, _, _ = _case(37, seed=3)
    student = student.to(dtype).requires_grad_()
    s64 = _leaf64(student)
    if method == "kd":
        out = fused_kd(student, teacher, 2.0)
        ref = oracle.kd_rows(s64, teacher.double(), 2.0, False)
    elif method == "dkd":
        out = sum(fused_dkd(student, teacher, target, 2.0))
        ref = sum(oracle.dkd_rows(s64, teacher.double(), target, 2.0, False))
    else:
        out = fused_ats(student, teacher, target, 4.0, 2.0, 2.0)
        ref = oracle.ats_rows(s64, teacher.double(), target, 4.0, 2.0, 2.0)
    (grad,) = torch.autograd.grad(out.sum(), [student])
    (ref_grad,) = torch.autograd.grad(ref.sum(), [s64])
    assert out.dtype == torch.float32 and grad.dtype == dtype
    _check(out, ref)
    _check(grad, ref_grad, 2.0, rtol=1e-2)


def _extreme(classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """±100 logits, the target at +100 for the teacher and -100 for the student."""
    g = torch.Generator().manual_seed(classes)
    student = (torch.rand(B, classes, generator=g) > 0.5).float() * 200 - 100
    teacher = (torch.rand(B, classes, generator=g) > 0.5).float() * 200 - 100
    target = torch.randint(0, classes, (B,), generator=g)
    rows = torch.arange(B)
    teacher[rows, target] = 100.0
    student[rows, target] = -100.0
    return student, teacher, target


@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
@pytest.mark.parametrize("classes", [2, 10, 37])
def test_extreme_logits_stay_finite(classes: int, zs: bool) -> None:
    """±100 logits at T = 1: finite losses and gradients, equal to the oracle (log space)."""
    student, teacher, target = _extreme(classes)
    student.requires_grad_()
    s64 = _leaf64(student)
    tckd, nckd = fused_dkd(student, teacher, target, 1.0, zs, config=(2, 16))
    kd = fused_kd(student, teacher, 1.0, zs, config=(2, 16))
    ats = fused_ats(student, teacher, target, 1.0, 1.0, 1.0, config=(2, 16))
    grads = torch.autograd.grad((tckd + nckd + kd + ats).sum(), [student])[0]
    ref_t, ref_n = oracle.dkd_rows(s64, teacher.double(), target, 1.0, zs)
    ref_kd = oracle.kd_rows(s64, teacher.double(), 1.0, zs)
    ref_ats = oracle.ats_rows(s64, teacher.double(), target, 1.0, 1.0, 1.0)
    ref_grads = torch.autograd.grad((ref_t + ref_n + ref_kd + ref_ats).sum(), [s64])[0]
    for out, ref in [(tckd, ref_t), (nckd, ref_n), (kd, ref_kd), (ats, ref_ats)]:
        _check(out, ref)
    _check(grads, ref_grads, _grad_floor(student, torch.full((B,), 4.0), 1.0, zs))


def _check_rows(actual: torch.Tensor, expected: torch.Tensor, groups, floor=0.0) -> None:
    """``_check`` on each group of rows apart: a row of huge gradients (a constant student row
    divided by eps) must not set the bound for the others."""
    for rows in groups:
        _check(actual[rows], expected[rows], floor)


@pytest.mark.parametrize("eps", [1e-7, 0.0], ids=["eps1e-7", "eps0"])
def test_constant_rows_standardize_to_uniform(eps: float) -> None:
    """A constant row z-scores to exact zeros (a uniform softmax), never NaN, also with eps = 0
    (0 / 0 before 2026-11-27): losses, the student's gradient and a per-sample temperature's
    equal the float64 oracle, row by row, for KD, DKD and their fused-CE forms."""
    student, teacher, target, _, _ = _case(10, seed=5)
    teacher[0] = 3.25
    student[1] = -7.5
    teacher[2], student[2] = 1.0, 2.0  # both constant
    temp = _temperature(True, seed=5)
    student.requires_grad_()
    s64, t64 = _leaf64(student), _leaf64(temp)
    kd = fused_kd(student, teacher, temp, True, eps)
    tckd, nckd = fused_dkd(student, teacher, target, temp, True, eps)
    ref_kd = oracle.kd_rows(s64, teacher.double(), t64, True, eps)
    ref_t, ref_n = oracle.dkd_rows(s64, teacher.double(), target, t64, True, eps)
    for out, ref in [(kd, ref_kd), (tckd, ref_t), (nckd, ref_n)]:
        _check(out, ref)
    groups = ([0, 3, 4], [1], [2])  # the constant student rows' gradients are ~1/eps apart
    ref_rows = ref_kd + ref_t + 2 * ref_n
    grads = torch.autograd.grad((kd + tckd + 2 * nckd).sum(), [student, temp])
    refs = torch.autograd.grad(ref_rows.sum(), [s64, t64])
    # dL/dT = 2T·loss - T·(...) nearly cancels: judged against 2·loss/T (the module's floors)
    t_floor = (2 * ref_rows / t64).abs().max().item()
    _check_rows(grads[0], refs[0], groups, 1e-3)
    _check_rows(grads[1], refs[1], groups, t_floor)
    total, ce, kd_mean = fused_kd_ce(student, teacher, target, temp, 0.1, 0.9, True, eps)
    ref_kd_mean = oracle.kd_rows(s64, teacher.double(), t64, True, eps).mean()
    ref_ce = torch.nn.functional.cross_entropy(s64, target)
    _check_means((total, ce, kd_mean), (0.1 * ref_ce + 0.9 * ref_kd_mean, ref_ce, ref_kd_mean))
    grads = torch.autograd.grad(total, [student, temp])
    refs = torch.autograd.grad(0.1 * ref_ce + 0.9 * ref_kd_mean, [s64, t64])
    _check_rows(grads[0], refs[0], groups, 1e-3 / B)
    _check_rows(grads[1], refs[1], groups, t_floor / B)
    out = fused_dkd_ce(student, teacher, target, temp, 1.0, 0.5, 4.0, True, eps)
    rows = oracle.dkd_rows(s64, teacher.double(), target, t64, True, eps)
    ref_t, ref_n = (x.mean() for x in rows)
    ref_ce = torch.nn.functional.cross_entropy(s64, target)  # afresh: the last was backpropagated
    ref = (ref_ce + 0.5 * ref_t + 4.0 * ref_n, ref_ce, ref_t, ref_n)
    _check_means(out, ref)
    grads = torch.autograd.grad(out[0], [student, temp])
    refs = torch.autograd.grad(ref[0], [s64, t64])
    _check_rows(grads[0], refs[0], groups, 1e-3 / B)
    _check_rows(grads[1], refs[1], groups, 4 * t_floor / B)


@pytest.mark.parametrize("zs_ats", [False, True], ids=["kd_dkd", "ats"])
def test_minus_inf_teacher_logits_add_nothing(zs_ats: bool) -> None:
    """A -inf teacher logit has p = 0 and adds 0 (0 · log 0 = 0), in the fused kernels as in
    the oracle: finite losses, student and temperature gradients equal to float64 (it gave NaN
    before 2026-11-27). Row 0 has one at a non-target class, row 1 three, row 2 at its target;
    row 3 at every class but its target: no non-target mass, NCKD 0 (it was NaN, and with it
    the batch's mean and every gradient)."""
    student, teacher, target, _, _ = _case(37, seed=21)
    teacher[0, (target[0] + 1) % 37] = float("-inf")
    teacher[1, [(target[1] + k) % 37 for k in (1, 5, 9)]] = float("-inf")
    teacher[2, target[2]] = float("-inf")
    teacher[3] = float("-inf")
    teacher[3, target[3]] = 2.0
    temp = _temperature(True, seed=21)
    student.requires_grad_()
    s64, t64, t_64 = _leaf64(student), _leaf64(temp), teacher.double()
    if zs_ats:  # ATS's temperatures get no gradient in the fused kernels: floats
        ats = fused_ats(student, teacher, target, 2.0, 3.0, 1.5, config=(2, 16))
        ref = oracle.ats_rows(s64, t_64, target, 2.0, 3.0, 1.5)
        _check(ats, ref)
        (grad,) = torch.autograd.grad(ats.sum(), [student])
        (ref_grad,) = torch.autograd.grad(ref.sum(), [s64])
        _check(grad, ref_grad, 1.5)
        return
    kd = fused_kd(student, teacher, temp, config=(2, 16))
    split = fused_kd(student, teacher, temp, config=(1, 16, 4, 3))
    tckd, nckd = fused_dkd(student, teacher, target, temp, config=(2, 16))
    ref_kd = oracle.kd_rows(s64, t_64, t64, False)
    ref_t, ref_n = oracle.dkd_rows(s64, t_64, target, t64, False)
    assert ref_n[3] == 0 and nckd[3] == 0 and ref_n[:3].gt(0).all()
    for out, ref in [(kd, ref_kd), (split, ref_kd), (tckd, ref_t), (nckd, ref_n)]:
        _check(out, ref)
    (alone,) = torch.autograd.grad(nckd[3], [student], retain_graph=True)
    assert alone.eq(0).all()  # NCKD 0 whatever the student: no gradient
    grads = torch.autograd.grad((kd + split + tckd + 2 * nckd).sum(), [student, temp])
    refs = torch.autograd.grad((2 * ref_kd + ref_t + 2 * ref_n).sum(), [s64, t64])
    floor = _grad_floor(student, torch.full((B,), 4.0), temp, False)
    _check(grads[0], refs[0], floor)
    _check(grads[1], refs[1], (2 * ref_kd / t64).abs().max().item())
    total, _, _ = fused_kd_ce(student, teacher, target, temp, 0.1, 0.9, config=(2, 16))
    ref_total = _kd_ce64(s64, t_64, target, t64, False)[0]
    _check(total, ref_total)
    grads = torch.autograd.grad(total, [student, temp])
    refs = torch.autograd.grad(ref_total, [s64, t64])
    _check(grads[0], refs[0], 1.0 / B)
    _check(grads[1], refs[1], (2 * 0.9 * ref_kd / t64 / B).abs().max().item())
    out = fused_dkd_ce(student, teacher, target, temp, 1.0, 0.5, 4.0, config=(2, 16))
    ref = _dkd_ce64(s64, t_64, target, t64, False)
    _check_means(out, ref)
    grads = torch.autograd.grad(out[0], [student, temp])
    refs = torch.autograd.grad(ref[0], [s64, t64])
    _check(grads[0], refs[0], 4.0 / B)
    _check(grads[1], refs[1], (8 * ref_n / t64 / B).abs().max().item())


def test_minus_inf_teacher_logits_in_the_reference() -> None:
    """The PyTorch reference (what the CPU runs) agrees: a -inf teacher logit gives a learned
    temperature no NaN gradient (0 · inf in ``t / T``'s backward before 2026-11-27), and a row
    with no non-target mass (row 3) NCKD 0, not NaN."""
    from pipeline.kernels import reference

    student, teacher, target, _, _ = _case(37, seed=21)
    teacher[0, (target[0] + 1) % 37] = float("-inf")
    teacher[2, target[2]] = float("-inf")
    teacher[3] = float("-inf")
    teacher[3, target[3]] = 2.0
    temp = _temperature(True, seed=21)
    s64, t64, t_64 = _leaf64(student), _leaf64(temp), teacher.double()
    student, temp = _leaf64(student), _leaf64(temp)  # the reference in float64: its formulas
    kd = reference.kd_rows(student, t_64, temp)
    tckd, nckd = reference.dkd_rows(student, t_64, target, temp)
    ref_kd = oracle.kd_rows(s64, t_64, t64, False)
    ref_t, ref_n = oracle.dkd_rows(s64, t_64, target, t64, False)
    for out, ref in [(kd, ref_kd), (tckd, ref_t), (nckd, ref_n)]:
        _check(out, ref)
    grads = torch.autograd.grad((kd + tckd + 2 * nckd).sum(), [student, temp])
    refs = torch.autograd.grad((ref_kd + ref_t + 2 * ref_n).sum(), [s64, t64])
    _check(grads[0], refs[0], _grad_floor(student, torch.ones(B), temp, False))
    _check(grads[1], refs[1], (2 * (ref_kd + ref_t + 2 * ref_n) / t64).abs().max().item())


def test_zscored_rows_holding_inf_are_nan_not_uniform() -> None:
    """A z-score of a row holding ±inf is undefined. The fused kernels gave such a teacher row
    zeros (a uniform teacher: a finite, silently wrong KD/DKD), and so did the reference with
    eps = 0 (the paper's population std); now the row's terms are NaN everywhere (a training
    loop stops on it, as on a diverging student), and the other rows are as before."""
    from pipeline import kernels

    student, teacher, target, _, _ = _case(37, seed=5)
    teacher[1, (target[1] + 3) % 37] = float("-inf")
    teacher[3, 4] = float("inf")
    temp = _temperature(True, seed=5)
    s64, t64 = student.double(), temp.double()
    good = torch.tensor([0, 2, 4])
    kd = fused_kd(student, teacher, temp, zscore=True, config=(2, 16))
    tckd, nckd = fused_dkd(student, teacher, target, temp, zscore=True, config=(2, 16))
    ref_kd = oracle.kd_rows(s64[good], teacher[good].double(), t64[good], True)
    ref_t, ref_n = oracle.dkd_rows(s64[good], teacher[good].double(), target[good], t64[good], True)
    for out, ref in ((kd, ref_kd), (tckd, ref_t), (nckd, ref_n)):
        assert out[[1, 3]].isnan().all()
        _check(out[good], ref)
    total, ce, kd_mean = fused_kd_ce(student, teacher, target, temp, 0.1, 0.9, True, config=(2, 16))
    assert total.isnan() and kd_mean.isnan() and ce.isfinite()
    assert fused_dkd_ce(student, teacher, target, temp, 1.0, 1.0, 8.0, True)[0].isnan()
    for eps in (1e-7, 0.0):
        ref = kernels.kd_rows(student, teacher, temp, zscore=True, eps=eps, impl="reference")
        assert ref[[1, 3]].isnan().all() and ref[good].isfinite().all()
        for unbiased in (True, False):  # the population std's path standardizes in PyTorch
            z = standardize(teacher, eps, unbiased=unbiased)
            assert z[[1, 3]].isnan().all() and z[good].isfinite().all()


def test_dkd_nan_or_inf_teacher_logits_stay_nan() -> None:
    """A NaN or +inf non-target teacher logit has no defined DKD: NaN, as the reference gives,
    not a finite NCKD (the empty-row guard must not take a NaN sum for an empty one)."""
    student, teacher, target, _, _ = _case(37, seed=8)
    teacher[1, (target[1] + 2) % 37] = float("nan")
    teacher[3, (target[3] + 5) % 37] = float("inf")
    tckd, nckd = fused_dkd(student, teacher, target, 4.0, config=(2, 64))
    ref_t, ref_n = oracle.dkd_rows(student.double(), teacher.double(), target, 4.0, False)
    assert nckd[[1, 3]].isnan().all() and ref_n[[1, 3]].isnan().all()
    good = torch.tensor([0, 2, 4])
    _check(tckd[good], ref_t[good])
    _check(nckd[good], ref_n[good])


def test_global_learnable_temperature() -> None:
    """CTKD's global tau: a 0-d tensor is broadcast to the rows and gets the summed gradient."""
    student, teacher, target, _, _ = _case(37, seed=11)
    theta = torch.tensor(1.0, requires_grad=True)
    tau = 1.0 + 20.0 * torch.sigmoid(theta)
    tckd, nckd = fused_dkd(student, teacher, target, tau, config=(2, 16))
    loss = fused_kd(student, teacher, tau, config=(2, 16)).mean() + (tckd + 2 * nckd).mean()
    (grad,) = torch.autograd.grad(loss, [theta])

    theta64 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    tau64 = 1.0 + 20.0 * torch.sigmoid(theta64)
    ref_t, ref_n = oracle.dkd_rows(student.double(), teacher.double(), target, tau64, False)
    ref_kd = oracle.kd_rows(student.double(), teacher.double(), tau64, False)
    ref = ref_kd.mean() + (ref_t + 2 * ref_n).mean()
    (ref_grad,) = torch.autograd.grad(ref, [theta64])
    # Rows pull tau both ways: judge the sum against its terms' size (2·loss/T · dtau/dtheta).
    floor = 2 * ref.item() / tau64.item() * 20 * (torch.sigmoid(theta64) * torch.sigmoid(-theta64))
    assert abs(grad.item() - ref_grad.item()) <= 1e-5 * max(abs(ref_grad.item()), floor.item())


@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_row_gradients_of_any_stride(layout: str) -> None:
    """The per-row losses' backward reads its (B,) gradient as given: a sum's (one value
    expanded, stride 0) and a strided view, without copying it out first."""
    student, teacher, target, _, _ = _case(37, seed=17)

    def go(seed: int) -> torch.Tensor:
        if layout == "expanded":
            return torch.tensor(0.3 + seed).expand(B)
        return torch.randn(2 * B, generator=torch.Generator().manual_seed(seed))[::2]

    s = student.detach().requires_grad_()
    g_kd, g_t, g_n = go(1), go(2), go(3)
    assert all(g.stride(0) == (0 if layout == "expanded" else 2) for g in (g_kd, g_t, g_n))
    kd = fused_kd(s, teacher, 2.0, config=(2, 16))
    tckd, nckd = fused_dkd(s, teacher, target, 2.0, config=(2, 16))
    (grad,) = torch.autograd.grad([kd, tckd, nckd], [s], [g_kd, g_t, g_n])
    s64 = _leaf64(student)
    ref_t, ref_n = oracle.dkd_rows(s64, teacher.double(), target, 2.0, False)
    ref = oracle.kd_rows(s64, teacher.double(), 2.0, False)
    total = (ref * g_kd.double() + ref_t * g_t.double() + ref_n * g_n.double()).sum()
    (ref_grad,) = torch.autograd.grad(total, [s64])
    _check(grad, ref_grad, 2.0 * float(max(g.abs().max() for g in (g_kd, g_t, g_n))))


def test_dkd_decomposes_kd() -> None:
    """METHODS.md's identity, kernel against kernel: KD = TCKD + (1 - p_y) · NCKD per sample."""
    student, teacher, target, _, _ = _case(130, seed=13)
    kd = fused_kd(student, teacher, 4.0)
    tckd, nckd = fused_dkd(student, teacher, target, 4.0)
    p_y = torch.softmax(teacher.double() / 4.0, dim=1)[torch.arange(B), target]
    _check(tckd + (1 - p_y) * nckd, kd.double())


def test_bad_inputs_raise_method_error() -> None:
    student, teacher, target, _, _ = _case(10)
    q, _, _ = oracle.encode_int8(teacher)
    with pytest.raises(MethodError, match="int8"):
        fused_kd(student, q, 2.0)
    # The reference's refusal word for word (it was "scale must be a float or a (5,) tensor").
    with pytest.raises(MethodError, match=r"needs a float \(B,\) scale, got \(5, 1\) for teacher"):
        fused_kd(student, q, 2.0, scale=torch.ones(5, 1), offset=torch.zeros(5))
    with pytest.raises(MethodError, match="target"):
        fused_dkd(student, teacher, target + 10, 2.0)
    with pytest.raises(MethodError, match="2 classes"):
        fused_dkd(student[:, :1], teacher[:, :1], target * 0, 2.0)
    with pytest.raises(MethodError, match=r"\(B, C\)"):
        fused_kd(student, teacher[:, :3], 2.0)
    with pytest.raises(MethodError, match="temperature"):
        fused_kd(student, teacher, torch.ones(3))


# (classes, (rows, block, warps, segments)): rows split among programs (plain KD for few rows of
# many classes): a partial last segment, several rows a program, a segment a column block, and
# more segments asked for than there are blocks (capped).
SPLITS = [(130, (1, 32, 4, 3)), (37, (2, 16, 4, 8)), (130, (4, 16, 2, 9)), (70, (1, 16, 1, 2))]


@pytest.mark.parametrize("dtype", TEACHER_DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["T", "T_b"])
@pytest.mark.parametrize(("classes", "config"), SPLITS)
def test_kd_split_rows(classes: int, config, per_sample: bool, dtype: torch.dtype) -> None:
    """Each row's online-KL state computed in column segments and merged equals the oracle;
    so do the student's gradient (written segment by segment) and the temperature's (its sums
    added over segments)."""
    student, teacher, _, scale, offset = _case(classes, dtype)
    student.requires_grad_()
    temp = _temperature(per_sample)
    loss = fused_kd(student, teacher, temp, config=config, scale=scale, offset=offset)
    go = torch.rand(B, generator=torch.Generator().manual_seed(1))
    leaves = [student, temp] if per_sample else [student]
    grads = torch.autograd.grad(loss, leaves, go)
    unsplit = fused_kd(student, teacher, temp, config=config[:3], scale=scale, offset=offset)
    grads_unsplit = torch.autograd.grad(unsplit, leaves, go)

    decoded = oracle.decode(teacher, scale, offset)
    leaves64 = [_leaf64(x) for x in leaves]
    temp64 = leaves64[1] if per_sample else temp
    ref = oracle.kd_rows(leaves64[0], decoded, temp64, False)
    refs = torch.autograd.grad(ref, leaves64, go.double())
    _check(loss, ref)
    _check(grads[0], refs[0], _grad_floor(student, go, temp, False))
    if per_sample:
        _check(grads[1], refs[1], (2 * go * ref / temp64).abs().max().item())
    for split, whole in zip([loss, *grads], [unsplit, *grads_unsplit]):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_kd_split_extreme_and_zscore() -> None:
    """±100 logits at T = 1 stay finite and right when split; z-score refuses a split (its row
    statistics are not split) and takes one program a row by default."""
    student, teacher, _ = _extreme(37)
    student.requires_grad_()
    kd = fused_kd(student, teacher, 1.0, config=(1, 16, 4, 3))
    grad = torch.autograd.grad(kd.sum(), [student])[0]
    s64 = _leaf64(student)
    ref = oracle.kd_rows(s64, teacher.double(), 1.0, False)
    _check(kd, ref)
    (ref_grad,) = torch.autograd.grad(ref.sum(), [s64])
    _check(grad, ref_grad, _grad_floor(student, torch.ones(B), 1.0, False))
    with pytest.raises(MethodError, match="plain KD only"):
        fused_kd(student, teacher, 1.0, True, config=(1, 16, 4, 3))
    one = fused_kd(student, teacher, 1.0, True, config=(1, 16, 4, 1))  # segments = 1: allowed
    _check(one, oracle.kd_rows(s64, teacher.double(), 1.0, True))


def _backprop(outputs, weights, leaves) -> tuple[torch.Tensor, ...]:
    """Gradients of Σ weight · output (the fused losses' means, or the oracle's)."""
    return torch.autograd.grad(sum(w * o for w, o in zip(weights, outputs)), leaves)


def _check_means(out, ref) -> None:
    """A fused loss's 0-d float32 batch means against the oracle's."""
    for value, expected in zip(out, ref, strict=True):
        assert value.shape == () and value.dtype == torch.float32
        _check(value, expected)


def _kd_ce64(student, teacher, target, temp, zs: bool, ce_w=0.1, kd_w=0.9):
    """Float64 (total, ce, kd) from the oracle: the CE on the raw student logits."""
    kd = oracle.kd_rows(student, teacher, temp, zs).mean()
    ce = torch.nn.functional.cross_entropy(student, target)
    return ce_w * ce + kd_w * kd, ce, kd


# (classes, config, teacher dtype): default and multi-block tiles (masked rows in the last
# program), every stored dtype, and a split config, where the CE is PyTorch's beside split KD.
KD_CE_CASES = [
    (2, None, torch.float32),
    (10, None, torch.float16),
    (37, (2, 16), torch.bfloat16),
    (130, (4, 32, 2), torch.int8),
    (130, None, torch.float32),
    (130, (1, 32, 4, 3), torch.float16),
]


@pytest.mark.parametrize("in_forward", [True, False], ids=["grad_in_fwd", "grad_in_bwd"])
@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
@pytest.mark.parametrize("config", [None, (1, 32, 4, 3)], ids=["rows", "split"])
def test_kd_gradients_made_in_forward(config, zs: bool, in_forward: bool, monkeypatch) -> None:
    """KD's forward computes each row's gradient (no kernel launched from autograd's backward);
    backward scales it by the rows' loss gradients, in place. Right for any scale, and again
    on a second backward of a retained graph (the buffer is spent: the gradient kernel runs),
    for the student and a per-sample temperature; and with GRADIENT_IN_FORWARD off."""
    monkeypatch.setattr(importlib.import_module(KD_MODULE), "GRADIENT_IN_FORWARD", in_forward)
    if zs and config is not None:
        config = (1, 32, 4, 1)  # z-score takes no split
    student, teacher, _, _, _ = _case(130, seed=21)
    student.requires_grad_()
    temp = _temperature(True, seed=3)
    loss = fused_kd(student, teacher, temp, zs, config=config)
    leaves64 = [_leaf64(student), _leaf64(temp)]
    ref = oracle.kd_rows(leaves64[0], teacher.double(), leaves64[1], zs)
    for seed in (1, 2):  # the second: the graph retained, the forward's gradient spent
        go = 3.0 * torch.rand(B, generator=torch.Generator().manual_seed(seed)) - 1.0
        grads = torch.autograd.grad(loss, [student, temp], go, retain_graph=True)
        refs = torch.autograd.grad(ref, leaves64, go.double(), retain_graph=True)
        _check(grads[0], refs[0], _grad_floor(student, go.abs(), temp, zs))
        _check(grads[1], refs[1], (2 * go.double() * ref / leaves64[1]).abs().max().item())


@pytest.mark.parametrize("in_forward", [True, False], ids=["grad_in_fwd", "grad_in_bwd"])
@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
def test_kd_ce_gradients_made_in_forward(zs: bool, in_forward: bool, monkeypatch) -> None:
    """kd_ce's forward computes the total's gradient; backward scales it when only the total
    is backpropagated (training), and runs the gradient kernel when the terms are too or the
    graph is backpropagated again: each way equals the float64 oracle (also with the switch
    off: the kernel in backward every time)."""
    monkeypatch.setattr(importlib.import_module(KD_MODULE), "GRADIENT_IN_FORWARD", in_forward)
    student, teacher, target, _, _ = _case(37, torch.float16, seed=22)
    student.requires_grad_()
    temp = _temperature(True, seed=4)
    out = fused_kd_ce(student, teacher, target, temp, 0.1, 0.9, zs, config=(2, 16))
    leaves, leaves64 = [student, temp], [_leaf64(student), _leaf64(temp)]
    ref = _kd_ce64(leaves64[0], teacher.double(), target, leaves64[1], zs)
    for weights in [(2.5,), (-0.5, 0.3, 1.7), (1.25,)]:  # scaled; the terms; total again
        grads = torch.autograd.grad(
            sum(w * o for w, o in zip(weights, out)), leaves, retain_graph=True
        )
        total64 = sum(w * o for w, o in zip(weights, ref))
        refs = torch.autograd.grad(total64, leaves64, retain_graph=True)
        go = torch.full((B,), max(abs(w) for w in weights) / B)
        _check(grads[0], refs[0], max(_grad_floor(student, go, temp, zs), 1.0 / B))
        kd64 = oracle.kd_rows(leaves64[0], teacher.double(), leaves64[1], zs)
        _check(grads[1], refs[1], (2 * go * kd64 / leaves64[1]).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_students_get_their_gradient_in_backward(dtype: torch.dtype, monkeypatch) -> None:
    """A float16/bfloat16 student's gradient is made in backward with the real loss gradient,
    rounded once: made in forward, its unit gradient was rounded to the student's dtype before
    the scaling (under a loss scale of 65536, 651 of 256,000 float16 entries underflowed to 0),
    and a z-scored row's per-row unit gradient, B times the mean's, overflowed to inf."""
    kd_module = importlib.import_module(KD_MODULE)
    student, teacher, target, _, _ = _case(130, seed=24)
    student = student.to(dtype)
    student[1] = 0.5 + 1e-3 * student[1]  # near constant: a z-score's large gradient
    grads = {}
    for in_forward in (True, False):
        monkeypatch.setattr(kd_module, "GRADIENT_IN_FORWARD", in_forward)
        s = student.detach().requires_grad_()
        total = fused_kd_ce(s, teacher, target, 4.0, 0.1, 0.9)[0] * 65536.0
        rows = fused_kd(s, teacher, 2.0, True).mean()
        grads[in_forward] = torch.autograd.grad([total, rows], [s])[0]
    assert torch.equal(grads[True], grads[False])
    assert torch.isfinite(grads[True]).all()


def test_kd_gradient_not_made_under_no_grad(monkeypatch) -> None:
    """Under torch.no_grad a student that requires grad gets no gradient kernel in forward (a
    Function's needs_input_grad ignores the grad mode)."""
    kd_module = importlib.import_module(KD_MODULE)
    launches = []
    original = kd_module._launch_bwd

    def counting(*args, **kwargs):
        launches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kd_module, "_launch_bwd", counting)
    student, teacher, target, _, _ = _case(37, seed=25)
    student.requires_grad_()
    with torch.no_grad():
        fused_kd(student, teacher, 2.0)
        fused_kd_ce(student, teacher, target, 2.0, 0.1, 0.9)
    assert not launches
    fused_kd(student, teacher, 2.0)  # with grad: made in forward
    assert len(launches) == 1


def test_target_flag_survives_a_failed_call_and_inference_mode(monkeypatch) -> None:
    """A call that fails after its kernel cleared the target flag (out of memory allocating the
    gradient) leaves no cleared flag behind; flags and cached temperatures first made under
    torch.inference_mode still serve training calls (inference tensors could not be reset or
    saved for backward)."""
    kd_module = importlib.import_module(KD_MODULE)
    common = importlib.import_module("pipeline.kernels.triton_common")
    kd_module._target_flags.cache_clear()
    common.constant_rows.cache_clear()
    try:
        student, teacher, target, _, _ = _case(10, seed=26)
        with torch.inference_mode():  # first use: flags and a T = 3.5 vector cached here
            fused_kd_ce(student, teacher, target, 3.5, 0.1, 0.9)
        wrong = target.clone()
        wrong[2] = 10
        s = student.detach().requires_grad_()
        with pytest.raises(MethodError, match="target class 10 is out of range"):
            fused_kd_ce(s, teacher, wrong, 3.5, 0.1, 0.9)

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(kd_module, "_launch_bwd", out_of_memory)
        with pytest.raises(RuntimeError, match="simulated"):
            fused_kd_ce(s, teacher, wrong, 3.5, 0.1, 0.9)
        monkeypatch.undo()
        total = fused_kd_ce(s, teacher, target, 3.5, 0.1, 0.9)[0]
        total.backward()
        _check(total, _kd_ce64(student.double(), teacher.double(), target, 3.5, False)[0])
        assert all(int(flag) == 1 for flag in kd_module._target_flags(student.device))
    finally:
        kd_module._target_flags.cache_clear()
        common.constant_rows.cache_clear()


def test_kd_ce_checks_targets_in_its_kernel() -> None:
    """An unchecked target outside [0, C) is refused by name (the kernel flags it as it reads
    the row; off CUDA the flag is read and reset), and a call whose caller checked its targets
    never leaves a flag behind for the next one."""
    student, teacher, target, _, _ = _case(10, seed=23)
    for bad in (10, -1):
        wrong = target.clone()
        wrong[3] = bad
        with pytest.raises(MethodError, match=rf"target class {bad} is out of range: .*0\.\.9"):
            fused_kd_ce(student, teacher, wrong, 4.0, 0.1, 0.9)
        fused_kd_ce(student, teacher, wrong, 4.0, 0.1, 0.9, target_checked=True)
        total = fused_kd_ce(student, teacher, target, 4.0, 0.1, 0.9)[0]
        _check(total, _kd_ce64(student.double(), teacher.double(), target, 4.0, False)[0])
    with pytest.raises(MethodError, match=r"target must be \(5,\)"):
        fused_kd_ce(student, teacher, target[:3], 4.0, 0.1, 0.9)
    with pytest.raises(MethodError, match="integer class indices"):
        fused_kd_ce(student, teacher, target.float(), 4.0, 0.1, 0.9)


@pytest.mark.parametrize("outputs", ["total", "all"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["T", "T_b"])
@pytest.mark.parametrize(
    ("classes", "config", "dtype", "zs"),
    [
        (*case, zs)
        for case in KD_CE_CASES
        for zs in (False, True)
        if not (zs and case[1] and len(case[1]) == 4)
    ],
)  # z-score refuses a split: test_kd_ce_extreme_logits_and_weights
def test_kd_ce(classes: int, config, dtype, zs: bool, per_sample: bool, outputs: str) -> None:
    """KD with its cross-entropy in one kernel each way: (total, ce, kd) and the gradients of
    the student and the temperature equal the float64 oracle, whether only the total is
    backpropagated (training) or each of the three outputs with its own weight."""
    student, teacher, target, scale, offset = _case(classes, dtype)
    student.requires_grad_()
    temp = _temperature(per_sample)
    out = fused_kd_ce(
        student, teacher, target, temp, 0.1, 0.9, zs, scale=scale, offset=offset, config=config
    )
    weights = (1.0,) if outputs == "total" else (1.0, 0.3, -0.7)
    leaves = [student, temp] if per_sample else [student]
    grads = _backprop(out, weights, leaves)

    leaves64 = [_leaf64(x) for x in leaves]
    temp64 = leaves64[1] if per_sample else temp
    decoded = oracle.decode(teacher, scale, offset)
    ref = _kd_ce64(leaves64[0], decoded, target, temp64, zs)
    refs = _backprop(ref, weights, leaves64)
    _check_means(out, ref)
    # dL/ds: the KD part's scale (go = 0.9 / B... per row) and the CE part's (softmax - onehot) / B
    go = torch.full((B,), max(abs(w) for w in weights) / B)
    floor = max(_grad_floor(student, go, temp, zs), 1.0 / B)
    _check(grads[0], refs[0], floor)
    if per_sample:
        _check(grads[1], refs[1], (2 * go * oracle.kd_rows(*leaves64[:1], decoded, temp64, zs)
                                   / temp64).abs().max().item())  # fmt: skip


def test_kd_ce_extreme_logits_and_weights() -> None:
    """±100 logits at T = 1 (the student's target logit at -100: CE of 200) stay finite and
    right; zero weights give exactly that part's gradient alone."""
    student, teacher, target = _extreme(37)
    student.requires_grad_()
    s64 = _leaf64(student)
    for ce_w, kd_w in [(0.1, 0.9), (1.0, 0.0), (0.0, 1.0)]:
        total, ce, kd = fused_kd_ce(student, teacher, target, 1.0, ce_w, kd_w, config=(2, 16))
        (grad,) = torch.autograd.grad(total, [student])
        ref = _kd_ce64(s64, teacher.double(), target, 1.0, False, ce_w, kd_w)
        (ref_grad,) = torch.autograd.grad(ref[0], [s64])
        for value, expected in zip((total, ce, kd), ref):
            _check(value, expected)
        _check(grad, ref_grad, 1.0 / B)
    with pytest.raises(MethodError, match="target"):
        fused_kd_ce(student, teacher, target + 37, 1.0, 0.1, 0.9)
    with pytest.raises(MethodError, match="plain KD only"):
        fused_kd_ce(student, teacher, target, 1.0, 0.1, 0.9, True, config=(1, 16, 4, 3))


def test_kd_ce_global_learned_temperature() -> None:
    """CTKD+KD as trained: a 0-d learned tau broadcast to the rows gets the summed gradient."""
    student, teacher, target, _, _ = _case(37, seed=11)
    theta = torch.tensor(1.0, requires_grad=True)
    tau = 1.0 + 20.0 * torch.sigmoid(theta)
    total, _, _ = fused_kd_ce(student, teacher, target, tau, 0.1, 0.9, config=(2, 16))
    (grad,) = torch.autograd.grad(total, [theta])
    theta64 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    tau64 = 1.0 + 20.0 * torch.sigmoid(theta64)
    ref, _, kd = _kd_ce64(student.double(), teacher.double(), target, tau64, False)
    (ref_grad,) = torch.autograd.grad(ref, [theta64])
    floor = (
        2 * 0.9 * kd.item() / tau64.item() * 20 * (torch.sigmoid(theta64) * torch.sigmoid(-theta64))
    )
    assert abs(grad.item() - ref_grad.item()) <= 1e-5 * max(abs(ref_grad.item()), floor.item())


def _dkd_ce64(student, teacher, target, temp, zs: bool, weights=(1.0, 0.5, 4.0)):
    """Float64 (total, ce, tckd, nckd) batch means from the oracle, the CE on the raw logits."""
    tckd, nckd = (x.mean() for x in oracle.dkd_rows(student, teacher, target, temp, zs))
    ce = torch.nn.functional.cross_entropy(student, target)
    return weights[0] * ce + weights[1] * tckd + weights[2] * nckd, ce, tckd, nckd


@pytest.mark.parametrize("outputs", ["total", "all"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["T", "T_b"])
@pytest.mark.parametrize("zs", [False, True], ids=["plain", "zscore"])
@pytest.mark.parametrize(("classes", "config", "dtype"), KD_CE_CASES[:-1])  # DKD has no split
def test_dkd_ce(classes: int, config, dtype, zs: bool, per_sample: bool, outputs: str) -> None:
    """DKD's training loss in one kernel each way: (total, ce, tckd, nckd) and the gradients of
    the student and the temperature equal the float64 oracle, for the total alone (training)
    and for the four outputs each with its own weight."""
    student, teacher, target, scale, offset = _case(classes, dtype)
    student.requires_grad_()
    temp = _temperature(per_sample)
    out = fused_dkd_ce(
        student, teacher, target, temp, 1.0, 0.5, 4.0, zs, scale=scale, offset=offset,
        config=config,
    )  # fmt: skip
    weights = (1.0,) if outputs == "total" else (1.0, 0.3, -0.7, 0.2)
    leaves = [student, temp] if per_sample else [student]
    grads = _backprop(out, weights, leaves)

    leaves64 = [_leaf64(x) for x in leaves]
    temp64 = leaves64[1] if per_sample else temp
    decoded = oracle.decode(teacher, scale, offset)
    ref = _dkd_ce64(leaves64[0], decoded, target, temp64, zs)
    refs = _backprop(ref, weights, leaves64)
    _check_means(out, ref)
    go = torch.full((B,), 4.0 / B)  # the largest per-row weight of a DKD part
    _check(grads[0], refs[0], max(_grad_floor(student, go, temp, zs), 1.0 / B))
    if per_sample:
        rows64 = sum(oracle.dkd_rows(leaves64[0], decoded, target, temp64, zs))
        _check(grads[1], refs[1], (2 * go * rows64 / temp64).abs().max().item())


def test_dkd_ce_extreme_logits_and_gaps() -> None:
    """±100 logits at T = 1 and DKD's target gaps stay finite and right with the CE fused in
    (the official DKD is inf/NaN there); a bad target is refused."""
    student, teacher, target = _extreme(37)
    student.requires_grad_()
    s64 = _leaf64(student)
    total, ce, tckd, nckd = fused_dkd_ce(student, teacher, target, 1.0, 1.0, 1.0, 8.0)
    (grad,) = torch.autograd.grad(total, [student])
    ref = _dkd_ce64(s64, teacher.double(), target, 1.0, False, (1.0, 1.0, 8.0))
    (ref_grad,) = torch.autograd.grad(ref[0], [s64])
    for value, expected in zip((total, ce, tckd, nckd), ref):
        _check(value, expected)
    _check(grad, ref_grad, 8.0 / B)
    with pytest.raises(MethodError, match="target"):
        fused_dkd_ce(student, teacher, target + 37, 1.0, 1.0, 1.0, 8.0)


def test_segments_for(monkeypatch) -> None:
    """Default: one program a row except long rows on CUDA with fewer than 2 rows an SM (then
    about 4 programs an SM); every segment whole column blocks, none empty."""
    from pipeline.kernels import triton_common as common

    cpu = torch.device("cpu")
    launch = common.launch_config(128, 131072)
    assert common.segments_for(128, 131072, launch, cpu) == (1, 131072 // 2048 * 2048)
    assert common.segments_for(128, 131072, launch, cpu, 5) == (5, 13 * 2048)
    assert common.segments_for(128, 131072, launch, cpu, 64) == (64, 2048)
    assert common.segments_for(128, 131072, launch, cpu, 1000) == (64, 2048)  # capped
    assert common.segments_for(128, 50257, launch, cpu, 4) == (4, 7 * 2048)  # 25 blocks
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(common, "_sm_count", lambda index: 132)  # an H100, without one
    assert common.segments_for(128, 131072, launch, gpu) == (5, 13 * 2048)
    assert common.segments_for(512, 32768, common.launch_config(512, 32768), gpu)[0] == 1
    assert common.segments_for(263, 32768, common.launch_config(263, 32768), gpu) == (3, 12288)
    assert common.segments_for(264, 32768, common.launch_config(264, 32768), gpu)[0] == 1
    assert common.segments_for(4096, 32768, common.launch_config(4096, 32768), gpu)[0] == 1
    assert common.segments_for(128, 4096, common.launch_config(128, 4096), gpu)[0] == 1
    small = common.launch_config(1 << 17, 100)
    assert common.segments_for(1 << 17, 100, small, gpu) == (1, 128)
    with pytest.raises(MethodError, match="segments"):
        common.segments_for(128, 131072, launch, cpu, 0)


def test_launch_config_defaults_and_overrides() -> None:
    """The default tiles (BENCHMARKS.md, registers) and what an override may say."""
    from pipeline.kernels.triton_common import launch_config

    def shape(launch) -> tuple[int, int, int]:
        return launch.rows, launch.block, launch.num_warps

    assert shape(launch_config(1 << 20, 10)) == (16, 16, 4)
    assert shape(launch_config(1 << 20, 32)) == (8, 32, 4)
    assert shape(launch_config(1 << 20, 33)) == (4, 64, 1)
    assert shape(launch_config(1 << 17, 100)) == (2, 128, 1)
    assert shape(launch_config(3, 10)) == (4, 16, 4)  # rows capped at the batch's power of 2
    assert shape(launch_config(1, 100)) == (1, 128, 1)
    assert shape(launch_config(1 << 14, 1000)) == (1, 512, 1)
    assert shape(launch_config(1 << 14, 2047)) == (1, 2048, 8)
    assert shape(launch_config(128, 131072)) == (1, 2048, 8)
    assert shape(launch_config(64, 100, (2, 64))) == (2, 64, 1)  # the default warps of a block
    assert shape(launch_config(64, 100, (4, 16))) == (4, 16, 4)
    assert shape(launch_config(64, 100, (2, 64, 2))) == (2, 64, 2)
    assert launch_config(1000, 10).grid(1000) == (63,)  # ceil(1000 / 16)
    for bad in [(3, 64), (2, 48), (2, 64, 3), (2, 64, 64), (2, 64, 4, 1)]:
        with pytest.raises(MethodError, match="powers of two|num_warps"):
            launch_config(64, 100, bad)


@pytest.mark.parametrize("outputs", ["total", "all"])
@pytest.mark.parametrize("student_temperature", [1.0, 2.0])
@pytest.mark.parametrize(("classes", "config", "dtype"), KD_CE_CASES[:-1])
def test_ats_ce(classes: int, config, dtype, student_temperature: float, outputs: str) -> None:
    """ATS's training loss in one kernel each way: (total, ce, ats) and the student's gradient
    equal the float64 oracle, for the total alone and for each output with its own weight."""
    student, teacher, target, scale, offset = _case(classes, dtype)
    student.requires_grad_()
    out = fused_ats_ce(
        student, teacher, target, 4.0, 2.0, student_temperature, 0.5, 0.5, scale=scale,
        offset=offset, config=config,
    )  # fmt: skip
    weights = (1.0,) if outputs == "total" else (1.0, 0.3, -0.7)
    (grad,) = _backprop(out, weights, [student])
    s64 = _leaf64(student)
    rows = oracle.ats_rows(s64, oracle.decode(teacher, scale, offset), target, 4.0, 2.0,
                           student_temperature)  # fmt: skip
    ce = torch.nn.functional.cross_entropy(s64, target)
    ref = (0.5 * ce + 0.5 * rows.mean(), ce, rows.mean())
    (ref_grad,) = _backprop(ref, weights, [s64])
    _check_means(out, ref)
    _check(grad, ref_grad, student_temperature / B)


def test_fused_losses_may_be_added_to_in_place() -> None:
    """A training loop may do ``total += aux`` (or scale DKD's rows in place): the totals and
    DKD's rows are tensors of their own, not views that autograd refuses to modify."""
    student, teacher, target, _, _ = _case(10)
    student.requires_grad_()
    for out in (
        fused_kd_ce(student, teacher, target, 4.0, 0.1, 0.9),
        fused_dkd_ce(student, teacher, target, 4.0, 1.0, 1.0, 8.0),
        fused_ats_ce(student, teacher, target, 4.0, 2.0, 1.0, 0.5, 0.5),
        fused_dkd(student, teacher, target, 4.0),
    ):
        first = out[0]
        expected = torch.autograd.grad(first.sum(), [student], retain_graph=True)[0]
        first *= 2.0
        (grad,) = torch.autograd.grad(first.sum(), [student])
        torch.testing.assert_close(grad, 2.0 * expected)


def test_fused_losses_of_an_empty_batch_are_nan_like_the_reference() -> None:
    """B = 0: no kernel is launched; the means of nothing are NaN, as PyTorch's mean gives."""
    student = torch.zeros(0, 10, requires_grad=True)
    teacher, target = torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64)
    for out in (
        fused_kd_ce(student, teacher, target, 4.0, 0.1, 0.9),
        fused_dkd_ce(student, teacher, target, 4.0, 1.0, 1.0, 8.0),
        fused_ats_ce(student, teacher, target, 4.0, 2.0, 1.0, 0.5, 0.5),
    ):
        assert all(value.shape == () and torch.isnan(value) for value in out)
