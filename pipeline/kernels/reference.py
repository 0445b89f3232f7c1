"""The per-row PyTorch reference of the loss kernels: the math every method computes through.

The fused Triton kernels (``pipeline.kernels.triton_*``) are tested against these functions;
names, argument order and returned shapes are the contract between the two:

    decode_teacher(teacher, scale=None, offset=None)                  -> (B, C) float32
    kd_rows(student, teacher, temperature, zscore=False, eps=1e-7)    -> (B,)
        T² · KL(softmax(t'/T) || softmax(s'/T)),  x' = standardize(x) if zscore else x
    kd_ce(student, teacher, target, temperature, ce_weight, kd_weight, zscore, eps)
                                                    -> (total, ce, kd), batch means, 0-d each
        ce_weight · CE(s, y) + kd_weight · mean(kd_rows), the CE on the raw student logits
    with_ce(student, target, ce_weight, *(weight, term))  -> (total, ce, *terms): what the
        *_ce functions share (the fused kernels' fallbacks use it too)
    dkd_rows(student, teacher, target, temperature, zscore, eps)      -> ((B,), (B,))
        (T² · KL([p_y, 1 - p_y] || [q_y, 1 - q_y]),  T² · KL(p̂ || q̂) over the C - 1 other classes)
    dkd_ce(student, teacher, target, temperature, ce_weight, tckd_weight, nckd_weight, zscore, eps)
                                              -> (total, ce, tckd, nckd), batch means, 0-d each
    ats_rows(student, teacher, target, tau1, tau2, student_temperature) -> (B,)
    ats_ce(student, teacher, target, tau1, tau2, student_temperature, ce_weight, ats_weight)
                                                    -> (total, ce, ats), batch means, 0-d each
        s_tau² · (-Σ_c p_ats,c · log_softmax(s / s_tau)_c),  p_ats = softmax(t / tau_c)

Everything is in log space (``log_softmax``, ``logsumexp``): DKD's binary split is
``log p_y = a_y - lse(a)`` and ``log(1 - p_y) = lse(a_{c≠y}) - lse(a)``, never ``log`` of a sum of
probabilities, so ±100 logits at T = 1 stay finite in float32 (the official DKD gives inf/NaN).
NCKD gathers the C - 1 non-target columns (no ``-1000`` mask, whose exact zeros make the gradient
with respect to a learned temperature NaN). Temperatures are a float or a 0-d/(1,)/(B,) tensor;
T² multiplies each row. The teacher is data: it is detached and never gets a gradient. A -inf
teacher logit (a class ruled out) contributes 0 to values and to the student's and the
temperature's gradients; a teacher row whose non-target logits are all -inf has NCKD 0.

Inputs are computed in the wider of the student's dtype and float32 (float64 stays float64, for
gradchecks); ``decode_teacher`` keeps a float64 teacher as float64 for the same reason.
"""

from __future__ import annotations

import math

import torch

from pipeline.errors import MethodError
from pipeline.transforms import (
    Temperature,
    apply_temperature,
    asymmetric_temperature,
    check_temperature,
    squared,
    standardize,
)

__all__ = [
    "ats_ce",
    "ats_rows",
    "decode_teacher",
    "dkd_ce",
    "dkd_rows",
    "kd_ce",
    "kd_rows",
    "nontarget_index",
    "with_ce",
]

_FLOAT_TEACHERS = (torch.float16, torch.bfloat16, torch.float32)


def check_affine(teacher: torch.Tensor, scale: object, offset: object) -> None:
    """MethodError unless an int8 teacher's ``scale`` and ``offset`` are float (B,) tensors
    (the reference and the fused kernels refuse them alike)."""
    if scale is None or offset is None:
        raise MethodError("an int8 teacher needs its per-row scale and offset, (B,) each")
    rows = teacher.shape[0] if teacher.dim() == 2 else None
    for name, value in (("scale", scale), ("offset", offset)):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or (
            rows is None or value.shape != (rows,)
        ):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise MethodError(
                f"an int8 teacher (B, C) needs a float (B,) {name}, got {got} for teacher "
                f"logits of shape {tuple(teacher.shape)}"
            )


