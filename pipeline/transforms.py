"""Load-time transforms of raw teacher/student logits, written once and shared by every method.

The store keeps raw logits; each method applies its own transform on the device when it computes
its loss (METHODS.md, "All methods read the raw teacher logits"):

- temperature, a float or one per sample:  z / T           (T: float, 0-d, (1,) or (B,) tensor)
- asymmetric temperature (ATS, Li et al., NeurIPS 2022):   z_c / tau_c,  tau_c = tau1 if c == y
  else tau2
- z-score (logit standardization, Sun et al., CVPR 2024):  (z - mean(z)) / (std(z) + eps) per row

Temperatures are validated here too (``check_temperature``), so every method refuses a
non-positive temperature with the same one-line ``MethodError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import MethodError

Temperature = float | torch.Tensor


def check_temperature(name: str, value: Temperature, batch: int | None = None) -> None:
    """Refuse a temperature that is not finite and > 0, or a tensor not 0-d, (1,) or (batch,).

    A CUDA tensor's values are checked on the device (``torch._assert_async``: a device-side
    assert, as PyTorch's cross-entropy's for a bad target; a readable check would cost a host
    sync per step), except a learned one's (one that requires grad: CTKD's, > 1 by
    construction), which would cost launches every training step.
    """
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MethodError(f"{name} must be a number > 0 or a tensor, got {value!r}")
        if isinstance(value, int) and value > 2**62:  # past (or near) a float's range
            raise MethodError(
                f"{name} must be a finite number > 0, got a {len(str(value))}-digit number"
            )
        if not (value > 0 and math.isfinite(value)):  # also refuses NaN
            raise MethodError(f"{name} must be a finite number > 0, got {value}")
        return
    if not value.dtype.is_floating_point:
        raise MethodError(f"{name} must be a floating-point tensor, got {value.dtype}")
    sizes = (1,) if batch is None else (1, batch)
    if value.dim() > 1 or value.numel() not in sizes:
        want = "a 0-d or (1,) tensor" if batch is None else f"a 0-d, (1,) or ({batch},) tensor"
        raise MethodError(f"{name} must be a float or {want}, got shape {tuple(value.shape)}")
    if value.is_cuda and value.requires_grad:
        return
    ok = (value.detach() > 0) & (value.detach() < math.inf)  # NaN fails both
    if value.is_cuda:
        torch._assert_async(ok.all(), f"{name} must be finite and > 0")
    elif not bool(ok.all()):
        bad = value.detach().reshape(-1)[~ok.reshape(-1)][0].item()
        raise MethodError(f"{name} must be finite and > 0, got {bad:.6g}")


def temperature_column(temperature: Temperature) -> Temperature:
    """A float stays a float; a tensor becomes a (B, 1) or (1, 1) column (autograd kept).

    The column broadcasts against (B, C) logits, and its square against (B, 1) row sums, so one
    code path serves the fixed, the global learned and the per-sample temperature.
    """
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(-1, 1)
    return float(temperature)


def apply_temperature(
    logits: torch.Tensor, temperature: Temperature, *, teacher: bool = False
) -> torch.Tensor:
    """``logits / T`` with T a float or a 0-d/(1,)/(B,) tensor: (B, C). ``teacher``: the logits
    are data that may hold -inf (p = 0), kept out of a learned T's gradient (``_divided``)."""
    column = temperature_column(temperature)
    return _divided(logits, column) if teacher else logits / column


def _divided(logits: torch.Tensor, column: torch.Tensor | float) -> torch.Tensor:
    """``logits / column``; for a temperature that requires a gradient, a -inf logit (p = 0)
    stays -inf and gives T no gradient, where plain division's would be 0 · inf = NaN. (Three
    more ops: only for teacher logits, and only under a learned temperature.)"""
    if not (isinstance(column, torch.Tensor) and column.requires_grad):
        return logits / column
    finite = torch.isfinite(logits)
    return torch.where(finite, torch.where(finite, logits, 0.0) / column, logits)


