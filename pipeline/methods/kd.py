"""KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015).

    L_kd  = T² · mean_b KL(softmax(t_b / T) || softmax(s_b / T))
    total = ce_weight · CE(s, y) + kd_weight · L_kd            defaults T 4, ce 0.1, kd 0.9

The ``KD`` module also carries the compositions that change only KD's inputs: a z-score in front
(``ls+kd``, logit standardization) and a learned temperature in place of T (``ctkd+kd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import kd_ce, kd_rows
from pipeline.methods.base import (
    Method,
    MethodContext,
    as_temperature,
    check_inputs,
    check_number,
    check_target,
    check_temperatures,
    tau_term,
)
from pipeline.transforms import Temperature, ZScore, zscore_inputs


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: Temperature = 4.0
) -> torch.Tensor:
    """T²-scaled KL(teacher || student) at temperature T, batch mean: a scalar.

    Args:
        student: (B, C) float32/float64 logits.
        teacher: (B, C) raw teacher logits (float16/bfloat16/float32/float64).
        temperature: a float or a (B,) tensor (T² then applies per sample, before the mean).
    """
    check_inputs(student, teacher)
    check_temperatures(student.shape[0], temperature=temperature)
    return kd_rows(student, teacher, temperature).mean()


class KD(Method):
    """KD as a training loss: ``{"ce", "kd", "total"}`` (and ``"tau"`` when it is learned)."""

    def __init__(
        self,
        *,
        temperature: float | nn.Module = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        zscore: ZScore | None = None,
    ) -> None:
        """
        Args:
            temperature: a fixed T, or a module ``(student, teacher, ctx) -> tau`` (CTKD).
            ce_weight, kd_weight: weights of the cross-entropy and of the T²-scaled KD term.
            zscore: standardize both logits before the temperature (logit standardization).
        """
        super().__init__()
        self.temperature = as_temperature(temperature)
        self.ce_weight = check_number("ce_weight", ce_weight, 0.0)
        self.kd_weight = check_number("kd_weight", kd_weight, 0.0)
        self.zscore = zscore

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        check_inputs(student, teacher)
        s, t, zs, eps = zscore_inputs(self.zscore, student, teacher)
        if s is not student:  # kd_ce checks the targets it reads (in its kernel on CUDA)
            check_target(target, student.shape[0], student.shape[1])
        tau = self.temperature(student, teacher, ctx)  # float, or (1,) / (B,) when learned
        weights = self.ce_weight, self.kd_weight
        if s is student:  # raw logits in (z-score, if any, inside): one call, fused on CUDA
            total, ce, kd = kd_ce(s, t, target, tau, *weights, zs, eps)
        else:  # the population-std z-score, done here: the cross-entropy takes the raw logits
            kd = kd_rows(s, t, tau, zscore=zs, eps=eps).mean()
            ce = F.cross_entropy(student, target)
            total = self.ce_weight * ce + self.kd_weight * kd
        return tau_term({"ce": ce, "kd": kd, "total": total}, tau)
