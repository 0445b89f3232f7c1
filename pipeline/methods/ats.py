"""ATS: Li et al., "Asymmetric Temperature Scaling Makes Larger Networks Teach Well Again"
(NeurIPS 2022).

    tau_c = tau1 if c == y else tau2;   p_ats = softmax(t / tau_c)   (one softmax, all classes)
    L_ats = s_tau² · mean_b (-Σ_c p_ats,c · log_softmax(s / s_tau)_c)
    total = (1 - lamb) · CE + lamb · L_ats        defaults tau1 4, tau2 2, s_tau 1, lamb 0.5

The official code uses this cross-entropy form; ``form="kl"`` gives KL = CE - s_tau² · H(p_ats)
(same gradient, a different value; with tau1 = tau2 = s_tau = T it equals KD). The paper asks
tau1 > tau2; tau1 = tau2 is accepted too (plain KD with a separate student temperature), tau1 <
tau2 is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import MethodError
from pipeline.kernels import ats_ce, ats_rows
from pipeline.methods.base import Method, MethodContext, check_inputs, check_number
from pipeline.transforms import Temperature, asymmetric_temperature, check_temperature, squared

FORMS = ("ce", "kl")


def _check(tau1: Temperature, tau2: Temperature, student_temperature: Temperature, batch: int):
    for name, value in (
        ("tau1", tau1),
        ("tau2", tau2),
        ("student_temperature", student_temperature),
    ):
        check_temperature(name, value, batch)
    if not isinstance(tau1, torch.Tensor) and not isinstance(tau2, torch.Tensor):
        a, b = tau1, tau2
    elif any(isinstance(t, torch.Tensor) and t.is_cuda for t in (tau1, tau2)):
        # On the device, without the host sync a readable check would cost a step.
        t1, t2 = (
            t.detach().reshape(-1) if isinstance(t, torch.Tensor) else t for t in (tau1, tau2)
        )
        if all(isinstance(t, torch.Tensor) for t in (t1, t2)) and t1.device != t2.device:
            return  # the loss refuses temperatures on two devices
        torch._assert_async(
            torch.as_tensor(t1 >= t2).all(), "ATS needs tau1 >= tau2 (tau1 on the target class)"
        )
        return
    else:  # (1,) or (B,) each, compared row by row
        t1, t2 = (
            torch.as_tensor(t, dtype=torch.float64).detach().reshape(-1) for t in (tau1, tau2)
        )
        below = (t1 < t2).nonzero()
        if not len(below):
            return
        i = int(below[0, 0])
        a, b = t1[min(i, len(t1) - 1)].item(), t2[min(i, len(t2) - 1)].item()
    if a < b:
        raise MethodError(f"ATS needs tau1 >= tau2 (tau1 on the target class), got {a} < {b}")


def ats_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    tau1: Temperature = 4.0,
    tau2: Temperature = 2.0,
    student_temperature: Temperature = 1.0,
    *,
    form: str = "ce",
) -> torch.Tensor:
    """ATS distillation term, batch mean: a scalar.

    Args:
        student: (B, C) float32/float64 logits.
        teacher: (B, C) raw teacher logits.
        target: (B,) class indices.
        tau1, tau2: the teacher's temperature on the target class and on the others.
        student_temperature: s_tau, the student's own temperature.
        form: ``"ce"`` (the official value) or ``"kl"`` (CE minus the entropy of p_ats).
    """
    check_inputs(student, teacher, target)
    _check(tau1, tau2, student_temperature, student.shape[0])
    if form not in FORMS:
        raise MethodError(f"ATS form must be one of {', '.join(FORMS)}, got {form!r}")
    rows = ats_rows(student, teacher, target, tau1, tau2, student_temperature, target_checked=True)
    if form == "kl":
        # The entropy of p_ats depends on the teacher only: it changes the value, not the gradient.
        log_p = torch.log_softmax(
            asymmetric_temperature(teacher.detach().to(rows.dtype), target, tau1, tau2), dim=1
        )
        p = log_p.exp()
        entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(dim=1)  # (B,)
        rows = rows - squared(student_temperature) * entropy
    return rows.mean()


class ATS(Method):
    """ATS as a training loss: ``{"ce", "ats", "total"}``."""

    def __init__(
        self,
        *,
        tau1: float = 4.0,
        tau2: float = 2.0,
        student_temperature: float = 1.0,
        lamb: float = 0.5,
        form: str = "ce",
    ) -> None:
        """
        Args:
            tau1, tau2, student_temperature, form: as in ``ats_loss``.
            lamb: weight of the ATS term; the cross-entropy gets 1 - lamb.
        """
        super().__init__()
        _check(tau1, tau2, student_temperature, 1)
        if form not in FORMS:
            raise MethodError(f"ATS form must be one of {', '.join(FORMS)}, got {form!r}")
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.student_temperature = float(student_temperature)
        self.lamb = check_number("lamb", lamb, 0.0, high=1.0)
        self.form = form

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        temps = self.tau1, self.tau2, self.student_temperature
        if self.form == "ce":  # one call, fused on CUDA with the cross-entropy
            check_inputs(student, teacher, target)
            weights = 1 - self.lamb, self.lamb
            total, ce, ats = ats_ce(student, teacher, target, *temps, *weights, target_checked=True)
        else:  # the KL form's entropy term is computed here, beside the kernel
            ats = ats_loss(student, teacher, target, *temps, form=self.form)
            ce = F.cross_entropy(student, target)
            total = (1 - self.lamb) * ce + self.lamb * ats
        return {"ce": ce, "ats": ats, "total": total}
