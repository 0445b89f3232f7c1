"""Shared pieces of the fused Triton loss kernels: tile loads, row statistics, online softmax.

Every loss kernel gives each program ``ROWS`` rows and walks their classes in ``BLOCK``-wide
column blocks, so any C works and no (B, C) intermediate is ever written: per-row state lives in
float32 ``(ROWS,)`` registers. Teacher logits are read in their stored dtype; int8 rows are decoded
in registers as ``q * scale + offset`` (the store's per-row affine code).

Online logsumexp keeps, per row, the running max ``m`` and ``S = sum exp(x - m)``; when a block
raises the max, ``S`` (and every sum weighted by ``exp(x - m)``) is rescaled by
``exp(m_old - m_new)``.
Masked entries are ``-inf`` in the exponent and 0 in the weights, and the rescale is written so a
row whose every entry so far was masked gives 0, never ``exp(-inf - -inf) = NaN``.

Importing this module imports triton: the dispatcher (``pipeline.kernels``) imports it lazily.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pipeline.errors import MethodError
from pipeline.kernels import FUSED_STUDENT_DTYPES, FUSED_TEACHER_DTYPES
from pipeline.kernels.reference import check_affine

#: Widest column block: a program walks longer rows in 2048-wide steps (8 warps, 8 values a
#: thread).
MAX_BLOCK = 2048
#: From this block width up a program takes one row (8 warps).
ROW_BLOCK = 2048
#: Rows of 33-1024 classes: a program walks (ROWS, BLOCK) tiles of ``SMALL_TILE`` elements with
#: one warp (8 values a thread), in blocks of at most this many columns: C = 100 is 2x128, C =
#: 1000 one row in two 512-wide steps. The kernels alone, forward + backward replayed from a
#: CUDA graph (tests/gpu/tile_sweep.py, H200, 2026-11-27, tests/gpu/results/): KD 0.157 ms at
#: C = 100 against 0.299 for the 4x128 4-warp tile it replaces, 0.100 against 0.144 (2x1024, 8
#: warps) at C = 1000; DKD 0.230 against 0.585 and 0.116 against 0.212; each the best or
#: within 1% of the best of 21 candidates.
MID_BLOCK = 512
#: Rows of at most 32 classes keep 4 warps on their 256-element tiles (16x16 at C = 10: KD
#: 0.388 ms against 0.429 for the 32x16 tile before, DKD 0.705 against 0.723; one warp is
#: not among the best there). The 2,048-element tiles before 2026-11-26, in which a thread holds
#: parts of several rows, took 206-255 registers per thread (tests/kernels/registers.py).
SMALL_TILE = 256
#: Blocks narrower than this take 4 warps, wider ones (up to ``MID_BLOCK``) one.
ONE_WARP_MIN_BLOCK = 64

STUDENT_DTYPES = FUSED_STUDENT_DTYPES
TEACHER_DTYPES = FUSED_TEACHER_DTYPES


@dataclass(frozen=True)
class Launch:
    """How a row kernel is launched: ``rows`` rows per program, ``block`` columns per step."""

    rows: int
    block: int
    num_warps: int

    def grid(self, batch: int) -> tuple[int]:
        return (-(-batch // self.rows),)  # ceil; triton.cdiv is a constexpr function (slower)

    def meta(self) -> dict[str, int]:
        """The tile's compile-time kernel arguments."""
        return {"ROWS": self.rows, "BLOCK": self.block, "num_warps": self.num_warps}


