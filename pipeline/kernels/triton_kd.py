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

Few rows of many classes (plain KD, ``segments_for``): each row's columns are split among
programs that each keep the online-KL state of their segment; ``_kd_split_merge`` combines the
states as ``online_kl`` combines blocks (into the same loss and statistics), backward gives each
program its segment's gradient, and the temperature gradient's two sums are added over segments.

KD's training loss (``kd_ce``, ``KDCE``): with WITH_CE the forward also keeps the online
logsumexp of the raw student logits (T = 1) and reads the target logit, so each row gives its
cross-entropy beside its KD; it writes (ce_w·CE + kd_w·KD, CE, KD) / B for the batch means, and
backward adds (softmax(s) - onehot(y)) · (g_total·ce_w + g_ce) / B to the student's gradient in
the same pass. The cross-entropy is on the raw logits, also under z-score (logit
standardization's CE is): the raw tile is loaded once and standardized in registers.

E_p[a] is summed only when the temperature gets a gradient (NEED_T_STATS) and the E[z_s] only
under z-score: plain KD's forward keeps three running sums fewer (80 registers instead of 96 at
C = 10 on sm_90, 64 instead of 80 at C = 100: tests/kernels/registers.py). Under z-score E_p[a]
stays: without it ptxas gave the kernel more registers, not fewer (139 against 128 at C = 100).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from pipeline.errors import MethodError
from pipeline.kernels import reference
from pipeline.kernels.reference import assert_targets, check_target, check_target_shape
from pipeline.kernels.triton_common import (
    Launch,
    affine,
    batch_means,
    check_inputs,
    constant_rows,
    defined,
    launch_config,
    load_affine,
    load_at,
    load_logits,
    load_tile,
    mean_grads,
    on_device,
    online_kl,
    online_step,
    row_stats,
    rows_vector,
    segments_for,
    shift_of,
    zscored,
)

N_STATS = 13  # rows of the (N_STATS, B) float32 buffer forward leaves for backward

#: Both Functions launch the gradient kernel in forward (go = 1: each row's own gradient, or the
#: total's), and backward scales it in place by the loss's gradient (one elementwise pass): the
#: kernel launched from autograd's backward cost the host more than that on an H200 machine
#: (tests/gpu/host_variants.py). False: the kernel runs in backward with the real gradient, from
#: the statistics forward saved (one pass over (B, C) fewer on the GPU). For benchmarks.
#: Float32 students only (what the methods train with): a float16/bfloat16 buffer would round
#: the unit gradient before its scaling (a loss scale's small gradients underflow, a per-row
#: gradient B times the mean's can overflow), so theirs is computed in backward, as before.
GRADIENT_IN_FORWARD = True


def _gradient_now(student: torch.Tensor, grad_mode: bool, *needed: bool) -> bool:
    """Whether forward computes the gradient (``GRADIENT_IN_FORWARD``): one is needed, grad
    mode was on at the call (a Function's ``needs_input_grad`` ignores ``torch.no_grad``) and
    the student is float32."""
    return any(needed) and grad_mode and GRADIENT_IN_FORWARD and student.dtype == torch.float32


