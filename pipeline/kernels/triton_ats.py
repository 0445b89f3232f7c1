"""Fused ATS rows, Asymmetric Temperature Scaling (Li et al., NeurIPS 2022).

    p = softmax(t / tau_c),  tau_c = tau1 if c == y else tau2   (one softmax over all classes)
    loss_b = s_tau² · (-Σ_c p_c · log_softmax(s / s_tau)_c) = s_tau² · (lse(b) - E_p[b])
    with b = s / s_tau

Forward is one pass with online logsumexp of the teacher (with the per-class temperature applied
in registers) and of the student; ``E_p[b - m_b]`` is kept against the student's running max so
the cross-entropy is a difference of range-sized terms. Backward is one pass writing
grad_student = go · s_tau · (q - p), q = softmax(b), from the two saved logsumexps.

ATS's training loss (``ats_ce``, ``ATSCE``): with WITH_CE the forward also keeps the online
logsumexp of the raw student logits and reads the raw target logit, writing (ce_w·CE + ats_w·ATS,
CE, ATS) / B for the batch means; backward adds (softmax(s) - onehot(y))·go_c in the same pass.
"""

from __future__ import annotations

import functools

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
    launch_config,
    load_affine,
    load_at,
    load_tile,
    mean_grads,
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
    """Teacher a = t / tau_c and student b = s / s_tau tiles, 0 where masked, and the raw
    student tile (junk where masked)."""
    xs = load_tile(s_ptr, s_off, cols, mask, sc, of, False)
    xt = load_tile(t_ptr, t_off, cols, mask, sc, of, HAS_SCALE)
    inv_c = tl.where(cols[None, :] == y[:, None], inv1[:, None], inv2[:, None])
    a = tl.where(mask, xt * inv_c, 0.0)
    b = tl.where(mask, xs * inv_s[:, None], 0.0)
    return a, b, xs


@triton.jit
def _ats_rows_fwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, tau1_ptr, tau2_ptr, st_ptr, target_ptr, loss_ptr,
    stats_ptr, B, C, s_stride, t_stride, ce_w, ats_w, inv_b,
    HAS_SCALE: tl.constexpr, WITH_CE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # WITH_CE: loss_ptr is (3, B), rows of (ce_w·CE + ats_w·ATS, CE, ATS) / B.
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
    m_c = tl.full([ROWS], float("-inf"), tl.float32)
    s_a, s_b, w, s_c = zero, zero, zero, zero  # w = Σ exp(a - m_a) · (b - m_b)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        a, b, xs = _ats_tiles(
            s_ptr, t_ptr, s_off, t_off, cols, mask, y, sc, of, inv1, inv2, inv_s, HAS_SCALE
        )
        if WITH_CE:  # online logsumexp of the raw student logits (T = 1)
            m_c, alpha_c, e_c = online_step(m_c, tl.where(mask, xs, float("-inf")))
            s_c = s_c * alpha_c + tl.sum(e_c, axis=1)
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
    ats = st * st * (tl.log(s_b) - w / s_a)
    if WITH_CE:
        lse_c = tl.where(rmask, m_c, 0.0) + tl.log(tl.where(rmask, s_c, 1.0))
        ce = lse_c - load_at(s_ptr, s_off, y, rmask, sc, of, False)  # the raw target logit
        tl.store(loss_ptr + rows, (ce_w * ce + ats_w * ats) * inv_b, mask=rmask)
        tl.store(loss_ptr + B + rows, ce * inv_b, mask=rmask)
        tl.store(loss_ptr + 2 * B + rows, ats * inv_b, mask=rmask)
        tl.store(stats_ptr + 2 * B + rows, lse_c, mask=rmask)
    else:
        tl.store(loss_ptr + rows, ats, mask=rmask)
    tl.store(stats_ptr + rows, m_a + tl.log(s_a), mask=rmask)  # lse_a
    tl.store(stats_ptr + B + rows, m_b + tl.log(s_b), mask=rmask)  # lse_b


