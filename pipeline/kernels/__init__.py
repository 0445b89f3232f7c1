"""Loss kernels: the PyTorch reference (any device) and fused Triton kernels (CUDA), one API.

    from pipeline.kernels import decode_teacher, kd_rows, dkd_rows, ats_rows
    kd_rows(student, teacher, temperature, zscore=False, eps=1e-7, *, scale=None, offset=None,
            impl="auto")                                        -> (B,)
    kd_ce(student, teacher, target, temperature, ce_weight, kd_weight, zscore=False, eps=1e-7,
          ...)                                      -> (total, ce, kd) batch means, 0-d each
    dkd_rows(student, teacher, target, temperature, zscore=False, eps=1e-7, ...) -> (tckd, nckd)
    dkd_ce(student, teacher, target, temperature, ce_weight, tckd_weight, nckd_weight, ...)
                                                -> (total, ce, tckd, nckd) batch means, 0-d each
    ats_rows(student, teacher, target, tau1, tau2, student_temperature, ...)     -> (B,)
    ats_ce(student, teacher, target, tau1, tau2, student_temperature, ce_weight, ats_weight,
           ...)                                     -> (total, ce, ats) batch means, 0-d each
    decode_teacher(teacher, scale=None, offset=None, *, impl="auto")            -> float32 (B, C)

The formulas and signatures are those of ``pipeline.kernels.reference``; this module only picks
who computes them. ``impl``:

- ``"auto"`` (default): the fused Triton kernel when every tensor is on CUDA, triton imports and
  the kernel supports the call; otherwise the reference. The environment variable
  ``LOGITBANK_KERNELS`` (``auto``/``reference``/``triton``) sets what ``"auto"`` means, so
  ``LOGITBANK_KERNELS=reference`` turns the fused kernels off everywhere without code changes.
- ``"reference"``: PyTorch (an int8 teacher is decoded with ``scale``/``offset`` first).
- ``"triton"``: the fused kernel or a ``MethodError`` saying why not. CPU tensors work only under
  triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the
  tests check the kernels without a GPU.

Calls the fused kernels do not support, which ``"auto"`` explicitly sends to the reference:
float64 (or other non-float32/16/bfloat16) students, teachers in other dtypes, and ATS
temperatures that require a gradient. Fused losses are float32 whatever the student dtype; their
gradients have the student's dtype. Teacher logits never get a gradient (they are data).

Neither triton nor the reference is imported until first used, so ``import pipeline.kernels``
works on machines without triton.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import os
from types import ModuleType

import torch

from pipeline.errors import MethodError
from pipeline.transforms import check_eps, check_temperature

__all__ = [
    "ENV_VAR",
    "IMPLS",
    "ats_ce",
    "ats_rows",
    "decode_teacher",
    "dkd_ce",
    "dkd_rows",
    "kd_ce",
    "kd_rows",
    "resolve_impl",
    "triton_available",
]

IMPLS = ("auto", "reference", "triton")
ENV_VAR = "LOGITBANK_KERNELS"

FUSED_STUDENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Why ATS temperatures that require a gradient go to the reference (its kernels give none).
_ATS_TEMPERATURE_GRADS = "ATS temperatures that require a gradient"
FUSED_TEACHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


@functools.cache  # import_module costs microseconds a call, and this is on every step's path
def _reference() -> ModuleType:
    return importlib.import_module("pipeline.kernels.reference")


@functools.cache
def _fused(name: str) -> ModuleType:
    return importlib.import_module(f"pipeline.kernels.triton_{name}")


@functools.cache
def triton_available() -> bool:
    """Whether triton and the fused kernel modules import (cached for the process)."""
    try:
        _fused("common")
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _interpreted() -> bool:
    return _fused("common").interpreted()


def resolve_impl(impl: str, tensors: tuple[torch.Tensor, ...], unsupported: str | None) -> str:
    """``"triton"`` or ``"reference"`` for a call on ``tensors``.

    Args:
        impl: ``"auto"``, ``"reference"`` or ``"triton"`` as passed by the caller.
        tensors: the call's tensor arguments (their devices decide ``"auto"``).
        unsupported: why the fused kernel cannot take this call, or None when it can.
    """
    if impl not in IMPLS:
        raise MethodError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if impl not in IMPLS:
            raise MethodError(f"{ENV_VAR} must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        ok = on_cuda and unsupported is None and triton_available()
        return "triton" if ok else "reference"
    if not triton_available():
        raise MethodError("impl='triton' but triton does not import here (pip install triton)")
    if unsupported is not None:
        raise MethodError(f"impl='triton' cannot take this call: {unsupported}")
    if not on_cuda and not _interpreted():
        raise MethodError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"


def _why_unsupported(student: torch.Tensor | None, teacher: torch.Tensor) -> str | None:
    if student is not None and student.dtype not in FUSED_STUDENT_DTYPES:
        return f"{student.dtype} student logits (fused kernels compute in float32)"
    if teacher.dtype not in FUSED_TEACHER_DTYPES:
        return f"{teacher.dtype} teacher logits"
    return None


def _decoded(
    teacher: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None
) -> torch.Tensor:
    return _reference().decode_teacher(teacher, scale, offset)


def _tensors(*values: object) -> tuple[torch.Tensor, ...]:
    return tuple(v for v in values if isinstance(v, torch.Tensor))


def _reference_teacher(
    impl: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    temperatures: dict[str, float | torch.Tensor],
    grad_unsupported: str | None = None,
    *,
    eps: float | None = None,
    weights: dict[str, float] | None = None,
) -> torch.Tensor | None:
    """Where one loss call goes: the teacher decoded to float32 when ``impl`` sends it to the
    PyTorch reference, None when the fused kernel takes it. The student's dtype, the
    temperatures, ``eps`` and the loss ``weights`` are checked first, for either;
    ``grad_unsupported``, when given, sends temperatures that require a gradient to the
    reference, with that reason."""
    if not student.dtype.is_floating_point:
        raise MethodError(
            f"student logits must be floating point (float32 or float64; the fused kernels "
            f"also take float16/bfloat16), got {student.dtype}"
        )
    batch = student.shape[0] if student.dim() else None
    for name, value in temperatures.items():
        # On CUDA a device-side assert (no host sync). Not a learned one (CTKD's, > 1 by
        # construction; the reference checks it off CUDA, the fused kernels' rows_vector its shape).
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            check_temperature(name, value, batch)
    if eps is not None:
        check_eps(eps)
    for name, value in (weights or {}).items():
        if not _finite_non_negative(value):
            raise MethodError(f"{name} must be a finite number >= 0, got {value!r}")
    why = _why_unsupported(student, teacher)
    grads = any(isinstance(v, torch.Tensor) and v.requires_grad for v in temperatures.values())
    if grad_unsupported and grads:
        why = why or grad_unsupported
    tensors = _tensors(student, teacher, target, *temperatures.values(), scale, offset)
    if resolve_impl(impl, tensors, why) != "reference":
        return None
    return _decoded(teacher, scale, offset)


def _finite_non_negative(value: object) -> bool:
    """A loss weight: any real number (numpy's too) that is finite and >= 0, as the methods'."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return value >= 0 and math.isfinite(value)
    except OverflowError:  # an int past a float's range
        return False


def decode_teacher(
    teacher: torch.Tensor,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Stored teacher logits (B, C) as float32; int8 as ``q * scale[:, None] + offset[:, None]``."""
    tensors = _tensors(teacher, scale, offset)
    if resolve_impl(impl, tensors, _why_unsupported(None, teacher)) == "reference":
        return _reference().decode_teacher(teacher, scale, offset)
    return _fused("decode").decode_teacher(teacher, scale, offset)


def kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float | torch.Tensor,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-row ``T² · KL(softmax(t'/T) || softmax(s'/T))`` (x' = z-score(x) if ``zscore``): (B,).

    ``temperature`` is a float or a (B,) tensor (per sample); a tensor that requires grad gets
    one (CTKD), in the fused kernel as in the reference.
    """
    temps = {"temperature": temperature}
    decoded = _reference_teacher(impl, student, teacher, None, scale, offset, temps, eps=eps)
    if decoded is not None:
        return _reference().kd_rows(student, decoded, temperature, zscore=zscore, eps=eps)
    return _fused("kd").kd_rows(
        student, teacher, temperature, zscore, eps, scale=scale, offset=offset
    )


def kd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    ce_weight: float,
    kd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    impl: str = "auto",
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD with its cross-entropy term, as KD-style methods train: 0-d ``(total, ce, kd)``.

    ``ce`` = CE(raw student logits, target) and ``kd`` = mean of ``kd_rows``, both batch means;
    total = ce_weight · ce + kd_weight · kd. Fused, one kernel each way computes all three and
    the whole gradient (no separate cross-entropy pass over the logits). ``target_checked``:
    the caller already checked the targets' range (otherwise the fused forward kernel checks
    them as it reads them, and one assert follows).
    """
    temps = {"temperature": temperature}
    weights = {"ce_weight": ce_weight, "kd_weight": kd_weight}
    decoded = _reference_teacher(
        impl, student, teacher, target, scale, offset, temps, eps=eps, weights=weights
    )
    if decoded is not None:
        return _reference().kd_ce(
            student, decoded, target, temperature, ce_weight, kd_weight, zscore=zscore, eps=eps,
            target_checked=target_checked,
        )  # fmt: skip
    return _fused("kd").kd_ce(
        student, teacher, target, temperature, ce_weight, kd_weight, zscore, eps,
        scale=scale, offset=offset, target_checked=target_checked,
    )  # fmt: skip


def dkd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    impl: str = "auto",
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row DKD parts ``(tckd, nckd)``, each (B,) and scaled by T², in log space.

    TCKD is the binary KL of [p_y, 1 - p_y] (teacher || student); NCKD the KL over the C - 1
    non-target classes, the target column dropped exactly. ``temperature`` as in ``kd_rows``,
    ``target_checked`` as in ``kd_ce``.
    """
    temps = {"temperature": temperature}
    decoded = _reference_teacher(impl, student, teacher, target, scale, offset, temps, eps=eps)
    if decoded is not None:
        return _reference().dkd_rows(
            student, decoded, target, temperature, zscore, eps, target_checked
        )
    return _fused("dkd").dkd_rows(
        student, teacher, target, temperature, zscore, eps, scale=scale, offset=offset,
        target_checked=target_checked,
    )  # fmt: skip


def dkd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float | torch.Tensor,
    ce_weight: float,
    tckd_weight: float,
    nckd_weight: float,
    zscore: bool = False,
    eps: float = 1e-7,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    impl: str = "auto",
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DKD with its cross-entropy, as DKD trains: 0-d ``(total, ce, tckd, nckd)``.

    Batch means of ``dkd_rows`` and of CE(raw student logits, target); total = ce_weight · ce +
    tckd_weight · tckd + nckd_weight · nckd. Fused, one kernel each way (as ``kd_ce``).
    """
    named = {"ce_weight": ce_weight, "tckd_weight": tckd_weight, "nckd_weight": nckd_weight}
    weights = tuple(named.values())
    temps = {"temperature": temperature}
    decoded = _reference_teacher(
        impl, student, teacher, target, scale, offset, temps, eps=eps, weights=named
    )
    if decoded is not None:
        return _reference().dkd_ce(
            student, decoded, target, temperature, *weights, zscore, eps, target_checked
        )
    return _fused("dkd").dkd_ce(
        student, teacher, target, temperature, *weights, zscore, eps, scale=scale,
        offset=offset, target_checked=target_checked,
    )  # fmt: skip


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
    impl: str = "auto",
    target_checked: bool = False,
) -> torch.Tensor:
    """Per-row ATS cross-entropy ``s_tau² · -Σ_c p_ats,c · log_softmax(s / s_tau)_c``: (B,).

    ``p_ats = softmax(t / tau_c)``, tau_c = tau1 on the target class and tau2 elsewhere, one
    softmax over all classes. Temperatures that require a gradient go to the reference.
    ``target_checked`` as in ``kd_ce``.
    """
    temps = {"tau1": tau1, "tau2": tau2, "student_temperature": student_temperature}
    decoded = _reference_teacher(
        impl, student, teacher, target, scale, offset, temps, _ATS_TEMPERATURE_GRADS
    )
    if decoded is not None:
        return _reference().ats_rows(
            student, decoded, target, tau1, tau2, student_temperature, target_checked
        )
    return _fused("ats").ats_rows(
        student, teacher, target, tau1, tau2, student_temperature, scale=scale, offset=offset,
        target_checked=target_checked,
    )  # fmt: skip


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
    impl: str = "auto",
    target_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATS with its cross-entropy, as ATS trains: 0-d ``(total, ce, ats)``.

    Batch means of ``ats_rows`` and of CE(raw student logits, target); total = ce_weight · ce +
    ats_weight · ats. Fused, one kernel each way (as ``kd_ce``).
    """
    temps = {"tau1": tau1, "tau2": tau2, "student_temperature": student_temperature}
    decoded = _reference_teacher(
        impl, student, teacher, target, scale, offset, temps, _ATS_TEMPERATURE_GRADS,
        weights={"ce_weight": ce_weight, "ats_weight": ats_weight},
    )  # fmt: skip
    taus = tuple(temps.values())
    if decoded is not None:
        return _reference().ats_ce(
            student, decoded, target, *taus, ce_weight, ats_weight, target_checked
        )
    return _fused("ats").ats_ce(
        student, teacher, target, *taus, ce_weight, ats_weight, scale=scale, offset=offset,
        target_checked=target_checked,
    )  # fmt: skip