@triton.jit
def _kd_block(
    s_ptr, t_ptr, s_off, t_off, cols, mask, sc, of, k_s, mean_s, sd_s, k_t, mean_t, sd_t, eps,
    inv_t, m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz, m_c, s_c,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, NEED_T_STATS: tl.constexpr,
    WITH_CE: tl.constexpr,
):  # fmt: skip
    """One column block of the forward's online sums (both forwards, split or not)."""
    xs = load_tile(s_ptr, s_off, cols, mask, sc, of, False)  # raw: cross-entropy reads it
    if WITH_CE:  # online logsumexp of the raw student logits (T = 1)
        m_c, alpha_c, e_c = online_step(m_c, tl.where(mask, xs, float("-inf")))
        s_c = s_c * alpha_c + tl.sum(e_c, axis=1)
    if ZSCORE:
        xs = zscored(xs, k_s, mean_s, sd_s, eps)
    xt = load_logits(t_ptr, t_off, cols, mask, sc, of, k_t, mean_t, sd_t, eps, HAS_SCALE, ZSCORE)
    xs = tl.where(mask, xs, 0.0)
    a = tl.where(mask, xt * inv_t[:, None], 0.0)
    b = xs * inv_t[:, None]
    m_a, s_a, m_b, s_b, w_ab, alpha_a, e_a, alpha_b, e_b = online_kl(
        m_a, s_a, m_b, s_b, w_ab, a, b, mask
    )
    if NEED_T_STATS:
        w_a = w_a * alpha_a + tl.sum(tl.where(e_a > 0, e_a * a, 0.0), axis=1)  # 0 at a = -inf
    if ZSCORE:
        w_pz = w_pz * alpha_a + tl.sum(e_a * xs, axis=1)
        w_qz = w_qz * alpha_b + tl.sum(e_b * xs, axis=1)
    return m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz, m_c, s_c


@triton.jit
def _kd_finish(
    loss_ptr, stats_ptr, rows, rmask, B, temp, m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz,
    k_s, mean_s, sd_s, k_t, mean_t, sd_t, m_c, s_c, x_y, ce_w, kd_w, inv_b,
    WITH_CE: tl.constexpr,
):  # fmt: skip
    """Loss and the statistics backward reads, from a row's finished online sums.

    With cross-entropy, ``loss_ptr`` is (3, B): rows of (ce_w·CE + kd_w·KD, CE, KD) / B, whose
    column sums are the batch means."""
    s_a = tl.where(rmask, s_a, 1.0)  # rows past B: keep them finite (and quiet)
    s_b = tl.where(rmask, s_b, 1.0)
    m_a = tl.where(rmask, m_a, 0.0)
    m_b = tl.where(rmask, m_b, 0.0)
    kl = defined(w_ab / s_a - tl.log(s_a) + tl.log(s_b), sd_s, sd_t)  # (sd = 0 without z-score)
    if WITH_CE:
        lse_c = tl.where(rmask, m_c, 0.0) + tl.log(tl.where(rmask, s_c, 1.0))
        ce = lse_c - x_y
        kd = temp * temp * kl
        tl.store(loss_ptr + rows, (ce_w * ce + kd_w * kd) * inv_b, mask=rmask)
        tl.store(loss_ptr + B + rows, ce * inv_b, mask=rmask)
        tl.store(loss_ptr + 2 * B + rows, kd * inv_b, mask=rmask)
        tl.store(stats_ptr + 12 * B + rows, lse_c, mask=rmask)
    else:
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
def _kd_rows_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, loss_ptr, stats_ptr, y_ptr, ok_ptr,
    B, C, s_stride, t_stride, eps, ce_w, kd_w, inv_b,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, NEED_T_STATS: tl.constexpr,
    WITH_CE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
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
    m_c = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, w_ab, w_a, w_pz, s_b, w_qz, s_c, x_y = zero, zero, zero, zero, zero, zero, zero, zero
    if WITH_CE:
        y = tl.load(y_ptr + rows, mask=rmask, other=0)
        # A class outside [0, C) clears the flag *ok_ptr (the caller asserts on it, no host
        # sync) and is read as class 0 meanwhile: never a load past the row.
        bad = rmask & ((y < 0) | (y >= C))
        tl.store(ok_ptr + rows * 0, tl.zeros([ROWS], tl.int32), mask=bad)
        y = tl.where(bad, 0, y)
        x_y = load_at(s_ptr, s_off, y, rmask, sc, of, False)  # the raw target logit
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz, m_c, s_c = _kd_block(
            s_ptr, t_ptr, s_off, t_off, cols, mask, sc, of, k_s, mean_s, sd_s, k_t, mean_t, sd_t,
            eps, inv_t, m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz, m_c, s_c, HAS_SCALE, ZSCORE,
            NEED_T_STATS, WITH_CE
        )  # fmt: skip
    _kd_finish(
        loss_ptr, stats_ptr, rows, rmask, B, temp, m_a, s_a, m_b, s_b, w_ab, w_a, w_pz, w_qz, k_s,
        mean_s, sd_s, k_t, mean_t, sd_t, m_c, s_c, x_y, ce_w, kd_w, inv_b, WITH_CE
    )  # fmt: skip


