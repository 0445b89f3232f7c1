"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

    b = [p_y, 1 - p_y] at T;  p̂ = softmax of the C - 1 non-target logits / T
    TCKD = T² · mean_b KL(b^T || b^S),   NCKD = T² · mean_b KL(p̂^T || p̂^S)
    total = ce_weight · CE + min(epoch / warmup, 1) · (alpha · TCKD + beta · NCKD)   (epochs from 1)

Defaults alpha 1, beta 8, T 4, ce_weight 1, warm-up 20 epochs (the official configs use beta 2 for
resnet56→resnet20 and resnet110→resnet32, 6 for vgg13→vgg8, vgg13→MobileNetV2, wrn40_2→wrn16_2
and wrn40_2→wrn40_1). The parts come from ``dkd_rows`` in log space, so ±100 logits at T = 1
stay finite (the official code's log of summed probabilities does not). The ``DKD`` module also
carries ``ls+dkd`` (z-score in front) and ``ctkd+dkd`` (a learned temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import MethodError
from pipeline.kernels import dkd_ce, dkd_rows
from pipeline.methods.base import (
    Method,
    MethodContext,
    as_temperature,
    check_inputs,
    check_number,
    check_temperatures,
    tau_term,
)
from pipeline.transforms import Temperature, ZScore, zscore_inputs


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: Temperature = 4.0,
) -> torch.Tensor:
    """``alpha · TCKD + beta · NCKD`` (each T²-scaled), batch mean: a scalar.

    Args:
        student: (B, C) float32/float64 logits, C >= 2.
        teacher: (B, C) raw teacher logits.
        target: (B,) class indices.
        temperature: a float or a (B,) tensor; gets a gradient when it requires one (CTKD).
    """
    check_inputs(student, teacher, target, min_classes=2, who="DKD")
    check_temperatures(student.shape[0], temperature=temperature)
    alpha, beta = check_number("alpha", alpha, 0.0), check_number("beta", beta, 0.0)
    tckd, nckd = dkd_rows(student, teacher, target, temperature, target_checked=True)
    return (alpha * tckd + beta * nckd).mean()


class DKD(Method):
    """DKD as a training loss: ``{"ce", "tckd", "nckd", "total"}`` (``"tau"`` when learned).

    ``tckd`` and ``nckd`` are the unweighted T²-scaled batch means; ``total`` applies alpha,
    beta, the warm-up factor and ce_weight.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float | nn.Module = 4.0,
        ce_weight: float = 1.0,
        warmup: int = 20,
        zscore: ZScore | None = None,
    ) -> None:
        """
        Args:
            alpha, beta: weights of TCKD and NCKD.
            temperature: a fixed T, or a module ``(student, teacher, ctx) -> tau`` (CTKD).
            ce_weight: weight of the cross-entropy (not warmed up).
            warmup: epochs over which the DKD term ramps linearly to full weight; 0 = none.
            zscore: standardize both logits before the temperature (logit standardization).
        """
        super().__init__()
        self.alpha = check_number("alpha", alpha, 0.0)
        self.beta = check_number("beta", beta, 0.0)
        self.temperature = as_temperature(temperature)
        self.ce_weight = check_number("ce_weight", ce_weight, 0.0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise MethodError(f"warmup must be a whole number of epochs >= 0, got {warmup!r}")
        self.warmup = warmup
        self.zscore = zscore

    def warmup_factor(self, ctx: MethodContext) -> float:
        """min(epoch / warmup, 1) with epochs counted from 1, as the official code does."""
        return 1.0 if self.warmup == 0 else min((ctx.epoch + 1) / self.warmup, 1.0)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        check_inputs(student, teacher, target, min_classes=2, who="DKD")
        tau = self.temperature(student, teacher, ctx)  # float, or (1,) / (B,) when learned
        s, t, zs, eps = zscore_inputs(self.zscore, student, teacher)
        warm = self.warmup_factor(ctx)
        if s is student:  # raw logits in (z-score, if any, inside): one call, fused on CUDA
            weights = self.ce_weight, warm * self.alpha, warm * self.beta
            total, ce, tckd, nckd = dkd_ce(
                s, t, target, tau, *weights, zs, eps, target_checked=True
            )
        else:  # the population-std z-score, done here: the cross-entropy takes the raw logits
            tckd_rows, nckd_rows = dkd_rows(s, t, target, tau, zs, eps, target_checked=True)
            tckd, nckd = tckd_rows.mean(), nckd_rows.mean()
            ce = F.cross_entropy(student, target)
            total = self.ce_weight * ce + warm * (self.alpha * tckd + self.beta * nckd)
        return tau_term({"ce": ce, "tckd": tckd, "nckd": nckd, "total": total}, tau)