def affine(
    scale: torch.Tensor | None, offset: torch.Tensor | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) pointers for a launch; ``dummy`` (never read) when the teacher is float."""
    return (dummy, dummy) if scale is None or offset is None else (scale, offset)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_config(batch: int, classes: int, override: Sequence[int] | None = None) -> Launch:
    """Tile shape for a (batch, classes) problem.

    ``override`` = (rows, block) or (rows, block, num_warps) is for tests and for
    ``tests/gpu/tile_sweep.py``, which times candidate tiles on a GPU.
    """
    return _launch_config(batch, classes, None if override is None else tuple(override))


@functools.lru_cache(maxsize=1024)  # called twice a training step: keep it off the host's path
def _launch_config(batch: int, classes: int, override: tuple[int, ...] | None) -> Launch:
    if override is not None:
        rows, block, *warps = override
    else:
        block = min(_next_power_of_2(classes), MAX_BLOCK)
        if block < ROW_BLOCK:
            block = min(block, MID_BLOCK)
        wanted = 1 if block >= ROW_BLOCK else max(1, SMALL_TILE // block)
        rows = max(1, min(wanted, _next_power_of_2(batch)))
        warps = []
    if rows < 1 or block < 1 or block & (block - 1) or rows & (rows - 1):
        raise MethodError(f"tile shape must be powers of two, got rows={rows}, block={block}")
    if warps:
        num_warps = warps[0]
    else:
        num_warps = 8 if block >= ROW_BLOCK else 1 if block >= ONE_WARP_MIN_BLOCK else 4
    if len(warps) > 1 or num_warps not in (1, 2, 4, 8, 16, 32):
        raise MethodError(f"num_warps must be one of 1, 2, 4, 8, 16, 32, got {override}")
    return Launch(rows=rows, block=block, num_warps=num_warps)


#: From this many classes up, plain KD may split each row's columns among several programs.
SPLIT_MIN_CLASSES = 8192
#: Programs per SM a split aims for (a row per program leaves SMs idle when rows are few).
PROGRAMS_PER_SM = 4
#: Rows are split only when there are fewer than this many a SM: with more, one program a row
#: keeps the GPU as busy (512 rows of 32,768 classes on an H200's 132 SMs: the kernels alone
#: 0.093 ms unsplit against 0.094 in 2 segments, tests/gpu/results/2026-11-27-h200/), and a
#: split costs the host a third launch (~20 µs there) and an allocation a step.
SPLIT_BELOW_ROWS_PER_SM = 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segments_for(
    batch: int, classes: int, launch: Launch, device: torch.device, override: int | None = None
) -> tuple[int, int]:
    """(segments, columns per segment): how a row's columns are shared among programs.

    One program a row (segments = 1) unless the row is long (C >= ``SPLIT_MIN_CLASSES``), the
    tile takes one row, and there are fewer than ``SPLIT_BELOW_ROWS_PER_SM`` rows for every SM
    of the device: 128 rows of 131,072 classes gave 128 programs for an H100's 132 SMs. A split
    aims for ``PROGRAMS_PER_SM`` programs an SM.
    ``override`` asks for a number of segments (tests, tile sweeps). Each segment covers whole
    ``launch.block`` column blocks, and none is empty.
    """
    blocks = -(-classes // launch.block)
    if override is not None:
        wanted = override
    elif launch.rows != 1 or classes < SPLIT_MIN_CLASSES or device.type != "cuda":
        wanted = 1
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(index)
        few = batch < SPLIT_BELOW_ROWS_PER_SM * sms
        wanted = -(-(PROGRAMS_PER_SM * sms) // batch) if few else 1
    if wanted < 1:
        raise MethodError(f"segments must be >= 1, got {wanted}")
    per = -(-blocks // min(wanted, blocks))  # column blocks a segment
    return -(-blocks // per), per * launch.block


def batch_means(parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """0-d batch means from the (K, B) parts a fused loss-with-CE forward writes (each part
    already divided by B), total first: the total its own tensor (a training loop may add to it
    in place), the terms views of one (K - 1,) sum. Fixed-order reductions: the same every run.
    """
    return parts[0].sum(), *parts[1:].sum(dim=1).unbind()


def mean_grads(grads: tuple[torch.Tensor | None, ...], like: torch.Tensor) -> torch.Tensor:
    """The gradients of the means ``batch_means`` returned, as the float32 vector the backward
    kernels read (``EXTRA_GRADS`` when it has more than one entry): (1,) when only the total
    has one, as in training; else (K,), zeros where an output got none."""
    if grads[0] is not None and all(g is None for g in grads[1:]):
        return grads[0].to(torch.float32).reshape(1)
    zero = torch.zeros((), dtype=torch.float32, device=like.device)
    return torch.stack([zero if g is None else g.to(torch.float32) for g in grads])


_SAME_DEVICE = contextlib.nullcontext()


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one (triton launches on the current device).

    Nothing to switch when the tensor is on the current device (the usual case: a context
    switches the device twice, host time on every launch)."""
    if not tensor.is_cuda or tensor.get_device() == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(tensor.device)


def interpreted() -> bool:
    """True when triton built these kernels for its CPU interpreter (TRITON_INTERPRET=1 at import).

    triton decides when a function is decorated, i.e. when this module is first imported.
    """
    return type(online_step).__name__ == "InterpretedFunction"


