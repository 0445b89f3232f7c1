"""PS-KD: Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets"
(ICCV 2021).

    alpha_t = alpha_T · (epoch + 1) / E                 epochs 0-based, alpha_T = 0.8
    q_b     = (1 - alpha_t) · onehot(y_b) + alpha_t · P_prev[i_b]
    loss    = mean_b Σ_c -q_bc · log_softmax(s_b)_c      (no temperature, no separate CE)

The teacher is the student one epoch earlier: P_prev[i] is the softmax of the student's output
the last time it trained on sample i. The ``PSKD`` module therefore takes those previous-epoch
**probabilities** where other methods take teacher logits (``teacher_input = "probabilities"``);
the training stage reads them from the self-teacher store it writes (a store like the teacher's,
instead of the official N × C matrix in RAM). At epoch 0 the targets are one-hot and the
probabilities may be ``None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import MethodError
from pipeline.methods.base import Method, MethodContext, check_inputs, check_number, check_target


def soft_targets(
    prev_probs: torch.Tensor | None,
    target: torch.Tensor,
    alpha_T: float = 0.8,
    epoch: int = 0,
    num_epochs: int = 300,
    *,
    num_classes: int | None = None,
    target_checked: bool = False,
) -> torch.Tensor:
    """PS-KD's targets q (B, C): one-hot at epoch 0, then mixed with the previous predictions.

    Args:
        prev_probs: (B, C) previous-epoch softmax outputs, or None at epoch 0.
        target: (B,) class indices.
        alpha_T: the final mixing weight (reached at the last epoch).
        epoch: 0-based epoch; num_epochs: the run's length E.
        num_classes: C when ``prev_probs`` is None.
        target_checked: the caller already checked the targets (``pskd_loss`` does, against
            the student's logits): not checked twice a training step.
    """
    alpha_T = check_number("alpha_T", alpha_T, 0.0, high=1.0)
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
        raise MethodError(f"num_epochs must be a whole number >= 1, got {num_epochs!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < num_epochs:
        raise MethodError(f"epoch must be in 0..{num_epochs - 1} (0-based), got {epoch!r}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
        raise MethodError(f"target must be a (B,) tensor of class indices, got {shape}")
    if prev_probs is None:
        if epoch != 0:
            raise MethodError("PS-KD needs the previous epoch's probabilities after epoch 0")
        if num_classes is None:
            raise MethodError("soft_targets at epoch 0 without prev_probs needs num_classes")
        classes, dtype = num_classes, torch.float32
    else:
        if prev_probs.dim() != 2 or not prev_probs.dtype.is_floating_point:
            raise MethodError(
                f"prev_probs must be float (B, C), got {prev_probs.dtype} {tuple(prev_probs.shape)}"
            )
        classes, dtype = prev_probs.shape[1], torch.promote_types(prev_probs.dtype, torch.float32)
        if not prev_probs.is_cuda:  # on CUDA this would cost a host sync a step
            _check_probabilities(prev_probs)
    if not target_checked:
        batch = target.shape[0] if prev_probs is None else prev_probs.shape[0]
        check_target(target, batch, classes)
    onehot = F.one_hot(target.long(), classes).to(dtype)  # (B, C)
    if epoch == 0 or prev_probs is None:
        return onehot  # the official code stores one-hot rows as the epoch-0 "predictions"
    alpha_t = alpha_T * (epoch + 1) / num_epochs
    return (1 - alpha_t) * onehot + alpha_t * prev_probs.detach().to(dtype)


def _check_probabilities(probs: torch.Tensor) -> None:
    """Rows >= 0 summing to 1 (within the rounding of their dtype), else a one-line error."""
    p = probs.detach().double()
    tol = max(1e-3, 8 * torch.finfo(probs.dtype).eps * probs.shape[1] ** 0.5)
    rows = zip(p.amin(dim=1).tolist(), p.sum(dim=1).tolist())  # on the CPU: cheap
    for row, (low, total) in enumerate(rows):
        if not (low >= 0 and abs(total - 1) <= tol):  # NaN rows fail too
            raise MethodError(
                f"prev_probs must hold probabilities (rows >= 0 summing to 1), but row {row} "
                f"sums to {total:.6g} (min {low:.6g}): pass softmax of the previous epoch's logits"
            )


def pskd_loss(
    student: torch.Tensor,
    prev_probs: torch.Tensor | None,
    target: torch.Tensor,
    alpha_T: float = 0.8,
    epoch: int = 0,
    num_epochs: int = 300,
) -> torch.Tensor:
    """Cross-entropy of the student against ``soft_targets``, batch mean: a scalar."""
    if prev_probs is None:
        check_inputs(student, student, target)
    else:
        check_inputs(student, prev_probs, target, teacher_name="prev_probs")
    q = soft_targets(
        prev_probs, target, alpha_T, epoch, num_epochs, num_classes=student.shape[1],
        target_checked=True,
    )  # (B, C)  # fmt: skip
    return -(q.to(student.dtype) * F.log_softmax(student, dim=1)).sum(dim=1).mean()


class PSKD(Method):
    """PS-KD as a training loss: ``{"pskd", "total"}``; the second argument is P_prev (B, C)."""

    teacher_input = "probabilities"

    def __init__(self, *, alpha_T: float = 0.8) -> None:
        super().__init__()
        self.alpha_T = check_number("alpha_T", alpha_T, 0.0, high=1.0)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        target: torch.Tensor,
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        loss = pskd_loss(student, teacher, target, self.alpha_T, ctx.epoch, ctx.num_epochs)
        return {"pskd": loss, "total": loss}
