"""Fused ATS rows, Asymmetric Temperature Scaling (Li et al., NeurIPS 2022).

    p = softmax(t / tau_c),  tau_c = tau1 if c == y else tau2   (one softmax over all classes)
    loss_b = s_tau² · (-Σ_c p_c · log_softmax(s / s_tau)_c) = s_tau² · (lse(b) - E_p[b])
    with b = s / s_tau

Forward is one pass with online logsumexp of the teacher (with the per-class temperature applied
in registers) and of the student; ``E_p[b - m_b]`` is kept against the student's running max so
the cross-entropy is a difference of range-sized terms. Backward is one pass writing
grad_student = go · s_tau · (q - p), q = softmax(b), from the two saved logsumexps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from pipeline.errors import MethodError
from pipeline.kernels.triton_common import (
    affine,
    check_inputs,
    check_target,
    launch_config,
    load_affine,
    load_tile,
    on_device,
    online_step,
    rows_vector,
    shift_of,
)


@triton.jit
def _ats_tiles(
    s_ptr, t_ptr, s_off, t_off, cols, mask, y, sc, of, inv1, inv2, inv_s,
    HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """Teacher a = t / tau_c and student b = s / s_tau tiles, 0 where masked."""
    xs = load_tile(s_ptr, s_off, cols, mask, sc, of, False)
    xt = load_tile(t_ptr, t_off, cols, mask, sc, of, HAS_SCALE)
    inv_c = tl.where(cols[None, :] == y[:, None], inv1[:, None], inv2[:, None])
    a = tl.where(mask, xt * inv_c, 0.0)
    b = tl.where(mask, xs * inv_s[:, None], 0.0)
    return a, b


@triton.jit
def _ats_rows_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, tau1_ptr, tau2_ptr, st_ptr, target_ptr, loss_ptr,
    stats_ptr, B, C, s_stride, t_stride,
    HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    inv1 = 1.0 / tl.load(tau1_ptr + rows, mask=rmask, other=1.0)
    inv2 = 1.0 / tl.load(tau2_ptr + rows, mask=rmask, other=1.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    inv_s = 1.0 / st
    zero = tl.zeros([ROWS], tl.float32)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, s_b, w = zero, zero, zero  # w = Σ exp(a - m_a) · (b - m_b)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        a, b = _ats_tiles(
            s_ptr, t_ptr, s_off, t_off, cols, mask, y, sc, of, inv1, inv2, inv_s, HAS_SCALE
        )
        m_a_new, alpha_a, e_a = online_step(m_a, tl.where(mask, a, float("-inf")))
        m_b_new, alpha_b, e_b = online_step(m_b, tl.where(mask, b, float("-inf")))
        cb = b - tl.where(m_b_new == float("-inf"), 0.0, m_b_new)[:, None]
        w = alpha_a * (w + s_a * shift_of(m_b, m_b_new)) + tl.sum(tl.where(mask, e_a * cb, 0.0), 1)
        s_a = s_a * alpha_a + tl.sum(e_a, axis=1)
        s_b = s_b * alpha_b + tl.sum(e_b, axis=1)
        m_a, m_b = m_a_new, m_b_new
    s_a = tl.where(rmask, s_a, 1.0)  # rows past B: keep them finite (and quiet)
    s_b = tl.where(rmask, s_b, 1.0)
    m_a = tl.where(rmask, m_a, 0.0)
    m_b = tl.where(rmask, m_b, 0.0)
    tl.store(loss_ptr + rows, st * st * (tl.log(s_b) - w / s_a), mask=rmask)
    tl.store(stats_ptr + rows, m_a + tl.log(s_a), mask=rmask)  # lse_a
    tl.store(stats_ptr + B + rows, m_b + tl.log(s_b), mask=rmask)  # lse_b


@triton.jit
def _ats_rows_bwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, tau1_ptr, tau2_ptr, st_ptr, target_ptr, stats_ptr,
    go_ptr, gs_ptr, B, C, s_stride, t_stride,
    HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    inv1 = 1.0 / tl.load(tau1_ptr + rows, mask=rmask, other=1.0)
    inv2 = 1.0 / tl.load(tau2_ptr + rows, mask=rmask, other=1.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    inv_s = 1.0 / st
    lse_a = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
    lse_b = tl.load(stats_ptr + B + rows, mask=rmask, other=0.0)
    g_scale = tl.load(go_ptr + rows, mask=rmask, other=0.0) * st
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        a, b = _ats_tiles(
            s_ptr, t_ptr, s_off, t_off, cols, mask, y, sc, of, inv1, inv2, inv_s, HAS_SCALE
        )
        p = tl.exp(tl.where(mask, a - lse_a[:, None], float("-inf")))
        q = tl.exp(tl.where(mask, b - lse_b[:, None], float("-inf")))
        gs = gs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
        g = g_scale[:, None] * (q - p)
        tl.store(gs, g.to(gs_ptr.dtype.element_ty), mask=mask)


class ATSRows(torch.autograd.Function):
    """Per-row ATS cross-entropy (B,) float32; differentiable in the student only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,  # (B, C) float32/16, bfloat16
        teacher: torch.Tensor,  # (B, C) stored dtype
        target: torch.Tensor,  # (B,) int64
        temps: torch.Tensor,  # (3, B) float32: tau1, tau2, student temperature
        scale: torch.Tensor | None,  # (B,) float32, int8 teachers only
        offset: torch.Tensor | None,
        config: tuple[int, ...] | None,
    ) -> torch.Tensor:
        batch, classes = student.shape
        launch = launch_config(batch, classes, config)
        loss = torch.empty(batch, dtype=torch.float32, device=student.device)  # (B,)
        stats = torch.empty((2, batch), dtype=torch.float32, device=student.device)
        with on_device(student):
            _ats_rows_fwd[launch.grid(batch)](
                student, teacher, *affine(scale, offset, loss), temps[0], temps[1], temps[2],
                target, loss, stats, batch, classes, student.stride(0), teacher.stride(0),
                HAS_SCALE=scale is not None, **launch.meta(),
            )  # fmt: skip
        ctx.save_for_backward(student, teacher, target, temps, scale, offset, stats)
        ctx.launch = launch
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # type: ignore[override]
        student, teacher, target, temps, scale, offset, stats = ctx.saved_tensors
        batch, classes = student.shape
        grad_loss = grad_loss.to(torch.float32).contiguous()  # (B,)
        grad_s = torch.empty_like(student)  # (B, C)
        launch = ctx.launch
        with on_device(student):
            _ats_rows_bwd[launch.grid(batch)](
                student, teacher, *affine(scale, offset, stats), temps[0], temps[1], temps[2],
                target, stats, grad_loss, grad_s, batch, classes, student.stride(0),
                teacher.stride(0), HAS_SCALE=scale is not None, **launch.meta(),
            )  # fmt: skip
        return grad_s, None, None, None, None, None, None


def ats_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: float | torch.Tensor,
    tau2: float | torch.Tensor,
    student_temperature: float | torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    target_checked: bool = False,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Fused per-row ATS cross-entropy, float32 (B,).

    Args:
        student, teacher, scale, offset, config: as ``triton_kd.kd_rows``.
        target: (B,) integer classes in [0, C); ``target_checked`` as in ``triton_kd.kd_ce``.
        tau1, tau2, student_temperature: floats or (B,) tensors that do not require grad.
    """
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < 1:
        raise MethodError("ATS needs at least one class")
    target = check_target(target, batch, classes, target_checked)
    named = (("tau1", tau1), ("tau2", tau2), ("student_temperature", student_temperature))
    if any(isinstance(v, torch.Tensor) and v.requires_grad for _, v in named):
        raise MethodError("fused ATS has no temperature gradient: use impl='reference'")
    temps = torch.stack([rows_vector(v, batch, student.device, n) for n, v in named])  # (3, B)
    if batch == 0:
        return student.sum(dim=1, dtype=torch.float32) * 0.0
    return ATSRows.apply(student, teacher, target, temps, scale, offset, config)