def check_teacher(
    teacher: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A row-contiguous (B, C) teacher and, for int8, its float32 (B,) scale and offset."""
    if teacher.dim() != 2:
        raise MethodError(f"teacher logits must be (B, C), got {tuple(teacher.shape)}")
    if teacher.dtype not in TEACHER_DTYPES:
        raise MethodError(f"fused kernels cannot read a {teacher.dtype} teacher")
    if (teacher.dtype == torch.int8) != (scale is not None and offset is not None):
        raise MethodError("an int8 teacher needs its per-row scale and offset (and only it)")
    if scale is not None and offset is not None:
        check_affine(teacher, scale, offset)  # the reference's refusal, word for word
        scale = rows_vector(scale, teacher.shape[0], teacher.device, "scale")
        offset = rows_vector(offset, teacher.shape[0], teacher.device, "offset")
    return teacher.contiguous(), scale, offset


def check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validated, row-contiguous student and teacher (views when already contiguous)."""
    if student.dim() != 2 or teacher.shape != student.shape:
        raise MethodError(
            f"student and teacher logits must both be (B, C), got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if student.dtype not in STUDENT_DTYPES:
        raise MethodError(f"fused kernels take float32/16 or bf16 students, not {student.dtype}")
    if teacher.device != student.device:
        raise MethodError(f"teacher on {teacher.device} but student on {student.device}")
    teacher, scale, offset = check_teacher(teacher, scale, offset)
    return student.contiguous(), teacher, scale, offset


def rows_vector(
    value: float | torch.Tensor, batch: int, device: torch.device, name: str
) -> torch.Tensor:
    """A float or a 0-d/(1,)/(B,) tensor as a contiguous float32 (B,) tensor (autograd kept)."""
    if not isinstance(value, torch.Tensor):
        return constant_rows(float(value), batch, device)
    if value.numel() not in (1, batch) or value.dim() > 1:
        raise MethodError(f"{name} must be a float or a ({batch},) tensor, not {value.shape}")
    if value.device != device:
        raise MethodError(f"{name} is on {value.device}, the logits on {device}")
    # expand + contiguous are differentiable: a global learnable temperature gets the sum.
    return value.reshape(-1).expand(batch).to(torch.float32).contiguous()


@functools.lru_cache(maxsize=64)
def constant_rows(value: float, batch: int, device: torch.device) -> torch.Tensor:
    """A fixed temperature as a (B,) tensor, made once per (value, B, device): the kernels only
    read it, and a fill a step is a launch a step. Never an inference tensor (a first call under
    ``torch.inference_mode`` would make one, which a later training step cannot save)."""
    with torch.inference_mode(False):
        return torch.full((batch,), value, dtype=torch.float32, device=device)


@triton.jit
def load_affine(scale_ptr, offset_ptr, rows, rmask, HAS_SCALE: tl.constexpr):
    """Per-row (scale, offset) of an int8 teacher, or (1, 0): ``(ROWS,)`` each."""
    if HAS_SCALE:
        sc = tl.load(scale_ptr + rows, mask=rmask, other=1.0)
        of = tl.load(offset_ptr + rows, mask=rmask, other=0.0)
    else:
        sc = tl.full(rows.shape, 1.0, tl.float32)
        of = tl.zeros(rows.shape, tl.float32)
    return sc, of


@triton.jit
def load_tile(ptr, row_off, cols, mask, sc, of, HAS_SCALE: tl.constexpr):
    """(ROWS, BLOCK) float32 tile of a stored-dtype tensor, decoded; masked entries are junk."""
    x = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0).to(tl.float32)
    if HAS_SCALE:
        x = x * sc[:, None] + of[:, None]
    return x


@triton.jit
def load_at(ptr, row_off, col, rmask, sc, of, HAS_SCALE: tl.constexpr):
    """One column per row (``col`` is ``(ROWS,)``, e.g. the target), decoded: ``(ROWS,)``."""
    x = tl.load(ptr + row_off + col, mask=rmask, other=0).to(tl.float32)
    if HAS_SCALE:
        x = x * sc + of
    return x


@triton.jit
def load_logits(
    ptr, row_off, cols, mask, sc, of, k, mean, sd, eps,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr,
):  # fmt: skip
    """``load_tile``, z-scored with the rows' (shift, mean, std) from ``row_stats`` if ZSCORE."""
    x = load_tile(ptr, row_off, cols, mask, sc, of, HAS_SCALE)
    if ZSCORE:
        x = zscored(x, k, mean, sd, eps)
    return x


@triton.jit
def zscored(x, k, mean, sd, eps):
    """A (ROWS, BLOCK) tile standardized with its rows' (shift, mean, std) from ``row_stats``.

    A row whose std + eps is 0 (a constant row with ``eps = 0``) gives zeros, as the reference's
    ``standardize`` does, not 0 / 0. A row holding ±inf has no mean or std (NaN): it stays NaN,
    as in the reference (it gave zeros, a uniform teacher, before 2026-11-27)."""
    d = sd + eps
    z = (x - k[:, None] - mean[:, None]) / tl.where(d == 0, 1.0, d)[:, None]
    return tl.where((d == 0)[:, None], 0.0, z)


@triton.jit
def defined(value, sd_s, sd_t):
    """``value`` (ROWS,), or NaN for a row whose z-score is undefined: a logit ±inf or NaN makes
    ``row_stats``' std NaN, and the GPU's max() would otherwise drop the NaNs it spreads."""
    return tl.where((sd_s == sd_s) & (sd_t == sd_t), value, float("nan"))


@triton.jit
def load_logit_at(
    ptr, row_off, col, rmask, sc, of, k, mean, sd, eps,
    HAS_SCALE: tl.constexpr, ZSCORE: tl.constexpr,
):  # fmt: skip
    """``load_at``, z-scored like ``load_logits``: ``(ROWS,)``."""
    x = load_at(ptr, row_off, col, rmask, sc, of, HAS_SCALE)
    if ZSCORE:
        d = sd + eps
        x = tl.where(d == 0, 0.0, (x - k - mean) / tl.where(d == 0, 1.0, d))
    return x


@triton.jit
def row_stats(
    ptr, row_off, rmask, C, sc, of, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """Per-row shift K (the first logit), mean of x - K and unbiased std, in one pass.

    Each block's mean and squared deviations are exact within the block and merged with Chan's
    parallel formula, which stays accurate where sum/sum-of-squares would cancel (logits far from
    0). Shifting by the first logit makes a constant row give mean 0 and std 0 exactly, so it
    standardizes to exact zeros (a uniform softmax), as METHODS.md requires.
    """
    k = load_at(ptr, row_off, tl.zeros([ROWS], tl.int64), rmask, sc, of, HAS_SCALE)
    mean = tl.zeros([ROWS], tl.float32)
    m2 = tl.zeros([ROWS], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = rmask[:, None] & (cols < C)[None, :]
        y = tl.where(mask, load_tile(ptr, row_off, cols, mask, sc, of, HAS_SCALE) - k[:, None], 0.0)
        n_a = start * 1.0
        n_b = tl.minimum(C - start, BLOCK) * 1.0
        b_mean = tl.sum(y, axis=1) / n_b
        dev = tl.where(mask, y - b_mean[:, None], 0.0)
        delta = b_mean - mean
        mean = mean + delta * (n_b / (n_a + n_b))
        m2 = m2 + tl.sum(dev * dev, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    sd = tl.sqrt(m2 / (C * 1.0 - 1.0))
    return k, mean, sd


@triton.jit
def online_step(m, x):
    """Raise the running max ``m`` (ROWS,) with tile ``x`` (-inf where masked).

    Returns the new max, the factor ``alpha`` that rescales sums kept against the old max, and
    ``exp(x - m_new)`` (0 where masked).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    return m_new, alpha, e


@triton.jit
def log_add_exp(x, y):
    """log(exp(x) + exp(y)) elementwise, finite for finite inputs."""
    m = tl.maximum(x, y)
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x (Goldberg's trick: the rounding of 1 + x cancels out)."""
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * (x / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) = -log(sigmoid(-x)), accurate in both tails."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def shift_of(m_old, m_new):
    # m_old - m_new, or 0 while nothing was accumulated (m_old = -inf, the sums are 0 then);
    # never -inf - -inf, even in the branch where() discards.
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.where(m_old == float("-inf"), 0.0, m_old - m_new)


@triton.jit
def online_kl(m_a, s_a, m_b, s_b, w, a, b, mask):
    """One block of the online KL(softmax(a) || softmax(b)) over (ROWS, BLOCK) tiles ``a``, ``b``.

    Keeps ``w = Σ exp(a - m_a) · ((a - m_a) - (b - m_b))`` against the running maxes, so that
    ``KL = w / s_a - log s_a + log s_b`` is a sum of range-sized terms, not of absolute-level
    ones (a student equal to its teacher gives ~0 to the rounding of the range, and C = 1 exactly
    0). Also returns the rescale factors and exponentials, for the caller's other weighted sums.
    """
    m_a_new, alpha_a, e_a = online_step(m_a, tl.where(mask, a, float("-inf")))
    m_b_new, alpha_b, e_b = online_step(m_b, tl.where(mask, b, float("-inf")))
    shift = shift_of(m_a, m_a_new) - shift_of(m_b, m_b_new)
    ca = a - tl.where(m_a_new == float("-inf"), 0.0, m_a_new)[:, None]
    cb = b - tl.where(m_b_new == float("-inf"), 0.0, m_b_new)[:, None]
    # e_a > 0: a -inf teacher logit (p = 0) adds 0, not 0 * -inf = NaN, as 0 log 0 = 0.
    w = alpha_a * (w + s_a * shift) + tl.sum(tl.where(mask & (e_a > 0), e_a * (ca - cb), 0.0), 1)
    s_a = s_a * alpha_a + tl.sum(e_a, axis=1)
    s_b = s_b * alpha_b + tl.sum(e_b, axis=1)
    return m_a_new, s_a, m_b_new, s_b, w, alpha_a, e_a, alpha_b, e_b