def squared(temperature: Temperature) -> Temperature:
    """T² as a float, or as a (B,) / (1,) tensor to multiply per-row losses before the mean."""
    if isinstance(temperature, torch.Tensor):
        return temperature.reshape(-1) ** 2
    return float(temperature) ** 2


def asymmetric_temperature(
    logits: torch.Tensor, target: torch.Tensor, tau1: Temperature, tau2: Temperature
) -> torch.Tensor:
    """ATS: the target logit divided by tau1, every other logit by tau2: (B, C).

    One softmax over the result is ATS's teacher distribution p_ats.
    """
    classes = logits.shape[1]
    is_target = torch.arange(classes, device=logits.device)[None, :] == target[:, None]  # (B, C)
    col1, col2 = temperature_column(tau1), temperature_column(tau2)
    # torch.where keeps autograd for tensor temperatures; python floats broadcast as scalars.
    return torch.where(is_target, _divided(logits, col1), _divided(logits, col2))


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 2**62:
        raise MethodError(f"eps must be a finite number >= 0, got {eps!r}")


def standardize(logits: torch.Tensor, eps: float = 1e-7, *, unbiased: bool = True) -> torch.Tensor:
    """Z-score per row: ``(z - mean(z)) / (std(z) + eps)``: (B, C).

    Args:
        logits: (B, C).
        eps: added to the std. The official logit-standardization code uses 1e-7.
        unbiased: the N - 1 std of the official code (default); False with ``eps=0`` is the
            paper's Algorithm 1 (population std, no eps).

    A constant row gives zeros (a uniform softmax), never NaN: the std's square root is taken
    only where the variance is positive (torch.std's gradient at 0 is NaN). Its gradient is then
    that of ``(z - mean(z)) / eps``, as in the official code: finite, 1/eps (1e7 at the
    default eps) times the centered upstream gradient, and zero with ``eps=0``.
    A row holding ±inf or NaN has no mean or std: it standardizes to NaN (whatever ``eps``), as
    the fused kernels' terms are, so a loss on it is NaN and training stops on it; a diverging
    student reaches the training loop's divergence check this way too.
    """
    check_eps(eps)
    classes = logits.shape[-1]
    if classes < 2:
        raise MethodError(f"standardization needs 2 classes or more, got {classes}")
    centered = logits - logits.mean(dim=-1, keepdim=True)  # (B, C)
    var = centered.square().sum(dim=-1, keepdim=True) / (classes - 1 if unbiased else classes)
    positive = var > 0
    # var is NaN for a row holding ±inf or NaN: it stays NaN (not the 0 of a constant row).
    std = torch.where(
        positive, torch.where(positive, var, 1.0).sqrt(), torch.where(var == 0, 0.0, var)
    )
    denom = std + eps  # (B, 1)
    # Only reachable with eps = 0: a constant row is all zeros, not 0 / 0.
    zero = denom == 0
    return torch.where(zero, 0.0, centered / torch.where(zero, 1.0, denom))


@dataclass(frozen=True)
class ZScore:
    """How a method standardizes logits before its temperature (logit standardization).

    ``unbiased=True`` (the official code) is passed to the loss kernels as ``zscore=True`` so a
    fused kernel can standardize in registers; the paper's population std is applied here first.
    """

    eps: float = 1e-7
    unbiased: bool = True

    def __post_init__(self) -> None:
        check_eps(self.eps)

    def kernel_inputs(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
        """(student, teacher, zscore, eps) arguments for ``kd_rows``/``dkd_rows``."""
        if self.unbiased:
            return student, teacher, True, self.eps
        teacher = teacher.detach()
        teacher = teacher.to(torch.promote_types(teacher.dtype, torch.float32))  # half → float32
        z_s = standardize(student, self.eps, unbiased=False)
        return z_s, standardize(teacher, self.eps, unbiased=False), False, self.eps


def zscore_inputs(
    zscore: ZScore | None, student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
    """``kd_rows``/``dkd_rows`` arguments (student, teacher, zscore, eps), raw when ``None``."""
    if zscore is None:
        return student, teacher, False, ZScore.eps
    return zscore.kernel_inputs(student, teacher)
