"""Inputs shared by the method tests: small seeded batches, float64 unless asked."""

from __future__ import annotations

import torch

from pipeline.methods import Method


def batch(
    rows: int = 5, classes: int = 7, seed: int = 0, dtype: torch.dtype = torch.float64, scale=3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student, teacher, target): logits ~ N(0, scale²), targets in [0, classes)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    return student, teacher, target


def teacher_for(method: Method, teacher: torch.Tensor) -> torch.Tensor:
    """PS-KD takes previous-epoch probabilities where the other methods take logits."""
    if method.teacher_input == "probabilities":
        return torch.softmax(teacher, dim=1)
    return teacher
