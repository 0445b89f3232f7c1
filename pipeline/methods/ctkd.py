"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023).

    tau = t_start + t_range · sigmoid(theta)        1 + 20 · sigmoid(theta) ∈ (1, 21), theta0 = 1
    GRL: identity forward, gradient × (-λ_e) backward    (tau is trained to *maximize* the loss)
    λ_e = λ_min + ½(λ_max - λ_min)(1 + cos((1 + min(e, E) / E) · π))     E = 10, epochs from 1

The learned tau replaces the fixed T of KD (``ctkd+kd``: 0.1 · CE + 0.9 · KD at tau) or of DKD
(``ctkd+dkd``: 1 · CE + DKD with alpha 1, beta 2, no warm-up). theta lives in the method module,
so the student's optimizer (same schedule, weight decay 5e-4) trains it via
``method.parameters()``. Variants: ``global`` (one theta) and ``instance`` (a 2-layer MLP on the
concatenated teacher and student logits, one tau per sample; T² then applies per sample).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import MethodError
from pipeline.methods.base import MethodContext, check_number

VARIANTS = ("global", "instance")


def curriculum_lambda(
    epoch: int, max_epochs: int = 10, *, lambda_min: float = 0.0, lambda_max: float = 1.0
) -> float:
    """GRL strength λ_e for epoch ``epoch`` (counted from 1): a cosine rise to λ_max at E."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise MethodError(f"epoch must be a whole number >= 0 (counted from 1), got {epoch!r}")
    _check_length("curriculum max_epochs", max_epochs)
    progress = min(epoch, max_epochs) / max_epochs
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1 + math.cos((1 + progress) * math.pi))


def _check_length(name: str, epochs: object) -> None:
    """Refuse a curriculum length E that is not a whole number >= 1, named as the caller spells
    it (``curriculum_epochs``, the config key, or ``curriculum_lambda``'s ``max_epochs``)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MethodError(f"{name} must be a whole number >= 1, got {epochs!r}")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad, None


def gradient_reversal(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Identity forward; the backward gradient is multiplied by ``-lambda_``."""
    return _GradientReversal.apply(x, lambda_)


class GlobalTemperature(nn.Module):
    """One learned temperature: ``forward(student, teacher, lambda_) -> tau`` of shape (1,)."""

    def __init__(self, *, t_start: float = 1.0, t_range: float = 20.0, theta0: float = 1.0):
        super().__init__()
        self.t_start = check_number("t_start", t_start, 0.0, strict=True)
        self.t_range = check_number("t_range", t_range, 0.0)
        self.theta = nn.Parameter(torch.full((1,), check_number("theta0", theta0, -math.inf)))

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, lambda_: float = 1.0
    ) -> torch.Tensor:
        theta = gradient_reversal(self.theta, lambda_)
        return self.t_start + self.t_range * torch.sigmoid(theta)  # (1,)


class InstanceTemperature(nn.Module):
    """One learned temperature per sample from a 2-layer MLP on [teacher, student] logits: (B,).

    The MLP reads the logits as data (detached), so the reversed gradient trains the MLP only and
    never reaches the student through the MLP's input. Its last layer starts at zero weights and
    bias theta0, so every sample starts at the global variant's tau0 ≈ 15.62.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        hidden: int = 256,
        t_start: float = 1.0,
        t_range: float = 20.0,
        theta0: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise MethodError(f"instance-wise CTKD needs num_classes >= 1, got {num_classes!r}")
        self.t_start = check_number("t_start", t_start, 0.0, strict=True)
        self.t_range = check_number("t_range", t_range, 0.0)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, check_number("theta0", theta0, -math.inf))

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, lambda_: float = 1.0
    ) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        if 2 * student.shape[-1] != self.mlp[0].in_features:
            raise MethodError(
                f"instance-wise CTKD was built for {self.mlp[0].in_features // 2} classes, got "
                f"logits of {student.shape[-1]}: build it with num_classes={student.shape[-1]}"
            )
        x = torch.cat([teacher.detach().to(dtype), student.detach().to(dtype)], dim=1)  # (B, 2C)
        theta = gradient_reversal(self.mlp(x)[:, 0], lambda_)  # (B,)
        return self.t_start + self.t_range * torch.sigmoid(theta)


class CurriculumTemperature(nn.Module):
    """A learned temperature driven by the GRL curriculum: ``(student, teacher, ctx) -> tau``.

    This is the call ``KD``/``DKD`` make on their temperature, so CTKD plugs into either.
    """

    def __init__(self, predictor: nn.Module, curriculum_epochs: int = 10) -> None:
        super().__init__()
        _check_length("curriculum_epochs", curriculum_epochs)  # the method option's name
        self.predictor = predictor
        self.curriculum_epochs = curriculum_epochs

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, ctx: MethodContext
    ) -> torch.Tensor:
        lambda_ = curriculum_lambda(ctx.epoch + 1, self.curriculum_epochs)  # ctx is 0-based
        return self.predictor(student, teacher, lambda_)


def learned_temperature(
    variant: str = "global",
    num_classes: int | None = None,
    *,
    t_start: float = 1.0,
    t_range: float = 20.0,
    theta0: float = 1.0,
    curriculum_epochs: int = 10,
) -> CurriculumTemperature:
    """CTKD's temperature for ``KD``/``DKD``; ``instance`` needs ``num_classes``."""
    kw = {"t_start": t_start, "t_range": t_range, "theta0": theta0}
    if variant == "global":
        predictor: nn.Module = GlobalTemperature(**kw)
    elif variant == "instance":
        if num_classes is None:
            raise MethodError(
                "instance-wise CTKD needs num_classes (build_method(..., num_classes=C))"
            )
        predictor = InstanceTemperature(num_classes, **kw)
    else:
        raise MethodError(f"CTKD variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return CurriculumTemperature(predictor, curriculum_epochs)
