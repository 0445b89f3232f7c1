"""Fused decode of stored teacher logits: float16/bfloat16/float32 or int8 with its per-row affine
code, ``logit = q * scale + offset``, to float32 (B, C) in one pass.

The loss kernels decode in registers and never need this; it is ``decode_teacher``'s fused path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.triton_common import (
    affine,
    check_teacher,
    launch_config,
    load_affine,
    load_tile,
    on_device,
)


@triton.jit
def _decode_kernel(
    t_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    B,
    C,
    t_stride,
    HAS_SCALE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    mask = rmask[:, None] & (cols < C)[None, :]
    sc, of = load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE)
    x = load_tile(t_ptr, rows.to(tl.int64) * t_stride, cols, mask, sc, of, HAS_SCALE)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], x, mask=mask)


def decode_teacher(
    teacher: torch.Tensor, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored teacher logits (B, C) as float32, int8 decoded with its per-row scale and offset."""
    teacher, scale, offset = check_teacher(teacher, scale, offset)
    batch, classes = teacher.shape
    out = torch.empty((batch, classes), dtype=torch.float32, device=teacher.device)  # (B, C)
    if out.numel() == 0:
        return out
    launch = launch_config(batch, classes)
    grid = (triton.cdiv(batch, launch.rows), triton.cdiv(classes, launch.block))
    with on_device(teacher):
        _decode_kernel[grid](
            teacher, *affine(scale, offset, out), out, batch, classes, teacher.stride(0),
            HAS_SCALE=scale is not None, **launch.meta(),
        )  # fmt: skip
    return out