def decode_teacher(
    teacher: torch.Tensor, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored teacher logits as float32 (B, C); int8 as ``q * scale[:, None] + offset[:, None]``."""
    if teacher.dtype == torch.int8:
        check_affine(teacher, scale, offset)
        return teacher.float() * scale.float()[:, None] + offset.float()[:, None]
    if scale is not None or offset is not None:
        raise MethodError(f"scale/offset belong to int8 teachers only, got a {teacher.dtype} one")
    if teacher.dtype in _FLOAT_TEACHERS:
        return teacher.float()
    if teacher.dtype == torch.float64:
        return teacher  # kept exact for float64 checks
    raise MethodError(f"teacher logits must be float16/bfloat16/float32/int8, not {teacher.dtype}")


def _prepared(
    student: torch.Tensor, teacher: torch.Tensor, zscore: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-checked (B, C) student and detached teacher in one float dtype, z-scored if asked."""
    if student.dim() != 2 or teacher.shape != student.shape:
        raise MethodError(
            f"student and teacher logits must both be (B, C), got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    student, teacher = student.to(dtype), teacher.detach().to(dtype)
    if zscore:
        student, teacher = standardize(student, eps), standardize(teacher, eps)
    return student, teacher


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_c p_c (log p_c - log q_c) per row with 0·log 0 = 0: (B,)."""
    p = log_p.exp()
    # A -inf teacher logit gives p = 0 and log p = -inf; zeroing log p there keeps both the value
    # and every gradient finite (a where() around the product would still backprop 0 · inf).
    log_p = torch.where(p > 0, log_p, 0.0)
    return (p * (log_p - log_q)).sum(dim=1)


def check_target(
    target: torch.Tensor, batch: int, classes: int, checked: bool = False
) -> torch.Tensor:
    """Targets (B,) of integer classes in [0, C), as contiguous int64; MethodError otherwise.

    The range is checked without a host sync on CUDA (a device-side assert: a sync per training
    step would stall it). ``checked``: the caller already checked shape and range (the methods'
    ``check_inputs``), so a training step does not pay for the same check twice.
    """
    if checked:
        return target.to(torch.int64).contiguous()
    check_target_shape(target, batch)
    # t // C is 0 exactly for 0 <= t < C (floor division: -1 for negatives): on CUDA three
    # kernels and the assert, where (t >= 0) & (t < C) took four and the assert.
    assert_targets((target // classes == 0).all(), target, classes)
    return target.to(torch.int64).contiguous()


def check_target_shape(target: torch.Tensor, batch: int) -> None:
    """MethodError unless ``target`` is a (B,) tensor of integers (their range not looked at)."""
    if not isinstance(target, torch.Tensor) or target.shape != (batch,):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
        raise MethodError(f"target must be ({batch},) to match the logits, got {shape}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise MethodError(f"target must hold integer class indices, not {target.dtype}")


def assert_targets(ok: torch.Tensor, target: torch.Tensor, classes: int) -> None:
    """``ok`` (one element, nonzero when every target lies in [0, C)) asserted: on CUDA on the
    device, without a host sync (a sync per training step would stall it); elsewhere a
    MethodError naming the first class out of range."""
    if ok.is_cuda:
        torch._assert_async(ok)
    elif not bool(ok):
        bad = target[(target < 0) | (target >= classes)][0].item()
        raise MethodError(f"target class {bad} is out of range: classes are 0..{classes - 1}")


def kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: Temperature,
    zscore: bool = False,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Per-row ``T² · KL(softmax(t'/T) || softmax(s'/T))``: (B,)."""
    s, t = _prepared(student, teacher, zscore, eps)
    check_temperature("temperature", temperature, s.shape[0])
    log_p = torch.log_softmax(apply_temperature(t, temperature, teacher=True), dim=1)  # (B, C)
    log_q = torch.log_softmax(apply_temperature(s, temperature), dim=1)  # (B, C)
    return squared(temperature) * _kl_rows(log_p, log_q)


def kd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature,
    ce_weight: float,
    kd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD with its cross-entropy, batch means ``(total, ce, kd)``: 0-d each.

    ``ce`` is the cross-entropy of the raw student logits (also under ``zscore``), ``kd`` the
    mean of ``kd_rows``, total = ce_weight · ce + kd_weight · kd. ``target_checked``: as in
    ``check_target``.
    """
    kd = kd_rows(student, teacher, temperature, zscore, eps).mean()
    return with_ce(student, target, ce_weight, (kd_weight, kd), target_checked=target_checked)


def with_ce(
    student: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float,
    *terms: tuple[float, torch.Tensor],
    target_checked: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(total, ce, *terms)`` of a method's training loss: ce the cross-entropy of the raw
    student logits (in the wider of their dtype and float32), total = ce_weight · ce + Σ w · term
    over the (weight, batch-mean term) pairs."""
    wide = torch.promote_types(student.dtype, torch.float32)
    target = check_target(target, *student.shape, target_checked)
    ce = torch.nn.functional.cross_entropy(student.to(wide), target)
    weighted = terms[0][0] * terms[0][1]
    for weight, term in terms[1:]:
        weighted = weighted + weight * term
    return ce_weight * ce + weighted, ce, *(term for _, term in terms)


def ats_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: Temperature,
    tau2: Temperature,
    student_temperature: Temperature,
    ce_weight: float,
    ats_weight: float,
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATS with its cross-entropy, batch means ``(total, ce, ats)``: 0-d each.

    total = ce_weight · ce + ats_weight · ats, the CE of the raw student logits.
    """
    temps = (tau1, tau2, student_temperature)
    ats = ats_rows(student, teacher, target, *temps, target_checked=target_checked).mean()
    return with_ce(student, target, ce_weight, (ats_weight, ats), target_checked=True)


def nontarget_index(target: torch.Tensor, classes: int) -> torch.Tensor:
    """Column indices of the C - 1 non-target classes of each row, in order: (B, C - 1).

    A gather with these drops the target column exactly, without boolean indexing (which would
    sync with the host and give a data-dependent shape).
    """
    cols = torch.arange(classes - 1, device=target.device)[None, :]  # (1, C - 1)
    return cols + (cols >= target[:, None]).long()  # skip the target column


def _binary_log_probs(
    x: torch.Tensor, target: torch.Tensor, rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_y, log(1 - p_y)) of softmax(x) from the target's log-odds: (B,) each.

    With u = x_y - logsumexp(x_rest), log p_y = -softplus(-u) and log(1 - p_y) = -softplus(u),
    the fused kernel's form: each is accurate where it is small. Differences of two logsumexps
    (lse(rest) - lse(all)) cancel when p_y is small and lost ~1e-3 of TCKD's float32 batch mean
    (and ~1 % of its temperature gradient) at C = 1000, T = 15.6.
    """
    u = x.gather(1, target[:, None])[:, 0] - torch.logsumexp(x.gather(1, rest), dim=1)  # (B,)
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    # softplus(z) = logaddexp(z, 0): exact for any z, ±inf included, and so is its gradient
    return -torch.logaddexp(-u, zero), -torch.logaddexp(u, zero)


def dkd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature,
    zscore: bool = False,
    eps: float = 1e-7,
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row DKD parts ``(T² · TCKD, T² · NCKD)``: (B,), (B,)."""
    s, t = _prepared(student, teacher, zscore, eps)
    batch, classes = s.shape
    if classes < 2:
        raise MethodError(f"DKD needs 2 classes or more (a target and a non-target), got {classes}")
    target = check_target(target, batch, classes, target_checked)
    check_temperature("temperature", temperature, batch)
    a = apply_temperature(t, temperature, teacher=True)  # (B, C)
    b = apply_temperature(s, temperature)
    rest = nontarget_index(target, classes)  # (B, C - 1)
    lp_y, lp_rest = _binary_log_probs(a, target, rest)
    lq_y, lq_rest = _binary_log_probs(b, target, rest)
    tckd = _kl_rows(torch.stack([lp_y, lp_rest], dim=1), torch.stack([lq_y, lq_rest], dim=1))
    a_rest = a.gather(1, rest)  # (B, C - 1)
    # A teacher row with no non-target mass (every non-target logit -inf) has no p̂ (0 / 0):
    # nothing to transfer about the non-target classes, so its NCKD is 0 (its weight in KD,
    # 1 - p_y, is 0 too), with no gradient; the rows' own where() keeps NaN out of backward.
    empty = a_rest.amax(dim=1) == -math.inf  # (B,)
    log_p_hat = torch.log_softmax(torch.where(empty[:, None], 0.0, a_rest), dim=1)
    log_q_hat = torch.log_softmax(b.gather(1, rest), dim=1)
    nckd = torch.where(empty, 0.0, _kl_rows(log_p_hat, log_q_hat))
    t2 = squared(temperature)
    return t2 * tckd, t2 * nckd


def dkd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature,
    ce_weight: float,
    tckd_weight: float,
    nckd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DKD with its cross-entropy, batch means ``(total, ce, tckd, nckd)``: 0-d each.

    total = ce_weight · ce + (tckd_weight · tckd + nckd_weight · nckd), the CE of the raw student
    logits (also under ``zscore``).
    """
    tckd, nckd = dkd_rows(student, teacher, target, temperature, zscore, eps, target_checked)
    terms = ((tckd_weight, tckd.mean()), (nckd_weight, nckd.mean()))
    return with_ce(student, target, ce_weight, *terms, target_checked=True)


def ats_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: Temperature,
    tau2: Temperature,
    student_temperature: Temperature,
    target_checked: bool = False,
) -> torch.Tensor:
    """Per-row ATS cross-entropy ``s_tau² · (-Σ_c p_ats,c · log_softmax(s / s_tau)_c)``: (B,)."""
    s, t = _prepared(student, teacher, False, 0.0)
    batch = s.shape[0]
    target = check_target(target, batch, s.shape[1], target_checked)
    for name, value in (
        ("tau1", tau1),
        ("tau2", tau2),
        ("student_temperature", student_temperature),
    ):
        check_temperature(name, value, batch)
    p = torch.softmax(asymmetric_temperature(t, target, tau1, tau2), dim=1)  # (B, C)
    log_q = torch.log_softmax(apply_temperature(s, student_temperature), dim=1)  # (B, C)
    return squared(student_temperature) * -(p * log_q).sum(dim=1)
