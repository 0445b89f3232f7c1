"""Float64 oracle of the loss kernels, written from the formulas in METHODS.md, independent of
``pipeline.kernels.reference`` and of the fused kernels; gradients come from autograd on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zscore(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(x - mean) / (unbiased std + eps) per row; a row whose std + eps is 0 (constant, with
    eps = 0) is all zeros, as METHODS.md has it. The std's root is taken only where the variance
    is positive, so a constant row's gradient is finite (torch.std's is NaN there)."""
    centered = x - x.mean(dim=1, keepdim=True)
    var = centered.square().sum(dim=1, keepdim=True) / (x.shape[1] - 1)
    std = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)
    d = std + eps
    return torch.where(d > 0, centered / torch.where(d > 0, d, 1.0), 0.0)


def _tempered(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x / t, a -inf logit kept -inf (and kept out of t's gradient, where it would be NaN)."""
    finite = torch.isfinite(x)
    return torch.where(finite, torch.where(finite, x, 0.0) / t, x)


def _p_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p · (log p - log q) elementwise with 0 · log 0 = 0 (a -inf teacher logit adds 0)."""
    p = log_p.exp()
    return p * (torch.where(p > 0, log_p, 0.0) - torch.where(p > 0, log_q, 0.0))


def _column(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # On the logits' device: a float made a CPU tensor, which CUDA rows refused (2026-11-27).
    t = torch.as_tensor(temperature, dtype=torch.float64, device=like.device)
    return t.reshape(-1, 1).expand(like.shape[0], 1)  # (B, 1)


def kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float | torch.Tensor,
    zs: bool,
    eps: float = 1e-7,
) -> torch.Tensor:
    """T² · KL(softmax(t'/T) || softmax(s'/T)) per row, float64 (B,)."""
    if zs:
        student, teacher = zscore(student, eps), zscore(teacher, eps)
    t = _column(temperature, student)
    log_p = F.log_softmax(_tempered(teacher, t), dim=1)
    log_q = F.log_softmax(student / t, dim=1)
    return t[:, 0] ** 2 * _p_log_ratio(log_p, log_q).sum(dim=1)


def dkd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    zs: bool,
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T² · TCKD, T² · NCKD) per row, float64, the target column dropped for NCKD."""
    if zs:
        student, teacher = zscore(student, eps), zscore(teacher, eps)
    t = _column(temperature, student)
    batch, classes = student.shape
    keep = ~F.one_hot(target, classes).bool()  # (B, C)

    def binary(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(x, dim=1)
        rest = torch.logsumexp(x[keep].reshape(batch, classes - 1), dim=1)
        return x.gather(1, target[:, None])[:, 0] - lse, rest - lse

    a, b = _tempered(teacher, t), student / t
    lp_y, lp_n = binary(a)
    lq_y, lq_n = binary(b)
    tckd = _p_log_ratio(lp_y, lq_y) + _p_log_ratio(lp_n, lq_n)
    a_n = a[keep].reshape(batch, classes - 1)
    # No non-target mass (every non-target teacher logit -inf): p̂ is 0 / 0, there is nothing
    # to transfer about the non-target classes, and NCKD is defined as 0 (weight 1 - p_y = 0).
    empty = a_n.amax(dim=1) == float("-inf")
    log_p = F.log_softmax(torch.where(empty[:, None], 0.0, a_n), dim=1)
    log_q = F.log_softmax(b[keep].reshape(batch, classes - 1), dim=1)
    nckd = torch.where(empty, 0.0, _p_log_ratio(log_p, log_q).sum(dim=1))
    return t[:, 0] ** 2 * tckd, t[:, 0] ** 2 * nckd


def ats_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: float,
    tau2: float,
    student_temperature: float,
) -> torch.Tensor:
    """s_tau² · (-Σ p_ats · log_softmax(s / s_tau)), p_ats one softmax with tau1 on the target."""
    tau = torch.full_like(teacher, tau2)
    tau.scatter_(1, target[:, None], tau1)
    p = F.softmax(_tempered(teacher, tau), dim=1)
    log_q = F.log_softmax(student / student_temperature, dim=1)
    return student_temperature**2 * -(p * log_q).sum(dim=1)


def encode_int8(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The store's int8 code: q in [-127, 127], scale = (max - min) / 254, offset = mid-range."""
    hi, lo = logits.amax(dim=1), logits.amin(dim=1)
    offset = (hi + lo) / 2
    scale = (hi - lo) / 254
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((logits - offset[:, None]) / safe[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale.float(), offset.float()


def decode(
    teacher: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None
) -> torch.Tensor:
    """Exact float64 value of stored teacher logits."""
    if teacher.dtype == torch.int8:
        assert scale is not None and offset is not None
        return teacher.double() * scale.double()[:, None] + offset.double()[:, None]
    return teacher.double()