@triton.jit
def _ats_rows_bwd(
    s_ptr, t_ptr, scale_ptr, offset_ptr, tau1_ptr, tau2_ptr, st_ptr, target_ptr, stats_ptr,
    go_ptr, gs_ptr, B, C, s_stride, t_stride, ce_w, ats_w, inv_b,
    HAS_SCALE: tl.constexpr, WITH_CE: tl.constexpr, EXTRA_GRADS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # WITH_CE: go_ptr holds the gradients of the means (total, CE, ATS) (``mean_grads``).
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
    go_c = tl.zeros([ROWS], tl.float32)
    lse_c = tl.zeros([ROWS], tl.float32)
    if WITH_CE:
        g_total = tl.load(go_ptr)
        g_ce, g_ats = g_total * ce_w, g_total * ats_w
        if EXTRA_GRADS:
            g_ce += tl.load(go_ptr + 1)
            g_ats += tl.load(go_ptr + 2)
        g_scale = st * g_ats * inv_b
        go_c += g_ce * inv_b
        lse_c = tl.load(stats_ptr + 2 * B + rows, mask=rmask, other=0.0)
    else:
        g_scale = tl.load(go_ptr + rows, mask=rmask, other=0.0) * st
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        a, b, xs = _ats_tiles(
            s_ptr, t_ptr, s_off, t_off, cols, mask, y, sc, of, inv1, inv2, inv_s, HAS_SCALE
        )
        p = tl.exp(tl.where(mask, a - lse_a[:, None], float("-inf")))
        q = tl.exp(tl.where(mask, b - lse_b[:, None], float("-inf")))
        gs = gs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
        g = g_scale[:, None] * (q - p)
        if WITH_CE:  # + (softmax(s) - onehot(y)) · go_c on the raw logits
            c = tl.exp(tl.where(mask, xs - lse_c[:, None], float("-inf")))
            g += go_c[:, None] * (c - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
        tl.store(gs, g.to(gs_ptr.dtype.element_ty), mask=mask)


def _forward(
    ctx: torch.autograd.function.FunctionCtx,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temps: torch.Tensor,  # (3, B): tau1, tau2, student temperature
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    out: torch.Tensor,  # (B,) per-row ATS, or (3, B) with weights: the parts of the means
    weights: tuple[float, float] | None,  # (ce_w, ats_w): ATS with its cross-entropy
    launch: Launch,
) -> None:
    """Launches the forward of both Functions and saves what backward reads."""
    batch, classes = student.shape
    stats = torch.empty((3, batch), dtype=torch.float32, device=student.device)
    with on_device(student):
        _ats_rows_fwd[launch.grid(batch)](
            student, teacher, *affine(scale, offset, stats), temps[0], temps[1], temps[2],
            target, out, stats, batch, classes, student.stride(0), teacher.stride(0),
            *(weights or (0.0, 0.0)), 1.0 / batch, HAS_SCALE=scale is not None,
            WITH_CE=weights is not None, **launch.meta(),
        )  # fmt: skip
    ctx.save_for_backward(student, teacher, target, temps, scale, offset, stats)
    ctx.weights, ctx.launch = weights, launch


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
    """Launches the backward of both Functions: grad_student. ``grad``: per-row (B,), or with
    the cross-entropy the means' gradients from ``mean_grads``."""
    student, teacher, target, temps, scale, offset, stats = ctx.saved_tensors
    batch, classes = student.shape
    grad_s = torch.empty_like(student)  # (B, C)
    with_ce = ctx.weights is not None
    with on_device(student):
        _ats_rows_bwd[ctx.launch.grid(batch)](
            student, teacher, *affine(scale, offset, stats), temps[0], temps[1], temps[2],
            target, stats, grad, grad_s, batch, classes, student.stride(0), teacher.stride(0),
            *(ctx.weights or (0.0, 0.0)), 1.0 / batch, HAS_SCALE=scale is not None,
            WITH_CE=with_ce, EXTRA_GRADS=with_ce and grad.numel() > 1, **ctx.launch.meta(),
        )  # fmt: skip
    return grad_s


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
        _forward(ctx, student, teacher, target, temps, scale, offset, loss, None, launch)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # type: ignore[override]
        grad_s = _backward(ctx, grad_loss.to(torch.float32).contiguous())  # grad_loss: (B,)
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
    student, teacher, target, temps, scale, offset = _inputs(
        student, teacher, target, (tau1, tau2, student_temperature), scale, offset,
        target_checked,
    )  # fmt: skip
    if student.shape[0] == 0:
        return student.sum(dim=1, dtype=torch.float32) * 0.0
    return ATSRows.apply(student, teacher, target, temps, scale, offset, config)


def _inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperatures: tuple,  # tau1, tau2, student temperature: floats or tensors
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    target_checked: bool,
) -> tuple:
    """Checked (student, teacher, target, (3, B) temperatures, scale, offset)."""
    student, teacher, scale, offset = check_inputs(student, teacher, scale, offset)
    batch, classes = student.shape
    if classes < 1:
        raise MethodError("ATS needs at least one class")
    target = check_target(target, batch, classes, target_checked)
    named = tuple(zip(("tau1", "tau2", "student_temperature"), temperatures, strict=True))
    if any(isinstance(v, torch.Tensor) and v.requires_grad for _, v in named):
        raise MethodError("fused ATS has no temperature gradient: use impl='reference'")
    if any(isinstance(v, torch.Tensor) for v in temperatures):
        temps = torch.stack([rows_vector(v, batch, student.device, n) for n, v in named])
    else:  # fixed temperatures (training): made once, not stacked every step
        temps = _constant_temps(tuple(map(float, temperatures)), batch, student.device)
    return student, teacher, target, temps, scale, offset  # temps: (3, B)


@functools.lru_cache(maxsize=64)
def _constant_temps(values: tuple[float, ...], batch: int, device: torch.device) -> torch.Tensor:
    """Fixed (tau1, tau2, s_tau) as the (3, B) tensor the kernels read (never written)."""
    return (
        torch.tensor(values, dtype=torch.float32, device=device)[:, None]
        .expand(-1, batch)
        .contiguous()
    )


class ATSCE(torch.autograd.Function):
    """Batch means (total, CE, ATS) of ATS's training loss, total = ce_w · CE + ats_w · ATS, in
    one kernel each way; the CE on the raw student logits. Differentiable in the student."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,  # (B, C) float32/16, bfloat16
        teacher: torch.Tensor,  # (B, C) stored dtype
        target: torch.Tensor,  # (B,) int64
        temps: torch.Tensor,  # (3, B) float32: tau1, tau2, student temperature
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        weights: tuple[float, float],  # (ce_w, ats_w)
        launch: Launch,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = torch.empty((3, student.shape[0]), dtype=torch.float32, device=student.device)
        _forward(ctx, student, teacher, target, temps, scale, offset, parts, weights, launch)
        ctx.set_materialize_grads(False)
        return batch_means(parts)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None
    ) -> tuple:
        grad_s = _backward(ctx, mean_grads(grads, ctx.saved_tensors[0]))
        return grad_s, None, None, None, None, None, None, None


def ats_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: float | torch.Tensor,
    tau2: float | torch.Tensor,
    student_temperature: float | torch.Tensor,
    ce_weight: float,
    ats_weight: float,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    target_checked: bool = False,
    config: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ATS with its cross-entropy: 0-d float32 (total, ce, ats), batch means.

    total = ce_weight · ce + ats_weight · ats (ATS's 1 - lamb and lamb); ce is the cross-entropy
    of the raw student logits. One forward and one backward kernel, as ``triton_kd.kd_ce``.
    Other args as ``ats_rows``.
    """
    student, teacher, target, temps, scale, offset = _inputs(
        student, teacher, target, (tau1, tau2, student_temperature), scale, offset,
        target_checked,
    )  # fmt: skip
    weights = (float(ce_weight), float(ats_weight))
    if student.shape[0] == 0:  # means of nothing: the reference's NaN
        teacher = reference.decode_teacher(teacher, scale, offset)
        temps = (tau1, tau2, student_temperature)
        return reference.ats_ce(student, teacher, target, *temps, *weights)
    launch = launch_config(*student.shape, config)
    return ATSCE.apply(student, teacher, target, temps, scale, offset, weights, launch)
