"""Fused DKD rows, Decoupled KD (Zhao et al., CVPR 2022), optionally on z-scored logits.

    TCKD_b = T² · KL([p_y, 1 - p_y] || [q_y, 1 - q_y]),   NCKD_b = T² · KL(p̂ || q̂)
    p = softmax(t'/T), p̂ = softmax over the C - 1 non-target classes (target dropped exactly)

Everything is in log space, so ±100 logits at T = 1 stay finite: with a = t'/T, b = s'/T and lse_n
the logsumexp over the non-target classes, log p_y = a_y - lse(a) and
log(1 - p_y) = lse_n(a) - lse(a), lse(a) = logaddexp(lse_n(a), a_y).

Forward streams the non-target classes once (online logsumexp, the target column masked) and keeps
per-row values for backward, which is one pass writing grad_student (B, C). With f = TCKD/T²,
h = NCKD/T² and d = q_y - p_y:

    ∂f/∂b_y = d,  ∂f/∂b_i = -d · q̂_i (i ≠ y);   ∂h/∂b_i = q̂_i - p̂_i (i ≠ y),  ∂h/∂b_y = 0
    dL/dT = 2T·f - T·(Σ ∂f/∂a·a + Σ ∂f/∂b·b)   (the same for h), where
    Σ ∂f/∂a·a = D·p_y(1-p_y)·(a_y - E_p̂[a]),  D = log(p_y/q_y) - log((1-p_y)/(1-q_y)) = u - v,
    Σ ∂h/∂a·a = Cov_p̂(a, a - b)   (u, v: teacher and student log-odds of the target).

Both gradients sum to 0 over the classes, so the z-score chain rule is the one of ``triton_kd``.

DKD's training loss (``dkd_ce``, ``DKDCE``): with WITH_CE the forward also keeps the online
logsumexp of the raw student logits over every class and reads the raw target logit, and writes
(ce_w·CE + w_t·TCKD + w_n·NCKD, CE, TCKD, NCKD) / B for the batch means; backward adds the
cross-entropy's (softmax(s) - onehot(y))·go_c in the same pass, as ``triton_kd`` does for KD.
E_p̂[a] and E_q̂[z_s] are summed only when a temperature gradient or the z-score needs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from pipeline.errors import MethodError
from pipeline.kernels import reference
from pipeline.kernels.reference import check_target
from pipeline.kernels.triton_common import (
    Launch,
    affine,
    batch_means,
    check_inputs,
    defined,
    launch_config,
    load_affine,
    load_at,
    load_logit_at,
    load_logits,
    load_tile,
    mean_grads,
    on_device,
    online_kl,
    online_step,
    row_stats,
    rows_vector,
    softplus,
    zscored,
)

N_STATS = 16  # rows of the (N_STATS, B) float32 buffer forward leaves for backward


@triton.jit
def _binary_kl(u, v):
    """KL([p, 1 - p] || [q, 1 - q]) from the log-odds u of p and v of q, in log space.

    log p = -softplus(-u), log(1 - p) = -softplus(u): each difference of logs is a difference of
    two accurately computed softplus values, with no logsumexp-sized cancellation.
    """
    sp_u, sp_nu = softplus(u), softplus(-u)
    sp_v, sp_nv = softplus(v), softplus(-v)
    p, p_not = tl.exp(-sp_nu), tl.exp(-sp_u)
    # 0 · log 0 = 0: u = -inf (a -inf teacher target logit) is p = 0, not 0 · -inf = NaN
    return tl.where(p > 0, p * (sp_nv - sp_nu), 0.0) + tl.where(
        p_not > 0, p_not * (sp_v - sp_u), 0.0
    )


@triton.jit
def _store_stats(
    ptr, B, rows, rmask, lse_na, lse_nb, u, v, h, e_ab, e_a, eq_z, ep_z,
    k_s, mean_s, sd_s, k_t, mean_t, sd_t,
):  # fmt: skip
    tl.store(ptr + 0 * B + rows, lse_na, mask=rmask)  # logsumexp of a over non-target classes
    tl.store(ptr + 1 * B + rows, lse_nb, mask=rmask)
    tl.store(ptr + 2 * B + rows, u, mask=rmask)
    tl.store(ptr + 3 * B + rows, v, mask=rmask)
    tl.store(ptr + 4 * B + rows, h, mask=rmask)
    tl.store(ptr + 5 * B + rows, e_ab, mask=rmask)  # E_p̂[a - b]
    tl.store(ptr + 6 * B + rows, e_a, mask=rmask)  # E_p̂[a]
    tl.store(ptr + 7 * B + rows, eq_z, mask=rmask)  # E_q̂[z_s]
    tl.store(ptr + 8 * B + rows, ep_z, mask=rmask)  # E_p̂[z_s]
    tl.store(ptr + 9 * B + rows, k_s, mask=rmask)
    tl.store(ptr + 10 * B + rows, mean_s, mask=rmask)
    tl.store(ptr + 11 * B + rows, sd_s, mask=rmask)
    tl.store(ptr + 12 * B + rows, k_t, mask=rmask)
    tl.store(ptr + 13 * B + rows, mean_t, mask=rmask)
    tl.store(ptr + 14 * B + rows, sd_t, mask=rmask)


@triton.jit
def _stat(ptr, i, B, rows, rmask):
    return tl.load(ptr + i * B + rows, mask=rmask, other=0.0)


@triton.jit
def _dkd_rows_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, target_ptr, tckd_ptr, nckd_ptr, stats_ptr,
    B, C, s_stride, t_stride, eps, ce_w, w_t, w_n, inv_b,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, NEED_T_STATS: tl.constexpr,
    WITH_CE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # NEED_T_STATS (a temperature gradient or z-score): keep E_p̂[a] and E_q̂[z_s] for backward;
    # plain DKD leaves them out (fewer registers; backward does not read them then).
    # WITH_CE: tckd_ptr is (4, B), rows of (ce_w·CE + w_t·TCKD + w_n·NCKD, CE, TCKD, NCKD) / B.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    k_s, mean_s, sd_s, k_t, mean_t, sd_t = zero, zero, zero, zero, zero, zero
    if ZSCORE:
        k_s, mean_s, sd_s = row_stats(s_ptr, s_off, rmask, C, sc, of, False, ROWS, BLOCK)
        k_t, mean_t, sd_t = row_stats(t_ptr, t_off, rmask, C, sc, of, HAS_SCALE, ROWS, BLOCK)
    xs_y = load_logit_at(s_ptr, s_off, y, rmask, sc, of, k_s, mean_s, sd_s, eps, False, ZSCORE)
    xt_y = load_logit_at(t_ptr, t_off, y, rmask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE)
    inv_t = 1.0 / temp
    zero = tl.zeros([ROWS], tl.float32)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, w_ab, w_a, w_pz, s_b, w_qz, s_c = zero, zero, zero, zero, zero, zero, zero
    m_c = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        nt = mask & (cols[None, :] != y[:, None])  # non-target classes
        xs = load_tile(s_ptr, s_off, cols, mask, sc, of, False)  # raw: cross-entropy reads it
        if WITH_CE:  # online logsumexp of the raw student logits over every class (T = 1)
            m_c, alpha_c, e_c = online_step(m_c, tl.where(mask, xs, float("-inf")))
            s_c = s_c * alpha_c + tl.sum(e_c, axis=1)
        if ZSCORE:
            xs = zscored(xs, k_s, mean_s, sd_s, eps)
        xt = load_logits(
            t_ptr, t_off, cols, mask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE
        )
        xs = tl.where(nt, xs, 0.0)
        a = tl.where(nt, xt * inv_t[:, None], 0.0)
        b = xs * inv_t[:, None]
        m_a, s_a, m_b, s_b, w_ab, alpha_a, e_a, alpha_b, e_b = online_kl(
            m_a, s_a, m_b, s_b, w_ab, a, b, nt
        )
        if NEED_T_STATS:  # E_p̂[a], E_q̂[z_s]: the temperature gradient's (and z-score's)
            w_a = w_a * alpha_a + tl.sum(tl.where(e_a > 0, e_a * a, 0.0), axis=1)
            w_qz = w_qz * alpha_b + tl.sum(e_b * xs, axis=1)
        if ZSCORE:
            w_pz = w_pz * alpha_a + tl.sum(e_a * xs, axis=1)
    # A teacher row with no non-target mass (every non-target logit -inf: s_a = 0) has no p̂:
    # its NCKD is 0, and its p̂ statistics 0 (backward gives it no NCKD gradient).
    empty = rmask & (s_a == 0.0)
    # rows past B and empty rows: 1, finite and quiet; a NaN s_a (a NaN or +inf teacher logit)
    # stays NaN, and so does the row's NCKD (the reference's NaN)
    s_a = tl.where(~rmask | empty, 1.0, s_a)
    s_b = tl.where(rmask, s_b, 1.0)
    m_a = tl.where(rmask, m_a, 0.0)
    m_b = tl.where(rmask, m_b, 0.0)
    lse_na = tl.where(empty, float("-inf"), m_a + tl.log(s_a))
    lse_nb = m_b + tl.log(s_b)
    u = xt_y * inv_t - lse_na  # teacher log-odds of the target: log p_y - log(1 - p_y)
    v = xs_y * inv_t - lse_nb  # student's
    h = tl.where(empty, 0.0, w_ab / s_a - tl.log(s_a) + tl.log(s_b))  # NCKD / T²
    tckd = temp * temp * _binary_kl(u, v)
    nckd = temp * temp * h
    if ZSCORE:
        tckd, nckd = defined(tckd, sd_s, sd_t), defined(nckd, sd_s, sd_t)
    if WITH_CE:
        lse_c = tl.where(rmask, m_c, 0.0) + tl.log(tl.where(rmask, s_c, 1.0))
        ce = lse_c - load_at(s_ptr, s_off, y, rmask, sc, of, False)  # the raw target logit
        tl.store(tckd_ptr + rows, (ce_w * ce + w_t * tckd + w_n * nckd) * inv_b, mask=rmask)
        tl.store(tckd_ptr + B + rows, ce * inv_b, mask=rmask)
        tl.store(tckd_ptr + 2 * B + rows, tckd * inv_b, mask=rmask)
        tl.store(tckd_ptr + 3 * B + rows, nckd * inv_b, mask=rmask)
        tl.store(stats_ptr + 15 * B + rows, lse_c, mask=rmask)
    else:
        tl.store(tckd_ptr + rows, tckd, mask=rmask)
        tl.store(nckd_ptr + rows, nckd, mask=rmask)
    e_ab = tl.where(empty, 0.0, w_ab / s_a + m_a - m_b)  # E_p̂[a - b]: w is kept against the
    # running maxes (w_ab, w_a, w_pz are 0 in an empty row, and s_a is 1 there)
    _store_stats(stats_ptr, B, rows, rmask, lse_na, lse_nb, u, v, h, e_ab, w_a / s_a,
                 w_qz / s_b, w_pz / s_a, k_s, mean_s, sd_s, k_t, mean_t, sd_t)  # fmt: skip


@triton.jit
def _dkd_rows_bwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, target_ptr, stats_ptr, go_t_ptr, go_n_ptr,
    gs_ptr, gt_ptr, g_ptr, B, C, s_stride, t_stride, eps, ce_w, w_t, w_n, inv_b, go_t_stride,
    go_n_stride,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, WRITE_GS: tl.constexpr,
    NEED_T_GRAD: tl.constexpr, WITH_CE: tl.constexpr, EXTRA_GRADS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # WITH_CE: g_ptr holds the gradients of the four means (total, CE, TCKD, NCKD), (4,); each
    # row's TCKD gets (g_total·w_t + g_tckd) / B, NCKD (g_total·w_n + g_nckd) / B, CE
    # (g_total·ce_w + g_ce) / B (the last three only when EXTRA_GRADS). Otherwise go_t_ptr and
    # go_n_ptr are (B,) with their strides (0: a sum's gradient, one value expanded).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    inv_t = 1.0 / temp
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    go_c = zero
    lse_c = zero
    if WITH_CE:
        g_total = tl.load(g_ptr)
        g_ce, g_t, g_n = g_total * ce_w, g_total * w_t, g_total * w_n
        if EXTRA_GRADS:
            g_ce += tl.load(g_ptr + 1)
            g_t += tl.load(g_ptr + 2)
            g_n += tl.load(g_ptr + 3)
        go_c = zero + g_ce * inv_b
        go_t = zero + g_t * inv_b
        go_n = zero + g_n * inv_b
        lse_c = tl.load(stats_ptr + 15 * B + rows, mask=rmask, other=0.0)
    else:
        go_t = tl.load(go_t_ptr + rows.to(tl.int64) * go_t_stride, mask=rmask, other=0.0)
        go_n = tl.load(go_n_ptr + rows.to(tl.int64) * go_n_stride, mask=rmask, other=0.0)
    lse_na = _stat(stats_ptr, 0, B, rows, rmask)
    empty = lse_na == float("-inf")  # no non-target teacher mass: NCKD is 0, no gradient
    go_n = tl.where(empty, 0.0, go_n)
    lse_na = tl.where(empty, 0.0, lse_na)  # p̂ = exp(-inf - 0) = 0 below, not exp(NaN)
    lse_nb = _stat(stats_ptr, 1, B, rows, rmask)
    u = _stat(stats_ptr, 2, B, rows, rmask)
    v = _stat(stats_ptr, 3, B, rows, rmask)
    h = _stat(stats_ptr, 4, B, rows, rmask)
    e_ab = _stat(stats_ptr, 5, B, rows, rmask)
    e_a = _stat(stats_ptr, 6, B, rows, rmask)
    eq_z = _stat(stats_ptr, 7, B, rows, rmask)
    ep_z = _stat(stats_ptr, 8, B, rows, rmask)
    k_s = _stat(stats_ptr, 9, B, rows, rmask)
    mean_s = _stat(stats_ptr, 10, B, rows, rmask)
    sd_s = _stat(stats_ptr, 11, B, rows, rmask)
    k_t = _stat(stats_ptr, 12, B, rows, rmask)
    mean_t = _stat(stats_ptr, 13, B, rows, rmask)
    sd_t = _stat(stats_ptr, 14, B, rows, rmask)
    xs_y = load_logit_at(s_ptr, s_off, y, rmask, sc, of, k_s, mean_s, sd_s, eps, False, ZSCORE)
    d = tl.exp(-softplus(-v)) - tl.exp(-softplus(-u))  # q_y - p_y
    g_scale = temp  # dL/dz_s = T · (∂f/∂b · go_t + ∂h/∂b · go_n)
    coef = zero
    if ZSCORE:
        d_s = sd_s + eps  # 0 only for a constant row with eps = 0: z = 0, no gradient
        g_scale = tl.where(d_s > 0, g_scale / tl.where(d_s > 0, d_s, 1.0), 0.0)
        sum_gz = temp * (go_t * d * (xs_y - eq_z) + go_n * (eq_z - ep_z))  # Σ_i g_i z_i
        safe_sd = tl.where(sd_s > 0, sd_s, 1.0)
        coef = tl.where(sd_s > 0, sum_gz / ((C * 1.0 - 1.0) * safe_sd), 0.0)
    e_b = e_a - e_ab  # E_p̂[b]: the centre of Σ (q̂ - p̂)·b (see triton_kd)
    cov = zero
    qpb = zero
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        is_y = cols[None, :] == y[:, None]
        nt = mask & ~is_y
        raw = load_tile(s_ptr, s_off, cols, mask, sc, of, False)
        xs = raw
        if ZSCORE:
            xs = zscored(raw, k_s, mean_s, sd_s, eps)
        xt = load_logits(
            t_ptr, t_off, cols, mask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE
        )
        xs = tl.where(mask, xs, 0.0)
        a = tl.where(nt, xt * inv_t[:, None], 0.0)
        b = xs * inv_t[:, None]
        p_hat = tl.exp(tl.where(nt, a - lse_na[:, None], float("-inf")))
        q_hat = tl.exp(tl.where(nt, b - lse_nb[:, None], float("-inf")))
        if WRITE_GS:
            g_nt = go_n[:, None] * (q_hat - p_hat) - (go_t * d)[:, None] * q_hat
            g = tl.where(is_y, (go_t * d)[:, None], g_nt)
            g = g_scale[:, None] * g - coef[:, None] * xs
            if WITH_CE:  # + (softmax(s) - onehot(y)) · go_c on the raw logits
                c = tl.exp(tl.where(mask, raw - lse_c[:, None], float("-inf")))
                g += go_c[:, None] * (c - tl.where(is_y, 1.0, 0.0))
            gs = gs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(gs, g.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T_GRAD:
            cov_pb = p_hat * (a - e_a[:, None]) * (a - b - e_ab[:, None])
            cov += tl.sum(tl.where(p_hat > 0, cov_pb, 0.0), axis=1)  # 0 at a = -inf
            qpb += tl.sum((q_hat - p_hat) * (b - e_b[:, None]), axis=1)
    if NEED_T_GRAD:
        xt_y = load_logit_at(
            t_ptr, t_off, y, rmask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE
        )
        # Σ ∂f/∂a·a + Σ ∂f/∂b·b; D = log(p_y/q_y) - log((1-p_y)/(1-q_y)) is u - v.
        p_pn = tl.exp(-softplus(u) - softplus(-u))  # p_y (1 - p_y)
        f_ab = tl.where(p_pn > 0, (u - v) * p_pn * (xt_y * inv_t - e_a), 0.0)  # 0 at u = -inf
        f_ab += d * (xs_y - eq_z) * inv_t
        f = _binary_kl(u, v)
        g_t = go_t * (2.0 * temp * f - temp * f_ab) + go_n * (2.0 * temp * h - temp * (cov + qpb))
        tl.store(gt_ptr + rows, g_t, mask=rmask)


def _forward(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple,  # (student, teacher, target, temperature, scale, offset)
    weights: tuple[float, float, float] | None,  # (ce_w, w_t, w_n): DKD with its CE
    zscore: bool,
    eps: float,
    launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward of both Functions: per-row (TCKD, NCKD), (B,) each, or with weights
    the (4, B) parts of the means (total, CE, TCKD, NCKD) twice. Saves what backward reads."""
    student, teacher, target, temperature, scale, offset = inputs
    batch, classes = student.shape
    if weights is None:  # two tensors, not views of one: each output is its own
        tckd = torch.empty(batch, dtype=torch.float32, device=student.device)
        out = (tckd, torch.empty_like(tckd))
    else:
        parts = torch.empty((4, batch), dtype=torch.float32, device=student.device)
        out = (parts, parts)
    stats = torch.empty((N_STATS, batch), dtype=torch.float32, device=student.device)
    with on_device(student):
        _dkd_rows_fwd[launch.grid(batch)](
            student, teacher, *affine(scale, offset, stats), temperature, target, *out,
            stats, batch, classes, student.stride(0), teacher.stride(0), eps,
            *(weights or (0.0, 0.0, 0.0)), 1.0 / batch, HAS_SCALE=scale is not None,
            ZSCORE=zscore, NEED_T_STATS=ctx.needs_input_grad[3] or zscore,
            WITH_CE=weights is not None, **launch.meta(),
        )  # fmt: skip
    ctx.save_for_backward(student, teacher, target, temperature, scale, offset, stats)
    ctx.weights, ctx.zscore, ctx.eps, ctx.launch = weights, zscore, eps, launch
    return out


