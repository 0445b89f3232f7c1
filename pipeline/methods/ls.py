"""Logit standardization: Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).

    Z(z)  = (z - mean(z)) / (std(z) + eps)      per row; unbiased std, eps = 1e-7 (official code)
    L_ls  = tau² · mean_b KL(softmax(Z(t) / tau) || softmax(Z(s) / tau))
    total = 0.1 · CE(raw s, y) + 9 · L_ls       base temperature tau = 2

LS is a modifier in front of KD, DKD or CTKD: the z-score itself lives once in
``pipeline.transforms.standardize`` (re-exported here) and the training losses are ``KD``/``DKD``
with a ``ZScore`` (see ``pipeline.methods.compose``). The paper's Algorithm 1 uses the population
std and no eps: ``standardize(z, eps=0.0, unbiased=False)``, or ``population_std: true`` in a
method config.
"""

from __future__ import annotations

import torch

from pipeline.kernels import kd_rows
from pipeline.methods.base import check_inputs, check_temperatures
from pipeline.transforms import Temperature, standardize

__all__ = ["ls_kd_loss", "standardize"]


def ls_kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: Temperature = 2.0
) -> torch.Tensor:
    """KD between z-scored logits at base temperature tau, T²-scaled, batch mean: a scalar.

    Args:
        student: (B, C) float32/float64 logits, C >= 2.
        teacher: (B, C) raw teacher logits.
        temperature: a float or a (B,) tensor.
    """
    check_inputs(student, teacher, min_classes=2, who="logit standardization")
    check_temperatures(student.shape[0], temperature=temperature)
    return kd_rows(student, teacher, temperature, zscore=True).mean()