N_PARTS = 6  # per (segment, row) state of the split forward: m_a, s_a, m_b, s_b, w_ab, w_a
MERGE_ROWS = 128  # rows per program of the merge


@triton.jit
def _kd_split_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, part_ptr,
    B, C, s_stride, t_stride, SEG_LEN,
    HAS_SCALE: tl.constexpr, NEED_T_STATS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (i, j): the online-KL state of rows i*ROWS.. over columns j*SEG_LEN.. only.

    For few rows of many classes (128 rows of 131,072 on 132 SMs), where one program a row
    leaves most of the GPU idle. Plain KD (no z-score); ``_kd_split_merge`` combines the parts.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    seg = tl.program_id(1)
    nseg = tl.num_programs(1)
    col0 = seg * SEG_LEN
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, s_b, w_ab, w_a = zero, zero, zero, zero
    for start in range(0, SEG_LEN, BLOCK):
        cols = col0 + start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        m_a, s_a, m_b, s_b, w_ab, w_a, _, _, _, _ = _kd_block(
            s_ptr, t_ptr, s_off, t_off, cols, mask, sc, of, zero, zero, zero, zero, zero, zero,
            0.0, inv_t, m_a, s_a, m_b, s_b, w_ab, w_a, zero, zero, zero, zero, HAS_SCALE, False,
            NEED_T_STATS, False
        )  # fmt: skip
    part = part_ptr + seg * B + rows  # part[k] at k * nseg * B
    tl.store(part + 0 * nseg * B, m_a, mask=rmask)
    tl.store(part + 1 * nseg * B, s_a, mask=rmask)
    tl.store(part + 2 * nseg * B, m_b, mask=rmask)
    tl.store(part + 3 * nseg * B, s_b, mask=rmask)
    tl.store(part + 4 * nseg * B, w_ab, mask=rmask)
    tl.store(part + 5 * nseg * B, w_a, mask=rmask)