def _backward(
    ctx: torch.autograd.function.FunctionCtx,
    grad_rows: tuple[torch.Tensor, torch.Tensor] | None,  # per-row (TCKD, NCKD) gradients
    grad_means: torch.Tensor | None,  # (1,) or (4,): the means' gradients (with CE)
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launches the backward of both Functions: (grad_student, grad_temperature)."""
    student, teacher, target, temperature, scale, offset, stats = ctx.saved_tensors
    batch, classes = student.shape
    write_gs, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_s = torch.empty_like(student) if write_gs else None  # (B, C)
    grad_t = torch.empty_like(temperature) if need_t else None  # (B,)
    go_t, go_n = grad_rows or (stats, stats)
    with_ce = grad_means is not None
    launch = ctx.launch
    with on_device(student):
        _dkd_rows_bwd[launch.grid(batch)](
            student, teacher, *affine(scale, offset, stats), temperature, target, stats, go_t,
            go_n, stats if grad_s is None else grad_s, stats if grad_t is None else grad_t,
            grad_means if with_ce else stats, batch, classes, student.stride(0),
            teacher.stride(0), ctx.eps, *(ctx.weights or (0.0, 0.0, 0.0)), 1.0 / batch,
            go_t.stride(0), go_n.stride(0), HAS_SCALE=scale is not None, ZSCORE=ctx.zscore,
            WRITE_GS=write_gs, NEED_T_GRAD=need_t, WITH_CE=with_ce,
            EXTRA_GRADS=with_ce and grad_means.numel() > 1, **launch.meta(),
        )  # fmt: skip
    return grad_s, grad_t


class DKDRows(torch.autograd.Function):
    """Per-row (TCKD, NCKD), each (B,) float32; differentiable in student and temperature."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,  # (B, C) float32/16, bfloat16
        teacher: torch.Tensor,  # (B, C) stored dtype
        target: torch.Tensor,  # (B,) int64
        temperature: torch.Tensor,  # (B,) float32
        scale: torch.Tensor | None,  # (B,) float32, int8 teachers only
        offset: torch.Tensor | None,
        zscore: bool,
        eps: float,
        config: tuple[int, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = (student, teacher, target, temperature, scale, offset)
        launch = launch_config(*student.shape, config)
        return _forward(ctx, inputs, None, zscore, eps, launch)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_tckd: torch.Tensor, grad_nckd: torch.Tensor
    ) -> tuple:
        rows = (g.to(torch.float32) for g in (grad_tckd, grad_nckd))  # (B,) each, any stride
        grad_s, grad_t = _backward(ctx, tuple(rows), None)
        return grad_s, None, None, grad_t, None, None, None, None, None


class DKDCE(torch.autograd.Function):
    """Batch means (total, CE, TCKD, NCKD) of DKD's training loss, one kernel each way.

    total = ce_w · mean CE(s, y) + w_t · mean TCKD + w_n · mean NCKD (w_t, w_n: alpha and beta
    times the warm-up factor); the CE is on the raw student logits. Differentiable in the
    student and the (B,) temperature; each of the four outputs may be backpropagated.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,  # (B, C) float32/16, bfloat16
        teacher: torch.Tensor,  # (B, C) stored dtype
        target: torch.Tensor,  # (B,) int64
        temperature: torch.Tensor,  # (B,) float32
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        weights: tuple[float, float, float],  # (ce_w, w_t, w_n)
        zscore: bool,
        eps: float,
        launch: Launch,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = (student, teacher, target, temperature, scale, offset)
        parts = _forward(ctx, inputs, weights, zscore, eps, launch)[0]
        ctx.set_materialize_grads(False)
        return batch_means(parts)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None
    ) -> tuple:
        grad_s, grad_t = _backward(ctx, None, mean_grads(grads, ctx.saved_tensors[0]))
        return grad_s, None, None, grad_t, None, None, None, None, None, None


def dkd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    target_checked: bool = False,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-row ``(TCKD, NCKD)``, each float32 (B,) and scaled by T².

    Args as ``triton_kd.kd_rows``, plus ``target``: (B,) integer classes in [0, C), and
    ``target_checked`` as in ``triton_kd.kd_ce``.
    """
    student, teacher, target, temp, scale, offset = _inputs(
        student, teacher, target, temperature, scale, offset, target_checked
    )
    if student.shape[0] == 0:
        empty = student.sum(dim=1, dtype=torch.float32) * 0.0 + temp * 0.0
        return empty, empty.clone()
    return DKDRows.apply(student, teacher, target, temp, scale, offset, zscore, float(eps), config)


def dkd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    ce_weight: float,
    tckd_weight: float,
    nckd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    target_checked: bool = False,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused DKD with its cross-entropy: 0-d float32 (total, ce, tckd, nckd), batch means.

    total = ce_weight · ce + tckd_weight · tckd + nckd_weight · nckd (DKD's alpha and beta,
    times its warm-up factor); ce is the cross-entropy of the raw student logits. One forward
    and one backward kernel, as ``triton_kd.kd_ce``. Other args as ``dkd_rows``.
    """
    student, teacher, target, temp, scale, offset = _inputs(
        student, teacher, target, temperature, scale, offset, target_checked
    )
    weights = (float(ce_weight), float(tckd_weight), float(nckd_weight))
    if student.shape[0] == 0:  # means of nothing: the reference's NaN
        teacher = reference.decode_teacher(teacher, scale, offset)
        return reference.dkd_ce(student, teacher, target, temp, *weights, zscore, eps)
    launch = launch_config(*student.shape, config)
    return DKDCE.apply(
        student, teacher, target, temp, scale, offset, weights, zscore, float(eps), launch
    )


def _inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    target_checked: bool,
) -> tuple:
    """Checked (student, teacher, int64 target, (B,) temperature, scale, offset)."""
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < 2:
        raise MethodError(f"DKD needs 2 classes or more (target and non-target), got {classes}")
    target = check_target(target, batch, classes, target_checked)
    temp = rows_vector(temperature, batch, student.device, "temperature")
    return student, teacher, target, temp, scale, offset
