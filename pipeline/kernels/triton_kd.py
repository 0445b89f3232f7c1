"""Fused KD rows (Hinton et al., 2015), optionally on z-scored logits (Sun et al., CVPR 2024).

    loss_b = T_b² · KL(softmax(t'_b / T_b) || softmax(s'_b / T_b)),  x' = Z(x) if zscore else x

Forward: [one statistics pass per tensor for the z-score, then] one pass over the classes with
online logsumexp for teacher (a = t'/T) and student (b = s'/T). Besides the loss it keeps, per row,
what backward needs, so backward is one pass that writes only grad_student (B, C):

- lse_a, lse_b: p = exp(a - lse_a), q = exp(b - lse_b) without a second reduction;
- KL, E_p[a - b] and E_p[a]: the temperature gradient
  dL/dT = 2T·KL - T·(Cov_p(a, a - b) + Σ (q - p)·b), whose covariance backward sums centred;
- E_q[z_s] - E_p[z_s]: the z-score chain rule. With g = dL/dz_s = T·(q - p) (Σ g = 0),
  dL/ds_j = g_j / (σ + eps) - (Σ_i g_i z_i) · z_j / ((C - 1) σ)   (σ = unbiased std; 0 if σ = 0).

E_p[a] is summed only when the temperature gets a gradient (NEED_T_STATS) and the E[z_s] only
under z-score: plain KD's forward keeps three running sums fewer (80 registers instead of 96 at
C = 10 on sm_90, 64 instead of 80 at C = 100: tests/kernels/registers.py). Under z-score E_p[a]
stays: without it ptxas gave the kernel more registers, not fewer (139 against 128 at C = 100).
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
    launch_config,
    load_affine,
    load_logits,
    on_device,
    online_kl,
    row_stats,
    rows_vector,
)

N_STATS = 12  # rows of the (N_STATS, B) float32 buffer forward leaves for backward


@triton.jit
def _kd_rows_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, loss_ptr, stats_ptr,
    B, C, s_stride, t_stride, eps,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, NEED_T_STATS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    inv_t = 1.0 / temp
    k_s, mean_s, sd_s, k_t, mean_t, sd_t = zero, zero, zero, zero, zero, zero
    if ZSCORE:
        k_s, mean_s, sd_s = row_stats(s_ptr, s_off, rmask, C, sc, of, False, ROWS, BLOCK)
        k_t, mean_t, sd_t = row_stats(t_ptr, t_off, rmask, C, sc, of, HAS_SCALE, ROWS, BLOCK)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, w_ab, w_a, w_pz, s_b, w_qz = zero, zero, zero, zero, zero, zero
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        xs = load_logits(s_ptr, s_off, cols, mask, sc, of, k_s, mean_s, sd_s, eps, False, ZSCORE)
        xt = load_logits(
            t_ptr, t_off, cols, mask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE
        )
        xs = tl.where(mask, xs, 0.0)
        a = tl.where(mask, xt * inv_t[:, None], 0.0)
        b = xs * inv_t[:, None]
        m_a, s_a, m_b, s_b, w_ab, alpha_a, e_a, alpha_b, e_b = online_kl(
            m_a, s_a, m_b, s_b, w_ab, a, b, mask
        )
        if NEED_T_STATS:
            w_a = w_a * alpha_a + tl.sum(e_a * a, axis=1)
        if ZSCORE:
            w_pz = w_pz * alpha_a + tl.sum(e_a * xs, axis=1)
            w_qz = w_qz * alpha_b + tl.sum(e_b * xs, axis=1)
    s_a = tl.where(rmask, s_a, 1.0)  # rows past B: keep them finite (and quiet)
    s_b = tl.where(rmask, s_b, 1.0)
    m_a = tl.where(rmask, m_a, 0.0)
    m_b = tl.where(rmask, m_b, 0.0)
    kl = w_ab / s_a - tl.log(s_a) + tl.log(s_b)
    tl.store(loss_ptr + rows, temp * temp * kl, mask=rmask)
    tl.store(stats_ptr + 0 * B + rows, m_a + tl.log(s_a), mask=rmask)  # lse_a
    tl.store(stats_ptr + 1 * B + rows, m_b + tl.log(s_b), mask=rmask)  # lse_b
    tl.store(stats_ptr + 2 * B + rows, w_ab / s_a + m_a - m_b, mask=rmask)  # E_p[a - b]
    tl.store(stats_ptr + 3 * B + rows, w_a / s_a, mask=rmask)  # E_p[a]
    tl.store(stats_ptr + 4 * B + rows, w_qz / s_b - w_pz / s_a, mask=rmask)  # E_q[z] - E_p[z]
    tl.store(stats_ptr + 5 * B + rows, kl, mask=rmask)
    tl.store(stats_ptr + 6 * B + rows, k_s, mask=rmask)
    tl.store(stats_ptr + 7 * B + rows, mean_s, mask=rmask)
    tl.store(stats_ptr + 8 * B + rows, sd_s, mask=rmask)
    tl.store(stats_ptr + 9 * B + rows, k_t, mask=rmask)
    tl.store(stats_ptr + 10 * B + rows, mean_t, mask=rmask)
    tl.store(stats_ptr + 11 * B + rows, sd_t, mask=rmask)


@triton.jit
def _kd_rows_bwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, stats_ptr, go_ptr, gs_ptr, gt_ptr,
    B, C, s_stride, t_stride, eps,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, WRITE_GS: tl.constexpr,
    NEED_T_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    inv_t = 1.0 / temp
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    lse_a = tl.load(stats_ptr + 0 * B + rows, mask=rmask, other=0.0)
    lse_b = tl.load(stats_ptr + 1 * B + rows, mask=rmask, other=0.0)
    e_ab = tl.load(stats_ptr + 2 * B + rows, mask=rmask, other=0.0)
    e_a = tl.load(stats_ptr + 3 * B + rows, mask=rmask, other=0.0)
    d_ez = tl.load(stats_ptr + 4 * B + rows, mask=rmask, other=0.0)
    kl = tl.load(stats_ptr + 5 * B + rows, mask=rmask, other=0.0)
    k_s = tl.load(stats_ptr + 6 * B + rows, mask=rmask, other=0.0)
    mean_s = tl.load(stats_ptr + 7 * B + rows, mask=rmask, other=0.0)
    sd_s = tl.load(stats_ptr + 8 * B + rows, mask=rmask, other=0.0)
    k_t = tl.load(stats_ptr + 9 * B + rows, mask=rmask, other=0.0)
    mean_t = tl.load(stats_ptr + 10 * B + rows, mask=rmask, other=0.0)
    sd_t = tl.load(stats_ptr + 11 * B + rows, mask=rmask, other=0.0)
    g_scale = go * temp  # dL/dz_s = go · T · (q - p)
    coef = zero
    if ZSCORE:
        g_scale = g_scale / (sd_s + eps)
        safe_sd = tl.where(sd_s > 0, sd_s, 1.0)
        coef = tl.where(sd_s > 0, go * temp * d_ez / ((C * 1.0 - 1.0) * safe_sd), 0.0)
    e_b = e_a - e_ab  # E_p[b]: (q - p)·b centred on it sums range-sized, not lse-sized, terms
    cov = zero
    qpb = zero
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        xs = load_logits(s_ptr, s_off, cols, mask, sc, of, k_s, mean_s, sd_s, eps, False, ZSCORE)
        xt = load_logits(
            t_ptr, t_off, cols, mask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE
        )
        xs = tl.where(mask, xs, 0.0)
        a = tl.where(mask, xt * inv_t[:, None], 0.0)
        b = xs * inv_t[:, None]
        # -inf before exp, not a product with the mask: a junk masked entry may overflow.
        p = tl.exp(tl.where(mask, a - lse_a[:, None], float("-inf")))
        q = tl.exp(tl.where(mask, b - lse_b[:, None], float("-inf")))
        if WRITE_GS:
            g = g_scale[:, None] * (q - p) - coef[:, None] * xs
            gs = gs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(gs, g.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T_GRAD:
            cov += tl.sum(p * (a - e_a[:, None]) * (a - b - e_ab[:, None]), axis=1)
            qpb += tl.sum((q - p) * (b - e_b[:, None]), axis=1)  # Σ(q-p) = 0: centre on E_p[b]
    if NEED_T_GRAD:
        tl.store(gt_ptr + rows, go * (2.0 * temp * kl - temp * (cov + qpb)), mask=rmask)


class KDRows(torch.autograd.Function):
    """Per-row KD loss (B,) float32; differentiable in the student and the (B,) temperature."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,  # (B, C) float32/16, bfloat16
        teacher: torch.Tensor,  # (B, C) stored dtype
        temperature: torch.Tensor,  # (B,) float32
        scale: torch.Tensor | None,  # (B,) float32, int8 teachers only
        offset: torch.Tensor | None,
        zscore: bool,
        eps: float,
        config: tuple[int, ...] | None,
    ) -> torch.Tensor:
        batch, classes = student.shape
        launch = launch_config(batch, classes, config)
        loss = torch.empty(batch, dtype=torch.float32, device=student.device)  # (B,)
        stats = torch.empty((N_STATS, batch), dtype=torch.float32, device=student.device)
        with on_device(student):
            _kd_rows_fwd[launch.grid(batch)](
                student, teacher, *affine(scale, offset, loss), temperature, loss, stats, batch,
                classes, student.stride(0), teacher.stride(0), eps, HAS_SCALE=scale is not None,
                ZSCORE=zscore, NEED_T_STATS=ctx.needs_input_grad[2] or zscore, **launch.meta(),
            )  # fmt: skip
        ctx.save_for_backward(student, teacher, temperature, scale, offset, stats)
        ctx.zscore, ctx.eps, ctx.launch = zscore, eps, launch
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # type: ignore[override]
        student, teacher, temperature, scale, offset, stats = ctx.saved_tensors
        batch, classes = student.shape
        write_gs, _, need_t = ctx.needs_input_grad[:3]
        grad_loss = grad_loss.to(torch.float32).contiguous()  # (B,)
        grad_s = torch.empty_like(student) if write_gs else None  # (B, C)
        grad_t = torch.empty_like(temperature) if need_t else None  # (B,)
        launch = ctx.launch
        with on_device(student):
            _kd_rows_bwd[launch.grid(batch)](
                student, teacher, *affine(scale, offset, stats), temperature, stats, grad_loss,
                stats if grad_s is None else grad_s, stats if grad_t is None else grad_t, batch,
                classes, student.stride(0), teacher.stride(0), ctx.eps, HAS_SCALE=scale is not None,
                ZSCORE=ctx.zscore, WRITE_GS=write_gs, NEED_T_GRAD=need_t, **launch.meta(),
            )  # fmt: skip
        return grad_s, None, grad_t, None, None, None, None, None


def kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float | torch.Tensor,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Fused ``T² · KL(softmax(t'/T) || softmax(s'/T))`` per row: float32 (B,).

    Args:
        student: (B, C) logits (float32, float16 or bfloat16); gets a gradient.
        teacher: (B, C) stored logits (float32, float16, bfloat16, or int8 with scale/offset).
        temperature: a float or a (B,) / 0-d tensor; gets a gradient when it requires one.
        zscore: standardize both rows first (unbiased std + eps), as logit standardization does.
        scale, offset: (B,) float32 affine code of an int8 teacher.
        config: (rows, block[, num_warps]) tile override, for tests and the tile sweep.
    """
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < (2 if zscore else 1):
        raise MethodError(f"KD needs {2 if zscore else 1} classes or more, got {classes}")
    temp = rows_vector(temperature, batch, student.device, "temperature")
    if batch == 0:
        return student.sum(dim=1, dtype=torch.float32) * 0.0 + temp * 0.0
    return KDRows.apply(student, teacher, temp, scale, offset, zscore, float(eps), config)