@triton.jit
def _kd_split_merge(
    part_ptr, temp_ptr, loss_ptr, stats_ptr, B, NSEG,
    NEED_T_STATS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The segments' states of each row merged as ``online_kl`` merges blocks; loss and the
    same statistics ``_kd_rows_fwd`` leaves for backward (z-score ones 0)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    zero = tl.zeros([ROWS], tl.float32)
    m_a = tl.full([ROWS], float("-inf"), tl.float32)
    m_b = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, s_b, w_ab, w_a = zero, zero, zero, zero
    for seg in range(0, NSEG):
        part = part_ptr + seg * B + rows
        pm_a = tl.load(part + 0 * NSEG * B, mask=rmask, other=float("-inf"))
        ps_a = tl.load(part + 1 * NSEG * B, mask=rmask, other=0.0)
        pm_b = tl.load(part + 2 * NSEG * B, mask=rmask, other=float("-inf"))
        ps_b = tl.load(part + 3 * NSEG * B, mask=rmask, other=0.0)
        pw_ab = tl.load(part + 4 * NSEG * B, mask=rmask, other=0.0)
        pw_a = tl.load(part + 5 * NSEG * B, mask=rmask, other=0.0)
        n_a = tl.maximum(m_a, pm_a)
        n_b = tl.maximum(m_b, pm_b)
        na_safe = tl.where(n_a == float("-inf"), 0.0, n_a)
        nb_safe = tl.where(n_b == float("-inf"), 0.0, n_b)
        # exp(-inf - finite) = 0: a side with nothing accumulated yet contributes nothing.
        alpha = tl.exp(m_a - na_safe)
        beta = tl.exp(pm_a - na_safe)
        gamma = tl.exp(m_b - nb_safe)
        delta = tl.exp(pm_b - nb_safe)
        # Σ exp(a - n_a)·((a - n_a) - (b - n_b)) from each side's sum against its own maxes.
        w_old = w_ab + s_a * (shift_of(m_a, n_a) - shift_of(m_b, n_b))
        w_new = pw_ab + ps_a * (shift_of(pm_a, n_a) - shift_of(pm_b, n_b))
        w_ab = alpha * w_old + beta * w_new
        if NEED_T_STATS:
            w_a = alpha * w_a + beta * pw_a
        s_a = alpha * s_a + beta * ps_a
        s_b = gamma * s_b + delta * ps_b
        m_a, m_b = n_a, n_b
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    _kd_finish(  # no z-score: its statistics are 0
        loss_ptr, stats_ptr, rows, rmask, B, temp, m_a, s_a, m_b, s_b, w_ab, w_a, zero, zero,
        zero, zero, zero, zero, zero, zero, zero, zero, zero, 0.0, 0.0, 0.0, False
    )  # fmt: skip


@triton.jit
def _kd_rows_bwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, temp_ptr, stats_ptr, go_ptr, gs_ptr, gt_ptr,
    y_ptr, B, C, s_stride, t_stride, eps, SEG_LEN, ce_w, kd_w, inv_b, go_stride,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr, WRITE_GS: tl.constexpr,
    NEED_T_GRAD: tl.constexpr, SPLIT: tl.constexpr, WITH_CE: tl.constexpr,
    EXTRA_GRADS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program (i, j): rows i*ROWS.., columns j*SEG_LEN.. (SEG_LEN = C: one program a row block).
    # WITH_CE: go_ptr holds the gradients of the means (total, CE, KD) (``mean_grads``: the
    # total's alone unless EXTRA_GRADS); each row's KD gets (g_total·kd_w + g_kd) / B, its CE
    # (g_total·ce_w + g_ce) / B. Otherwise go_ptr is (B,) with stride go_stride (0: a sum's
    # gradient, one value expanded; 2: a column of a stack), read as it is, not copied first.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col0 = tl.program_id(1) * SEG_LEN
    rmask = rows < B
    s_off = rows.to(tl.int64) * s_stride
    t_off = rows.to(tl.int64) * t_stride
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    zero = tl.zeros([ROWS], tl.float32)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    inv_t = 1.0 / temp
    go_c = zero
    lse_c = zero
    y = tl.zeros([ROWS], tl.int64)
    if WITH_CE:
        g_total = tl.load(go_ptr)
        g_kd = g_total * kd_w
        g_ce = g_total * ce_w
        if EXTRA_GRADS:
            g_ce += tl.load(go_ptr + 1)
            g_kd += tl.load(go_ptr + 2)
        go = zero + g_kd * inv_b
        go_c = zero + g_ce * inv_b
        lse_c = tl.load(stats_ptr + 12 * B + rows, mask=rmask, other=0.0)
        y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        go = tl.load(go_ptr + rows.to(tl.int64) * go_stride, mask=rmask, other=0.0)
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
        d_s = sd_s + eps  # 0 only for a constant row with eps = 0: z = 0, no gradient
        g_scale = tl.where(d_s > 0, g_scale / tl.where(d_s > 0, d_s, 1.0), 0.0)
        safe_sd = tl.where(sd_s > 0, sd_s, 1.0)
        coef = tl.where(sd_s > 0, go * temp * d_ez / ((C * 1.0 - 1.0) * safe_sd), 0.0)
    e_b = e_a - e_ab  # E_p[b]: (q - p)·b centred on it sums range-sized, not lse-sized, terms
    cov = zero
    qpb = zero
    for start in range(0, SEG_LEN, BLOCK):
        cols = col0 + start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        raw = load_tile(s_ptr, s_off, cols, mask, sc, of, False)
        xs = raw
        if ZSCORE:
            xs = zscored(raw, k_s, mean_s, sd_s, eps)
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
            if WITH_CE:  # + d(mean CE)/ds = (softmax(s) - onehot(y)) / B, on the raw logits
                c = tl.exp(tl.where(mask, raw - lse_c[:, None], float("-inf")))
                hit = cols[None, :].to(tl.int64) == y[:, None]
                g += go_c[:, None] * (c - tl.where(hit, 1.0, 0.0))
            gs = gs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(gs, g.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T_GRAD:
            cov_pb = p * (a - e_a[:, None]) * (a - b - e_ab[:, None])
            cov += tl.sum(tl.where(p > 0, cov_pb, 0.0), axis=1)  # 0, not NaN, at a = -inf
            qpb += tl.sum((q - p) * (b - e_b[:, None]), axis=1)  # Σ(q-p) = 0: centre on E_p[b]
    if NEED_T_GRAD:
        if SPLIT:  # this segment's part of the sums: (segments, B), added up by the caller
            tl.store(gt_ptr + tl.program_id(1) * B + rows, cov + qpb, mask=rmask)
        else:
            tl.store(gt_ptr + rows, go * (2.0 * temp * kl - temp * (cov + qpb)), mask=rmask)


def _launch_fwd(
    inputs: tuple,  # (student, teacher, temperature, scale, offset)
    out: torch.Tensor,  # (B,) per-row KD, or (3, B) with the cross-entropy: the means' parts
    stats: torch.Tensor,  # (N_STATS, B): what backward reads
    ce: tuple | None,  # (target, (ce_w, kd_w)): KD with its cross-entropy
    zscore: bool,
    eps: float,
    need_t_stats: bool,
    launch: Launch,
    ok: torch.Tensor | None = None,  # int32 flag the kernel clears for a target outside [0, C)
) -> None:
    """The one-program-a-row-block forward of both Functions."""
    student, teacher, temperature, scale, offset = inputs
    batch, classes = student.shape
    target, weights = ce or (out, (0.0, 0.0))
    with on_device(student):
        _kd_rows_fwd[launch.grid(batch)](
            student, teacher, *affine(scale, offset, out), temperature, out, stats, target,
            out if ok is None else ok, batch, classes, student.stride(0), teacher.stride(0), eps,
            *weights, 1.0 / batch,
            HAS_SCALE=scale is not None, ZSCORE=zscore, NEED_T_STATS=need_t_stats,
            WITH_CE=ce is not None, **launch.meta(),
        )  # fmt: skip


def _launch_bwd(
    inputs: tuple,  # (student, teacher, temperature, scale, offset)
    stats: torch.Tensor,
    go: torch.Tensor,  # (B,) per-row gradients, or with the CE the means' (``mean_grads``)
    ce: tuple | None,  # (target, (ce_w, kd_w))
    zscore: bool,
    eps: float,
    launch: Launch,
    write_gs: bool,
    need_t: bool,
    split: tuple[int, int],  # (segments, columns a segment)
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of both Functions: (grad_student, grad_temperature); split rows give each
    segment's part of the temperature sums, (segments, B), for the caller to add."""
    student, teacher, temperature, scale, offset = inputs
    batch, classes = student.shape
    nseg, seg_len = split
    grad_s = torch.empty_like(student) if write_gs else None  # (B, C)
    t_shape = (nseg, batch) if nseg > 1 else temperature.shape
    grad_t = torch.empty(t_shape, dtype=torch.float32, device=student.device) if need_t else None
    target, weights = ce or (stats, (0.0, 0.0))
    with on_device(student):
        _kd_rows_bwd[(*launch.grid(batch), nseg)](
            student, teacher, *affine(scale, offset, stats), temperature, stats, go,
            stats if grad_s is None else grad_s, stats if grad_t is None else grad_t, target,
            batch, classes, student.stride(0), teacher.stride(0), eps, seg_len, *weights,
            1.0 / batch, go.stride(0), HAS_SCALE=scale is not None, ZSCORE=zscore,
            WRITE_GS=write_gs, NEED_T_GRAD=need_t, SPLIT=nseg > 1, WITH_CE=ce is not None,
            EXTRA_GRADS=ce is not None and go.numel() > 1, **launch.meta(),
        )  # fmt: skip
    return grad_s, grad_t


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
        grad_mode: bool,  # torch.is_grad_enabled() at the call
    ) -> torch.Tensor:
        batch, classes = student.shape
        tile, segments = (config[:3], config[3]) if config and len(config) == 4 else (config, None)
        launch = launch_config(batch, classes, tile)
        if zscore and segments not in (None, 1):
            raise MethodError("a row split among programs is for plain KD only, not z-score")
        device = student.device
        nseg, seg_len = segments_for(batch, classes, launch, device, segments)
        if zscore:
            nseg, seg_len = 1, classes
        loss = torch.empty(batch, dtype=torch.float32, device=device)  # (B,)
        stats = torch.empty((N_STATS, batch), dtype=torch.float32, device=device)
        need_t_stats = ctx.needs_input_grad[2] or zscore
        inputs = (student, teacher, temperature, scale, offset)
        if nseg == 1:
            _launch_fwd(inputs, loss, stats, None, zscore, eps, need_t_stats, launch)
        else:
            part = torch.empty((N_PARTS, nseg, batch), dtype=torch.float32, device=device)
            with on_device(student):
                _kd_split_fwd[(*launch.grid(batch), nseg)](
                    student, teacher, *affine(scale, offset, loss), temperature, part, batch,
                    classes, student.stride(0), teacher.stride(0), seg_len,
                    HAS_SCALE=scale is not None, NEED_T_STATS=need_t_stats, **launch.meta(),
                )  # fmt: skip
                _kd_split_merge[(-(-batch // MERGE_ROWS),)](
                    part, temperature, loss, stats, batch, nseg, NEED_T_STATS=need_t_stats,
                    ROWS=MERGE_ROWS, num_warps=4,
                )  # fmt: skip
        ctx.save_for_backward(student, teacher, temperature, scale, offset, stats)
        ctx.zscore, ctx.eps, ctx.launch, ctx.split = zscore, eps, launch, (nseg, seg_len)
        write_gs, _, need_t = ctx.needs_input_grad[:3]
        ctx.grads = None
        if _gradient_now(student, grad_mode, write_gs, need_t):  # each row's own, now
            unit = constant_rows(1.0, batch, device)
            ctx.grads = _rows_grads(inputs, stats, unit, ctx, write_gs, need_t)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # type: ignore[override]
        grad_loss = grad_loss.to(torch.float32)  # (B,), any stride (a sum's: 0)
        grads, ctx.grads = ctx.grads, None  # ctx lets go: autograd may keep the buffer itself
        write_gs, _, need_t = ctx.needs_input_grad[:3]
        if grads is None:  # a second backward (retain_graph): the gradient kernel again
            *inputs, stats = ctx.saved_tensors
            grads = _rows_grads(tuple(inputs), stats, grad_loss, ctx, write_gs, need_t)
        else:  # each row's gradient times its loss's: in place, the buffer is this call's
            grad_s, grad_t = grads
            if grad_s is not None:
                grad_s.mul_(grad_loss[:, None])
            if grad_t is not None:
                grad_t.mul_(grad_loss)
        return grads[0], None, grads[1], None, None, None, None, None, None


def _rows_grads(
    inputs: tuple,
    stats: torch.Tensor,
    go: torch.Tensor,  # (B,) float32, any stride: each row's loss gradient
    ctx: torch.autograd.function.FunctionCtx,
    write_gs: bool,
    need_t: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """KDRows' (grad_student, grad_temperature (B,)) for the rows' loss gradients ``go``."""
    grad_s, grad_t = _launch_bwd(
        inputs, stats, go, None, ctx.zscore, ctx.eps, ctx.launch, write_gs, need_t, ctx.split
    )
    if need_t and ctx.split[0] > 1:  # dL/dT = go · (2T·KL - T·(Cov_p(a, a - b) + Σ(q - p)·b))
        temperature, kl = inputs[2], stats[5]
        grad_t = go * (2.0 * temperature * kl - temperature * grad_t.sum(dim=0))
    return grad_s, grad_t


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
        config: (rows, block[, num_warps[, segments]]) tile override, for tests and the tile
            sweep; segments > 1 splits each row's columns among programs (plain KD only).
    """
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < (2 if zscore else 1):
        raise MethodError(f"KD needs {2 if zscore else 1} classes or more, got {classes}")
    temp = rows_vector(temperature, batch, student.device, "temperature")
    if batch == 0:
        return student.sum(dim=1, dtype=torch.float32) * 0.0 + temp * 0.0
    grad_mode = torch.is_grad_enabled()
    return KDRows.apply(
        student, teacher, temp, scale, offset, zscore, float(eps), config, grad_mode
    )


class KDCE(torch.autograd.Function):
    """Batch means (total, CE, KD) of KD with its cross-entropy term, in one kernel each way.

    total = ce_w · mean_b CE(s_b, y_b) + kd_w · mean_b KD_b; the CE is on the raw student logits
    (also under z-score, as logit standardization has it). Differentiable in the student and the
    (B,) temperature; each of the three outputs may be backpropagated.
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
        weights: tuple[float, float],  # (ce_w, kd_w)
        zscore: bool,
        eps: float,
        launch: Launch,
        ok: torch.Tensor,  # int32 (1,) flag, cleared by a target outside [0, C)
        grad_mode: bool,  # torch.is_grad_enabled() at the call
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = student.shape[0]
        parts = torch.empty((3, batch), dtype=torch.float32, device=student.device)
        stats = torch.empty((N_STATS, batch), dtype=torch.float32, device=student.device)
        inputs = (student, teacher, temperature, scale, offset)
        need_t_stats = ctx.needs_input_grad[3] or zscore
        ce = (target, weights)
        _launch_fwd(inputs, parts, stats, ce, zscore, eps, need_t_stats, launch, ok)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student, teacher, temperature, scale, offset, target, stats)
        ctx.weights, ctx.zscore, ctx.eps, ctx.launch = weights, zscore, eps, launch
        write_gs, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        ctx.grads = None
        if _gradient_now(student, grad_mode, write_gs, need_t):  # the total's, now
            unit = constant_rows(1.0, 1, student.device)  # d total / d total
            split = (1, student.shape[1])
            ctx.grads = _launch_bwd(
                inputs, stats, unit, ce, zscore, eps, launch, write_gs, need_t, split
            )
        return batch_means(parts)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None
    ) -> tuple:
        ready, ctx.grads = ctx.grads, None  # ctx lets go: autograd may keep the buffer itself
        if ready is not None and grads[0] is not None and grads[1] is None and grads[2] is None:
            # Only the total backpropagated (training): its gradient times the total's, in place.
            grad_s, grad_t = ready
            for grad in (grad_s, grad_t):
                if grad is not None:
                    grad.mul_(grads[0])
        else:  # the terms backpropagated too, or a second backward: the gradient kernel again
            del ready
            *inputs, target, stats = ctx.saved_tensors
            go = mean_grads(grads, stats)  # (1,) or (3,)
            grad_s, grad_t = _launch_bwd(
                tuple(inputs), stats, go, (target, ctx.weights), ctx.zscore, ctx.eps, ctx.launch,
                ctx.needs_input_grad[0], ctx.needs_input_grad[3], (1, inputs[0].shape[1]),
            )  # fmt: skip
        return grad_s, None, None, grad_t, None, None, None, None, None, None, None, None


def kd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    ce_weight: float,
    kd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    target_checked: bool = False,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused KD with its cross-entropy: 0-d float32 (total, ce, kd), batch means.

    ``kd`` is the mean of ``kd_rows``; ``ce`` the mean cross-entropy of the raw student logits
    with ``target``; total = ce_weight · ce + kd_weight · kd. One forward and one backward
    kernel replace KD's two and cross-entropy's own (three passes over the student logits fewer,
    and fewer launches: on a small student a training step is mostly launch time). Rows are
    split among programs only when ``config`` asks for segments: then the split KD kernels run
    with PyTorch's cross-entropy beside them.

    Args:
        target: (B,) integer classes; ``target_checked`` when the caller already checked that
            they lie in [0, C) (DKD's and ATS's methods do), so it is not paid twice a step.
            Otherwise the forward kernel checks the range as it reads each row's target, and
            one assert follows it (on CUDA a device-side assert, as PyTorch's cross-entropy's;
            a separate check took four launches, up to ~0.1 ms of a 0.5-0.9 ms step on an H200's
            host, tests/gpu/host_variants.py).
        Others: as ``kd_rows``.
    """
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < (2 if zscore else 1):
        raise MethodError(f"KD needs {2 if zscore else 1} classes or more, got {classes}")
    if not target_checked:
        check_target_shape(target, batch)
    target = target.to(torch.int64).contiguous()
    temp = rows_vector(temperature, batch, student.device, "temperature")
    tile, segments = (config[:3], config[3]) if config and len(config) == 4 else (config, None)
    if zscore and segments not in (None, 1):
        raise MethodError("a row split among programs is for plain KD only, not z-score")
    launch = launch_config(batch, classes, tile)
    # Rows are split only when a config asks: the split path computes the cross-entropy apart
    # (PyTorch's, more launches and passes), and on an H100 it took 1.12-1.16x eager's time at
    # C >= 32768, where one program a row is as fast or nearly (the kernels alone: 0.093 against
    # 0.094 ms at C = 32768, 0.185 against 0.106 at C = 131072, H200, tests/gpu/results/) and
    # a call waits longer than that on the host anyway.
    split = (
        segments is not None
        and segments_for(batch, classes, launch, student.device, segments)[0] > 1
    )
    if batch == 0 or split:  # no kernel reads the targets: checked apart
        target = check_target(target, batch, classes, target_checked)
    if batch == 0:  # means of nothing: the reference's NaN
        teacher = reference.decode_teacher(teacher, scale, offset)
        return reference.kd_ce(student, teacher, target, temp, ce_weight, kd_weight, zscore, eps)
    if split:  # the split KD kernels, PyTorch's cross-entropy beside them
        grad_mode = torch.is_grad_enabled()
        kd = KDRows.apply(
            student, teacher, temp, scale, offset, zscore, float(eps), config, grad_mode
        )
        terms = (kd_weight, kd.mean())
        return reference.with_ce(student, target, ce_weight, terms, target_checked=True)
    weights = (float(ce_weight), float(kd_weight))
    checked, ignored = _target_flags(student.device)
    ok = ignored if target_checked else checked
    try:
        out = KDCE.apply(
            student, teacher, target, temp, scale, offset, weights, zscore, float(eps), launch,
            ok, torch.is_grad_enabled(),
        )  # fmt: skip
        if not target_checked:
            assert_targets(ok, target, classes)
    except BaseException:  # a refused target, or a call failing past its kernel (out of
        ok.fill_(1)  # memory): no cleared flag left behind to fail the next, valid call
        raise
    return out


@functools.cache
def _target_flags(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's (checked, ignored) int32 (1,) flags, 1 until a forward kernel reads a target
    outside [0, C). ``checked`` is asserted after the call; ``ignored`` is what a call whose
    targets its caller checked may clear, never read (made once: a fill a step is a launch;
    never an inference tensor, which training could not reset)."""
    with torch.inference_mode(False):
        return tuple(torch.ones(1, dtype=torch.int32, device=device) for _ in range(2))
