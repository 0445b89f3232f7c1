"""What every method shares: the call context, the module base class, input and value checks.

A method is an ``nn.Module`` called as ``method(student_logits, teacher_logits, target, ctx)``
that returns a dict of named scalar terms and ``"total"`` (the loss to backpropagate). Being a
module lets learned parts (CTKD's temperature) reach the student's optimizer through
``method.parameters()``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import MethodError
from pipeline.kernels import reference
from pipeline.transforms import Temperature, check_temperature

STUDENT_DTYPES = (torch.float32, torch.float64)
TEACHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MethodContext:
    """Where training stands when a method is called.

    Epochs are 0-based here, as in ``for epoch in range(num_epochs)``; each method converts to
    its paper's convention (DKD's warm-up and CTKD's curriculum count from 1, PS-KD from 0).
    """

    epoch: int = 0
    """0-based index of the current epoch."""
    num_epochs: int = 1
    """Length of the run (PS-KD's schedule reaches alpha_T at the last epoch)."""
    step: int = 0
    """Global optimizer step (for logging; no method here depends on it)."""

    def __post_init__(self) -> None:
        for name in ("epoch", "num_epochs", "step"):  # a float epoch would warm DKD up halfway
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise MethodError(f"{name} must be a whole number, got {value!r}")
        if self.num_epochs < 1:
            raise MethodError(f"num_epochs must be >= 1, got {self.num_epochs}")
        # Past num_epochs is left to the methods whose schedule ends there (PS-KD refuses it):
        # KD or DKD called with epoch=30 alone keeps num_epochs' default of 1.
        if self.epoch < 0:
            raise MethodError(f"epoch must be >= 0 (0-based), got {self.epoch}")
        if self.step < 0:
            raise MethodError(f"step must be >= 0, got {self.step}")


class Method(nn.Module):
    """Base of the registry's modules. ``teacher_input`` says what the second argument holds."""

    #: "logits": raw teacher logits from the store; "probabilities": PS-KD's previous-epoch
    #: softmax outputs of the student itself (from the self-teacher store).
    teacher_input: str = "logits"

    def forward(  # pragma: no cover - every method overrides it
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class FixedTemperature(nn.Module):
    """A constant temperature, with the same call as CTKD's learned ones: (s, t, ctx) -> T."""

    def __init__(self, value: float) -> None:
        super().__init__()
        check_temperature("temperature", value)
        self.value = float(value)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, ctx: MethodContext) -> float:
        return self.value

    def extra_repr(self) -> str:
        return f"{self.value}"


def as_temperature(value: float | nn.Module) -> nn.Module:
    """A float becomes a ``FixedTemperature``; a module (CTKD) is used as it is."""
    return value if isinstance(value, nn.Module) else FixedTemperature(value)


def check_student(student: torch.Tensor) -> int:
    """Refuse anything but float32/float64 (B, C) student logits; returns C."""
    if not isinstance(student, torch.Tensor) or student.dim() != 2:
        shape = tuple(student.shape) if isinstance(student, torch.Tensor) else type(student)
        raise MethodError(f"student logits must be a (B, C) tensor, got {shape}")
    if student.dtype not in STUDENT_DTYPES:
        raise MethodError(
            f"student logits must be float32 (or float64), got {student.dtype}: "
            "call .float() on them (e.g. after autocast)"
        )
    if student.shape[0] == 0:  # the batch mean of no rows is NaN
        raise MethodError("student logits hold no rows (B = 0): a loss needs a batch of 1 or more")
    return student.shape[1]


def check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    min_classes: int = 1,
    who: str = "this method",
    teacher_name: str = "teacher",
) -> None:
    """Shapes, dtypes and (on CPU) target range of a method's inputs; MethodError otherwise.
    ``teacher_name`` names the second tensor in the messages (PS-KD's is ``prev_probs``)."""
    classes = check_student(student)
    if classes < min_classes:
        raise MethodError(f"{who} needs C >= {min_classes} classes, got C = {classes}")
    if not isinstance(teacher, torch.Tensor) or teacher.shape != student.shape:
        shape = tuple(teacher.shape) if isinstance(teacher, torch.Tensor) else type(teacher)
        raise MethodError(
            f"{teacher_name} must have the student's shape {tuple(student.shape)}, got {shape}"
        )
    if teacher.dtype not in TEACHER_DTYPES:
        hint = " (decode int8 first: pipeline.kernels.decode_teacher)" * (
            teacher.dtype == torch.int8
        )
        raise MethodError(
            f"{teacher_name} must be float16/bf16/float32/64, not {teacher.dtype}{hint}"
        )
    if target is not None:
        check_target(target, student.shape[0], classes)


def check_target(target: torch.Tensor, batch: int, classes: int) -> None:
    """Targets (B,) of integer classes in [0, C); the range is checked without a host sync."""
    reference.check_target(target, batch, classes)


def check_number(
    name: str, value: object, low: float, *, strict: bool = False, high: float | None = None
) -> float:
    """``value`` as a float, refused unless it is a finite number >= low (> low when ``strict``)
    and, with ``high``, <= high."""
    if high is not None:
        want = f"a number in {'(' if strict else '['}{low:g}, {high:g}]"
    elif low == -math.inf:
        want = "a finite number"
    else:
        want = f"a finite number {'>' if strict else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{name} must be {want}, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**62:  # past a float's range, or near it
        raise MethodError(f"{name} must be {want}, got a {len(str(abs(value)))}-digit number")
    above = value > low if strict else value >= low  # False for NaN
    if not (above and math.isfinite(value) and (high is None or value <= high)):
        raise MethodError(f"{name} must be {want}, got {value}")
    return float(value)


def check_temperatures(batch: int, **temps: Temperature) -> None:
    for name, value in temps.items():
        check_temperature(name, value, batch)


def tau_term(terms: dict[str, torch.Tensor], tau: Temperature) -> dict[str, torch.Tensor]:
    """Adds a learned temperature's batch mean as ``"tau"`` (detached: for logging only)."""
    if isinstance(tau, torch.Tensor):
        terms["tau"] = tau.detach().mean()
    return terms
